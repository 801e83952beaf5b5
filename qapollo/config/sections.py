"""The run configuration's sections: every key, its type and default, with a comment that says what it does."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field

import yaml

# The 7B recipe: what `python run_7b.py` and `qapollo plan` use when no --config is given.
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CONFIG = os.path.join(_ROOT, "configs", "llama_7b.yaml")
# LLaMA-7B for 8 GB cards (model.lean_head): what `qapollo plan --budget` and out-of-memory advice point to.
PRESET_8GB = os.path.join(os.path.dirname(DEFAULT_CONFIG), "llama_7b_8gb.yaml")


@dataclass
class ModelConfig:
    # the transformers class: LlamaForCausalLM | MistralForCausalLM | Qwen2ForCausalLM | Qwen3ForCausalLM
    # (qapollo/families.py; model.init_from sets it from the folder's config.json)
    architecture: str = "LlamaForCausalLM"
    # the shape (the HF config names)
    hidden_size: int = 512
    intermediate_size: int = 1376
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None
    head_dim: int | None = None  # channels per attention head; None: hidden_size / num_attention_heads
    vocab_size: int = 32000
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF rope scaling, e.g. {rope_type: llama3, factor: 8.0, ...}
    tie_word_embeddings: bool = False  # lm_head shares the embedding matrix
    # Mistral's sliding-window attention span (None: full causal attention); train.seq_len must not exceed it
    sliding_window: int | None = None
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
    lean_lr: float | None = None  # model.lean_head's int8 embedding / lm_head; None: float_lr
    # model.lean_head's int8 embedding and lm_head (at float_lr): factored second moments, per-element steps as
    # Adam's (optim/factored.py) | apollo_mini (one tensor-wise scale: +0.5-0.8 nats at 20M; BENCHMARKS.md)
    lean_optim: str = "factored"


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
    num_proc: int | None = None  # threads that tokenize a new source; None: one per core (os.cpu_count())


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
# Keys whose change makes a checkpoint incompatible (model shape, optimizer kind); everything else
# (max_steps, logging, eval, lr schedule length) may change on resume.
ARCH_KEYS = ("model.architecture", "model.hidden_size", "model.intermediate_size", "model.num_hidden_layers",
             "model.num_attention_heads", "model.num_key_value_heads", "model.head_dim", "model.vocab_size",
             "model.weight_quant", "model.group_size", "model.tie_word_embeddings", "model.lean_head",
             "optim.name", "optim.rank", "optim.scale_type", "optim.float_optim", "optim.lean_optim", "train.batch_size",
             "train.seq_len")


def flat_dict(cfg: Config) -> dict:
    """{"section.key": value} of every key of every section."""
    return {f"{s}.{k}": v for s, sec in cfg.to_dict().items() if isinstance(sec, dict) for k, v in sec.items()}


def arch_dict(cfg: Config) -> dict:
    flat = flat_dict(cfg)
    return {k: flat[k] for k in ARCH_KEYS}


def config_hash(cfg: Config) -> str:
    return hashlib.sha256(json.dumps(arch_dict(cfg), sort_keys=True).encode()).hexdigest()[:16]
