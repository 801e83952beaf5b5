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


# Continued pre-training of a trained model (benchmarks/continued_pretraining.py; BENCHMARKS.md, 'Continued
# pre-training of a real pretrained model'): the sweep on SmolLM2-135M (width 576, 4,096 tokens per step,
# float_lr = lr / 5) found APOLLO-Mini's best peak lr at CONTINUE_FRACTION of the from-scratch stable lr at
# that width (1e-4 / 3e-4 / 1e-3: 3e-4 best, 1e-3 blew the model up; the float tensors at lr ended 0.006 /
# 0.018 nats worse than at lr / 5). The rule carries that fraction to other widths along the from-scratch table
# (only width 576 was swept). Tokens per step do not enter: from scratch a larger batch did not raise the
# stable lr (not measured for continued training).
CONTINUE_FRACTION = 0.1
CONTINUE_FLOAT_RATIO = 5


def continued_lrs(hidden_size: int) -> tuple[float, float]:
    """(APOLLO matrices' peak lr, float tensors' peak lr) for continuing the training of a trained model of
    this width (the continue presets use it; `train` notes an lr more than 2x above it with model.init_from)."""
    lr = CONTINUE_FRACTION * stable_lrs(hidden_size)[0]
    return lr, lr / CONTINUE_FLOAT_RATIO


def continued_warmup(beta2: float, max_steps: int) -> int:
    """Warmup steps for fresh optimizer states on a trained model: 2 / (1 - beta2), the rule of thumb for
    Adam's second moment (Ma & Yarats 2021, 'On the adequacy of untuned warmup for adaptive optimization'),
    at most a tenth of the run. The first Adam-type step is a sign step (the second moment has seen one
    gradient) and the next few are close to it, several times a later step; a trained model feels that
    unless the lr is still small (SmolLM2-135M with a 2-step warmup: APOLLO-Mini at 3e-4 took the training
    loss from 3.92 to 4.79 in three steps; BENCHMARKS.md)."""
    return max(1, min(round(2 / (1 - beta2)), max_steps // 10))


def lr_notes(hidden_size: int, lr: float, float_lr: float | None, continued: bool, warmup_steps: int,
             beta2: float, max_steps: int) -> list[str]:
    """What `train` says at start-up about the peak lrs and the warmup: an lr more than 2x the rule for this
    width (the largest found stable from scratch, or the continued-training rule); continuing, an lr under
    half the rule (a preset's lrs are its own width's: a narrower model learns slower than it could) and a
    warmup shorter than continued_warmup; a warmup over half the run (the lr peaks late or never)."""
    if continued:
        rule, what = continued_lrs(hidden_size), (
            f"the continued-training lr for width {hidden_size}",
            "BENCHMARKS.md, 'Continued pre-training of a real pretrained model'",
            "expect the trained model's loss to rise in the first steps")
    else:
        rule, what = largest_stable_lrs(hidden_size), (
            f"the largest peak lr the stability probe found stable at width {hidden_size}",
            "BENCHMARKS.md, 'Stable learning rates'",
            "expect loss spikes (the spike guard skips the worst; a larger batch did not raise the stable lr)")
    keys = ("optim.lr", "optim.float_lr" if float_lr is not None else "optim.float_lr (unset: optim.lr)")
    lrs = (lr, lr if float_lr is None else float_lr)
    notes = [f"{key}={x:g} is {x / ok:.2f}x {what[0]} ({ok:.3g}; {what[1]}): {what[2]}"
             for key, x, ok in zip(keys, lrs, rule) if x > 2 * ok]
    if continued:
        notes += [f"{key}={x:g} is {x / ok:.2f}x {what[0]} ({ok:.3g}; {what[1]}): it learns slower than it could "
                  "(a preset's lrs are for its own width)" for key, x, ok in zip(keys, lrs, rule) if x < ok / 2]
    warm = continued_warmup(beta2, max_steps)
    if continued and warmup_steps < warm:
        notes.append(f"optim.warmup_steps={warmup_steps} is short for fresh optimizer states on a trained model: "
                     f"{warm} (2 / (1 - optim.beta2), at most a tenth of the run) lets them settle")
    if warmup_steps > max_steps / 2:
        notes.append(f"optim.warmup_steps={warmup_steps} is over half of train.max_steps={max_steps}: the lr "
                     f"{'peaks late' if warmup_steps < max_steps else 'never reaches its peak'}; a tenth of the run "
                     "is usual")
    return notes
