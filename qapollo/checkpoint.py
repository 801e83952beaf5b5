"""Checkpoints: atomic, pickle-free saves; exact resume; one-line errors for broken checkpoints.

    <output_dir>/<run_name>/
      checkpoint-<step>/
        model.safetensors       int8 codes + per-group scales/zeros + float tensors, bit for bit
        optimizer.safetensors   per-tensor optimizer state keyed by tensor name (`<name>.exp_avg`, ...)
        rng_state.safetensors   torch CPU/CUDA generator states (uint8 tensors), numpy, python
        trainer_state.json      step, tokens seen, lr position, data cursor, config hash, versions,
                                metrics pointer, and a manifest (size + crc32 of every file above)
        config.yaml             the resolved run config
        tokenizer/              the tokenizer files (the HF export copies them from here)
      latest                    name of the newest checkpoint, replaced last
      metrics.jsonl

A checkpoint is written into `.tmp-checkpoint-<step>-<pid>/`, every file fsynced, then renamed into
place, and only then is `latest` replaced: a crash at any point leaves the older checkpoints intact.
Nothing is pickled: tensors go to safetensors (written here tensor by tensor), the rest to JSON/YAML.
Stochastic rounding noise is a function of (seed, tensor, step), so step counters are all it needs.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import struct
import sys
import time
import zlib

import numpy as np
import torch
import yaml

SCHEMA = 1
CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}
TENSOR_FILES = ("model.safetensors", "optimizer.safetensors", "rng_state.safetensors")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be saved, found or loaded; the message names the file and the problem."""


class IncompatibleCheckpoint(CheckpointError):
    """The checkpoint is intact but made with another model shape or optimizer: no fallback helps."""


def say(msg: str) -> None:
    print(f"qapollo: {msg}", file=sys.stderr, flush=True)


# ---- safetensors, written tensor by tensor -------------------------------------------------------
def write_safetensors(path: str, items, metadata: dict[str, str]) -> dict:
    """Write `items` = [(name, shape, dtype, get_tensor)] to `path` in the safetensors format.

    The header needs only shapes and dtypes, so each tensor is produced (and dropped) one at a time:
    an export never holds the whole model, a save never builds a second in-memory copy. Returns the
    manifest entry {bytes, crc32}. The file is fsynced before returning.
    """
    header, offset = {}, 0
    for name, shape, dtype, _ in items:
        n = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = metadata
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    hbytes += b" " * (-len(hbytes) % 8)  # the format pads the header to 8 bytes
    crc = 0
    with open(path, "wb") as f:
        for chunk in (struct.pack("<Q", len(hbytes)), hbytes):
            f.write(chunk)
            crc = zlib.crc32(chunk, crc)
        for name, shape, dtype, get in items:
            t = get()
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise CheckpointError(f"{path}: tensor {name} changed shape/dtype while saving")
            buf = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
            f.write(buf.data)
            crc = zlib.crc32(buf.data, crc)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": os.path.getsize(path), "crc32": crc}


def _items(tensors: dict[str, torch.Tensor]):
    return [(k, tuple(v.shape), v.dtype, (lambda v=v: v)) for k, v in tensors.items()]


