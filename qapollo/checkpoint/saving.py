"""Saving: checkpoint-<step> written into a temp folder, fsynced, named in `latest`, renamed into place, rotated."""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

from .. import testhook
from .files import (SCHEMA, CheckpointError, DiskSpaceError, _fsync_dir, _items, _write_text, list_checkpoints, say,
                    write_safetensors)
from .loading import accumulation_record
from .validation import _files_ok, resume_target


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

    APOLLO: step/seed as int64 0-d tensors, moments, limiter norm, projection (if drawn yet), the lagged
    mode's scale and projected-gradient buffer (optim/apollo.state_tensors). Float
    tensors: the raw per-parameter state of their torch or bitsandbytes optimizer (bnb keeps `step`
    as a Python int: it goes to the layout's `scalars`).
    """
    from ..layerwise import ApolloUpdater
    from ..optim import apollo
    tensors, layout = {}, {}
    for name, upd in opt.updaters.items():
        if isinstance(upd, ApolloUpdater):
            state, kind, scalars = apollo.state_tensors(upd.state), "apollo", {}
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
    """Write checkpoint-<step> atomically and name it in `latest`, then drop checkpoints beyond keep_checkpoints.

    Refused for a step that did not complete (trainer.dirty_step: some tensors updated, others not) and,
    before anything is written, when the disk lacks room for it.
    """
    step, run_dir = trainer.opt.step_count, trainer.run_dir
    name = f"checkpoint-{step}"
    dirty = getattr(trainer, "dirty_step", None)
    if dirty is not None:
        raise CheckpointError(f"refusing to save {name}: step {dirty} did not complete, so the weights and "
                              f"optimizer states in memory are partly updated")
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
    check_disk_space(run_dir, name, checkpoint_bytes(trainer))
    tmp = os.path.join(run_dir, f".tmp-{name}-{os.getpid()}")
    os.makedirs(tmp)
    t0 = time.perf_counter()
    try:
        files = _write_checkpoint(trainer, tmp, step)
        # `latest` first: a crash before the rename leaves it naming a missing folder, and resume falls
        # back to the newest checkpoint that exists (the one before), never to an older one it named.
        _write_latest(run_dir, name)
        testhook.hit("save:latest", step)
        if os.path.isdir(final):  # an older or broken folder of this step: replaced only now
            old = os.path.join(run_dir, f".old-{name}-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)  # atomic; fails rather than overwrite a non-empty folder
        _fsync_dir(run_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskSpaceError(f"the disk filled up while writing {name} in {run_dir} ({e.strerror}): the "
                                 f"partial checkpoint was removed; {kept_note(run_dir)}; free some space, then "
                                 f"continue with --resume auto") from e
        raise
    testhook.hit("save:rotate", step)
    _rotate(run_dir, trainer.cfg.train.keep_checkpoints, keep=final)
    trainer.checkpoint_path = final
    mb = sum(f["bytes"] for f in files.values()) / 2**20
    say(f"saved {final} ({mb:.1f} MiB in {time.perf_counter() - t0:.2f}s)")
    return final


# ---- disk space ----------------------------------------------------------------------------------
HEADROOM_BYTES = 16 << 20  # safetensors headers, JSON/YAML, the tokenizer files (≈ 0.5 MB for 32k)


def checkpoint_bytes(trainer) -> int:
    """Bytes the next checkpoint takes: every model and optimizer tensor, plus headroom for the rest."""
    tensors = list(trainer.model.state_dict().values()) + list(optimizer_state(trainer.opt)[0].values())
    return sum(t.numel() * t.element_size() for t in tensors) + HEADROOM_BYTES


def check_disk_space(run_dir: str, name: str, need: int) -> None:
    """Fail before writing when the file system of run_dir has less than `need` bytes free."""
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise DiskSpaceError(
            f"not enough disk space for {name} in {run_dir}: it needs about {need / 2**20:,.1f} MiB and "
            f"{free / 2**20:,.1f} MiB are free; nothing was written and {kept_note(run_dir)}; free some space "
            f"(or lower train.keep_checkpoints, or set train.output_dir to a larger disk), then continue with "
            f"--resume auto")


def check_output_dir(run_dir: str, plan: dict | None = None) -> None:
    """Before a run allocates anything: its folder can be created and written, and holds one checkpoint.

    `plan` (memory.predict_peak) gives the checkpoint size: the persistent weights and optimizer states.
    """
    where = os.path.abspath(run_dir)
    while not os.path.exists(where) and os.path.dirname(where) != where:
        where = os.path.dirname(where)
    if not os.path.isdir(where):
        raise CheckpointError(f"train.output_dir: {where} is a file, not a folder, so {run_dir} cannot be created; "
                              f"set train.output_dir to a folder")
    try:  # os.access says yes to root even where writing fails (read-only or special file systems)
        os.rmdir(tempfile.mkdtemp(prefix=".qapollo-write-test-", dir=where))
    except OSError as e:
        raise CheckpointError(f"train.output_dir: cannot write in {where} ({e.strerror}); choose a writable "
                              f"folder with train.output_dir=PATH") from None
    if plan is not None:
        need = plan["persistent_bytes"] - plan["components"].get("accumulated_grads", 0) + HEADROOM_BYTES
        check_disk_space(where, "the first checkpoint", need)


def kept_note(run_dir: str) -> str:
    target = resume_target(run_dir)
    return (f"the earlier checkpoints are kept (--resume auto continues from {target})" if target
            else "no checkpoint of this run exists yet")


def _write_checkpoint(trainer, tmp: str, step: int) -> dict:
    from ..config import arch_dict, config_hash
    cfg, opt = trainer.cfg, trainer.opt
    files = {}
    model_t = trainer.model.state_dict()
    files["model.safetensors"] = write_safetensors(
        os.path.join(tmp, "model.safetensors"), _items(model_t), _meta("model", step))
    testhook.hit("save:model", step)
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
        "spike_guard": trainer.guard.state_dict() if hasattr(trainer, "guard") else None,
        # what the lagged step size and the limiter's reference were measured on (loading.check_accumulation)
        "accumulation": accumulation_record(cfg, trainer.dist.world if hasattr(trainer, "dist") else 1),
        "tokenizer": None if tok is None else {"name": str(tok.name_or_path), "vocab_size": tok.vocab_size,
                                               "fingerprint": tok.fingerprint()},
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
