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
        # lagged accumulation only: summed R of the current window, its count, the previous step's c
        "r_sum": None, "r_count": 0, "lag_scale": None,
    }


def project(grad: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    if projects_right(tuple(grad.shape)):
        return grad @ proj.to(grad.dtype).T
    return proj.to(grad.dtype).T @ grad


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


def update_norm(grad: torch.Tensor, c: torch.Tensor, math_dtype) -> torch.Tensor:
    """‖c ⊙ G‖ without forming c ⊙ G (c: 0-d, (m,1) or (1,n))."""
    if c.dim() == 0:
        return c * torch.linalg.vector_norm(grad, dtype=math_dtype)
    dim = 1 if c.shape[1] == 1 else 0  # (m,1): one factor per row, so row norms
    g_norms = torch.linalg.vector_norm(grad, dim=dim, keepdim=True, dtype=math_dtype)
    return (c * g_norms).norm()


def _limit(c: torch.Tensor, u_norm: torch.Tensor, state: dict, first: bool, norm_growth_limit: float,
           limiter_decay: float) -> torch.Tensor:
    """Norm-growth limiter (Fira, γ): if ‖U‖ > γ·‖U_prev‖, scale U down to γ·‖U_prev‖.

    limiter_decay = 0 is the paper's limiter: the reference norm is the last (limited) one. With small
    noisy batches that reference ratchets down (any dip lowers it, growth back is capped at 1%/step), so
    limiter_decay = d > 0 holds the reference at max(‖U_t‖, d·reference): dips no longer shrink the cap,
    a sudden jump above the recent level is still cut to γ×, and the reference follows a real decline
    at (1-d) per step.
    """
    if norm_growth_limit <= 0:
        return c
    math_dtype = u_norm.dtype
    prev = state["prev_norm"].to(math_dtype)
    if not first:
        rho = torch.clamp(u_norm / (prev + 1e-8), min=norm_growth_limit) / norm_growth_limit
        c = c / rho
        u_norm = u_norm / rho
    ref = u_norm.detach()
    if limiter_decay > 0 and not first:
        ref = torch.maximum(ref, limiter_decay * prev)
    # a non-finite gradient must not poison the reference (the caller zeroes c for it)
    ref = torch.where(torch.isfinite(ref), ref, prev)
    state["prev_norm"] = ref.to(torch.float32) if math_dtype == torch.float32 else ref
    return c


def _refresh_projection(grad: torch.Tensor, state: dict, rank: int, update_proj_gap: int) -> None:
    """Draw P at steps 0, T, 2T, ... (counted before the increment), a new seed each time."""
    if state["proj"] is None or state["step"] % update_proj_gap == 0:
        state["proj"] = make_projection(tuple(grad.shape), rank, state["seed"], grad.device)
        state["seed"] = next_seed(state["seed"])


def apollo_multiplier(grad: torch.Tensor, state: dict, *, rank: int, scale_type: str, update_proj_gap: int,
                      beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                      norm_growth_limit: float = 1.01, limiter_decay: float = 0.0) -> torch.Tensor:
    """Advance `state` by one step and return c with U = c ⊙ G (limiter applied, √scale not applied).

    c is a 0-d tensor (tensor-wise) or an (m,1) / (1,n) tensor (channel-wise), in the math dtype
    (fp32, or fp64 for fp64 gradients: the tests replay the equations in fp64). A non-finite gradient
    gives c = 0 (see `finite`), so nothing of it reaches the weight.
    """
    shape = tuple(grad.shape)
    math_dtype = torch.promote_types(grad.dtype, torch.float32)
    _refresh_projection(grad, state, rank, update_proj_gap)
    r = project(grad, state["proj"]).to(math_dtype)
    m, v, t = _moments(state, r, beta1, beta2, commit=True)
    c = _scale(r, m, v, t, shape, scale_type, beta1, beta2, eps)
    return _guarded(grad, c, state, t == 1, math_dtype, norm_growth_limit, limiter_decay)


def refresh_projection(shape: tuple[int, int], state: dict, rank: int, update_proj_gap: int, device) -> None:
    """_refresh_projection for a gradient that is never whole (given by slices or rows)."""
    if state["proj"] is None or state["step"] % update_proj_gap == 0:
        state["proj"] = make_projection(shape, rank, state["seed"], device)
        state["seed"] = next_seed(state["seed"])


def projected_multiplier(r: torch.Tensor, g_norm: torch.Tensor, state: dict, *, shape: tuple[int, int],
                         beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                         norm_growth_limit: float = 1.01, limiter_decay: float = 0.0) -> torch.Tensor:
    """apollo_multiplier (tensor-wise) from what it needs of G: R = project(G) and ‖G‖ (0-d, math dtype).

    For a gradient that only exists slice by slice (lm_head inside the loss backward: R's rows are the
    slices' projections, ‖G‖² the sum of theirs) or sparsely (the embedding's rows). The caller refreshes
    the projection first (refresh_projection). Same equations, same state, as apollo_multiplier."""
    m, v, t = _moments(state, r, beta1, beta2, commit=True)
    c = _scale(r, m, v, t, shape, "tensor", beta1, beta2, eps)
    return _limited(c, c * g_norm, state, t == 1, norm_growth_limit, limiter_decay)


def _guarded(grad, c, state, first, math_dtype, norm_growth_limit, limiter_decay) -> torch.Tensor:
    """Limiter, then c = 0 where the gradient is not finite; leaves state['finite'] (a device bool for
    the caller to take and read later: no host sync per tensor)."""
    return _limited(c, update_norm(grad, c, math_dtype), state, first, norm_growth_limit, limiter_decay)


def _limited(c, u_norm, state, first, norm_growth_limit, limiter_decay) -> torch.Tensor:
    """_guarded from the update's norm ‖c ⊙ G‖ (also for gradients given only by slices or rows)."""
    finite = torch.isfinite(u_norm)
    c = _limit(c, u_norm, state, first, norm_growth_limit, limiter_decay)
    state["finite"] = finite
    return torch.where(finite, c, torch.zeros_like(c))


# ---- lagged-scale accumulation ---------------------------------------------------------------------
# With K micro-batches per optimizer step and in-backward updates, the exact mode must keep every
# matrix's full gradient until the last micro-batch. APOLLO's update is U = c ⊙ G, *linear* in G once c
# is fixed, and its moments live in the projected space, where R(Σ G_i) = Σ R(G_i). So each micro-batch
# i applies lr·√scale·c_{t-1} ⊙ G_i at once (c of the previous step) and adds R_i = R(G_i) to a small
# buffer; at the step boundary the moments take ΣR_i once and give c_t for the next window. The applied
# direction is exactly that of accumulated gradients; the scale lags by one step. The very first window
# has no previous scale: each of its micro-batches uses the scale its own R_i would give (a peek at the
# moments, not committed). Extra state: the R buffer (max(m,n)·rank) and c (one scalar or one per channel).

def _lagged_scale(r: torch.Tensor, state: dict, shape, scale_type: str, beta1: float, beta2: float,
                  eps: float) -> tuple[torch.Tensor, bool]:
    """Add one micro-batch's R to the window's sum; the scale to apply: the previous window's (lag_scale),
    or in the very first window this micro-batch's own. Also: is this the run's first window?"""
    if state.get("r_sum") is None:
        state["r_sum"] = torch.zeros_like(state["exp_avg"])
    state["r_sum"] = state["r_sum"].to(r.dtype).add_(torch.nan_to_num(r, nan=0.0, posinf=0.0, neginf=0.0))
    state["r_count"] = state.get("r_count", 0) + 1
    first = state["step"] == 0 and state.get("lag_scale") is None
    if state.get("lag_scale") is None:
        m, v, t = _moments(state, r, beta1, beta2, commit=False)
        return _scale(r, m, v, t, shape, scale_type, beta1, beta2, eps), first
    return state["lag_scale"].to(r.dtype), first


def lagged_multiplier(grad: torch.Tensor, state: dict, *, rank: int, scale_type: str, update_proj_gap: int,
                      beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                      norm_growth_limit: float = 1.01, limiter_decay: float = 0.0) -> torch.Tensor:
    """One micro-batch of the lagged mode: add R(G) to the window's buffer and return c for U = c ⊙ G.

    The limiter acts per micro-batch (γ against the previous micro-batch's update norm)."""
    shape = tuple(grad.shape)
    math_dtype = torch.promote_types(grad.dtype, torch.float32)
    if state.get("r_count", 0) == 0:  # first micro-batch of a window: P is fixed for the whole window
        _refresh_projection(grad, state, rank, update_proj_gap)
    r = project(grad, state["proj"]).to(math_dtype)
    c, first = _lagged_scale(r, state, shape, scale_type, beta1, beta2, eps)
    c = _guarded(grad, c, state, first and state["r_count"] == 1, math_dtype, norm_growth_limit, limiter_decay)
    return c


def lagged_projected_multiplier(r: torch.Tensor, g_norm: torch.Tensor, state: dict, *, shape: tuple[int, int],
                                beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                                norm_growth_limit: float = 1.01, limiter_decay: float = 0.0) -> torch.Tensor:
    """lagged_multiplier (tensor-wise) from R = project(G) and ‖G‖ only (see projected_multiplier). The caller
    refreshes the projection at a window's first micro-batch (state['r_count'] == 0)."""
    c, first = _lagged_scale(r, state, shape, "tensor", beta1, beta2, eps)
    return _limited(c, c * g_norm, state, first and state["r_count"] == 1, norm_growth_limit, limiter_decay)


def lagged_commit(state: dict, *, shape: tuple[int, int], scale_type: str, beta1: float = 0.9,
                  beta2: float = 0.999, eps: float = 1e-8) -> None:
    """Step boundary of the lagged mode: the moments take the window's summed R once; c_t is stored for
    the next window. No-op for a window without micro-batches (all skipped)."""
    if not state.get("r_count"):
        return
    r = state["r_sum"]
    m, v, t = _moments(state, r, beta1, beta2, commit=True)
    state["lag_scale"] = _scale(r, m, v, t, shape, scale_type, beta1, beta2, eps)
    state["r_sum"] = torch.zeros_like(r)
    state["r_count"] = 0


# ---- state as tensors (checkpoints) ----------------------------------------------------------------
def state_shapes(shape: tuple[int, int], rank: int, scale_type: str) -> dict[str, tuple]:
    """Shapes of every tensor a checkpoint may hold for one matrix's state."""
    rshape = (shape[0], rank) if projects_right(shape) else (rank, shape[1])
    if scale_type == "tensor":
        cshape = ()
    else:
        cshape = (shape[0], 1) if projects_right(shape) else (1, shape[1])
    return {"step": (), "seed": (), "exp_avg": rshape, "exp_avg_sq": rshape, "prev_norm": (),
            "proj": projection_shape(shape, rank), "r_sum": rshape, "lag_scale": cshape}


REQUIRED_STATE = ("step", "seed", "exp_avg", "exp_avg_sq", "prev_norm")


def state_tensors(state: dict) -> dict[str, torch.Tensor]:
    """The state as named tensors (ints as int64 0-d tensors); drawn-later entries only once they exist."""
    out = {"step": torch.tensor(state["step"], dtype=torch.int64),
           "seed": torch.tensor(state["seed"], dtype=torch.int64)}
    for k in ("exp_avg", "exp_avg_sq", "prev_norm", "proj", "r_sum", "lag_scale"):
        if state.get(k) is not None:
            out[k] = state[k]
    return out


def load_state_tensors(state: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Inverse of state_tensors, onto the device of the existing state."""
    dev = state["exp_avg"].device
    state["step"], state["seed"] = int(tensors["step"]), int(tensors["seed"])
    for k in ("exp_avg", "exp_avg_sq", "prev_norm"):
        state[k] = tensors[k].to(dev)
    for k in ("proj", "r_sum", "lag_scale"):
        state[k] = tensors[k].to(dev) if k in tensors else None
    state["r_count"] = 0