def open_safetensors(path: str):
    from safetensors import safe_open
    try:
        return safe_open(path, framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error type for a bad header
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


# ---- what goes into a checkpoint -------------------------------------------------------------------
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
    from .layerwise import ApolloUpdater
    from .optim import apollo
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


# ---- save --------------------------------------------------------------------------------------
def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every checkpoint-<step> folder, newest step first."""
    if not os.path.isdir(run_dir):
        return []
    out = [(int(m.group(1)), os.path.join(run_dir, d)) for d in os.listdir(run_dir)
           if (m := CKPT_RE.match(d)) and os.path.isdir(os.path.join(run_dir, d))]
    return sorted(out, reverse=True)


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
    from .config import arch_dict, config_hash
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
        "spike_guard": trainer.guard.state_dict() if hasattr(trainer, "guard") else None,
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


# ---- finding what to resume --------------------------------------------------------------------
def candidates(run_dir: str) -> list[str]:
    """Checkpoints of a run dir in the order to try them: the one `latest` names, then newest first."""
    ckpts = [p for _, p in list_checkpoints(run_dir)]
    try:
        with open(os.path.join(run_dir, "latest")) as f:
            name = f.read().strip()
    except OSError:
        name = ""
    first = [p for p in ckpts if os.path.basename(p) == name]
    return first + [p for p in ckpts if p not in first]


def is_checkpoint_dir(path: str) -> bool:
    return bool(CKPT_RE.match(os.path.basename(os.path.normpath(path)))) or \
        os.path.exists(os.path.join(path, "trainer_state.json"))


def resume_candidates(cfg, run_dir: str) -> list[str]:
    """What `cfg.resume` asks for, as checkpoints to try in order ([] = a fresh run).

    A fresh run refuses a run dir that already holds checkpoints: nothing is overwritten silently.
    """
    spec = cfg.resume
    if not spec:
        existing = list_checkpoints(run_dir)
        if existing:
            raise CheckpointError(
                f"run dir {run_dir} already holds checkpoints ({os.path.basename(existing[0][1])}, ...): continue "
                f"it with --resume {run_dir} (or --resume auto), or start a new run with another train.run_name")
        return []
    if spec == "auto":
        found = candidates(run_dir)
        if not found:
            say(f"resume=auto: no checkpoint in {run_dir}, starting a fresh run")
    elif not os.path.isdir(spec):
        raise CheckpointError(f"--resume {spec}: no such checkpoint or run directory "
                              f"(give checkpoints/<run>, checkpoints/<run>/checkpoint-<step>, or auto)")
    elif is_checkpoint_dir(spec):
        found = [spec]
    else:
        found = candidates(spec)
        if not found:
            raise CheckpointError(f"--resume {spec}: the folder holds no checkpoint-<step> folder")
    for ckpt in found[:1]:  # fail fast, before a (7B) model is built, on a config that cannot resume
        try:
            saved = read_config(ckpt)
        except CheckpointError:
            continue  # reported, with fallback, when the checkpoint is validated
        check_compatible(ckpt, saved, cfg)
    return found


# ---- validation ----------------------------------------------------------------------------------
def read_state(ckpt: str) -> dict:
    path = os.path.join(ckpt, "trainer_state.json")
    try:
        with open(path) as f:
            state = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (incomplete checkpoint)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    for key, typ in (("schema_version", int), ("global_step", int), ("tokens_seen", int), ("data_cursor", dict),
                     ("files", dict)):
        if not isinstance(state.get(key), typ):
            raise CheckpointError(f"{path}: field '{key}' missing or not {typ.__name__}")
    if state["schema_version"] > SCHEMA:
        raise CheckpointError(f"{path}: schema {state['schema_version']} is newer than this qapollo reads "
                              f"({SCHEMA}); update qapollo")
    return state


def read_config(ckpt: str):
    from .config import ConfigError, config_from_dict
    path = os.path.join(ckpt, "config.yaml")
    try:
        with open(path) as f:
            return config_from_dict(yaml.safe_load(f))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (incomplete checkpoint)") from None
    except (yaml.YAMLError, ConfigError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a valid run config ({str(e).splitlines()[0]})") from None


def check_compatible(ckpt: str, saved, cfg) -> None:
    from .config import arch_dict
    old, new = arch_dict(saved), arch_dict(cfg)
    diff = [k for k in old if old[k] != new[k]]
    if diff:
        k = diff[0]
        raise IncompatibleCheckpoint(
            f"cannot resume {ckpt}: it was trained with {k}={old[k]!r} but the config has {k}={new[k]!r}"
            f"{f' (and {len(diff) - 1} more)' if len(diff) > 1 else ''}; model shape and optimizer kind must "
            f"match (max_steps, logging and eval may change): set {k}={old[k]} or start a new train.run_name")


def check_files(ckpt: str, state: dict, crc: bool = True) -> None:
    """Every file of the manifest exists with its recorded size (and crc32)."""
    for name in TENSOR_FILES:
        if name not in state["files"]:
            raise CheckpointError(f"{os.path.join(ckpt, 'trainer_state.json')}: manifest lacks {name}")
    for name, info in state["files"].items():
        path = os.path.join(ckpt, name)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: missing (incomplete checkpoint)")
        size = os.path.getsize(path)
        if size != info["bytes"]:
            raise CheckpointError(f"{path}: {size} bytes, expected {info['bytes']} (truncated or overwritten)")
        if crc and _crc32(path) != info["crc32"]:
            raise CheckpointError(f"{path}: checksum mismatch (the file is corrupted)")


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def _files_ok(ckpt: str) -> bool:
    try:
        check_files(ckpt, read_state(ckpt), crc=False)
        return True
    except CheckpointError:
        return False


def _check_schema(path: str, f, kind: str) -> dict:
    meta = f.metadata() or {}
    if meta.get("kind") != kind or meta.get("qapollo_schema") is None:
        raise CheckpointError(f"{path}: not a qapollo {kind} file (metadata {meta})")
    if int(meta["qapollo_schema"]) > SCHEMA:
        raise CheckpointError(f"{path}: schema {meta['qapollo_schema']} is newer than this qapollo reads ({SCHEMA})")
    return meta


def _check_tensor(path: str, f, key: str, shape, dtype=None) -> None:
    if key not in f.keys():
        raise CheckpointError(f"{path}: tensor '{key}' missing")
    sl = f.get_slice(key)
    if shape is not None and tuple(sl.get_shape()) != tuple(shape):
        raise CheckpointError(f"{path}: tensor '{key}' has shape {list(sl.get_shape())}, the model needs {list(shape)}")
    if dtype is not None and sl.get_dtype() != DTYPES[dtype]:
        raise CheckpointError(f"{path}: tensor '{key}' has dtype {sl.get_dtype()}, the model needs {DTYPES[dtype]}")


def validate(trainer, ckpt: str) -> dict:
    """Check a checkpoint against the built model/optimizer without changing anything; its state."""
    from .layerwise import ApolloUpdater
    from .optim.apollo import REQUIRED_STATE, state_shapes
    state = read_state(ckpt)
    check_compatible(ckpt, read_config(ckpt), trainer.cfg)
    check_files(ckpt, state)

    path = os.path.join(ckpt, "model.safetensors")
    with open_safetensors(path) as f:
        _check_schema(path, f, "model")
        want = trainer.model.state_dict()
        for k, v in want.items():
            # uint8 codes/zeros must match exactly; float tensors may change dtype (bf16 run → fp32 CPU)
            _check_tensor(path, f, k, v.shape, v.dtype if not v.is_floating_point() else None)
        extra = sorted(set(f.keys()) - set(want))
        if extra:
            raise CheckpointError(f"{path}: tensor '{extra[0]}' is not in this model ({len(extra)} unknown)")

    path = os.path.join(ckpt, "optimizer.safetensors")
    with open_safetensors(path) as f:
        meta = _check_schema(path, f, "optimizer")
        try:
            layout = json.loads(meta["layout"])
        except (KeyError, json.JSONDecodeError):
            raise CheckpointError(f"{path}: metadata 'layout' missing or not JSON") from None
        for name, upd in trainer.opt.updaters.items():
            if name not in layout:
                raise CheckpointError(f"{path}: no state for tensor '{name}'")
            entry = layout[name]
            if isinstance(upd, ApolloUpdater):
                shapes = state_shapes(upd.shape, upd.o.rank, upd.o.scale_type)
                need = set(REQUIRED_STATE)
            else:
                shapes = {f"c{i}.{k}": tuple(view.shape) for i, (_, view, _) in enumerate(upd.chunks)
                          for k in ("exp_avg", "exp_avg_sq", "state1", "state2")}
                need = set()
            missing = sorted(need - set(entry["tensors"]))
            if missing:
                raise CheckpointError(f"{path}: state of '{name}' lacks '{missing[0]}'")
            for k in entry["tensors"]:
                _check_tensor(path, f, f"{name}.{k}", shapes.get(k))
    return state


# ---- resume --------------------------------------------------------------------------------------
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
    trainer.opt.step_count = state["global_step"]
    trainer.tokens_seen = state["tokens_seen"]
    trainer.last_eval = state.get("last_eval")
    if state.get("spike_guard") and hasattr(trainer, "guard"):
        trainer.guard.load_state_dict(state["spike_guard"])
    load_rng(os.path.join(ckpt, "rng_state.safetensors"))
    trainer.metrics.truncate_after(state["global_step"])


def load_optimizer(opt, path: str) -> None:
    from .layerwise import ApolloUpdater
    from .optim import apollo
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
