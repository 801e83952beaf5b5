"""int8 group-wise weight format and rounding (pure tensor math).

Format (Q-GaLore / Q-APOLLO, group size 128):
    codes  uint8 (out, in)              the weight, 256 levels per group
    scale  (out*in/g,) fp32             one step size per group of g consecutive elements of the
                                        row-major matrix (a group may run on into the next row when
                                        the input size is not a multiple of g, e.g. 1376 or 5461)
    zero   uint8 (out*in/g,)            integer zero point per group
    w = (code - zero) * scale

Every requantization recomputes scale/zero from the group's min/max, with 0 always inside the range
(a single-signed group otherwise gets its zero point clamped and its extremes clipped: the bug unsloth
PR #10841 found in a Q-GaLore port) and both extremes on the grid (compute_scale_zero), so rounding is
never clamped. The arithmetic runs in fp32: in bf16 most updates smaller than a
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


def _step_for_zero(lo: torch.Tensor, hi: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The smallest step whose grid with integer zero point z holds both lo <= 0 and hi >= 0 (inf: none)."""
    inf = torch.full_like(lo, float("inf"))
    below = torch.where(lo < 0, torch.where(z > 0, -lo / z, inf), torch.zeros_like(lo))
    above = torch.where(hi > 0, torch.where(z < 255, hi / (255.0 - z), inf), torch.zeros_like(hi))
    return torch.maximum(below, above)


def smallest_grid(lo: torch.Tensor, hi: torch.Tensor, min_step) -> tuple[torch.Tensor, torch.Tensor]:
    """(step, zero) fp32 per group: the finest uint8 grid, w = (code - zero)·step with integer zero, that holds
    both the group's min lo <= 0 and max hi >= 0, so every real-valued code lies in [0, 255].

    Of the two integer zero points next to -lo/((hi-lo)/255) the one needing the smaller step is taken: at
    most 1/126 coarser than (hi-lo)/255. (A (hi-lo)/255 step with a rounded zero point puts an extreme up to
    half a code outside [0, 255], and clamping it pulls the group's outliers inward at every requantization:
    a bias as large as a typical update; BENCHMARKS.md, "Unbiased rounding".)"""
    z0 = (-lo / ((hi - lo) / 255.0).clamp(min=_MIN_SCALE)).clamp(0, 255)
    z_lo, z_hi = z0.floor(), z0.ceil()
    s_lo, s_hi = _step_for_zero(lo, hi, z_lo), _step_for_zero(lo, hi, z_hi)
    use_lo = s_lo <= s_hi
    return torch.where(use_lo, s_lo, s_hi).clamp(min=min_step), torch.where(use_lo, z_lo, z_hi)


