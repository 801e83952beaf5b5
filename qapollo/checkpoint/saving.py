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
from .files import (SCHEMA, CheckpointError, DiskSpaceError, fsync_dir, list_checkpoints, say, tensor_items,
                    write_safetensors, write_text)
from .validation import files_ok, resume_target


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


def save(run_dir: str, step: int, states: dict, *, config, tokenizer=None, keep: int = 2,
         incomplete_step: int | None = None, last_saved: str | None = None) -> str:
    """Write checkpoint-<step> atomically and name it in `latest`, then drop checkpoints beyond `keep` (<= 0
    keeps all). Returns its path.

    `states` maps a name to a component's state: "model" {name: tensor}, "optimizer" (tensors, layout) and
    "trainer" (a JSON-able dict: counters, data cursor, spike guard, ...); the RNG states are taken here.
    `config` is the run config (saved as config.yaml), `tokenizer` is saved under tokenizer/.
    Refused for a step that did not complete (`incomplete_step`: some tensors updated, others not) and,
    before anything is written, when the disk lacks room for it. `last_saved`: the checkpoint this very
    state was saved to or resumed from (then only `latest` is written again).
    """
    name = f"checkpoint-{step}"
    if incomplete_step is not None:
        raise CheckpointError(f"refusing to save {name}: step {incomplete_step} did not complete, so the weights "
                              f"and optimizer states in memory are partly updated")
    final = os.path.join(run_dir, name)
    os.makedirs(run_dir, exist_ok=True)
    if last_saved and os.path.isdir(final) and os.path.samefile(last_saved, final) and files_ok(final):
        # This very state was just saved or resumed from (a stop right after a periodic save).
        _write_latest(run_dir, name)
        return final
    for d in os.listdir(run_dir):  # leftovers of a save that crashed: never a valid checkpoint
        if d.startswith(".tmp-checkpoint-") or d.startswith(".old-checkpoint-"):
            shutil.rmtree(os.path.join(run_dir, d), ignore_errors=True)
    check_disk_space(run_dir, name, checkpoint_bytes(states))
    tmp = os.path.join(run_dir, f".tmp-{name}-{os.getpid()}")
    os.makedirs(tmp)
    t0 = time.perf_counter()
    previous = _read_latest(run_dir)
    try:
        files = _write_checkpoint(tmp, step, states, config, tokenizer)
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
        fsync_dir(run_dir)
    except BaseException as e:  # also a second Ctrl-C (stops.Interrupted): the last checkpoint stays as it was
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isdir(final) and _read_latest(run_dir) == name:
            _restore_latest(run_dir, previous)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskSpaceError(f"the disk filled up while writing {name} in {run_dir} ({e.strerror}): the "
                                 f"partial checkpoint was removed; {kept_note(run_dir)}; free some space, then "
                                 f"continue with --resume auto") from e
        raise
    testhook.hit("save:rotate", step)
    _rotate(run_dir, keep, keep=final)
    mb = sum(f["bytes"] for f in files.values()) / 2**20
    say(f"saved {final} ({mb:.1f} MiB in {time.perf_counter() - t0:.2f}s)")
    return final


# ---- disk space ----------------------------------------------------------------------------------
HEADROOM_BYTES = 16 << 20  # safetensors headers, JSON/YAML, the tokenizer files (≈ 0.5 MB for 32k)


def checkpoint_bytes(states: dict) -> int:
    """Bytes the checkpoint of `states` takes: every model and optimizer tensor, plus headroom for the rest."""
    tensors = list(states["model"].values()) + list(states["optimizer"][0].values())
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


def _write_checkpoint(tmp: str, step: int, states: dict, config, tokenizer) -> dict:
    from ..config import arch_dict, config_hash
    files = {}
    files["model.safetensors"] = write_safetensors(
        os.path.join(tmp, "model.safetensors"), tensor_items(states["model"]), _meta("model", step))
    testhook.hit("save:model", step)
    opt_t, layout = states["optimizer"]
    files["optimizer.safetensors"] = write_safetensors(
        os.path.join(tmp, "optimizer.safetensors"), tensor_items(opt_t), _meta("optimizer", step, layout=layout))
    rng_t, rng_meta = rng_state()
    files["rng_state.safetensors"] = write_safetensors(
        os.path.join(tmp, "rng_state.safetensors"), tensor_items(rng_t), _meta("rng", step, **rng_meta))
    write_text(os.path.join(tmp, "config.yaml"), config.to_yaml())
    if tokenizer is not None:
        tokenizer.save(os.path.join(tmp, "tokenizer"))
        for f in os.listdir(os.path.join(tmp, "tokenizer")):
            with open(os.path.join(tmp, "tokenizer", f), "rb+") as fh:
                os.fsync(fh.fileno())
    state = {
        "schema_version": SCHEMA,
        "global_step": step,
        **states["trainer"],
        "config_hash": config_hash(config),
        "arch": arch_dict(config),
        "versions": versions(),
        "tokenizer": None if tokenizer is None else {"name": str(tokenizer.name_or_path),
                                                     "vocab_size": tokenizer.vocab_size,
                                                     "fingerprint": tokenizer.fingerprint()},
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": files,
    }
    write_text(os.path.join(tmp, "trainer_state.json"), json.dumps(state, indent=1) + "\n")
    fsync_dir(tmp)
    return files


def _write_latest(run_dir: str, name: str) -> None:
    tmp = os.path.join(run_dir, f".latest-{os.getpid()}")
    write_text(tmp, name + "\n")
    os.replace(tmp, os.path.join(run_dir, "latest"))
    fsync_dir(run_dir)


def _read_latest(run_dir: str) -> str | None:
    try:
        with open(os.path.join(run_dir, "latest")) as f:
            return f.read().strip()
    except OSError:
        return None


def _restore_latest(run_dir: str, previous: str | None) -> None:
    """A save that did not complete: `latest` names the checkpoint it named before (or none)."""
    if previous:
        _write_latest(run_dir, previous)
    else:
        os.remove(os.path.join(run_dir, "latest"))


def _rotate(run_dir: str, limit: int, keep: str) -> None:
    """Keep `keep` (the checkpoint just written) and the newest limit-1 others; limit <= 0 keeps all."""
    if limit <= 0:
        return
    others = [p for _, p in list_checkpoints(run_dir) if os.path.abspath(p) != os.path.abspath(keep)]
    for p in others[limit - 1:]:
        # renamed first (atomic), then removed: an interrupted removal leaves a hidden .old- folder, which the
        # next save clears, never a half-deleted folder under a checkpoint-<step> name
        old = os.path.join(run_dir, f".old-{os.path.basename(p)}-{os.getpid()}")
        os.replace(p, old)
        shutil.rmtree(old, ignore_errors=True)
