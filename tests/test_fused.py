"""The compiled (fused) int8 kernels against the eager reference: identical codes, scales and zero
points; the same noise; no matrix-sized buffers; inside a real backward, on another thread, with
activation checkpointing. Shapes are small, with the 7B matrices' aspect ratios, few distinct ones
(each compiles once, a few seconds on the CPU)."""
import re
import threading

import pytest
import torch

from qapollo import fused, quant
from qapollo.layerwise import LayerwiseOptimizer
from qapollo.model import build_model, enable_activation_checkpointing, int8_modules
from tests.helpers import tiny_config

pytestmark = pytest.mark.skipif(fused.unavailable_reason("cpu") is not None,
                                reason=f"torch.compile unavailable: {fused.unavailable_reason('cpu')}")

# (out, in): 1:1 (q/k/v/o 4096²), 2.69:1 and 1:2.69 (gate/up 11008×4096, down 4096×11008) with an
# input size that is not a multiple of 128 (groups span rows, like 1376 or 5461), odd row counts.
SHAPES = [(128, 128), (172, 64), (64, 172), (43, 128), (128, 171)]


def make(shape, seed=0, grad_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    w[0, :5] = 0.0  # exact zeros, and a single-signed group below
    w.view(-1)[128:256] = w.view(-1)[128:256].abs()
    grad = (torch.randn(shape, generator=g) * 0.5).to(grad_dtype)
    return quant.quantize(w, 128), grad


def both(shape, coef, decay=None, stochastic=True, seed=1234, grad_dtype=torch.float32, max_elems=300):
    """(reference, fused) (codes, scale, zero) after one update of the same matrix."""
    (c, s, z), grad = make(shape, grad_dtype=grad_dtype)
    ref, fus = (c.clone(), s.clone(), z.clone()), (c.clone(), s.clone(), z.clone())
    # small row chunks in the reference: chunking must not change the result either
    n_ref = quant.update_quantized_(*ref, 128, grad, coef, decay, stochastic=stochastic, seed=seed,
                                    count_changes=True, max_elems=max_elems)
    n_fus = fused.update_quantized_(*fus, 128, grad, coef, decay, stochastic=stochastic, seed=seed,
                                    count_changes=True)
    assert n_ref == n_fus > 0
    return ref, fus


def assert_identical(ref, fus):
    diff = [int((a != b).sum()) for a, b in zip(ref, fus)]
    assert diff == [0, 0, 0], f"codes/scales/zeros differing: {diff} of {[a.numel() for a in ref]}"


@pytest.mark.parametrize("shape", SHAPES)
def test_stochastic_update_identical(shape):
    ref, fus = both(shape, torch.tensor(-4e-3))
    assert_identical(ref, fus)


@pytest.mark.parametrize("shape", [(172, 64), (43, 128)])
def test_round_to_nearest_update_identical(shape):
    ref, fus = both(shape, torch.tensor(-4e-3), stochastic=False)
    assert_identical(ref, fus)


@pytest.mark.parametrize("side", ["rows", "cols"])
def test_channel_wise_coef_and_weight_decay_identical(side):
    shape = (64, 172)
    coef = -1e-2 * torch.rand(shape[0] if side == "rows" else shape[1], generator=torch.Generator().manual_seed(3))
    coef = coef[:, None] if side == "rows" else coef[None, :]
    ref, fus = both(shape, coef, decay=torch.tensor(1 - 0.01 * 0.1))
    assert_identical(ref, fus)


@pytest.mark.parametrize("keep", [True, False])
def test_keep_flag_identical(keep):
    """keep (a non-finite gradient's device flag) returns the old codes, scales and zeros untouched."""
    (c, s, z), grad = make((172, 64))
    if keep:
        grad[3, 5] = float("nan")
    outs = []
    for fn in (quant.update_quantized_, fused.update_quantized_):
        t = [c.clone(), s.clone(), z.clone()]
        fn(*t, 128, grad, torch.tensor(0.0 if keep else -4e-3), stochastic=True, seed=9, keep=torch.tensor(keep))
        outs.append(t)
    assert_identical(*outs)
    assert all(torch.equal(a, b) for a, b in zip(outs[1], (c, s, z))) == keep


def test_bf16_gradient_identical():
    ref, fus = both((172, 64), torch.tensor(-4e-3), grad_dtype=torch.bfloat16)
    assert_identical(ref, fus)


@pytest.mark.parametrize("shape,dtype", [((172, 64), torch.bfloat16), ((64, 172), torch.bfloat16),
                                         ((128, 171), torch.float32)])
def test_dequantize_identical(shape, dtype):
    (c, s, z), _ = make(shape)
    assert torch.equal(fused.dequantize(c, s, z, 128, dtype), quant.dequantize_chunked(c, s, z, 128, dtype, 300))


def test_noise_is_counter_based_and_uniform():
    u = quant.sr_bits((1 << 20,), 987654321, "cpu").double() * 2.0 ** -32
    assert 0.0 <= u.min() and u.max() < 1.0
    # any block of the stream is the same noise as the whole stream's slice (chunking-independent)
    assert torch.equal(quant.sr_bits((1000,), 987654321 + 5000, "cpu").double() * 2.0 ** -32, u[5000:6000])
    assert abs(u.mean().item() - 0.5) < 2e-3 and abs(u.var().item() - 1 / 12) < 1e-3
    hist = torch.histc(u, bins=64, min=0, max=1)
    chi2 = (((hist - u.numel() / 64) ** 2) / (u.numel() / 64)).sum().item()
    assert chi2 < 120  # 63 degrees of freedom: p ≈ 1e-5
    # neighbours and other keys are uncorrelated
    assert abs(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1].item()) < 5e-3
    v = quant.sr_bits((1 << 20,), 123, "cpu").double() * 2.0 ** -32
    assert abs(torch.corrcoef(torch.stack([u, v]))[0, 1].item()) < 5e-3


