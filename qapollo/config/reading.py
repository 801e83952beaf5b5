"""Reading a config: defaults ← YAML file ← dotted command-line overrides, then validation (checks.py).

Unknown keys and values of the wrong type are errors (a typo must never be silently ignored).
"""
from __future__ import annotations

import os
import sys
from dataclasses import fields
from typing import Any, get_type_hints

import yaml

from .checks import ConfigError, validate
from .sections import SECTIONS, TOP_LEVEL, Config

# Old key names still read (YAML files, configs saved in older checkpoints), mapped to the new ones.
RENAMED = {"train.save_total_limit": "train.keep_checkpoints"}
# Keys that no longer exist: still read (configs saved in older checkpoints hold them) and ignored.
RETIRED = {"train.compile": "it never had an effect (the int8 kernels are compiled per model.fused_update)"}


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Check/convert one value against the declared type (str → int/float/bool for CLI overrides)."""
    allowed = [t for t in getattr(typ, "__args__", (typ,))]
    if value is None:
        if type(None) in allowed:
            return None
        raise ConfigError(f"config key '{key}' may not be null")
    for t in allowed:
        if t is type(None):
            continue
        if t is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
        elif t is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, str):
                try:
                    return int(value)
                except ValueError:
                    pass
            if isinstance(value, float) and value.is_integer():
                return int(value)
        elif t is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
        elif t is dict:
            if isinstance(value, dict):
                return value
        elif t is list:
            if isinstance(value, list):
                return value
            if isinstance(value, str) and str not in allowed:  # one item given on the command line
                return [value]
        elif t is str:
            if isinstance(value, str):
                return value
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
    if isinstance(value, str) and type(None) in allowed and value.lower() in ("null", "none", ""):
        return None
    names = "/".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise ConfigError(f"config key '{key}' must be {names}, got {value!r}")


def _set(cfg: Config, dotted: str, value: Any) -> None:
    dotted = RENAMED.get(dotted, dotted)
    if dotted in RETIRED:
        return
    parts = dotted.split(".")
    if len(parts) == 1 and parts[0] in TOP_LEVEL:
        cfg.resume = _coerce(value, str | None, dotted)
        return
    if len(parts) != 2 or parts[0] not in SECTIONS:
        raise ConfigError(f"unknown config key '{dotted}': use section.key with a section in "
                          f"{sorted(SECTIONS)} (e.g. optim.lr=0.005)")
    section = getattr(cfg, parts[0])
    hints = get_type_hints(type(section))
    if parts[1] not in hints:
        valid = ", ".join(f.name for f in fields(section))
        raise ConfigError(f"unknown config key '{dotted}'; valid keys of '{parts[0]}': {valid}")
    if parts[0] == "model" and (value is None or (isinstance(value, str) and value.lower() in ("null", "none"))):
        # model.KEY=null unsets the key (its default, as if no file had set it): the override that lets
        # model.init_from set a shape key another config file gave
        setattr(section, parts[1], getattr(type(section)(), parts[1]))
        explicit_keys(cfg).discard(dotted)
        return
    setattr(section, parts[1], _coerce(value, hints[parts[1]], dotted))
    explicit_keys(cfg).add(dotted)


def explicit_keys(cfg: Config) -> set[str]:
    """The dotted keys a file or override set (not defaults): model.init_from refuses conflicting shape keys."""
    return cfg.__dict__.setdefault("_explicit", set())


def _flatten(d: dict, where: str) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if k in TOP_LEVEL:
            out[k] = v
        elif k in SECTIONS and not isinstance(v, (dict, type(None))):
            raise ConfigError(f"config section '{k}' in {where} must be a mapping of keys (key: value lines "
                              f"indented under '{k}:'), got {v!r}")
        elif k in SECTIONS:
            for kk, vv in (v or {}).items():  # an empty section (`model:` alone) is null: nothing to set
                out[f"{k}.{kk}"] = vv
        else:
            raise ConfigError(f"unknown config section '{k}' in {where}; expected {sorted(SECTIONS)}")
    return out


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value (e.g. train.max_steps=200)")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def _warn_renamed(key: str, where: str) -> None:
    if key in RENAMED:
        print(f"qapollo: warning: {key} (in {where}) is now called {RENAMED[key]}; the old name still works",
              file=sys.stderr)
    elif key in RETIRED:
        print(f"qapollo: warning: {key} (in {where}) is no longer a setting and is ignored: {RETIRED[key]}",
              file=sys.stderr)


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults ← YAML file ← dotted overrides; then validation."""
    cfg = Config()
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file '{path}' not found; pass an existing YAML file to --config "
                              f"(see configs/)")
        with open(path) as f:
            try:
                raw = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                mark, what = getattr(e, "problem_mark", None), getattr(e, "problem", None) or str(e).splitlines()[0]
                at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
                raise ConfigError(f"config file '{path}' is not valid YAML: {what}{at}; fix that line (configs/ has "
                                  f"examples)") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file '{path}' holds a {type(raw).__name__}, not a mapping of sections: "
                              f"write it as `model:`, `optim:`, `train:`, `data:`, `eval:` sections (see configs/)")
        for k, v in _flatten(raw, path).items():
            _warn_renamed(k, path)
            _set(cfg, k, v)
        if not cfg.train.run_name:
            cfg.train.run_name = os.path.splitext(os.path.basename(path))[0]
    for o in overrides:
        k, v = parse_override(o)
        _warn_renamed(k, "the command line")
        _set(cfg, k, v)
    if not cfg.train.run_name:
        cfg.train.run_name = "run"
    validate(cfg)
    return cfg


def config_from_dict(d: dict) -> Config:
    cfg = Config()
    for k, v in _flatten(d, "config").items():
        _set(cfg, k, v)
    validate(cfg)
    return cfg