def _span(wg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group min and max with 0 always inside the range."""
    return wg.amin(dim=1).clamp(max=0.0), wg.amax(dim=1).clamp(min=0.0)


def compute_scale_zero(wg: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group scale (in its storage dtype) and uint8 zero point of fp32 groups wg (G, g): smallest_grid."""
    scale, zero = smallest_grid(*_span(wg), _MIN_SCALE)
    return scale.to(scale_dtype), zero.to(torch.uint8)


# Stochastic-rounding noise: a counter-based hash of (key, element index), pure integer torch ops.
# The same (key, index) gives the same noise on every device, in every chunking, eager or compiled
# (torch.compile fuses it into the update kernel; an explicit torch.Generator would not fuse), and
# there is no generator state to save for resume. The mixing function is Chris Wellons' "lowbias32"
# on int64 values kept in [0, 2^32): the second multiplier is taken as its negative 32-bit twin, so
# no product leaves int64 and masking gives the exact 32-bit result.
_M32 = 0xFFFFFFFF
_MIX_A = 0x7FEB352D
_MIX_B = 0x846CA68B - (1 << 32)


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    """In place on int64 values in [0, 2^32): a bijective 32-bit hash."""
    x ^= x >> 16  # `>>` with a Python int: ATen's fast scalar path (bitwise_right_shift(x, 16) is ~5x slower)
    x.mul_(_MIX_A).bitwise_and_(_M32)
    x ^= x >> 15
    x.mul_(_MIX_B).bitwise_and_(_M32)
    x ^= x >> 16
    return x


def sr_bits(shape, start, device) -> torch.Tensor:
    """Uniform 32-bit rounding noise, int64 values in [0, 2^32), for elements start, start+1, ... of a
    row-major block.

    `start` = key + index of the block's first element (int, or 0-d int64 tensor, or one int64 start per
    element for gathered rows); only its low 32 bits and the element offsets matter, so the key is a
    per-(tensor, step) 32-bit value. The hash is a bijection of the 32-bit counter: over a full period
    every value occurs once."""
    n = math.prod(shape)
    if torch.is_tensor(start) and start.dim() > 0:  # one int64 start per element (gathered rows)
        x = start.reshape(-1).bitwise_and(_M32)
    elif isinstance(start, int) and 0 <= start and start + n <= 1 << 32:  # eager: no wrap, one pass fewer
        x = torch.arange(start, start + n, dtype=torch.int64, device=device)
    else:
        x = torch.arange(n, dtype=torch.int64, device=device).add_(start).bitwise_and_(_M32)
    return _mix32_(x).reshape(shape)


def sr_threshold(r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(floor(r), t), overwriting r: stochastic rounding of r is floor(r) + (bits < t) with bits uniform on
    [0, 2^32), so E[round(r)] = floor(r) + t / 2^32 exactly.

    t = frac(r)·2^32 is exact in fp32 (a power-of-two scaling of the exact fraction) and an integer for
    every fp32 r >= 2^-9, where E[round(r)] = r holds exactly; below 2^-9 the int64 conversion drops
    bits under 2^-32 (a bias below 2^-32 of a code). The former floor(r + u) rounded the sum r + u to
    fp32 first, which biased every code >= 1 upward by ulp(r)/2 (BENCHMARKS.md, "Unbiased rounding")."""
    lo = torch.floor(r)
    return lo, r.sub_(lo).mul_(2.0 ** 32).to(torch.int64)


def round_codes(r: torch.Tensor, stochastic: bool, noise_start=0) -> torch.Tensor:
    """Round real-valued codes r (overwritten): stochastically (floor(r) + (bits < t), sr_threshold: E = r
    exactly) with the noise of elements noise_start, ... (sr_bits), or to nearest. Returns the result."""
    if not stochastic:
        return r.round_()
    bits = sr_bits(r.shape, noise_start, r.device)  # first: its int64 temporaries and t's do not overlap
    lo, t = sr_threshold(r)
    return lo.add_(bits < t)


def round_float(x: torch.Tensor, dtype: torch.dtype, noise_start=0) -> torch.Tensor:
    """fp32 x stochastically rounded to a bf16 or fp16 tensor with the noise of elements noise_start, ...

    The float tensors (embedding, lm_head) of a bf16 model are updated in fp32 and stored through this: an
    Adam step of a trained model is mostly below half a bf16 ulp (0.05's ulp is 2^-12), and rounding to
    nearest drops it. bf16 is fp32's upper half: adding 16 uniform bits to the lower half carries into the
    upper with probability low/2^16, then truncating rounds the magnitude up with exactly the fraction's
    probability, E = x exactly. fp16 takes the nearer neighbour or the other one with probability |x − r| /
    |other − r| (sr_threshold's integer threshold: E = x to 2^-32 of an ulp)."""
    bits = sr_bits(x.shape, noise_start, x.device)
    if dtype == torch.bfloat16:
        noise = bits.bitwise_and_(0xFFFF).to(torch.int32)
        return x.view(torch.int32).add(noise).bitwise_and_(-65536).view(torch.float32).to(torch.bfloat16)
    near = x.to(dtype)
    nf = near.float()
    other = torch.nextafter(near, torch.where(nf < x, math.inf, -math.inf).to(dtype))
    frac = (x.double() - nf.double()).abs_().div_((other.double() - nf.double()).abs_())
    t = frac.mul_(2.0 ** 32).to(torch.int64)  # 0 where x is exact (near == x)
    return torch.where(bits < t, other, near)


def quantize_groups(wg: torch.Tensor, scale_dtype: torch.dtype, stochastic: bool = False, noise_start=0):
    """Quantize fp32 groups (G, g) → (codes uint8 (G, g), scale (G,), zero uint8 (G,))."""
    scale, zero = compute_scale_zero(wg, scale_dtype)
    r = wg / scale.float()[:, None]
    r += zero.float()[:, None]
    # the grid holds every value: the clamp only removes fp32 ulps before rounding
    codes = round_codes(r.clamp_(0, 255), stochastic, noise_start).to(torch.uint8)
    return codes, scale, zero


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(G, g) uint8 codes → (G, g) values in `dtype` (math in fp32, then cast)."""
    w = (codes.float() - zero.float()[:, None]) * scale.float()[:, None]
    return w.to(dtype)


def quantize(w: torch.Tensor, group_size: int, scale_dtype: torch.dtype = torch.float32,
             stochastic: bool = False, noise_start=0):
    """Quantize an (out, in) float matrix. Returns codes (out, in) uint8, scale (G,), zero (G,) uint8."""
    wg = group_view(w.float(), group_size)
    codes, scale, zero = quantize_groups(wg, scale_dtype, stochastic, noise_start)
    return codes.reshape(w.shape), scale, zero


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return dequantize_groups(group_view(codes, group_size), scale, zero, dtype).reshape(codes.shape)


# Row chunks of the eager (reference) path, per device. CPU: 256K elements, so a chunk's fp32/int64
# temporaries (≈ 1-2 MiB each) stay in the caches across the dozen elementwise passes of an update.
# CUDA (the fallback when model.fused_update=false or Triton is missing): 8M elements, half a 4096²
# matrix per chunk, so each pass is a large kernel rather than hundreds of small ones, at 29 B/element
# of transient (232 MiB; planner.py).
CHUNK_ELEMS = {"cpu": 1 << 18, "cuda": 1 << 23}


def chunk_elems(device) -> int:
    """Elements per row chunk of the eager update/dequantize on `device` (a torch.device or type name)."""
    return CHUNK_ELEMS.get(torch.device(device).type, CHUNK_ELEMS["cuda"])


def rows_per_chunk(shape: tuple[int, int], group_size: int = 1, max_elems: int = 1 << 22) -> int:
    """Rows of an (out, in) matrix processed at once, so transients stay ≈ max_elems elements.

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
                       dtype: torch.dtype, max_elems: int | None = None) -> torch.Tensor:
    """dequantize() into a `dtype` tensor chunk by chunk: the fp32 intermediates of the whole matrix
    (8 bytes per weight) never exist, only the output (2 bytes per weight in bf16). An fp32 output is
    made whole: chunks would only add a copy (measured slower on the CPU) for 4 of the 8 bytes."""
    if dtype == torch.float32:
        return dequantize(codes, scale, zero, group_size)
    out = torch.empty(codes.shape, dtype=dtype, device=codes.device)
    for rows, gs in row_chunks(tuple(codes.shape), group_size, max_elems or chunk_elems(codes.device)):
        out[rows] = dequantize(codes[rows], scale[gs], zero[gs], group_size, dtype)
    return out


# The update of a block of whole groups, requant((dequant(W) + coef·G) · decay), in three steps that
# the eager path runs in a row and the compiled path (fused.py) as two kernels (regrid's per-group
# arithmetic, inlined into the rounding pass, would be recomputed for every weight).
#
# The arithmetic runs in units of the current grid's step: a weight is exactly its integer code there,
# so an unchanged weight re-rounds to itself, never by a stray ulp. A group keeps its grid while that
# still holds the updated values and is at most GRID_SLACK coarser than smallest_grid: an unchanged group
# then requantizes to itself bit for bit (a finer grid would re-round all its weights: unbiased, but
# noise at every step).

def code_units(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grad: torch.Tensor,
               coef: torch.Tensor, decay: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """(dequant(W) + coef·G)·decay of a block (r, n) as groups (G, g), in units of each group's step."""
    u = group_view(codes, group_size).float().sub_(zero.float()[:, None])  # exact integers
    u += (grad.float() * coef).reshape(u.shape).div_(scale.float()[:, None])
    if decay is not None:
        u *= decay
    return u


def regrid(u: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
    """The grid that groups u (code units) round onto: (its step in units of the old one, its zero point as
    fp32, its scale in storage dtype). The old grid where it still fits (see above), else smallest_grid."""
    step = scale.float()
    lo, hi = _span(u)
    ratio, new_zero = smallest_grid(lo, hi, _MIN_SCALE / step)
    z = zero.float()
    same = (lo + z >= -GRID_TOL) & (hi + z <= 255.0 + GRID_TOL) & (ratio * (1.0 + GRID_SLACK) >= 1.0)
    ratio = torch.where(same, torch.ones_like(ratio), ratio)
    new_scale = torch.where(same, scale, (step * ratio).to(scale.dtype))
    return ratio, torch.where(same, z, new_zero), new_scale


def round_onto(u: torch.Tensor, ratio: torch.Tensor, new_zero: torch.Tensor, noise_start, stochastic: bool):
    """uint8 codes of groups u (code units, overwritten) on the grid (ratio, new_zero) of regrid."""
    r = u.div_(ratio[:, None]).add_(new_zero[:, None])
    # the grid holds every value: the clamp only removes fp32 ulps before rounding
    return round_codes(r.clamp_(0, 255), stochastic, noise_start).to(torch.uint8)


def keep_where(keep: torch.Tensor | None, old: tuple, new: tuple) -> tuple:
    """new (codes, scale, zero), or old where the 0-d bool `keep` is True (a non-finite gradient)."""
    if keep is None:
        return new
    return tuple(torch.where(keep, o, n) for o, n in zip(old, new))


def update_groups(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grad: torch.Tensor,
                  coef: torch.Tensor, decay: torch.Tensor | None, noise_start, group_size: int,
                  stochastic: bool, keep: torch.Tensor | None = None):
    """The update of a block of whole groups: requant((dequant(W) + coef·G) · decay) (eager).

    codes (r, n) uint8 and the scale/zero of its r·n/g groups; grad (r, n) in any float dtype; coef
    fp32, 0-d (tensor-wise) or (r, 1) / (1, n) (channel-wise); decay None or a 0-d fp32 factor
    (decoupled weight decay on the updated weight); noise_start: sr_bits's start for the block's first
    element; keep None or a 0-d bool: where True the old block comes back unchanged (a non-finite
    gradient, whose NaNs never get past this select). Returns new (codes (r, n), scale, zero).
    """
    u = code_units(codes, scale, zero, grad, coef, decay, group_size)
    ratio, new_zero, new_scale = regrid(u, scale, zero)
    nc = round_onto(u, ratio, new_zero, noise_start, stochastic).reshape(codes.shape)  # u is spent
    return keep_where(keep, (codes, scale, zero), (nc, new_scale, new_zero.to(torch.uint8)))


GRID_SLACK = 1.0 / 64  # how much coarser than the smallest a group's kept grid may be
GRID_TOL = 1e-4  # codes: fp32 error allowed when checking that a kept grid holds the updated values


def noise_key(seed: int) -> int:
    """The 31 bits of a (tensor, step) seed that sr_bits uses as its start (with the element indices
    of a matrix below 2^31 added, the eager path never wraps)."""
    return seed & 0x7FFFFFFF


def changes(old: tuple, new: tuple) -> torch.Tensor:
    """How many codes, scales or zero points differ between two (codes, scale, zero) blocks (0-d int64).
    A scale counts when it moved by more than fp32 noise."""
    (oc, os_, oz), (nc, ns, nz) = old, new
    moved = (ns.float() - os_.float()).abs() > _SCALE_TOL * os_.float()
    return (nc != oc).sum() + moved.sum() + (nz != oz).sum()


def _coef_rows(coef: torch.Tensor, rows: slice) -> torch.Tensor:
    return coef[rows] if coef.dim() and coef.shape[0] != 1 else coef


@torch.no_grad()
def update_quantized_(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                      grad: torch.Tensor, coef: torch.Tensor, decay: torch.Tensor | None = None, *,
                      stochastic: bool, seed: int = 0, count_changes: bool = False,
                      max_elems: int | None = None, keep: torch.Tensor | None = None, offset: int = 0) -> int:
    """In place: W ← requant((dequant(W) + coef·grad) · decay), row chunk by row chunk (eager reference).

    coef: 0-d or per-row (m, 1) / per-column (1, n) fp32 multiplier (e.g. -lr·√scale·c of APOLLO);
    decay: None or 0-d (1 - lr·wd). seed: the (tensor, step) rounding key (noise_key). Chunks bound the
    fp32 transients (chunk_elems per device); the noise is indexed by the element's place in the whole
    matrix, so any chunking gives the same result. With count_changes, returns how many codes, scales
    or zero points changed (the startup guard's proof that the write happened; it costs a device sync,
    so it is off in the steady state); else 0. `keep`, a 0-d bool tensor on the device, keeps the old
    codes/scales/zeros bit for bit where True (a non-finite gradient: even a zero update would
    requantize) without a host sync. `offset`: the element index of the block's first element in its
    whole matrix (a row slice of lm_head updated on its own gets the noise the whole matrix would).
    """
    changed = torch.zeros((), dtype=torch.int64, device=codes.device)
    n = codes.shape[1]
    for rows, gs in row_chunks(tuple(codes.shape), group_size, max_elems or chunk_elems(codes.device)):
        c = codes[rows]
        new = update_groups(c, scale[gs], zero[gs], grad[rows], _coef_rows(coef, rows), decay,
                            noise_key(seed) + offset + rows.start * n, group_size, stochastic, keep)
        if count_changes:
            changed += changes((c, scale[gs], zero[gs]), new)
        c.copy_(new[0])
        scale[gs] = new[1]
        zero[gs] = new[2]
    return int(changed) if count_changes else 0


def row_groups(rows: torch.Tensor, n: int, group_size: int) -> torch.Tensor:
    """Group indices (k, n/g) of whole rows `rows` (k,) of an (m, n) matrix with n % g == 0."""
    per = n // group_size
    return rows[:, None] * per + torch.arange(per, device=rows.device)


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                    rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The rows `rows` (any shape of indices) of an (m, n) int8 matrix as `dtype` (an embedding lookup)."""
    n = codes.shape[1]
    flat = rows.reshape(-1)
    gi = row_groups(flat, n, group_size)
    w = dequantize_groups(codes[flat].reshape(-1, group_size), scale[gi].reshape(-1), zero[gi].reshape(-1), dtype)
    return w.reshape(*rows.shape, n)


@torch.no_grad()
def update_rows_(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int, rows: torch.Tensor,
                 grad_rows: torch.Tensor, coef: torch.Tensor, *, stochastic: bool, seed: int = 0,
                 count_changes: bool = False, keep: torch.Tensor | None = None) -> int:
    """update_quantized_ on the distinct rows `rows` (k,) only, with the gradient's rows (k, n): a sparse
    (embedding) gradient. Needs n % g == 0. Each element gets the rounding noise of its place in the whole
    matrix, as the dense update would; rows not listed are untouched. Returns changes as update_quantized_."""
    n = codes.shape[1]
    changed = torch.zeros((), dtype=torch.int64, device=codes.device)
    step = max(1, chunk_elems(codes.device) // n)
    col = torch.arange(n, dtype=torch.int64, device=codes.device)
    for i in range(0, rows.shape[0], step):
        r = rows[i:i + step]
        gi = row_groups(r, n, group_size).reshape(-1)
        c, sc, z = codes[r], scale[gi], zero[gi]
        start = (r[:, None] * n + col).add_(noise_key(seed))
        new = update_groups(c, sc, z, grad_rows[i:i + step], coef, None, start, group_size, stochastic, keep)
        if count_changes:
            changed += changes((c, sc, z), new)
        codes[r], scale[gi], zero[gi] = new
    return int(changed) if count_changes else 0