def test_update_allocates_no_matrix_sized_buffer():
    """Inductor recomputes the code-unit weights in the reduction and in the rounding instead of storing
    them (fused._inductor_options, two kernels): the generated code allocates only per-group buffers."""
    from torch._inductor.utils import run_and_get_code
    shape = (172, 64)
    (c, s, z), grad = make(shape)
    torch._dynamo.reset()  # generate the code here, not from the cache of an earlier test
    _, codes = run_and_get_code(fused._update_inplace, c, s, z, grad, torch.tensor(-1e-3), None, torch.tensor(7),
                                128, True, torch.tensor(False))
    assert len(codes) == 2, "expected the grid and the rounding kernels"
    sizes = []
    for code in codes:
        call = code[code.index("def call("):]
        sizes += [eval(m) for m in re.findall(r"empty_strided_\w+\((\([^)]*\))", call)]
    assert sizes, "no buffer allocations found: has the generated code's format changed?"
    assert all(torch.Size(sz).numel() <= c.numel() // 128 for sz in sizes), sizes


def train(cfg, fused_on: bool, steps=3, ckpt=False, in_thread=False, device="cpu"):
    cfg.model.fused_update = fused_on
    model = build_model(cfg.model, device, seed=0)
    assert all(m.fused == fused_on for _, m in int8_modules(model))
    if ckpt:
        enable_activation_checkpointing(model)
    model.train()
    opt = LayerwiseOptimizer(model, cfg.optim, max_steps=10, seed=0, stochastic_round=True)
    g = torch.Generator().manual_seed(1)
    losses = []

    def run():
        for i in range(steps):
            x = torch.randint(0, cfg.model.vocab_size, (2, 16), generator=g).to(device)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                opt.begin_step(check=i == 0)  # step 1 runs the startup guard (counts the changes)
                loss = model(input_ids=x, labels=x).loss
                loss.backward()  # the int8 updates run inside this backward
                opt.after_backward()
                opt.end_step(check=i == 0)
            losses.append(loss.item())
        # the compiled code really ran (no silent eager fallback): per matrix one update (two kernels:
        # grid and rounding) and a dequantize in the forward, the recomputation (checkpointing) and grad_input
        calls = sum(e.name.startswith("Torch-Compiled Region") for e in prof.events())
        n = len(int8_modules(model))
        assert calls == (n * (5 if ckpt else 4) if fused_on else 0), calls

    if in_thread:  # like CUDA's autograd device thread: compiled code called off the main thread
        errors = []
        t = threading.Thread(target=lambda: errors.append(None) if run() is None else None)
        t.start()
        t.join()
        assert errors == [None]
    else:
        run()
    return losses, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("ckpt,in_thread", [(False, False), (True, True)])
def test_training_inside_backward_identical(ckpt, in_thread):
    """A real backward of a tiny model: the compiled dequantize (forward, checkpoint recomputation,
    grad_input) and update (in the backward hook) give bit-identical losses and weights."""
    cfg = tiny_config(model__hidden_size=64, model__intermediate_size=172, model__num_attention_heads=4)
    l_ref, s_ref = train(cfg, False, ckpt=ckpt)
    l_fus, s_fus = train(cfg, True, ckpt=ckpt, in_thread=in_thread)
    assert l_ref == l_fus
    for k in s_ref:
        assert torch.equal(s_ref[k], s_fus[k]), k


def test_resolve_and_error(monkeypatch):
    assert fused.resolve("auto", "cpu") is False  # the eager reference on CPU
    assert fused.resolve(True, "cpu") is True and fused.resolve(False, "cpu") is False
    monkeypatch.setattr(fused.shutil, "which", lambda name: None)
    with pytest.raises(fused.FusedUnavailable, match="model.fused_update=true .* no C\\+\\+ compiler"):
        fused.resolve(True, "cpu")
    assert fused.resolve("auto", "cpu") is False


cuda_fused = pytest.mark.skipif(not torch.cuda.is_available() or fused.unavailable_reason("cuda") is not None,
                                reason="needs CUDA and Triton")


@cuda_fused
@pytest.mark.parametrize("shape", SHAPES + [(4096, 4096), (11008, 4096), (4096, 11008)])
@pytest.mark.parametrize("stochastic", [True, False])
def test_cuda_update_matches_cpu_reference(shape, stochastic):
    """On the GPU: the Triton kernel, the eager CUDA reference and the CPU reference, from the same
    codes, bf16 gradient and key. Prints how many codes/scales/zeros differ (float-tie flips, if any)."""
    (c, s, z), grad = make(shape, grad_dtype=torch.bfloat16)
    coef, key = torch.tensor(-4e-3), 0x5EED5EED
    outs = {}
    for name, dev, fn in (("cpu_ref", "cpu", quant.update_quantized_), ("cuda_ref", "cuda", quant.update_quantized_),
                          ("cuda_fused", "cuda", fused.update_quantized_)):
        t = [x.clone().to(dev) for x in (c, s, z)]
        fn(*t, 128, grad.to(dev), coef.to(dev), stochastic=stochastic, seed=key)
        outs[name] = [x.cpu() for x in t]
    ref = outs["cpu_ref"]
    for name in ("cuda_ref", "cuda_fused"):
        diff = [int((a != b).sum()) for a, b in zip(ref, outs[name])]
        print(f"\n{shape} stochastic={stochastic} {name} vs cpu_ref: codes/scales/zeros differing {diff} "
              f"of {[a.numel() for a in ref]}")
        # a tie flip moves one code by one step; it may not happen in more than 1 of 10^5 weights
        assert (outs[name][0].int() - ref[0].int()).abs().max() <= 1
        assert diff[0] <= max(1, ref[0].numel() // 100_000) and diff[1] == diff[2] == 0, diff


@cuda_fused
@pytest.mark.parametrize("shape", [(172, 64), (4096, 11008)])
def test_cuda_dequantize_matches_cpu(shape):
    (c, s, z), _ = make(shape)
    ref = quant.dequantize(c, s, z, 128, torch.bfloat16)
    got = fused.dequantize(c.cuda(), s.cuda(), z.cuda(), 128, torch.bfloat16).cpu()
    assert torch.equal(got, ref)


@cuda_fused
def test_cuda_training_inside_backward_identical():
    """On the GPU the int8 updates run on autograd's device thread: compiled there, same weights."""
    cfg = tiny_config(model__hidden_size=64, model__intermediate_size=172, model__num_attention_heads=4)
    l_ref, s_ref = train(cfg, False, ckpt=True, device="cuda")
    l_fus, s_fus = train(cfg, True, ckpt=True, device="cuda")
    assert l_ref == l_fus
    for k in s_ref:
        assert torch.equal(s_ref[k], s_fus[k]), k


def test_a_failing_compile_falls_back_to_the_eager_path(monkeypatch, capsys):
    """The compiled path has never run on a GPU: when compiling (or the first call of what it built) raises,
    the run says so in one line and goes on with the eager update and dequantize, with the same numbers."""
    def broken(fn):
        def call(*args, **kwargs):
            raise RuntimeError("simulated Inductor failure\nsecond line of its report")
        return call
    monkeypatch.setattr(fused, "_compiled", broken)
    monkeypatch.setattr(fused, "_given_up", [])
    monkeypatch.setattr(fused, "_proven", set())
    cfg = tiny_config(model__hidden_size=64, model__intermediate_size=172, model__num_attention_heads=4)
    results = {}
    for fused_on in (False, True):
        cfg.model.fused_update = fused_on
        model = build_model(cfg.model, "cpu", seed=0)
        assert all(m.fused == fused_on for _, m in int8_modules(model))
        model.train()
        opt = LayerwiseOptimizer(model, cfg.optim, max_steps=10, seed=0, stochastic_round=True)
        g = torch.Generator().manual_seed(1)
        losses = []
        for i in range(3):
            x = torch.randint(0, cfg.model.vocab_size, (2, 16), generator=g)
            opt.begin_step(check=i == 0)
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.after_backward()
            opt.end_step(check=i == 0)
            losses.append(loss.item())
        results[fused_on] = losses, {k: v.clone() for k, v in model.state_dict().items()}
    assert results[True][0] == results[False][0]
    assert all(torch.equal(results[True][1][k], v) for k, v in results[False][1].items())
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "compiled int8 kernels failed" in ln]
    assert len(lines) == 1 and "RuntimeError: simulated Inductor failure)" in lines[0], err
