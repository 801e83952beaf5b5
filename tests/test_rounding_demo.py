"""Why stochastic rounding: updates smaller than half an int8 step vanish under round-to-nearest,
while stochastic rounding follows the float trajectory in expectation."""
import torch

from qapollo import quant


def run(stochastic: bool, steps: int = 60, frac: float = 0.1):
    torch.manual_seed(0)
    w0 = torch.randn(256, 128) * 0.02
    c, s, z = quant.quantize(w0, 128)
    start = quant.dequantize(c, s, z, 128)
    step_size = s.mean().item()
    delta = frac * step_size  # a tenth of a quantization step per update
    # A sign pattern so that the group ranges stay put: half the elements go up, half down.
    sign = torch.where(torch.arange(128) % 2 == 0, 1.0, -1.0).expand(256, 128)
    for step in range(steps):
        quant.update_quantized_(c, s, z, 128, sign, torch.tensor(delta), stochastic=stochastic, seed=step)
    end = quant.dequantize(c, s, z, 128)
    moved = ((end - start) * sign).mean().item()  # realised movement along the update direction
    return moved, steps * delta, step_size


def test_round_to_nearest_loses_small_updates():
    moved, intended, _ = run(stochastic=False)
    assert intended > 0
    assert abs(moved) < 0.02 * intended  # nothing moved: every update rounded back


def test_stochastic_rounding_tracks_float_trajectory():
    moved, intended, step = run(stochastic=True)
    # 6 quantization steps intended; the mean over 32k weights lands within a few percent
    assert abs(moved - intended) < 0.05 * intended, (moved, intended)
