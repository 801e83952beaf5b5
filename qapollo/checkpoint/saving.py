"""Saving: checkpoint-<step> written into a temp folder, fsynced, named in `latest`, renamed into place, rotated."""
from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time

import numpy as np
import torch

from .files import SCHEMA, _fsync_dir, _items, _write_text, list_checkpoints, say, write_safetensors
from .validation import _files_ok

def versions() -> dict:
    import importlib.metadata as md
    out = {"python": sys.version.split()[0], "schema": SCHEMA}
    for pkg in ("qapollo", "torch", "transformers", "bitsandbytes", "safetensors"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "source" if pkg == "qapollo" else None
    out["torch"] = torch.__version__
    return out


def optimizer_state(opt) -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten every updater's state to `<tensor name>.<key>` tensors + a JSON layout.

    APOLLO: step/seed as int64 0-d tensors, moments, limiter norm, projection (if drawn yet). Float
    tensors: the raw per-parameter state of their torch or bitsandbytes optimizer (bnb keeps `step`
    as a Python int: it goes to the layout's `scalars`).
    """
    from ..layerwise import ApolloUpdater
    tensors, layout = {}, {}
    for name, upd in opt.updaters.items():
        if isinstance(upd, ApolloUpdater):
            st = upd.state
            state = {"step": torch.tensor(st["step"], dtype=torch.int64),
                     "seed": torch.tensor(st["seed"], dtype=torch.int64),
                     "exp_avg": st["exp_avg"], "exp_avg_sq": st["exp_avg_sq"], "prev_norm": st["prev_norm"]}
            if st["proj"] is not None:
                state["proj"] = st["proj"]
            kind, scalars = "apollo", {}
        else:
            state, scalars = upd.state_dict()
            kind = type(upd.chunks[0][2]).__name__
        for k, v in state.items():
            tensors[f"{name}.{k}"] = v
        layout[name] = {"kind": kind, "tensors": sorted(state), "scalars": scalars}
    return tensors, layout


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    t = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i in range(torch.cuda.device_count()):
            t[f"torch_cuda_{i}"] = torch.cuda.get_rng_state(i)
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    t["numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
    py = random.getstate()
    t["python_state"] = torch.tensor(py[1], dtype=torch.int64)
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(gauss)], "python": [py[0], py[2]]}
    return t, meta


def _meta(kind: str, step: int, **extra) -> dict[str, str]:
    return {"format": "pt", "qapollo_schema": str(SCHEMA), "kind": kind, "step": str(step),
            **{k: json.dumps(v) for k, v in extra.items()}}


def save(trainer) -> str:
    """Write checkpoint-<step> atomically, then `latest`, then drop checkpoints beyond save_total_limit."""
    step, run_dir = trainer.opt.step_count, trainer.run_dir
    name = f"checkpoint-{step}"
    final = os.path.join(run_dir, name)
    os.makedirs(run_dir, exist_ok=True)
    done = getattr(trainer, "checkpoint_path", None)
    if done and os.path.isdir(final) and os.path.samefile(done, final) and _files_ok(final):
        # This very state was just saved or resumed from (a stop right after a periodic save).
        _write_latest(run_dir, name)
        return final
    for d in os.listdir(run_dir):  # leftovers of a save that crashed: never a valid checkpoint
        if d.startswith(".tmp-checkpoint-") or d.startswith(".old-checkpoint-"):
            shutil.rmtree(os.path.join(run_dir, d), ignore_errors=True)
    tmp = os.path.join(run_dir, f".tmp-{name}-{os.getpid()}")
    os.makedirs(tmp)
    t0 = time.perf_counter()
    try:
        files = _write_checkpoint(trainer, tmp, step)
        if os.path.isdir(final):  # an older or broken folder of this step: replaced only now
            old = os.path.join(run_dir, f".old-{name}-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)  # atomic; fails rather than overwrite a non-empty folder
        _fsync_dir(run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_latest(run_dir, name)
    _rotate(run_dir, trainer.cfg.train.save_total_limit, keep=final)
    trainer.checkpoint_path = final
    mb = sum(f["bytes"] for f in files.values()) / 2**20
    say(f"saved {final} ({mb:.1f} MiB in {time.perf_counter() - t0:.2f}s)")
    return final


def _write_checkpoint(trainer, tmp: str, step: int) -> dict:
    from ..config import arch_dict, config_hash
    cfg, opt = trainer.cfg, trainer.opt
    files = {}
    model_t = trainer.model.state_dict()
    files["model.safetensors"] = write_safetensors(
        os.path.join(tmp, "model.safetensors"), _items(model_t), _meta("model", step))
    opt_t, layout = optimizer_state(opt)
    files["optimizer.safetensors"] = write_safetensors(
        os.path.join(tmp, "optimizer.safetensors"), _items(opt_t), _meta("optimizer", step, layout=layout))
    rng_t, rng_meta = rng_state()
    files["rng_state.safetensors"] = write_safetensors(
        os.path.join(tmp, "rng_state.safetensors"), _items(rng_t), _meta("rng", step, **rng_meta))
    _write_text(os.path.join(tmp, "config.yaml"), cfg.to_yaml())
    tok = getattr(getattr(trainer, "data", None), "tokenizer", None)
    if tok is not None:
        tok.save(os.path.join(tmp, "tokenizer"))
        for f in os.listdir(os.path.join(tmp, "tokenizer")):
            with open(os.path.join(tmp, "tokenizer", f), "rb+") as fh:
                os.fsync(fh.fileno())
    o = cfg.optim
    state = {
        "schema_version": SCHEMA,
        "global_step": step,
        "max_steps": cfg.train.max_steps,
        "tokens_seen": trainer.tokens_seen,
        "lr_schedule": {"position": step, "next_lr": opt.current_lr(), "lr": o.lr, "warmup_steps": o.warmup_steps,
                        "max_steps": cfg.train.max_steps, "min_lr_ratio": o.min_lr_ratio},
        "data_cursor": trainer.data.train.state_dict(),
        "seed": cfg.train.seed,
        "config_hash": config_hash(cfg),
        "arch": arch_dict(cfg),
        "versions": versions(),
        "metrics": {"file": "../metrics.jsonl", "last_step": step},
        "last_eval": getattr(trainer, "last_eval", None),
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": files,
    }
    _write_text(os.path.join(tmp, "trainer_state.json"), json.dumps(state, indent=1) + "\n")
    _fsync_dir(tmp)
    return files


def _write_latest(run_dir: str, name: str) -> None:
    tmp = os.path.join(run_dir, f".latest-{os.getpid()}")
    _write_text(tmp, name + "\n")
    os.replace(tmp, os.path.join(run_dir, "latest"))
    _fsync_dir(run_dir)


def _rotate(run_dir: str, limit: int, keep: str) -> None:
    """Keep `keep` (the checkpoint just written) and the newest limit-1 others; limit <= 0 keeps all."""
    if limit <= 0:
        return
    others = [p for _, p in list_checkpoints(run_dir) if os.path.abspath(p) != os.path.abspath(keep)]
    for p in others[limit - 1:]:
        shutil.rmtree(p, ignore_errors=True)
