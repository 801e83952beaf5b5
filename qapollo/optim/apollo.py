"""APOLLO / APOLLO-Mini update rule, written from the paper's equations (pure tensor math).

For one weight matrix W (m×n, torch's (out, in) layout) with full gradient G:

    P  ~ N(0, 1/r), regenerated every `update_proj_gap` steps from a per-parameter seed that changes at
         each refresh. The smaller dimension is compressed:
             m >= n:  P is r×n,  R = G Pᵀ  (m×r)        m < n:  P is m×r,  R = Pᵀ G  (r×n)
    M, V = low-rank Adam moments of R (fp32), bias corrected:  Ñ = M̂ / (√V̂ + eps)
    s  = ‖Ñ‖ / (‖R‖ + 1e-8), one scalar (scale_type=tensor, APOLLO-Mini) or one per channel along the
         larger dimension (scale_type=channel, APOLLO)
    U  = G ⊙ s                         (the *raw full-rank* gradient, scaled)
    norm-growth limiter (Fira, γ = 1.01):  if ‖U‖ > γ·‖U_prev‖, U ← U · γ‖U_prev‖/‖U‖
    W ← W − lr · √scale · U    (then W ← W − lr·wd·W if weight decay is set)

Bias correction follows the Q-APOLLO reference (bias-corrected Ñ, step size = lr; eps outside the
corrected square root). Because U is G times a scalar or a per-channel vector, this module returns only
that multiplier `c` (U = c ⊙ G): the caller applies it chunk by chunk and no full-size copy of the
update ever exists.
"""
from __future__ import annotations

import math

import torch

_LCG_A = 6364136223846793005
_LCG_C = 1442695040888963407
_MASK63 = (1 << 63) - 1


def next_seed(seed: int) -> int:
    """Seed of the next projection refresh (a 64-bit LCG step: cheap, deterministic, resumable)."""
    return (seed * _LCG_A + _LCG_C) & _MASK63


def projects_right(shape: tuple[int, int]) -> bool:
    """True when the input dimension n is compressed (m >= n), i.e. R = G Pᵀ."""
    return shape[0] >= shape[1]


def projection_shape(shape: tuple[int, int], rank: int) -> tuple[int, int]:
    m, n = shape
    return (rank, n) if projects_right(shape) else (m, rank)


