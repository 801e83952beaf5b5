"""Loading: the first valid checkpoint of a list into a built trainer, exactly (model, optimizer, RNG, data cursor)."""
from __future__ import annotations

import json
import os
import random
import time

import numpy as np
import torch

from .files import CheckpointError, IncompatibleCheckpoint, open_safetensors, say
from .validation import validate


def resume(trainer, ckpts: list[str]) -> str | None:
    """Load the first valid checkpoint of `ckpts` into the trainer; None (fresh run) when empty."""
    if not ckpts:
        trainer.metrics.truncate_after(0)  # a run that crashed before its first checkpoint left lines
        return None
    for i, ckpt in enumerate(ckpts):
        try:
            state = validate(trainer, ckpt)
        except IncompatibleCheckpoint:
            raise
        except CheckpointError as e:
            if i + 1 == len(ckpts):
                raise
            say(f"warning: {e}; falling back to {ckpts[i + 1]}")
            continue
        t0 = time.perf_counter()
        load(trainer, ckpt, state)
        trainer.checkpoint_path = ckpt
        say(f"resumed from {ckpt} at step {state['global_step']} ({state['tokens_seen']} tokens seen, "
            f"loaded in {time.perf_counter() - t0:.2f}s)")
        return ckpt
    return None


LOAD_BATCH_BYTES = 512 << 20


@torch.no_grad()
def load_model_tensors(model, path: str, batch_bytes: int = LOAD_BATCH_BYTES) -> None:
    """Copy every tensor of `path` into the model, reopening the file every `batch_bytes`.

    safe_open memory-maps the file and the pages read stay in the process's RSS until it is closed: one
    open for a 7B checkpoint (6.9 GB) would add the whole file on top of the model (13.96 GiB peak RSS
    measured). Closing it every 512 MiB keeps that to one batch.
    """
    items = list(model.state_dict().items())
    i = 0
    while i < len(items):
        with open_safetensors(path) as f:
            done = 0
            while i < len(items) and done < batch_bytes:
                k, dst = items[i]
                dst.copy_(f.get_tensor(k))
                done += dst.numel() * dst.element_size()
                i += 1


@torch.no_grad()
def load(trainer, ckpt: str, state: dict) -> None:
    """Put a validated checkpoint's state into the trainer (model and optimizer in place)."""
    trainer.data.train.load_state_dict(state["data_cursor"])  # first: raises on other data settings
    load_model_tensors(trainer.model, os.path.join(ckpt, "model.safetensors"))
    load_optimizer(trainer.opt, os.path.join(ckpt, "optimizer.safetensors"))
    check_accumulation(trainer, ckpt, state)
    trainer.opt.step_count = state["global_step"]
    trainer.tokens_seen = state["tokens_seen"]
    trainer.last_eval = state.get("last_eval")
    if state.get("spike_guard") and hasattr(trainer, "guard"):
        trainer.guard.load_state_dict(state["spike_guard"])
    load_rng(os.path.join(ckpt, "rng_state.safetensors"))
    trainer.metrics.truncate_after(state["global_step"])


def accumulation_record(cfg, world_size: int) -> dict:
    """What a lagged step size and the limiter's reference were measured on (saved in trainer_state.json)."""
    t = cfg.train
    return {"accum_mode": t.accum_mode, "grad_accum_steps": t.grad_accum_steps,
            "tokens_per_step": t.batch_size * t.seq_len * t.grad_accum_steps * world_size}


def _lagged(rec: dict) -> bool:
    return rec["accum_mode"] == "lagged" and rec["grad_accum_steps"] > 1  # lagged with one micro-batch is exact


def check_accumulation(trainer, ckpt: str, state: dict) -> None:
    """A resume with other accumulation settings than the checkpoint's. The lagged step size is dropped
    when the mode or K changed (the next window measures its own, applied at its last micro-batch: one step
    of the right size), the limiter's reference too when the tokens per step changed (it measured other
    steps). Checkpoints written before the record held a per-micro-batch lagged state: both are dropped."""
    now = accumulation_record(trainer.cfg, trainer.dist.world)
    then = state.get("accumulation")
    if then is None:
        from .validation import read_config
        saved = read_config(ckpt).train
        if saved.accum_mode == "lagged" and saved.grad_accum_steps > 1:
            trainer.opt.forget_accumulation(reference=True)
        return
    same_window = _lagged(then) == _lagged(now) and (not _lagged(now) or then["grad_accum_steps"] == now["grad_accum_steps"])
    same_tokens = then["tokens_per_step"] == now["tokens_per_step"]
    if same_window and same_tokens:
        return
    trainer.opt.forget_accumulation(reference=not same_tokens)
    say(f"note: {ckpt} was trained with train.accum_mode={then['accum_mode']}, train.grad_accum_steps="
        f"{then['grad_accum_steps']}, {then['tokens_per_step']} tokens per step; now {now['accum_mode']}, "
        f"{now['grad_accum_steps']}, {now['tokens_per_step']}: the next step measures its own lagged step size"
        f"{'' if same_tokens else ' and the norm limiter starts afresh'}")


def load_optimizer(opt, path: str) -> None:
    from ..layerwise import ApolloUpdater
    from ..optim import apollo
    with open_safetensors(path) as f:
        layout = json.loads(f.metadata()["layout"])
        for name, upd in opt.updaters.items():
            entry = layout[name]
            # copy=True: get_tensor may map the file, which must not stay mapped (rotation deletes it)
            t = {k: f.get_tensor(f"{name}.{k}").to(copy=True) for k in entry["tensors"]}
            if isinstance(upd, ApolloUpdater):
                apollo.load_state_tensors(upd.state, t)
                continue
            upd.load_state_dict(t, entry["scalars"])


def load_rng(path: str) -> None:
    with open_safetensors(path) as f:
        meta = f.metadata()
        keys = set(f.keys())
        torch.set_rng_state(f.get_tensor("torch_cpu"))
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                if f"torch_cuda_{i}" in keys:
                    torch.cuda.set_rng_state(f.get_tensor(f"torch_cuda_{i}"), i)
        kind, pos, has_gauss, gauss = json.loads(meta["numpy"])
        np.random.set_state((kind, f.get_tensor("numpy_keys").numpy().astype(np.uint32), pos, has_gauss, gauss))
        version, gauss_next = json.loads(meta["python"])
        random.setstate((version, tuple(int(x) for x in f.get_tensor("python_state").tolist()), gauss_next))
