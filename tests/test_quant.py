"""int8 group format: round trip, unbiased stochastic rounding, chunked in-place update."""
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
    c, s, z = quant.quantize(res[0], 128)
    assert (res[0] - target).abs().max() <= 0.5 * s.float().max() + 1e-7


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
