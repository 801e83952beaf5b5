"""APOLLO's per-matrix state (optim/apollo.py) as the named tensors a checkpoint holds, and back.

Checkpoints are written at step boundaries, where a lagged window's sums are empty: only the step size
and alignment the next window applies are saved. Checkpoints of earlier versions may hold `r_sum` (always
zero there) and `lag_scale` (the scale itself, not a step size): both are read and dropped.
"""
from __future__ import annotations

import torch

from .apollo import projection_shape, projects_right, reset_window

SAVED = ("exp_avg", "exp_avg_sq", "prev_norm", "proj", "lag_step", "lag_align")
OLD_KEYS = ("r_sum", "lag_scale")


def state_shapes(shape: tuple[int, int], rank: int, scale_type: str) -> dict[str, tuple]:
    """Shapes of every tensor a checkpoint may hold for one matrix's state."""
    rshape = (shape[0], rank) if projects_right(shape) else (rank, shape[1])
    if scale_type == "tensor":
        cshape = ()
    else:
        cshape = (shape[0], 1) if projects_right(shape) else (1, shape[1])
    return {"step": (), "seed": (), "exp_avg": rshape, "exp_avg_sq": rshape, "prev_norm": (),
            "proj": projection_shape(shape, rank), "lag_step": cshape, "lag_align": (),
            "r_sum": rshape, "lag_scale": cshape}


REQUIRED_STATE = ("step", "seed", "exp_avg", "exp_avg_sq", "prev_norm")


def state_tensors(state: dict) -> dict[str, torch.Tensor]:
    """The state as named tensors (ints as int64 0-d tensors); drawn-later entries only once they exist."""
    out = {"step": torch.tensor(state["step"], dtype=torch.int64),
           "seed": torch.tensor(state["seed"], dtype=torch.int64)}
    for k in SAVED:
        if state.get(k) is not None:
            out[k] = state[k]
    return out


def load_state_tensors(state: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Inverse of state_tensors, onto the device of the existing state."""
    dev = state["exp_avg"].device
    state["step"], state["seed"] = int(tensors["step"]), int(tensors["seed"])
    for k in ("exp_avg", "exp_avg_sq", "prev_norm"):
        state[k] = tensors[k].to(dev)
    for k in ("proj", "lag_step", "lag_align"):
        state[k] = tensors[k].to(dev) if k in tensors else None
    if state["lag_step"] is not None and state["lag_align"] is None:
        state["lag_step"] = None
    reset_window(state)
