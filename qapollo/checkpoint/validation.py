"""Validation: which checkpoints to try, and one-line errors for every way a checkpoint can be broken."""
from __future__ import annotations

import json
import os

import yaml

from .files import (CKPT_RE, DTYPES, SCHEMA, TENSOR_FILES, CheckpointError, IncompatibleCheckpoint, file_crc32,
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
    return next((p for p in candidates(run_dir) if files_ok(p)), None)


def is_checkpoint_dir(path: str) -> bool:
    return bool(CKPT_RE.match(os.path.basename(os.path.normpath(path)))) or \
        os.path.exists(os.path.join(path, "trainer_state.json"))


def find_checkpoint(spec: str) -> str:
    """A checkpoint folder as given, or a run dir's newest intact one (falling back past broken ones)."""
    if not os.path.isdir(spec):
        raise CheckpointError(f"{spec}: no such checkpoint or run directory")
    found = [spec] if is_checkpoint_dir(spec) else candidates(spec)
    if not found:
        raise CheckpointError(f"{spec}: holds no checkpoint-<step> folder; give checkpoints/<run> or "
                              f"checkpoints/<run>/checkpoint-<step>")
    for i, path in enumerate(found):
        try:
            check_files(path, read_state(path))
            read_config(path)
            return path
        except CheckpointError as e:
            if i + 1 == len(found):
                raise
            say(f"warning: {e}; falling back to {found[i + 1]}")
    raise AssertionError("unreachable")


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
            raw = yaml.safe_load(f)
        if isinstance(raw, dict) and (raw.get("model") or {}).get("lean_head") and isinstance(raw.get("optim"), dict):
            raw["optim"].setdefault("lean_optim", "apollo_mini")  # saved before the key existed: APOLLO-Mini
        return config_from_dict(raw)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (incomplete checkpoint)") from None
    except (yaml.YAMLError, ConfigError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a valid run config ({str(e).splitlines()[0]})") from None


def resume_config(spec: str, overrides=()):
    """`qapollo train --resume DIR` without --config: the config.yaml of the checkpoint it names (a run dir:
    its newest intact one), run where that checkpoint lies (train.output_dir, train.run_name), then the
    command line's overrides. Any qapollo checkpoint resumes with nothing else given (one written by
    qapollo.save included)."""
    from ..config import load_config
    ckpt = find_checkpoint(os.path.expanduser(spec))
    saved = read_config(ckpt)  # a broken config.yaml: the checkpoint's one-line error
    run_dir = os.path.dirname(os.path.abspath(ckpt))
    where = [f"train.output_dir={os.path.dirname(run_dir)}", f"train.run_name={os.path.basename(run_dir)}"]
    if saved.data.tokenizer is None and os.path.isdir(os.path.join(ckpt, "tokenizer")):
        where.append(f"data.tokenizer={os.path.join(ckpt, 'tokenizer')}")  # the copy saved with it (same ids)
    return load_config(os.path.join(ckpt, "config.yaml"), where + list(overrides))


def check_compatible(ckpt: str, saved, cfg) -> None:
    from ..config import arch_dict
    old, new = arch_dict(saved), arch_dict(cfg)
    diff = [k for k in old if old[k] != new[k]]
    if diff:
        k = diff[0]
        raise IncompatibleCheckpoint(
            f"cannot resume {ckpt}: it was trained with {k}={old[k]!r} but the config has {k}={new[k]!r}"
            f"{f' (and {len(diff) - 1} more)' if len(diff) > 1 else ''}; the model's shape, the optimizer's kind, "
            f"train.batch_size and train.seq_len must match (any other setting may change, and the resume says what "
            f"that changes): set {k}={old[k]} or start a new train.run_name")


# Settings a resume changes without a note: where the run is and which resources it uses; a tokenizer that
# passes the resume's check gives the same ids. The accumulation has its own note (the trainer's), the shape
# keys cannot change (check_compatible).
QUIET_ON_RESUME = ("train.output_dir", "train.run_name", "train.device", "data.cache_dir", "data.num_proc",
                   "data.tokenizer", "train.accum_mode", "train.grad_accum_steps")
SCHEDULE_KEYS = ("optim.lr", "optim.warmup_steps", "optim.min_lr_ratio", "train.max_steps")
WHAT_CHANGES = {
    "train.seed": "the data order and the random projections continue the checkpoint's; the rounding noise is "
                  "drawn from the new seed",
    "model.stochastic_round": "the int8 weights are rounded {} from here on",
    "model.dtype": "the float tensors and the activations compute in {} from here on",
}


def resume_notes(saved, cfg, step: int, lr_of) -> list[str]:
    """One line per setting a resume at `step` changes from the checkpoint's config `saved`: for the lr
    schedule's, the lr at that step before and after (`lr_of(config)`), for the others what they change."""
    from ..config import flat_dict
    old, new = flat_dict(saved), flat_dict(cfg)
    lines = []
    for k in (k for k in new if k in old and old[k] != new[k] and k not in QUIET_ON_RESUME):
        head = f"note: {k}={old[k]!r} in the checkpoint, {new[k]!r} now"
        if k in SCHEDULE_KEYS:
            how = ""
            if k == "train.max_steps":
                how = f" is {'stretched' if new[k] > old[k] else 'shortened'} to {new[k]} steps and"
            lines.append(f"{head}: the lr schedule{how} the lr at step {step} changes from {lr_of(saved):.4g} to "
                         f"{lr_of(cfg):.4g}")
        elif k == "model.stochastic_round":
            lines.append(f"{head}: {WHAT_CHANGES[k].format('stochastically' if new[k] else 'to nearest')}")
        elif k in WHAT_CHANGES:
            lines.append(f"{head}: {WHAT_CHANGES[k].format(new[k])}")
        else:
            lines.append(f"{head}: applies from here on")
    return lines


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
        if crc and file_crc32(path) != info["crc32"]:
            raise CheckpointError(f"{path}: checksum mismatch (the file is corrupted)")


def files_ok(ckpt: str) -> bool:
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


def check_tensor(path: str, f, key: str, shape, dtype=None) -> None:
    if key not in f.keys():
        raise CheckpointError(f"{path}: tensor '{key}' missing")
    sl = f.get_slice(key)
    if shape is not None and tuple(sl.get_shape()) != tuple(shape):
        raise CheckpointError(f"{path}: tensor '{key}' has shape {list(sl.get_shape())}, the model needs {list(shape)}")
    if dtype is not None and sl.get_dtype() != DTYPES[dtype]:
        raise CheckpointError(f"{path}: tensor '{key}' has dtype {sl.get_dtype()}, the model needs {DTYPES[dtype]}")


def validate(ckpt: str, cfg, model_state: dict, optimizer_spec: dict) -> dict:
    """Check a checkpoint against the run config, the built model's tensors (`model_state`: name → tensor)
    and the optimizer's state spec ({tensor name: (shapes, required keys)}) without changing anything;
    returns its trainer_state.json."""
    state = read_state(ckpt)
    check_compatible(ckpt, read_config(ckpt), cfg)
    check_files(ckpt, state)

    path = os.path.join(ckpt, "model.safetensors")
    with open_safetensors(path) as f:
        _check_schema(path, f, "model")
        for k, v in model_state.items():
            # uint8 codes/zeros must match exactly; float tensors may change dtype (bf16 run → fp32 CPU)
            check_tensor(path, f, k, v.shape, v.dtype if not v.is_floating_point() else None)
        extra = sorted(set(f.keys()) - set(model_state))
        if extra:
            raise CheckpointError(f"{path}: tensor '{extra[0]}' is not in this model ({len(extra)} unknown)")

    path = os.path.join(ckpt, "optimizer.safetensors")
    with open_safetensors(path) as f:
        meta = _check_schema(path, f, "optimizer")
        try:
            layout = json.loads(meta["layout"])
        except (KeyError, json.JSONDecodeError):
            raise CheckpointError(f"{path}: metadata 'layout' missing or not JSON") from None
        for name, (shapes, required) in optimizer_spec.items():
            if name not in layout:
                raise CheckpointError(f"{path}: no state for tensor '{name}'")
            entry = layout[name]
            missing = sorted(set(required) - set(entry["tensors"]))
            if missing:
                raise CheckpointError(f"{path}: state of '{name}' lacks '{missing[0]}'")
            for k in entry["tensors"]:
                check_tensor(path, f, f"{name}.{k}", shapes.get(k))
    return state
