"""Run configuration: typed sections, YAML files, dotted command-line overrides.

A config file has the sections `model`, `optim`, `train`, `data`, `eval`. Unknown keys and values of
the wrong type are errors (a typo must never be silently ignored). This module imports nothing of ours.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass, field, fields
from typing import Any, get_type_hints

import yaml


# The 7B recipe: what `python run_7b.py` and `qapollo plan` use when no --config is given.
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "llama_7b.yaml")
# LLaMA-7B for 8 GB cards (model.lean_head): what `qapollo plan --budget` and out-of-memory advice point to.
PRESET_8GB = os.path.join(os.path.dirname(DEFAULT_CONFIG), "llama_7b_8gb.yaml")


# (width, peak lr) the width-faithful stability probe found stable (benchmarks/stability.py, BENCHMARKS.md:
# 2 decoder layers, 2,048 tokens per step, 25 steps): APOLLO-Mini matrices, and the float tensors' 8-bit Adam
STABLE_LR_MATRICES = ((256, 3e-3), (1024, 3e-3), (2048, 1e-3), (4096, 7.5e-4))
STABLE_LR_FLOAT = ((256, 3e-3), (1024, 7.5e-4), (2048, 2e-4), (4096, 1.875e-4))
# the largest peak lrs the probe found stable at each width it ran (above the configs' values at 4096)
LARGEST_STABLE_MATRICES = ((256, 3e-3), (1024, 3e-3), (2048, 1e-3), (4096, 1e-3))
LARGEST_STABLE_FLOAT = ((256, 3e-3), (1024, 7.5e-4), (2048, 2e-4), (4096, 1e-3))


def _log_interp(points, x: float) -> float:
    """Piecewise power law through `points`; flat below the first, ∝ 1/x beyond the last."""
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x == x1:
            return y1
        if x < x1:
            k = math.log(y1 / y0) / math.log(x1 / x0)
            return y0 * (x / x0) ** k
    x1, y1 = points[-1]
    return y1 * x1 / x


def stable_lrs(hidden_size: int) -> tuple[float, float]:
    """(APOLLO matrices' peak lr, float tensors' peak lr) for a model of this width: the probe's table,
    interpolated (the shipped configs use it; `train` notes an lr more than 2x above it).

    APOLLO-Mini's update norm does not depend on the gradient's scale, so its stable lr does not rise with
    width: 3e-3 held from width 256 to 1024 (1e-2 spiked at both), 1e-3 at 2048 (1.5e-3 jumped 1.04-1.05
    nats on two seeds), 7.5e-4 and 1e-3 at 4096 (2e-3 spiked by 4.4 nats). The embedding/lm_head/norms'
    Adam follows 3e-3·256/width (muP's output-layer rule) down to 2e-4 at 2048, where 3.75e-4 failed.
    """
    return _log_interp(STABLE_LR_MATRICES, hidden_size), _log_interp(STABLE_LR_FLOAT, hidden_size)


def largest_stable_lrs(hidden_size: int) -> tuple[float, float]:
    """(matrices, float tensors): the largest peak lrs the stability probe found stable at this width,
    interpolated between the widths it ran (what `train`'s lr note compares with)."""
    return _log_interp(LARGEST_STABLE_MATRICES, hidden_size), _log_interp(LARGEST_STABLE_FLOAT, hidden_size)


class ConfigError(ValueError):
    """A bad config key or value; the message says what and how to fix it."""


@dataclass
class ModelConfig:
    # LLaMA shape (the HF LlamaConfig names)
    hidden_size: int = 512
    intermediate_size: int = 1376
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None
    vocab_size: int = 32000
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF rope scaling, e.g. {rope_type: llama3, factor: 8.0, ...}
    tie_word_embeddings: bool = False  # lm_head shares the embedding matrix
    initializer_range: float = 0.02
    # a local HF LLaMA folder (config.json + safetensors) to start from: it sets every shape key above
    # (hf_import.py); null trains from a random init
    init_from: str | None = None
    # int8 weights for the attention/MLP projections (false: ordinary floating-point weights)
    weight_quant: bool = True
    group_size: int = 128
    stochastic_round: bool = True
    activation_checkpointing: bool = False
    # int8 dequantize/update as torch.compile'd whole-matrix kernels (qapollo/fused.py) or the eager
    # row-chunk reference: auto = compiled on CUDA (when Triton is installed), eager on CPU
    fused_update: bool | str = "auto"
    # dtype of float params (embeddings, norms, lm_head) and of compute: auto = bf16 on CUDA, fp32 on CPU
    dtype: str = "auto"
    # the small-card option: embedding and lm_head stored int8 like the projections and optimized by
    # APOLLO-Mini (tiny state) instead of float + 8-bit Adam; lm_head updated slice by slice inside the
    # loss backward (its full gradient never exists), the embedding on the rows of the batch only
    lean_head: bool = False


@dataclass
class OptimConfig:
    # apollo_mini (tensor, rank 1) | apollo (channel) | adamw (torch AdamW on every tensor, baseline)
    name: str = "apollo_mini"
    lr: float = 0.01
    rank: int = 1
    scale: float = 128.0
    scale_type: str = "tensor"  # tensor | channel
    proj: str = "random"
    update_proj_gap: int = 200
    weight_decay: float = 0.0
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    norm_growth_limit: float = 1.01  # gamma of the norm-growth limiter; 0 disables it
    limiter_decay: float = 0.0  # 0: the paper's limiter; d>0: reference norm = max(last, d·reference)
    # optimizer of the float tensors (embeddings, norms, lm_head): adam8bit (bitsandbytes) | adamw (torch)
    float_optim: str = "adam8bit"
    float_lr: float | None = None  # None: same lr as the matrices


@dataclass
class TrainConfig:
    max_steps: int = 1000
    batch_size: int = 8
    seq_len: int = 256
    grad_accum_steps: int = 1
    # exact: the hooks keep a full gradient between micro-batches; lagged: APOLLO matrices apply each
    # micro-batch at once, at the previous window's step size, and keep only the projected gradient and a
    # sketch (optim/apollo.py)
    accum_mode: str = "exact"
    seed: int = 0
    save_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2  # checkpoints kept on disk (the newest); 0 keeps all
    log_every: int = 10
    output_dir: str = "checkpoints"
    run_name: str = ""  # empty: derived from the config file name
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    check_updates: bool = True  # startup guard: every trainable tensor must change in the first step
    # spike guard, decided from the forward loss before backward (an in-backward update cannot be undone):
    # skip a micro-batch whose loss is non-finite or above mean + spike_sigma·std of the last spike_window
    # accepted losses; stop (last checkpoint kept) after max_skips_in_row skips in a row
    skip_spikes: bool = True
    spike_sigma: float = 6.0
    spike_window: int = 128
    max_skips_in_row: int = 20
    # several ranks (torchrun): compare a checksum of every weight across ranks every N steps and before
    # each save; a mismatch stops the run naming the tensor. 0: never
    replica_check_every: int = 100
    compile: bool = False
    tensorboard: bool = False  # also write metrics.jsonl's scalars to <run dir>/tb/ (needs `tensorboard`)
    wandb: bool = False  # also log the metrics to Weights & Biases (needs `wandb`; WANDB_MODE=offline works)
    wandb_project: str = "qapollo"


@dataclass
class DataConfig:
    # local files: .txt/.jsonl/.parquet (+.gz/.xz/.bz2), globs, comma separated or a list; or a weighted
    # mixture: a list of {path: FILES, weight: W} mappings (an entry may name a `dataset` instead of a path)
    path: str | list | None = None
    dataset: str | None = None  # datasets.load_dataset name or local dataset directory
    config: str | None = None
    split: str = "train"
    streaming: bool = False
    text_field: str = "text"
    max_tokens: int | None = None  # cap on tokens taken from the source (streaming datasets)
    tokenizer: str | None = None  # None: the shipped 32k LLaMA-layout sentencepiece model
    cache_dir: str | None = None
    num_proc: int | None = None  # processes that tokenize a new source; None: one per core (os.cpu_count())


@dataclass
class EvalConfig:
    every: int = 0  # 0: never
    tokens: int = 65536
    batch_size: int = 8
    # at each eval step, the greedy continuation of each prompt goes to metrics.jsonl ("samples") and TensorBoard
    sample_prompts: list = field(default_factory=list)
    sample_tokens: int = 32


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    resume: str | None = None  # checkpoint dir, run dir, or "auto"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


SECTIONS = {"model": ModelConfig, "optim": OptimConfig, "train": TrainConfig, "data": DataConfig,
            "eval": EvalConfig}
TOP_LEVEL = {"resume"}
# Old key names still read (YAML files, configs saved in older checkpoints), mapped to the new ones.
RENAMED = {"train.save_total_limit": "train.keep_checkpoints"}


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


def validate(cfg: Config) -> None:
    m, o, t = cfg.model, cfg.optim, cfg.train
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)
    need(o.name in ("apollo_mini", "apollo", "adamw"), f"optim.name must be apollo_mini, apollo or adamw, got '{o.name}'")
    need(o.scale_type in ("tensor", "channel"), f"optim.scale_type must be tensor or channel, got '{o.scale_type}'")
    need(o.proj == "random", f"optim.proj must be 'random' (the only projection implemented), got '{o.proj}'")
    need(o.float_optim in ("adam8bit", "adamw"), f"optim.float_optim must be adam8bit or adamw, got '{o.float_optim}'")
    need(o.rank >= 1, "optim.rank must be >= 1")
    need(0 <= o.limiter_decay < 1, "optim.limiter_decay must be in [0, 1)")
    need(o.update_proj_gap >= 1, "optim.update_proj_gap must be >= 1")
    need(o.lr > 0, "optim.lr must be > 0")
    need(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio must be in [0, 1]")
    need(o.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
    _validate_shape(m, need)
    need(m.fused_update in (True, False, "auto"), f"model.fused_update must be auto, true or false, got '{m.fused_update}'")
    need(m.dtype in ("auto", "float32", "bfloat16", "float16"), f"model.dtype must be auto/float32/bfloat16/float16, got '{m.dtype}'")
    if m.weight_quant:
        # groups may span rows (1376 x 512 with group 128): each matrix's size must divide, not its rows
        sizes = {a * b for a, b in _matrix_shapes(m)}
        need(m.group_size > 0 and all(n % m.group_size == 0 for n in sizes),
             f"model.group_size {m.group_size} must divide the size of every projection matrix "
             f"(hidden {m.hidden_size}, intermediate {m.intermediate_size}); try 128, 64 or 32")
        need(o.name != "adamw", "optim.name=adamw needs float weights: set model.weight_quant=false")
    if o.name != "adamw":
        # the random projection compresses each gradient's smaller side to `rank`: it must be smaller
        small = min(min(a, b) for a, b in _matrix_shapes(m))
        need(o.rank <= small, f"optim.rank {o.rank} is larger than the smallest side of a projection matrix "
                              f"({small}): use optim.rank <= {small} (APOLLO-Mini: 1, APOLLO: hidden/4 = "
                              f"{max(1, m.hidden_size // 4)})")
    need(t.batch_size >= 1, f"train.batch_size must be >= 1 (got {t.batch_size}): it counts the sequences of a "
                            f"micro-batch; use train.grad_accum_steps for larger optimizer batches")
    need(t.seq_len >= 2, f"train.seq_len must be >= 2 (got {t.seq_len}): a sequence needs a token to predict")
    need(t.seq_len <= m.max_position_embeddings,
         f"train.seq_len {t.seq_len} exceeds model.max_position_embeddings {m.max_position_embeddings}: lower "
         f"train.seq_len or raise model.max_position_embeddings (for a new run)")
    need(t.grad_accum_steps >= 1, "train.grad_accum_steps must be >= 1")
    need(t.accum_mode in ("exact", "lagged"), f"train.accum_mode must be exact or lagged, got '{t.accum_mode}'")
    need(t.accum_mode == "exact" or o.name != "adamw",
         "train.accum_mode=lagged needs an APOLLO optimizer (optim.name apollo_mini or apollo); use exact with adamw")
    need(t.spike_sigma > 0, "train.spike_sigma must be > 0 (set train.skip_spikes=false to turn the guard off)")
    need(t.spike_window >= 8, "train.spike_window must be >= 8")
    need(t.max_skips_in_row >= 1, "train.max_skips_in_row must be >= 1")
    need(t.max_steps >= 1, "train.max_steps must be >= 1")
    _validate_run(cfg, need)
    if m.lean_head:
        _validate_lean_head(cfg, need)

    need(t.replica_check_every >= 0, "train.replica_check_every must be >= 0 (0 turns the replica check off)")


def _validate_lean_head(cfg: Config, need) -> None:
    """model.lean_head: what the int8 embedding / lm_head with APOLLO-Mini supports."""
    m, o, t = cfg.model, cfg.optim, cfg.train
    need(m.weight_quant, "model.lean_head=true needs model.weight_quant=true (it stores embedding and lm_head int8 "
                         "like the projections)")
    need(o.name == "apollo_mini" and o.scale_type == "tensor",
         "model.lean_head=true needs optim.name=apollo_mini with optim.scale_type=tensor (its slice-by-slice lm_head "
         "update uses one tensor-wise scale)")
    need(not m.tie_word_embeddings, "model.lean_head=true needs model.tie_word_embeddings=false")
    need(m.hidden_size % m.group_size == 0,
         f"model.lean_head=true needs model.hidden_size ({m.hidden_size}) divisible by model.group_size "
         f"({m.group_size}): embedding rows are looked up in whole groups")
    need(m.vocab_size >= m.hidden_size,
         f"model.lean_head=true needs model.vocab_size ({m.vocab_size}) >= model.hidden_size ({m.hidden_size}): "
         f"the projection keeps one value per vocabulary row")
    need(t.grad_accum_steps == 1 or t.accum_mode == "lagged",
         "model.lean_head=true with train.grad_accum_steps > 1 needs train.accum_mode=lagged (exact accumulation "
         "would keep lm_head's full gradient, which this option exists to avoid)")
    need(m.init_from is None, "model.lean_head=true cannot start from model.init_from yet; train from scratch or "
                              "set model.lean_head=false")


def _validate_shape(m: ModelConfig, need) -> None:
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
              "max_position_embeddings"):
        need(getattr(m, k) >= 1, f"model.{k} must be >= 1 (got {getattr(m, k)})")
    h, n, kv = m.hidden_size, m.num_attention_heads, m.num_key_value_heads
    fits = [d for d in range(1, h + 1) if h % d == 0]
    near = sorted(fits, key=lambda d: (abs(d - n), d))[:2]
    need(h % n == 0, f"model.hidden_size {h} is not divisible by model.num_attention_heads {n}: each head gets "
                     f"hidden_size / heads channels; use e.g. model.num_attention_heads={' or '.join(map(str, sorted(near)))}")
    need(kv is None or (kv >= 1 and n % kv == 0),
         f"model.num_attention_heads {n} is not a multiple of model.num_key_value_heads {kv}: grouped-query "
         f"attention shares each key/value head among an equal group: use a divisor of {n}, or null for {n}")


def _matrix_shapes(m: ModelConfig) -> list[tuple[int, int]]:
    """(out, in) of one decoder layer's seven projections."""
    h, i = m.hidden_size, m.intermediate_size
    kv = (m.num_key_value_heads or m.num_attention_heads) * (h // m.num_attention_heads)
    return [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]


def _validate_run(cfg: Config, need) -> None:
    """Logging, saving, eval and device settings."""
    t, e = cfg.train, cfg.eval
    need(t.log_every >= 1, f"train.log_every must be >= 1 (got {t.log_every})")
    need(t.save_every >= 0, f"train.save_every must be >= 0 (got {t.save_every}; 0: save only at the end)")
    need(t.keep_checkpoints >= 0, f"train.keep_checkpoints must be >= 0 (got {t.keep_checkpoints}; 0 keeps all)")
    need(t.device in ("auto", "cpu", "cuda") or (t.device.startswith("cuda:") and t.device[5:].isdigit()),
         f"train.device must be auto, cpu, cuda or cuda:N, got '{t.device}'")
    need(e.every >= 0, f"eval.every must be >= 0 (got {e.every}; 0: never)")
    need(e.tokens >= 1 and e.batch_size >= 1, f"eval.tokens and eval.batch_size must be >= 1 (got {e.tokens}, "
                                              f"{e.batch_size})")
    need(cfg.data.max_tokens is None or cfg.data.max_tokens >= 1,
         f"data.max_tokens must be >= 1 or null (got {cfg.data.max_tokens})")
    need(cfg.data.num_proc is None or cfg.data.num_proc >= 1,
         f"data.num_proc must be >= 1 or null (one per core), got {cfg.data.num_proc}")
    need(all(isinstance(p, str) and p.strip() for p in e.sample_prompts),
         f"eval.sample_prompts must be a list of non-empty strings, got {e.sample_prompts!r}")
    need(1 <= e.sample_tokens < cfg.model.max_position_embeddings,
         f"eval.sample_tokens must be >= 1 and below model.max_position_embeddings "
         f"{cfg.model.max_position_embeddings} (got {e.sample_tokens})")



# Keys whose change makes a checkpoint incompatible (model shape, optimizer kind); everything else
# (max_steps, logging, eval, lr schedule length) may change on resume.
ARCH_KEYS = ("model.hidden_size", "model.intermediate_size", "model.num_hidden_layers", "model.num_attention_heads",
             "model.num_key_value_heads", "model.vocab_size", "model.weight_quant", "model.group_size",
             "model.tie_word_embeddings", "model.lean_head",
             "optim.name", "optim.rank", "optim.scale_type", "optim.float_optim", "train.batch_size", "train.seq_len")


def flat_dict(cfg: Config) -> dict:
    """{"section.key": value} of every key of every section."""
    return {f"{s}.{k}": v for s, sec in cfg.to_dict().items() if isinstance(sec, dict) for k, v in sec.items()}


def arch_dict(cfg: Config) -> dict:
    flat = flat_dict(cfg)
    return {k: flat[k] for k in ARCH_KEYS}


def config_hash(cfg: Config) -> str:
    return hashlib.sha256(json.dumps(arch_dict(cfg), sort_keys=True).encode()).hexdigest()[:16]
