"""int8 group format: round trip, unbiased stochastic rounding, chunked in-place update."""
import math

import torch

from qapollo import quant

ONE = torch.tensor(1.0)  # coef: the gradient argument is the update itself


def test_round_trip_within_half_step():
    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.02
    for sd in (torch.float32, torch.bfloat16):
        codes, scale, zero = quant.quantize(w, 128, sd)
        assert codes.dtype == torch.uint8 and zero.dtype == torch.uint8 and scale.dtype == sd
        back = quant.dequantize(codes, scale, zero, 128)
        step = scale.float().repeat_interleave(128).reshape(w.shape)
        # half a step, plus half a step at a group's extreme where a bf16 scale rounded down clips it
        assert ((back - w).abs() <= (0.5 if sd == torch.float32 else 1.0) * step + 1e-7).all()
        assert ((back - w).abs() <= 0.5 * step + 1e-7).float().mean() > 0.99


def test_single_signed_group_is_not_clipped():
    w = torch.rand(2, 128) + 1.0  # all positive: 0 must stay representable and max must not clip
    codes, scale, zero = quant.quantize(w, 128)
    back = quant.dequantize(codes, scale, zero, 128)
    assert (back - w).abs().max() <= 0.5 * scale.max() + 1e-6
    assert (zero == 0).all()


def test_stochastic_rounding_unbiased_and_rtn_biased():
    r = torch.full((200_000,), 3.3)
    sr = quant.round_codes(r.clone(), True, noise_start=12345)
    assert set(sr.unique().tolist()) == {3.0, 4.0}
    assert abs(sr.mean().item() - 3.3) < 0.01
    rtn = quant.round_codes(r.clone(), False)
    assert rtn.mean().item() == 3.0  # round-to-nearest is biased for values between codes


# fp32 codes where floor(r + u) was biased (r >= 1: r + u is rounded to fp32 first), small ones, and
# values with every fraction bit set
CODES = [0.3, 64.5, 200.25, 254.0, 1.0, 127.99998, 255.99998, 0.5 + 2 ** -24, 0.1, 3 * 2 ** -9, 2 ** -9,
         1 - 2 ** -24, 0.0]


def test_exact_mean_over_the_whole_noise_range():
    """round(r) = floor(r) + (bits < t) with bits uniform on [0, 2^32): over the noise's full range the mean is
    floor(r) + t / 2^32 exactly. That it equals r (< 1e-9) is the unbiasedness; that round_codes is that
    threshold function is checked on the bits that decide it (t-1, t, t+1, the range's ends) and on random ones."""
    r = torch.tensor(CODES, dtype=torch.float32)
    lo, t = quant.sr_threshold(r.clone())
    exact_mean = lo.double() + t.double() / 2 ** 32
    assert (exact_mean - r.double()).abs().max().item() < 1e-9
    # round_codes with given noise bits, through the same code path (sr_bits patched to hand them over)
    gen = torch.Generator().manual_seed(0)
    probe = torch.cat([torch.randint(0, 2 ** 32, (4096,), generator=gen)])
    for v, tv in zip(CODES, t.tolist()):
        bits = torch.cat([probe, torch.tensor([0, 2 ** 32 - 1, tv - 1, tv, tv + 1])]).clamp(0, 2 ** 32 - 1)
        got = _round_with_bits(torch.full(bits.shape, v), bits)
        want = math.floor(v) + (bits < tv).float()
        assert torch.equal(got, want), v


def _round_with_bits(r, bits):
    real = quant.sr_bits
    quant.sr_bits = lambda shape, start, device: bits.reshape(shape)
    try:
        return quant.round_codes(r, True)
    finally:
        quant.sr_bits = real


