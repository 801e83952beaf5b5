"""Validation of a whole config: each bad value is one ConfigError that says what to set instead."""
from __future__ import annotations

import math

from ..errors import QapolloError
from .sections import Config, ModelConfig


class ConfigError(QapolloError, ValueError):
    """A bad config key or value; the message says what and how to fix it."""


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
    need(o.float_lr is None or o.float_lr > 0, "optim.float_lr must be > 0 (null: optim.lr)")
    need(o.lean_lr is None or (o.lean_lr > 0 and m.lean_head), "optim.lean_lr must be > 0, and needs model.lean_head=true "
         "(it is the lr of the int8 embedding and lm_head; null: optim.float_lr)")
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
         + (f"train.seq_len to {m.max_position_embeddings} or less (model.init_from's config.json sets the context "
            f"the model was trained for)" if m.init_from else
            "train.seq_len or raise model.max_position_embeddings (for a new run)"))
    need(m.sliding_window is None or t.seq_len <= m.sliding_window,
         f"{m.architecture} with sliding_window {m.sliding_window} < train.seq_len {t.seq_len}: sliding-window "
         f"attention is not supported (qapollo trains full causal attention); use train.seq_len <= {m.sliding_window}")
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
    """model.lean_head: what the int8 embedding / lm_head (factored or APOLLO-Mini) support."""
    m, o, t = cfg.model, cfg.optim, cfg.train
    need(m.weight_quant, "model.lean_head=true needs model.weight_quant=true (it stores embedding and lm_head int8 "
                         "like the projections)")
    need(o.lean_optim in ("factored", "apollo_mini"),
         f"optim.lean_optim must be factored or apollo_mini, got '{o.lean_optim}'")
    need(o.name != "adamw", "model.lean_head=true needs an APOLLO optimizer for the matrices (optim.name apollo_mini "
                            "or apollo)")
    need(o.lean_optim == "factored" or (o.name == "apollo_mini" and o.scale_type == "tensor"),
         "optim.lean_optim=apollo_mini needs optim.name=apollo_mini with optim.scale_type=tensor (its slice-by-slice "
         "lm_head update uses one tensor-wise scale); or use optim.lean_optim=factored")
    need(m.hidden_size % m.group_size == 0,
         f"model.lean_head=true needs model.hidden_size ({m.hidden_size}) divisible by model.group_size "
         f"({m.group_size}): embedding rows are looked up in whole groups; set model.group_size="
         f"{math.gcd(m.hidden_size, m.group_size)}")
    need(m.vocab_size >= m.hidden_size,
         f"model.lean_head=true needs model.vocab_size ({m.vocab_size}) >= model.hidden_size ({m.hidden_size}): "
         f"the projection keeps one value per vocabulary row")
    need(t.grad_accum_steps == 1 or t.accum_mode == "lagged",
         "model.lean_head=true with train.grad_accum_steps > 1 needs train.accum_mode=lagged (exact accumulation "
         "would keep lm_head's full gradient, which this option exists to avoid)")


def _validate_shape(m: ModelConfig, need) -> None:
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
              "max_position_embeddings"):
        need(getattr(m, k) >= 1, f"model.{k} must be >= 1 (got {getattr(m, k)})")
    h, n, kv = m.hidden_size, m.num_attention_heads, m.num_key_value_heads
    fits = [d for d in range(1, h + 1) if h % d == 0]
    near = sorted(fits, key=lambda d: (abs(d - n), d))[:2]
    need(m.head_dim is None or m.head_dim >= 1, f"model.head_dim must be >= 1 or null (got {m.head_dim})")
    need(m.head_dim is not None or h % n == 0,
         f"model.hidden_size {h} is not divisible by model.num_attention_heads {n}: each head gets "
         f"hidden_size / heads channels (or set model.head_dim); use e.g. model.num_attention_heads={' or '.join(map(str, sorted(near)))}")
    need(kv is None or (kv >= 1 and n % kv == 0),
         f"model.num_attention_heads {n} is not a multiple of model.num_key_value_heads {kv}: grouped-query "
         f"attention shares each key/value head among an equal group: use a divisor of {n}, or null for {n}")


def _matrix_shapes(m: ModelConfig) -> list[tuple[int, int]]:
    """(out, in) of one decoder layer's seven projections (q and o: heads · head_dim, which Qwen3 may set
    apart from hidden_size)."""
    h, i = m.hidden_size, m.intermediate_size
    hd = m.head_dim or h // m.num_attention_heads
    q, kv = m.num_attention_heads * hd, (m.num_key_value_heads or m.num_attention_heads) * hd
    return [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]


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
    need(not e.sample_prompts or 1 <= e.sample_tokens < cfg.model.max_position_embeddings,  # used with prompts only
         f"eval.sample_tokens must be >= 1 and below model.max_position_embeddings "
         f"{cfg.model.max_position_embeddings} (got {e.sample_tokens})")



