"""The one build and the one step: what the trainer, the tests, the benchmarks and the Python API share.

    model, opt = build(cfg, device)                    # int8 LLaMA + its in-backward optimizer
    for step in range(max_steps):
        loss = optimizer_step(model, opt, [next(batches) for _ in range(K)])

`build` = model.build_model → activation checkpointing → layerwise.LayerwiseOptimizer (`attach` does the
last two for a model built elsewhere, e.g. a transformers LlamaForCausalLM made int8 by model.quantize_).
`micro_batch` is one micro-batch with its bookkeeping: begin_step, forward, the spike guard's decision
before backward (an in-backward update cannot be undone), backward, after_backward. `optimizer_step` runs
K of them and ends the step (end_step, or abandon_step when the guard skipped them all).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from .layerwise import LayerwiseOptimizer
from .loss import causal_lm_loss
from .model import build_model, enable_activation_checkpointing


def attach(model, cfg, reducer=None) -> LayerwiseOptimizer:
    """Put `model` in train mode (activation checkpointing per cfg.model) and hook the in-backward optimizer
    of cfg.optim into it: from here every backward updates the weights. `reducer`: data parallel
    (distributed.GradAverager), None in one process."""
    t = cfg.train
    model.train()
    if cfg.model.activation_checkpointing:
        enable_activation_checkpointing(model)
    return LayerwiseOptimizer(model, cfg.optim, t.max_steps, seed=t.seed, stochastic_round=cfg.model.stochastic_round,
                              accum_mode=t.accum_mode, reducer=reducer, grad_accum_steps=t.grad_accum_steps)


def build(cfg, device: torch.device | str = "cpu", reducer=None, init: bool = True):
    """(model, optimizer) of a run config on `device`: the int8 LLaMA of cfg.model (initialised from
    cfg.train.seed; init=False leaves the weights for the caller to fill, e.g. from a checkpoint) with its
    in-backward optimizer attached."""
    model = build_model(cfg.model, device, seed=cfg.train.seed, init=init)
    return model, attach(model, cfg, reducer)


def micro_batch(model, opt: LayerwiseOptimizer, x: torch.Tensor, *, last: bool = True, accum: int = 1,
                check: bool = False, guard=None, loss_fn: Callable | None = None,
                value_of: Callable | None = None, replay: int = 0) -> tuple[float, str | None]:
    """One micro-batch of an optimizer step of `accum` (`last`: the step's last one, whose backward steps
    every tensor): (its loss, None) when trained on; (its loss, the reason) when the spike guard skipped it,
    before its backward (nothing changed). `value_of(loss)` turns the loss into the float the guard judges
    (data parallel: the mean over the ranks); `check`: the startup guard's count of changed weights;
    `replay`: a micro-batch of this step run again in place of a skipped one, how many replays are left
    counting this one (see optimizer_step)."""
    opt.begin_step(last_micro=last, check=check, replay=replay)
    loss = (loss_fn or causal_lm_loss)(model, x)  # default: model(input_ids=x, labels=x).loss, no full logits
    value = value_of(loss) if value_of is not None else loss.item()
    if guard is not None:
        reason = guard.reason_to_skip(value)
        if reason:
            return value, reason  # the graph is freed with `loss`: no backward, no update
        guard.accept(value)
    (loss / accum).backward()
    opt.after_backward()  # raises NonFiniteGradient (no weight took it) naming the tensor
    return value, None


def optimizer_step(model, opt: LayerwiseOptimizer, batches: Iterable[torch.Tensor], accum: int | None = None, *,
                   check: bool = False, guard=None, loss_fn: Callable | None = None, value_of: Callable | None = None,
                   on_skip: Callable | None = None) -> float | None:
    """One optimizer step over `accum` micro-batches drawn from `batches` as they are needed (default: all
    of a list); the mean loss of those trained on, or None when the guard skipped all of them (then nothing
    changed and the step does not count). `on_skip(reason, micro)` hears of each skip.

    Lagged accumulation applies each micro-batch's share of the window's step at once, sized for K of them:
    a skipped micro-batch would leave its share unapplied (7 of 8 skipped: a third to a half of a step), and
    the micro-batches already applied cannot be scaled up afterwards (their gradients are gone). So in lagged
    mode the step's last micro-batch trained on is run again once per skipped one, at the window's end (no
    new tokens, not judged again, its loss not counted): the window stays K backward passes, and those
    replays apply the rest of the window's step (optim/apollo.py). Exact mode steps on the mean of those
    used (×K/used) instead."""
    accum = len(batches) if accum is None else accum
    total, used, it = 0.0, 0, iter(batches)
    owed, last_used = 0, None  # lagged: micro-batches skipped so far; the last one trained on
    for micro in range(accum):
        x = next(it)
        value, reason = micro_batch(model, opt, x, last=micro == accum - 1 and not owed, accum=accum, check=check,
                                    guard=guard, loss_fn=loss_fn, value_of=value_of)
        if reason:
            if on_skip is not None:
                on_skip(reason, micro)
            owed += opt.lagged
            continue
        total += value
        used += 1
        last_used = x
    for r in range(owed if used else 0):
        micro_batch(model, opt, last_used, last=r == owed - 1, accum=accum, check=check, loss_fn=loss_fn,
                    replay=owed - r)
    if used == 0:
        opt.abandon_step()
        return None
    opt.end_step(check=check)
    return total / used