def test_noise_bits_are_a_permutation_of_the_counter():
    """The exact mean needs every 32-bit value equally often over a period: the hash must be a bijection.
    No collision among 2^22 consecutive counters (a birthday collision of a non-injective map would show)."""
    b = quant.sr_bits((1 << 22,), 2 ** 31 + 12345, "cpu")
    assert b.min() >= 0 and b.max() < 2 ** 32
    assert b.unique().numel() == b.numel()


def test_zero_updates_do_not_drift():
    """1,000 zero updates with stochastic rounding on a 256×1024 int8 matrix: every code is an integer, so an
    unbiased rounding of an exact integer never moves one (floor(r + u) moved 1,414 up and 9 down)."""
    torch.manual_seed(0)
    c, s, z = quant.quantize(torch.randn(256, 1024) * 0.02, 128)
    start = c.clone()
    zero = torch.zeros(256, 1024)
    for step in range(1000):
        quant.update_quantized_(c, s, z, 128, zero, ONE, stochastic=True, seed=step * 7919)
    moved = c.int() - start.int()
    up, down = int((moved > 0).sum()), int((moved < 0).sum())
    assert up <= down, (up, down)
    assert up == 0 and down == 0, (up, down)  # the update runs in code units: an unchanged code is exact


def test_update_quantized_chunked_matches_whole():
    torch.manual_seed(0)
    w = torch.randn(40, 256) * 0.02
    upd = torch.randn(40, 256) * 1e-3
    c0, s0, z0 = quant.quantize(w, 128)
    target = quant.dequantize(c0, s0, z0, 128) + upd
    res = []
    for max_elems in (256 * 3, 1 << 22):  # several row chunks vs one
        c, s, z = quant.quantize(w, 128)
        n = quant.update_quantized_(c, s, z, 128, upd, ONE, stochastic=False, count_changes=True,
                                    max_elems=max_elems)
        assert n > 0
        res.append(quant.dequantize(c, s, z, 128))
    assert torch.equal(res[0], res[1])
    step = s.float().repeat_interleave(128).reshape(w.shape)  # the grid the update rounded on
    assert ((res[0] - target).abs() <= 0.5 * step + 1e-7).all()


def test_update_quantized_stochastic_is_seeded():
    torch.manual_seed(0)
    w = torch.randn(8, 128) * 0.02
    outs = []
    for seed in (7, 7, 8):
        c, s, z = quant.quantize(w, 128)
        quant.update_quantized_(c, s, z, 128, torch.full_like(w, 1e-5), ONE, stochastic=True, seed=seed)
        outs.append(c.clone())
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


def test_requantization_is_idempotent():
    """dequant → requant with no update changes nothing (no creeping scale, no drift)."""
    torch.manual_seed(0)
    w = torch.randn(32, 256) * 0.02
    for sd in (torch.float32,):
        c, s, z = quant.quantize(w, 128, sd)
        c0, s0, z0 = c.clone(), s.clone(), z.clone()
        for _ in range(5):
            n = quant.update_quantized_(c, s, z, 128, torch.zeros_like(w), ONE, stochastic=False,
                                        count_changes=True)
            assert n == 0
        assert torch.equal(c, c0) and torch.equal(z, z0)
        assert torch.allclose(s.float(), s0.float(), rtol=1e-6, atol=0)


def test_groups_may_span_rows():
    """Paper shapes such as 512x1376 (60M down_proj) have rows that are not a multiple of 128."""
    torch.manual_seed(0)
    w = torch.randn(32, 48) * 0.02  # 1536 elements = 12 groups of 128, each spanning 8/3 rows
    c0, s0, z0 = quant.quantize(w, 128)
    back = quant.dequantize(c0, s0, z0, 128)
    assert (back - w).abs().max() <= 0.5 * s0.max() + 1e-7
    assert quant.rows_per_chunk((32, 48), 128, max_elems=100) == 8  # whole groups per chunk
    upd = torch.randn(32, 48) * 1e-3
    res = []
    for max_elems in (100, 1 << 22):
        c, s, z = c0.clone(), s0.clone(), z0.clone()
        quant.update_quantized_(c, s, z, 128, upd, ONE, stochastic=False, max_elems=max_elems)
        res.append(quant.dequantize(c, s, z, 128))
    assert torch.equal(res[0], res[1])
    bf = quant.dequantize_chunked(c0, s0, z0, 128, torch.bfloat16, max_elems=100)
    assert torch.equal(bf, back.to(torch.bfloat16))


