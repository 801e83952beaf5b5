"""What a run says when a training step fails part-way through, and why nothing is saved then.

With in-backward updates an exception inside backward (out of memory, a non-finite gradient, a bug)
leaves some tensors updated and others not; the data cursor has moved and the step counter has not.
The trainer marks that state dirty (Trainer.dirty_step) and every save refuses it, so the run stops
with the newest checkpoint on disk as the place to continue from. This module words that stop.
"""
from __future__ import annotations

import os
import re
import sys

import torch

from .checkpoint import resume_target
from .config import PRESET_8GB
from .errors import QapolloError
from .planner import fmt, predict_peak
from .stops import Interrupted

_OOM_TYPES = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), MemoryError)


class TrainError(QapolloError, RuntimeError):
    """A run that cannot start or continue; the message says why and what to do."""


class StepFailed(TrainError):
    """A step ran out of memory part-way through: nothing of it was saved (on_step_failure words it)."""


def is_out_of_memory(e: BaseException) -> bool:
    # CUDA raises torch.OutOfMemoryError; the CPU allocator a RuntimeError naming the failed allocation
    return isinstance(e, _OOM_TYPES) or (isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


def on_step_failure(e: BaseException, step: int, run_dir: str, cfg, device: torch.device,
                    plan: dict | None = None) -> BaseException:
    """The exception that ends a run whose step `step` raised `e` (returned `e` itself: re-raise it unchanged).

    Out of memory becomes a one-line StepFailed. Errors a user can fix (QapolloError, e.g. a non-finite
    loss or gradient) keep their type, so callers can still catch them, with the resume point added to
    their message. Anything else is a bug: the same first part is printed, then its traceback.
    """
    if isinstance(e, Interrupted):  # a second Ctrl-C/SIGTERM says itself what it did
        return e
    what, tail = _what(e), ""
    if is_out_of_memory(e):
        tail = "; " + oom_advice(cfg, device, plan)
    msg = (f"step {step} did not complete ({what}); the weights and optimizer states in memory may "
           f"be partly updated, so nothing was saved; {_resume_note(run_dir)}{tail}")
    if is_out_of_memory(e):
        return StepFailed(msg)
    if isinstance(e, QapolloError):
        e.args = (msg,)
        return e if str(e) == msg else StepFailed(msg)  # a class with its own __str__: wrap it instead
    print(f"qapollo: {msg}; the traceback follows", file=sys.stderr, flush=True)
    return e


def _what(e: BaseException) -> str:
    if is_out_of_memory(e):
        m = re.search(r"[Tt]ried to allocate ([\d.]+ ?\w+)", str(e))
        return "out of memory" + (f" (tried to allocate {m.group(1)})" if m else "")
    if isinstance(e, QapolloError):
        return str(e)
    lines = str(e).strip().splitlines()
    return type(e).__name__ + (f": {lines[0]}" if lines else "")


def _resume_note(run_dir: str) -> str:
    target = resume_target(run_dir)
    return (f"--resume auto will continue from {target}" if target
            else "no checkpoint of this run exists yet, so a rerun starts from step 0")


def oom_advice(cfg, device: torch.device, plan: dict | None = None) -> str:
    """The planner's prediction for this config (`plan`, or made now) and what to change to fit."""
    plan = plan or predict_peak(cfg, device.type)
    said = f"the memory plan predicted a {fmt(plan['peak_bytes'])} peak ({plan['phase']} phase)"
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        said += f" + {fmt(plan['context_bytes'])} CUDA context on a {fmt(total)} device"
    else:
        said += f", ≈ {fmt(plan['rss_bytes'])} peak RSS"
    t = cfg.train
    tips = [f"lower train.batch_size (now {t.batch_size}) or train.seq_len (now {t.seq_len})"]
    if not cfg.model.activation_checkpointing:
        tips.append("set model.activation_checkpointing=true")
    if os.path.exists(PRESET_8GB) and not cfg.model.lean_head:
        tips.append(f"start from the 8 GB preset configs/{os.path.basename(PRESET_8GB)}")
    ask = tips[0] if len(tips) == 1 else ", ".join(tips[:-1]) + ", or " + tips[-1]
    return f"{said}; to fit: {ask} (see `qapollo plan`)"
