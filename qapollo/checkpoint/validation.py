"""Validation: which checkpoints to try, and one-line errors for every way a checkpoint can be broken."""
from __future__ import annotations

import json
import os

import yaml

from .files import (CKPT_RE, DTYPES, SCHEMA, TENSOR_FILES, CheckpointError, IncompatibleCheckpoint, _crc32,
                    list_checkpoints, open_safetensors, say)


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


def resume_target(run_dir: str) -> str | None:
    """The checkpoint `--resume auto` would continue from (first candidate whose files are all there)."""
    return next((p for p in candidates(run_dir) if _files_ok(p)), None)


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
    from ..config import ConfigError, config_from_dict
    path = os.path.join(ckpt, "config.yaml")
    try:
        with open(path) as f:
            return config_from_dict(yaml.safe_load(f))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (incomplete checkpoint)") from None
    except (yaml.YAMLError, ConfigError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a valid run config ({str(e).splitlines()[0]})") from None


def check_compatible(ckpt: str, saved, cfg) -> None:
    from ..config import arch_dict
    old, new = arch_dict(saved), arch_dict(cfg)
    diff = [k for k in old if old[k] != new[k]]
    if diff:
        k = diff[0]
        raise IncompatibleCheckpoint(
            f"cannot resume {ckpt}: it was trained with {k}={old[k]!r} but the config has {k}={new[k]!r}"
            f"{f' (and {len(diff) - 1} more)' if len(diff) > 1 else ''}; model shape and optimizer kind must "
            f"match (max_steps, logging and eval may change): set {k}={old[k]} or start a new train.run_name")


def check_tokenizer(ckpts: list[str], tok) -> None:
    """The run to resume was tokenized with this tokenizer: other token ids would silently mean other text.

    Checks the first checkpoint (all of a run share the tokenizer), before any data is tokenized or a
    model built. Older checkpoints without the fingerprint are compared through their saved tokenizer/.
    """
    for ckpt in ckpts[:1]:
        try:
            saved = read_state(ckpt).get("tokenizer")
        except CheckpointError:
            return  # reported, with fallback, when the checkpoint is validated
        if saved is None:
            folder = os.path.join(ckpt, "tokenizer")
            if not os.path.isdir(folder):
                return
            from ..tokenizer import load_tokenizer
            old = load_tokenizer(folder)
            saved = {"name": str(old.name_or_path), "vocab_size": old.vocab_size, "fingerprint": old.fingerprint()}
        if saved.get("fingerprint") != tok.fingerprint():
            raise IncompatibleCheckpoint(
                f"cannot resume {ckpt}: it was trained with tokenizer {saved.get('name')!r} (vocab "
                f"{saved.get('vocab_size')}) but data.tokenizer gives {str(tok.name_or_path)!r} (vocab "
                f"{tok.vocab_size}), another tokenizer: resume with data.tokenizer={os.path.join(ckpt, 'tokenizer')} "
                f"(the copy saved with the run) or start a new train.run_name")


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
    from ..layerwise import ApolloUpdater
    from ..optim.apollo import REQUIRED_STATE, state_shapes
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
