"""int8 group-wise weight format and rounding (pure tensor math).

Format (Q-GaLore / Q-APOLLO, group size 128):
    codes  uint8 (out, in)              the weight, 256 levels per group
    scale  (out*in/g,) fp32             one step size per group of g consecutive elements of the
                                        row-major matrix (a group may run on into the next row when
                                        the input size is not a multiple of g, e.g. 1376 or 5461)
    zero   uint8 (out*in/g,)            integer zero point per group
    w = (code - zero) * scale

Every requantization recomputes scale/zero from the group's min/max, with 0 always inside the range:
a single-signed group otherwise gets its zero point clamped and its extremes clipped (the bug unsloth
PR #10841 found in a Q-GaLore port). The arithmetic runs in fp32: in bf16 most updates smaller than a
quantization step are lost before rounding sees them (reference_algorithms.md §3.4).
"""
from __future__ import annotations

import math

import torch

_MIN_SCALE = 1e-8
# Scales are kept in fp32 (4 bytes per 128 weights, 0.19 GiB at 7B): requantizing dequantized values
# then reproduces codes and zero exactly and the scale up to fp32 rounding. A bf16 scale cannot do that
# (the group's codes no longer span 0..255, so each requantization shrinks or grows the grid), which
# turns every update into extra rounding noise. `scale_dtype` stays a parameter for experiments.
_SCALE_TOL = 1e-6  # relative scale changes below this are fp32 noise, not an update


def group_view(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """(out, in) → (out*in/g, g): groups of g consecutive elements in row-major order."""
    if t.numel() % group_size:
        raise ValueError(f"a {tuple(t.shape)} tensor does not split into groups of {group_size}")
    return t.reshape(-1, group_size)


def compute_scale_zero(wg: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group asymmetric scale (rounded to its storage dtype) and uint8 zero point; wg is (G, g) fp32."""
    lo = wg.amin(dim=1).clamp(max=0.0)
    hi = wg.amax(dim=1).clamp(min=0.0)
    scale = ((hi - lo) / 255.0).clamp(min=_MIN_SCALE)
    scale = scale.to(scale_dtype)
    s = scale.float()
    zero = torch.round(-lo / s).clamp(0, 255)
    return scale, zero.to(torch.uint8)


def round_codes(r: torch.Tensor, stochastic: bool, generator: torch.Generator | None) -> torch.Tensor:
    """Round real-valued codes: stochastic floor(r + u), u ~ U[0,1) (unbiased: E = r), or to nearest."""
    if stochastic:
        u = torch.rand(r.shape, generator=generator, device=r.device, dtype=torch.float32)
        return torch.floor(r.add_(u))
    return torch.round(r)


def quantize_groups(wg: torch.Tensor, scale_dtype: torch.dtype, stochastic: bool = False,
                    generator: torch.Generator | None = None):
    """Quantize fp32 groups (G, g) → (codes uint8 (G, g), scale (G,), zero uint8 (G,))."""
    scale, zero = compute_scale_zero(wg, scale_dtype)
    r = wg / scale.float()[:, None] + zero.float()[:, None]
    codes = round_codes(r, stochastic, generator).clamp_(0, 255).to(torch.uint8)
    return codes, scale, zero


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(G, g) uint8 codes → (G, g) values in `dtype` (math in fp32, then cast)."""
    w = (codes.float() - zero.float()[:, None]) * scale.float()[:, None]
    return w.to(dtype)


def quantize(w: torch.Tensor, group_size: int, scale_dtype: torch.dtype = torch.float32,
             stochastic: bool = False, generator: torch.Generator | None = None):
    """Quantize an (out, in) float matrix. Returns codes (out, in) uint8, scale (G,), zero (G,) uint8."""
    wg = group_view(w.float(), group_size)
    codes, scale, zero = quantize_groups(wg, scale_dtype, stochastic, generator)
    return codes.reshape(w.shape), scale, zero


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return dequantize_groups(group_view(codes, group_size), scale, zero, dtype).reshape(codes.shape)


def rows_per_chunk(shape: tuple[int, int], group_size: int = 1, max_elems: int = 1 << 22) -> int:
    """Rows of an (out, in) matrix processed at once, so fp32 transients stay ≤ max_elems (16 MB).

    A multiple of g / gcd(in, g) rows, so every chunk holds whole groups."""
    unit = group_size // math.gcd(shape[1], group_size)
    rows = max(unit, (max_elems // max(1, shape[1])) // unit * unit)
    return min(shape[0], rows)


def row_chunks(shape: tuple[int, int], group_size: int, max_elems: int = 1 << 22):
    """(row slice, group slice) pairs covering an (out, in) matrix in whole groups."""
    step = rows_per_chunk(shape, group_size, max_elems)
    for r0 in range(0, shape[0], step):
        r1 = min(shape[0], r0 + step)
        yield slice(r0, r1), slice(r0 * shape[1] // group_size, r1 * shape[1] // group_size)


def dequantize_chunked(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                       dtype: torch.dtype, max_elems: int = 1 << 22) -> torch.Tensor:
    """dequantize() into a `dtype` tensor chunk by chunk: the fp32 intermediates of the whole matrix
    (8 bytes per weight) never exist, only the output (2 bytes per weight in bf16)."""
    if dtype == torch.float32:
        return dequantize(codes, scale, zero, group_size)
    out = torch.empty(codes.shape, dtype=dtype, device=codes.device)
    for rows, gs in row_chunks(tuple(codes.shape), group_size, max_elems):
        out[rows] = dequantize(codes[rows], scale[gs], zero[gs], group_size, dtype)
    return out


@torch.no_grad()
def update_quantized_(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                      delta_fn, stochastic: bool, generator: torch.Generator | None,
                      count_changes: bool = False, max_elems: int = 1 << 22,
                      keep: torch.Tensor | None = None) -> int:
    """In place: W ← requant(dequant(W) + delta_fn(rows, W_rows)), row chunk by row chunk.

    delta_fn(row_slice, w_rows_fp32) returns the fp32 change of those rows. Chunking keeps the fp32
    transient small (the largest 7B matrix would be 180 MB at once). With count_changes, returns how
    many codes, scales or zero points changed (the startup guard's proof that the write happened; it
    costs a device sync, so it is off in the steady state); else 0. `keep`, a 0-d bool tensor on the
    device, keeps the old codes/scales/zeros bit for bit where True (a non-finite gradient: even a zero
    update would requantize) without a host sync.
    """
    changed = torch.zeros((), dtype=torch.int64, device=codes.device)
    for rows, gs in row_chunks(tuple(codes.shape), group_size, max_elems):
        c = codes[rows]
        w = dequantize(c, scale[gs], zero[gs], group_size)
        w += delta_fn(rows, w)
        nc, ns, nz = quantize(w, group_size, scale.dtype, stochastic, generator)
        if keep is not None:
            nc, ns, nz = torch.where(keep, c, nc), torch.where(keep, scale[gs], ns), torch.where(keep, zero[gs], nz)
        if count_changes:
            moved = (ns.float() - scale[gs].float()).abs() > _SCALE_TOL * scale[gs].float()
            changed += (nc != c).sum() + moved.sum() + (nz != zero[gs]).sum()
        c.copy_(nc)
        scale[gs] = ns
        zero[gs] = nz
    return int(changed) if count_changes else 0