def test_update_is_unbiased_at_the_groups_extremes():
    """E[dequant(update(W))] = W + ΔW for every weight, the group's min and max included: the new grid holds
    the updated extremes, so no rounding is clamped (a (max-min)/255 grid with a rounded zero point put them
    up to half a code outside [0, 255] and pulled them inward). 4,096 copies of one group, each with its own
    rounding noise: the mean of each weight within 5 standard errors of its target."""
    torch.manual_seed(1)
    base = torch.randn(1, 128) * 0.02
    base[0, 7], base[0, 90] = 0.061, -0.047  # outliers: the extremes
    c, s, z = quant.quantize(base.expand(4096, 128).contiguous(), 128)
    w0 = quant.dequantize(c, s, z, 128)
    delta = (torch.randn(1, 128) * 0.4 * s[0]).repeat(4096, 1)  # below a step: what rounding must carry
    delta[:, 7], delta[:, 90] = 0.45 * s[0], -0.35 * s[0]  # the extremes grow: off the old grid
    quant.update_quantized_(c, s, z, 128, delta.contiguous(), ONE, stochastic=True, seed=99)
    w1 = quant.dequantize(c, s, z, 128)
    err = ((w1 - (w0 + delta)) / s[:, None]).mean(0)  # in steps of the new grid (one per row)
    se = 0.5 / 4096 ** 0.5  # a Bernoulli rounding has std <= half a step
    assert err.abs().max() < 5 * se, (err[7].item(), err[90].item(), err.abs().max().item())


# fp32 values for the bf16 / fp16 rounding: between grid points, exact grid points, negative, tiny, with
# every dropped bit set
FLOATS = [0.05123, -0.05123, 1.0001, -3.3e-3, 1.0, 0.0, 2.0 ** -130, -(1 + 2.0 ** -8 - 2.0 ** -23), 65000.5, 1e-7]


def test_bf16_rounding_is_exactly_unbiased_over_the_whole_noise_range(monkeypatch):
    """round_float to bf16 adds 16 noise bits under the kept half and truncates: over all 2^16 noise values
    the mean is x exactly, and only the two bf16 neighbours of x (or x itself when it is on the grid) occur."""
    bits = torch.arange(1 << 16, dtype=torch.int64) * 0x10001  # every low half once (the high half is ignored)
    for v in FLOATS:
        x = torch.full((1 << 16,), v, dtype=torch.float32)
        monkeypatch.setattr(quant, "sr_bits", lambda shape, start, device: bits.reshape(shape).clone())
        got = quant.round_float(x, torch.bfloat16)
        assert got.double().mean().item() == x[0].double().item(), v
        assert got.unique().numel() == (1 if x[0].to(torch.bfloat16).float() == x[0] else 2), v


def test_fp16_rounding_unbiased():
    """fp16 takes the other neighbour with probability |x − nearest| / ulp (a 32-bit threshold)."""
    for v in FLOATS[:6]:
        x = torch.full((400_000,), v)
        got = quant.round_float(x, torch.float16, noise_start=99)
        vals = got.unique()
        assert vals.numel() <= 2 and got.dtype == torch.float16
        if vals.numel() == 2:
            ulp = (vals[1].double() - vals[0].double()).abs().item()
            p = abs(v - vals[0].item()) / ulp
            assert abs(got.double().mean().item() - v) < 5 * ulp * (p * (1 - p) / 400_000) ** 0.5 + 1e-12, v
        else:
            assert vals.item() == torch.tensor(v).half().item()

