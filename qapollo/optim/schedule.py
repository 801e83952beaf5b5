"""The learning rate: the schedule every tensor follows, and the peak lrs found stable per width."""
from __future__ import annotations

import math


def lr_at(step: int, base_lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup then cosine to min_lr_ratio·lr. `step` is 0 for the first update, whose lr is > 0."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return base_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# (width, peak lr) the width-faithful stability probe found stable (benchmarks/stability.py; the measurements
# are in BENCHMARKS.md, 'Stable learning rates'): APOLLO-Mini matrices, and the float tensors' 8-bit Adam
STABLE_LR_MATRICES = ((256, 3e-3), (1024, 3e-3), (2048, 1e-3), (4096, 7.5e-4), (5120, 6e-4))
STABLE_LR_FLOAT = ((256, 3e-3), (1024, 7.5e-4), (2048, 2e-4), (4096, 1.875e-4), (5120, 1.5e-4))
# the largest peak lrs the probe found stable at each width it ran (above the configs' values at 4096 and 5120;
# at 5120 the float tensors ran only at the config's value)
LARGEST_STABLE_MATRICES = ((256, 3e-3), (1024, 3e-3), (2048, 1e-3), (4096, 1e-3), (5120, 1e-3))
LARGEST_STABLE_FLOAT = ((256, 3e-3), (1024, 7.5e-4), (2048, 2e-4), (4096, 1e-3), (5120, 1.5e-4))


def _log_interp(points, x: float) -> float:
    """Piecewise power law through `points`; flat below the first, ∝ 1/x beyond the last."""
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x == x1:
            return y1
        if x < x1:
            k = math.log(y1 / y0) / math.log(x1 / x0)
            return y0 * (x / x0) ** k
    x1, y1 = points[-1]
    return y1 * x1 / x


def stable_lrs(hidden_size: int) -> tuple[float, float]:
    """(APOLLO matrices' peak lr, float tensors' peak lr) for a model of this width: the probe's table,
    interpolated (the shipped configs use it; `train` notes an lr more than 2x above it). APOLLO-Mini's
    update norm does not depend on the gradient's scale, so its stable lr does not rise with width; the
    float tensors' Adam follows muP's output-layer rule, 3e-3·256/width."""
    return _log_interp(STABLE_LR_MATRICES, hidden_size), _log_interp(STABLE_LR_FLOAT, hidden_size)


def largest_stable_lrs(hidden_size: int) -> tuple[float, float]:
    """(matrices, float tensors): the largest peak lrs the stability probe found stable at this width,
    interpolated between the widths it ran (what `train`'s lr note compares with)."""
    return _log_interp(LARGEST_STABLE_MATRICES, hidden_size), _log_interp(LARGEST_STABLE_FLOAT, hidden_size)