def make_projection(shape: tuple[int, int], rank: int, seed: int, device, dtype=torch.float32) -> torch.Tensor:
    """Random projection with i.i.d. N(0, 1/rank) entries, generated in fp32 on `device` from `seed`."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    p = torch.randn(projection_shape(shape, rank), generator=gen, device=device, dtype=torch.float32)
    return (p / math.sqrt(rank)).to(dtype)


def init_state(shape: tuple[int, int], rank: int, seed: int, device) -> dict:
    """Fresh per-matrix state. Tensors only (plus the int step/seed) so it saves to safetensors."""
    rshape = (shape[0], rank) if projects_right(shape) else (rank, shape[1])
    return {
        "step": 0,
        "seed": int(seed),
        "proj": None,
        "exp_avg": torch.zeros(rshape, device=device, dtype=torch.float32),
        "exp_avg_sq": torch.zeros(rshape, device=device, dtype=torch.float32),
        "prev_norm": torch.zeros((), device=device, dtype=torch.float32),
        # lagged accumulation only: the window's ΣR, sketch sums, Σ‖G_i‖², its count; the previous window's
        # step size and alignment
        "r_sum": None, "sk_sum": None, "sk_sq": 0, "g_sq": 0, "r_count": 0, "lag_step": None, "lag_align": None,
        "lag_rest": None,  # while replays of skipped micro-batches run: the step size each of them applies
    }


def project(grad: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    if projects_right(tuple(grad.shape)):
        return project_rows(grad, proj)
    return proj.to(grad.dtype).T @ grad


def project_rows(rows: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """Those rows of R = G Pᵀ (m >= n) that rows of G give: for a gradient given by rows or row slices."""
    return rows @ proj.to(rows.dtype).T


def _moments(state: dict, r: torch.Tensor, beta1: float, beta2: float, commit: bool):
    """Adam moments of the projected gradient after one more step: (M, V, t). Committed to `state` only
    with commit=True (the lagged mode's first window peeks without committing)."""
    math_dtype = r.dtype
    m, v = state["exp_avg"].to(math_dtype), state["exp_avg_sq"].to(math_dtype)
    t = state["step"] + 1
    if commit:
        m.mul_(beta1).add_(r, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(r, r, value=1 - beta2)
        state["exp_avg"], state["exp_avg_sq"], state["step"] = m, v, t
    else:
        m = m * beta1 + r * (1 - beta1)
        v = v * beta2 + r * r * (1 - beta2)
    return m, v, t


def _scale(r: torch.Tensor, m: torch.Tensor, v: torch.Tensor, t: int, shape, scale_type: str,
           beta1: float, beta2: float, eps: float) -> torch.Tensor:
    """s = ‖Ñ‖ / ‖R‖: a 0-d tensor (tensor-wise) or one factor per row (m≥n) / column (m<n)."""
    n_hat = (m / (1 - beta1 ** t)) / ((v / (1 - beta2 ** t)).sqrt() + eps)
    if scale_type == "tensor":
        return n_hat.norm() / (r.norm() + 1e-8)
    dim = 1 if projects_right(shape) else 0  # norm across the rank axis
    return n_hat.norm(dim=dim, keepdim=True) / (r.norm(dim=dim, keepdim=True) + 1e-8)


def grad_sq(grad: torch.Tensor, scale_type: str, math_dtype) -> torch.Tensor:
    """‖G‖² (0-d, tensor-wise) or the squared norms of the channels c scales: rows (m,1) when m >= n,
    columns (1,n) otherwise (channel-wise)."""
    if scale_type == "tensor":
        return torch.linalg.vector_norm(grad, dtype=math_dtype).square()
    dim = 1 if projects_right(tuple(grad.shape)) else 0
    return torch.linalg.vector_norm(grad, dim=dim, keepdim=True, dtype=math_dtype).square()


def update_norm(c: torch.Tensor, g_sq: torch.Tensor) -> torch.Tensor:
    """‖c ⊙ G‖ from c (0-d, (m,1) or (1,n)) and grad_sq of G of the same layout, without forming c ⊙ G."""
    return (c.square() * g_sq).sum().sqrt()


def _limit(c: torch.Tensor, u_norm: torch.Tensor, prev: torch.Tensor, norm_growth_limit: float,
           limiter_decay: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Norm-growth limiter (Fira, γ): if ‖U‖ > γ·‖U_prev‖, scale U down to γ·‖U_prev‖. Returns (c, the
    reference norm for the next step). prev = 0: no reference yet (the first step, or after a resume that
    changed the accumulation), nothing is limited.

    limiter_decay = 0 is the paper's limiter: the reference norm is the last (limited) one. With small
    noisy batches that reference ratchets down (any dip lowers it, growth back is capped at 1%/step), so
    limiter_decay = d > 0 holds the reference at max(‖U_t‖, d·reference): dips no longer shrink the cap,
    a sudden jump above the recent level is still cut to γ×, and the reference follows a real decline
    at (1-d) per step.
    """
    if norm_growth_limit <= 0:
        return c, prev
    math_dtype = u_norm.dtype
    prev = prev.to(math_dtype)
    rho = torch.clamp(u_norm / (prev + 1e-8), min=norm_growth_limit) / norm_growth_limit
    rho = torch.where(prev > 0, rho, torch.ones_like(rho))
    c, u_norm = c / rho, u_norm / rho
    ref = u_norm.detach()
    if limiter_decay > 0:
        ref = torch.maximum(ref, limiter_decay * prev)
    # a non-finite gradient must not poison the reference (the caller zeroes c for it)
    return c, torch.where(torch.isfinite(ref), ref, prev)


def _limited(c, g_sq, state, norm_growth_limit, limiter_decay) -> tuple[torch.Tensor, torch.Tensor]:
    """Limiter on U = c ⊙ G (given by grad_sq of G), reference updated; then c = 0 where the gradient is
    not finite. Returns (c, finite): the flag stays a device bool for the caller to read later (no host
    sync per tensor)."""
    finite = torch.isfinite(g_sq).all()
    c, ref = _limit(c, update_norm(c, g_sq), state["prev_norm"], norm_growth_limit, limiter_decay)
    state["prev_norm"] = ref.float()
    return torch.where(finite, c, torch.zeros_like(c)), finite


def refresh_projection(shape: tuple[int, int], state: dict, rank: int, update_proj_gap: int, device) -> None:
    """Draw P at steps 0, T, 2T, ... (counted before the increment), a new seed each time."""
    if state["proj"] is None or state["step"] % update_proj_gap == 0:
        state["proj"] = make_projection(shape, rank, state["seed"], device)
        state["seed"] = next_seed(state["seed"])


def apollo_multiplier(grad: torch.Tensor, state: dict, *, rank: int, scale_type: str, update_proj_gap: int,
                      beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                      norm_growth_limit: float = 1.01, limiter_decay: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Advance `state` by one step and return (c, finite) with U = c ⊙ G (limiter applied, √scale not applied).

    c is a 0-d tensor (tensor-wise) or an (m,1) / (1,n) tensor (channel-wise), in the math dtype
    (fp32, or fp64 for fp64 gradients: the tests replay the equations in fp64). A non-finite gradient
    gives c = 0 and finite = False (a device bool), so nothing of it reaches the weight.
    """
    shape = tuple(grad.shape)
    math_dtype = torch.promote_types(grad.dtype, torch.float32)
    refresh_projection(shape, state, rank, update_proj_gap, grad.device)
    r = project(grad, state["proj"]).to(math_dtype)
    m, v, t = _moments(state, r, beta1, beta2, commit=True)
    c = _scale(r, m, v, t, shape, scale_type, beta1, beta2, eps)
    return _limited(c, grad_sq(grad, scale_type, math_dtype), state, norm_growth_limit, limiter_decay)


def projected_multiplier(r: torch.Tensor, g_norm: torch.Tensor, state: dict, *, shape: tuple[int, int],
                         beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                         norm_growth_limit: float = 1.01, limiter_decay: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """apollo_multiplier (tensor-wise) from what it needs of G: R = project(G) and ‖G‖ (0-d, math dtype).

    For a gradient that only exists slice by slice (lm_head inside the loss backward: R's rows are the
    slices' projections, ‖G‖² the sum of theirs) or sparsely (the embedding's rows). The caller refreshes
    the projection first (refresh_projection). Same equations, same state, as apollo_multiplier."""
    m, v, t = _moments(state, r, beta1, beta2, commit=True)
    c = _scale(r, m, v, t, shape, "tensor", beta1, beta2, eps)
    return _limited(c, g_norm.square(), state, norm_growth_limit, limiter_decay)


# ---- lagged-scale accumulation ---------------------------------------------------------------------
# With K micro-batches per optimizer step and in-backward updates, the exact mode must keep every
# matrix's full gradient until the last micro-batch. APOLLO's update is U = c ⊙ G, *linear* in G once c
# is fixed, and its moments live in the projected space, where R(Σ G_i) = Σ R(G_i). So the lagged mode
# applies each micro-batch's share at once and keeps only ΣR_i: at the window's end (`lagged_commit`) the
# moments take ΣR_i once, the scale c_t follows, and the limiter compares the window's update
# ‖c_t ⊙ ΣG_i‖ with the previous window's, as the exact mode does once per step.
#
# What a window applies: its own accumulated direction ΣG_i, at the size of the previous window's
# (limited) step, S_t = ‖c_t ⊙ ΣG‖ (per channel for channel-wise c). Micro-batch i applies
# c = S_t / ĝ ⊙ G_i, where ĝ predicts this window's ‖ΣG‖ from its micro-batches so far (their mean ‖G_i‖²,
# ×K, × the previous window's alignment ‖ΣG‖²/Σ‖G_i‖²). Applying c_t itself instead (c_t ⊙ ΣG_{t+1})
# scaled the step by ‖G_{t+1}‖/‖G_t‖, a feedback the exact mode's 1/‖R‖ normalization does not have:
# with the limiter measuring window t and acting on window t+1, the step swung by 0.2-5× from one window
# to the next (BENCHMARKS.md, "Lagged accumulation").
#
# ‖ΣG_i‖ is never formed: the window keeps Σ‖G_i‖² and a sketch of each G_i (H_i = A·G_i, A a Gaussian
# SKETCH_ROWS × max(m,n) matrix drawn anew each window, compressing the larger side), and
# ‖ΣG_i‖² ≈ Σ‖G_i‖² · ‖ΣH_i‖² / Σ‖H_i‖², the micro-batches' alignment measured in the sketch (exact when
# they are parallel or orthogonal; ±4 % with 16 rows, against 0.5-1.2× measured in APOLLO's rank-1 R).
#
# A window without a step size yet (a fresh run, or a resume that changed the accumulation) applies
# nothing before its last micro-batch, which commits the window and carries the whole window's step in
# G_K's direction. A micro-batch the spike guard skipped would leave its share unapplied (and those applied
# cannot be scaled afterwards: their gradients are gone), so the trainer's step (engine.optimizer_step)
# runs the last accepted micro-batch again in its place: the window applies K accepted micro-batches at the
# step size, as the exact mode steps on the mean of those used. A window that still ends short (a caller of
# its own) commits the mean of those it used (×K/used). Extra state: ΣR (max(m,n)·rank), the sketch's sum
# (SKETCH_ROWS·min(m,n)), the step size (one or one per channel) and a few scalars.

SKETCH_ROWS = 16


def sketch_matrix(shape: tuple[int, int], state: dict, device) -> torch.Tensor:
    """The window's sketch A (SKETCH_ROWS × max(m,n)), N(0,1), from the projection seed and the step: the
    same for every micro-batch of a window, another in the next."""
    gen = torch.Generator(device=device)
    gen.manual_seed(next_seed(state["seed"] ^ (state["step"] + 1)))
    return torch.randn(SKETCH_ROWS, max(shape), generator=gen, device=device)


def sketch(grad: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """H = A·G compressing G's larger side: (s, n) when m >= n, else (m, s)."""
    if projects_right(tuple(grad.shape)):
        return sketch_rows(grad, a)
    return grad.to(a.dtype) @ a.T


def sketch_rows(rows: torch.Tensor, a_cols: torch.Tensor) -> torch.Tensor:
    """A·G (m >= n) restricted to some rows of G: those rows times the matching columns of A."""
    return a_cols @ rows.to(a_cols.dtype)


def _add_micro(state: dict, r: torch.Tensor, g_sq: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Add one micro-batch's R, ‖G‖² and sketch H to the window's sums (nothing of a non-finite one); its
    finite flag."""
    finite = torch.isfinite(g_sq).all()
    if state.get("r_sum") is None:
        state["r_sum"] = torch.zeros_like(state["exp_avg"])
    r, h, g_sq = (torch.where(finite, x, torch.zeros_like(x)) for x in (r, h, g_sq))
    state["r_sum"] = state["r_sum"].to(r.dtype).add_(r)
    state["sk_sum"] = h if state.get("sk_sum") is None else state["sk_sum"].add_(h)
    state["sk_sq"] = state.get("sk_sq", 0) + h.square().sum()
    state["g_sq"] = state.get("g_sq", 0) + g_sq
    state["r_count"] = state.get("r_count", 0) + 1
    return finite


def alignment(state: dict) -> torch.Tensor:
    """‖ΣG_i‖² / Σ‖G_i‖² of the window so far, from the sketch (1 when it is empty)."""
    h_sq = state["sk_sq"]
    return torch.where(h_sq > 0, state["sk_sum"].square().sum() / h_sq, torch.ones_like(h_sq))


def _replay_multiplier(state: dict, g_sq: torch.Tensor, h: torch.Tensor, window: int,
                       replays_left: int) -> torch.Tensor:
    """A replay of the window's last micro-batch in place of a skipped one (engine.optimizer_step, at the
    window's end). The window's own micro-batches applied V = S/ĝ ⊙ ΣG (ĝ: the last one's prediction), of
    norm A = S·√(alignment·used / (K·previous alignment)); the replays, all in one direction G_r, add x along
    it so that ‖V + x·Ĝ_r‖ = S, the window's step: x = −A·cos + √(S² − A²·sin²), cos the angle of ΣG and
    G_r measured in the sketch. Each replay applies an equal part of x (exact for one micro-batch used)."""
    if state.get("lag_rest") is None:  # the first replay: size the rest of the window's step
        s, h_sum = state["lag_step"], state["sk_sum"]
        a = s * (alignment(state) * state["r_count"] / (window * state["lag_align"])).sqrt()
        cos = (h_sum * h).sum() / (h_sum.norm() * h.norm()).clamp(min=1e-30)
        x = -a * cos + (s.square() - a.square() * (1 - cos.square())).clamp(min=0).sqrt()
        state["lag_rest"] = x.clamp(min=0) / replays_left
    return torch.where(g_sq > 0, state["lag_rest"] / g_sq.sqrt(), torch.zeros_like(g_sq))


def _lagged_micro(r: torch.Tensor, g_sq: torch.Tensor, h: torch.Tensor, state: dict, *, shape, scale_type: str,
                  window: int, last: bool, beta1: float, beta2: float, eps: float, norm_growth_limit: float,
                  limiter_decay: float, replays_left: int = 0) -> tuple[torch.Tensor | None, torch.Tensor]:
    """One micro-batch of the lagged mode from R = project(G), grad_sq(G) and the sketch H = A·G: (c for
    U = c ⊙ G, or None when nothing is to be applied now (a window without a step size, before its last
    micro-batch); the device flag: was G finite). replays_left > 0: a replay (_replay_multiplier)."""
    replay = replays_left > 0 and state.get("lag_step") is not None
    c = _replay_multiplier(state, g_sq, h, window, replays_left) if replay else None
    finite = _add_micro(state, r, g_sq, h)
    if c is not None:
        pass
    elif state.get("lag_step") is not None:  # the previous window's step, over this window's predicted ‖ΣG‖
        g_hat = state["g_sq"] * (window / state["r_count"]) * state["lag_align"]
        c = torch.where(g_hat > 0, state["lag_step"] / g_hat.sqrt(), torch.zeros_like(g_hat))
    elif last:  # commit now; this micro-batch carries the whole window's step
        lagged_commit(state, shape=shape, scale_type=scale_type, window=window, beta1=beta1, beta2=beta2, eps=eps,
                      norm_growth_limit=norm_growth_limit, limiter_decay=limiter_decay)
        c = torch.where(g_sq > 0, state["lag_step"] / g_sq.sqrt(), torch.zeros_like(g_sq))
    else:
        return None, finite
    c = c.to(r.dtype)
    return torch.where(finite, c, torch.zeros_like(c)), finite


def lagged_multiplier(grad: torch.Tensor, state: dict, *, rank: int, scale_type: str, update_proj_gap: int,
                      window: int, last: bool, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                      norm_growth_limit: float = 1.01, limiter_decay: float = 0.0, replays_left: int = 0):
    """One micro-batch of a lagged window of `window` micro-batches (`last`: the window's last one): add
    R(G) to the window's sums and return (c for U = c ⊙ G, or None: nothing to apply now (see above); finite)."""
    math_dtype = torch.promote_types(grad.dtype, torch.float32)
    if state.get("r_count", 0) == 0:  # first micro-batch of a window: P is fixed for the whole window
        refresh_projection(tuple(grad.shape), state, rank, update_proj_gap, grad.device)
    r = project(grad, state["proj"]).to(math_dtype)
    h = sketch(grad, sketch_matrix(tuple(grad.shape), state, grad.device))
    return _lagged_micro(r, grad_sq(grad, scale_type, math_dtype), h, state, shape=tuple(grad.shape),
                         scale_type=scale_type, window=window, last=last, beta1=beta1, beta2=beta2, eps=eps,
                         norm_growth_limit=norm_growth_limit, limiter_decay=limiter_decay, replays_left=replays_left)


def lagged_projected_multiplier(r: torch.Tensor, g_norm: torch.Tensor, h: torch.Tensor, state: dict, *,
                                shape: tuple[int, int], window: int, last: bool, beta1: float = 0.9,
                                beta2: float = 0.999, eps: float = 1e-8, norm_growth_limit: float = 1.01,
                                limiter_decay: float = 0.0, replays_left: int = 0):
    """lagged_multiplier (tensor-wise) from R = project(G), ‖G‖ and the sketch h = sketch_matrix(...)·G, each
    summed over G's slices or rows (see projected_multiplier). The caller refreshes the projection at a
    window's first micro-batch (state['r_count'] == 0)."""
    return _lagged_micro(r, g_norm.square(), h, state, shape=shape, scale_type="tensor", window=window, last=last,
                         beta1=beta1, beta2=beta2, eps=eps, norm_growth_limit=norm_growth_limit,
                         limiter_decay=limiter_decay, replays_left=replays_left)


def lagged_commit(state: dict, *, shape: tuple[int, int], scale_type: str, window: int, beta1: float = 0.9,
                  beta2: float = 0.999, eps: float = 1e-8, norm_growth_limit: float = 1.01,
                  limiter_decay: float = 0.0, measured: bool = True) -> None:
    """Window boundary: the moments take the window's R once (the mean of the micro-batches used, ×K/used,
    when fewer than K came), the limiter compares the window's update ‖c ⊙ ΣG‖ with the previous window's,
    and that (limited) step size is stored for the next window. measured=False: the window's micro-batches
    were not all distinct (replays of skipped ones), so its alignment is not kept for the next window.
    No-op without micro-batches."""
    used = state.get("r_count", 0)
    if not used:
        return
    k = window / used
    r = state["r_sum"] * k
    m, v, t = _moments(state, r, beta1, beta2, commit=True)
    c = _scale(r, m, v, t, shape, scale_type, beta1, beta2, eps)
    # as if whole: K·(mean of the used micro-batches); ‖ΣG‖² = Σ‖G_i‖² · align, both ×K/used
    align = alignment(state) * k
    g_window = state["g_sq"] * k * align  # per channel for channel-wise c
    c, ref = _limit(c, update_norm(c, g_window), state["prev_norm"], norm_growth_limit, limiter_decay)
    # a window with skips (or replays in their place) cannot measure the alignment of K distinct micro-batches
    if (used == window and measured) or state.get("lag_align") is None:
        state["lag_align"] = align.float()
    state["prev_norm"], state["lag_step"] = ref.float(), (c * g_window.sqrt()).float()
    reset_window(state)


def reset_window(state: dict) -> None:
    """Empty the window's sums (a commit, a resume)."""
    if state.get("r_sum") is not None:
        state["r_sum"] = torch.zeros_like(state["r_sum"])
    state["sk_sum"], state["sk_sq"], state["g_sq"] = None, 0, 0
    state["r_count"], state["lag_rest"] = 0, None


def forget_accumulation(state: dict, reference: bool) -> None:
    """After a resume that changed the accumulation: the next window finds its step size anew (applied at
    its last micro-batch) and, with reference=True, the limiter starts afresh (its reference norm belonged
    to windows of another size)."""
    state["lag_step"] = state["lag_align"] = None
    if reference:
        state["prev_norm"] = torch.zeros_like(state["prev_norm"])
