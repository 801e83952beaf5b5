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
    }


def project(grad: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    if projects_right(tuple(grad.shape)):
        return grad @ proj.to(grad.dtype).T
    return proj.to(grad.dtype).T @ grad


def apollo_multiplier(grad: torch.Tensor, state: dict, *, rank: int, scale_type: str, update_proj_gap: int,
                      beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                      norm_growth_limit: float = 1.01, limiter_decay: float = 0.0) -> torch.Tensor:
    """Advance `state` by one step and return c with U = c ⊙ G (limiter applied, √scale not applied).

    c is a 0-d tensor (tensor-wise) or an (m,1) / (1,n) tensor (channel-wise), in the math dtype
    (fp32, or fp64 for fp64 gradients: the tests replay the equations in fp64).

    limiter_decay = 0 is the paper's limiter: the reference norm is the last (limited) one. With small
    noisy batches that reference ratchets down (any dip lowers it, growth back is capped at 1%/step), so
    limiter_decay = d > 0 holds the reference at max(‖U_t‖, d·reference): dips no longer shrink the cap,
    a sudden jump above the recent level is still cut to γ×, and the reference follows a real decline
    at (1-d) per step.
    """
    shape = tuple(grad.shape)
    math_dtype = torch.promote_types(grad.dtype, torch.float32)
    # Refresh the projection at steps 0, T, 2T, ... (counted before the increment), new seed each time.
    if state["proj"] is None or state["step"] % update_proj_gap == 0:
        state["proj"] = make_projection(shape, rank, state["seed"], grad.device)
        state["seed"] = next_seed(state["seed"])
    r = project(grad, state["proj"]).to(math_dtype)

    state["step"] += 1
    t = state["step"]
    m, v = state["exp_avg"], state["exp_avg_sq"]
    if m.dtype != math_dtype:
        m, v = m.to(math_dtype), v.to(math_dtype)
    m.mul_(beta1).add_(r, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(r, r, value=1 - beta2)
    state["exp_avg"], state["exp_avg_sq"] = m, v
    n_hat = (m / (1 - beta1 ** t)) / ((v / (1 - beta2 ** t)).sqrt() + eps)

    right = projects_right(shape)
    if scale_type == "tensor":
        c = n_hat.norm() / (r.norm() + 1e-8)
        u_norm = c * torch.linalg.vector_norm(grad, dtype=math_dtype)
    else:
        dim = 1 if right else 0  # norm across the rank axis → one factor per row (m≥n) or column (m<n)
        c = n_hat.norm(dim=dim, keepdim=True) / (r.norm(dim=dim, keepdim=True) + 1e-8)
        g_norms = torch.linalg.vector_norm(grad, dim=dim, keepdim=True, dtype=math_dtype)
        u_norm = (c * g_norms).norm()

    if norm_growth_limit > 0:
        if t > 1:
            prev = state["prev_norm"].to(math_dtype)
            rho = torch.clamp(u_norm / (prev + 1e-8), min=norm_growth_limit) / norm_growth_limit
            c = c / rho
            u_norm = u_norm / rho
        ref = u_norm.detach()
        if limiter_decay > 0 and t > 1:
            ref = torch.maximum(ref, limiter_decay * state["prev_norm"].to(math_dtype))
        state["prev_norm"] = ref.to(torch.float32) if math_dtype == torch.float32 else ref
    return c
