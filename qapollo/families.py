"""The model families qapollo trains: one row of `FAMILIES` per Hugging Face class.

Every family here is LLaMA's decoder (RMSNorm, rotary attention with grouped-query heads, a SiLU-gated MLP,
bias-free projections unless said) under its own transformers class. A row names the class, its
config class and model_type, and what it adds to LLaMA's tensors:

    qkv_bias   q/k/v projections carry a bias (Qwen2/2.5): a float tensor beside the int8 matrix, kept fp32
               and stepped by the float optimizer like the norms (model.Int8Linear.bias)
    qk_norm    a per-head RMSNorm of q and of k (Qwen3): two float vectors of head_dim per layer
    window     how the config turns sliding-window attention on: "sliding_window" (Mistral: a number, the
               model's sliding_window key) or "use_sliding_window" (Qwen: a switch, refused when on)
    fixed      config keys the family is built with whatever the folder says (checked by `refusal`)

Adding a family is adding a row (and a test in tests/test_families.py): the model is built by its own
transformers class on the meta device and its projections made int8 (model.py), its tensors are found by
that class's state_dict (hf_import.py, export.py), and the planner counts `extra_float_elems`. What no
row describes (mixture-of-experts, other attention or MLP layouts) is refused before anything is built.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import QapolloError

DEFAULT = "LlamaForCausalLM"


class FamilyError(QapolloError, ValueError):
    """A model class or config that qapollo cannot train; the message names the supported classes."""


@dataclass(frozen=True)
class Family:
    arch: str  # the transformers model class, config.json's architectures[0]
    model_type: str
    config_class: str
    qkv_bias: bool = False
    qk_norm: bool = False
    window: str | None = None
    fixed: dict = field(default_factory=dict)


FAMILIES = {f.arch: f for f in (
    Family("LlamaForCausalLM", "llama", "LlamaConfig", fixed={"attention_bias": False, "mlp_bias": False}),
    Family("MistralForCausalLM", "mistral", "MistralConfig", window="sliding_window"),
    Family("Qwen2ForCausalLM", "qwen2", "Qwen2Config", qkv_bias=True, window="use_sliding_window",
           fixed={"use_sliding_window": False}),
    Family("Qwen3ForCausalLM", "qwen3", "Qwen3Config", qk_norm=True, window="use_sliding_window",
           fixed={"use_sliding_window": False, "attention_bias": False}),
)}


def supported() -> str:
    return ", ".join(FAMILIES)


def family(arch: str) -> Family:
    """The row of `arch` (model.architecture); anything else is one FamilyError naming the supported ones."""
    if arch not in FAMILIES:
        raise FamilyError(f"model.architecture {arch!r} is not supported: qapollo trains {supported()}")
    return FAMILIES[arch]


def family_of(raw: dict, where: str) -> Family:
    """The family of a config.json (or a config's to_dict(): architectures may be None, model_type says it);
    refuses another class, a model_type that is not the class's, and what a row's `fixed` keys exclude."""
    by_type = {f.model_type: f.arch for f in FAMILIES.values()}
    archs = raw.get("architectures") or [by_type.get(raw.get("model_type"), raw.get("model_type") or "?")]
    arch = archs[0]
    if len(archs) != 1 or arch not in FAMILIES:
        moe = any(k in raw for k in ("num_experts", "num_local_experts", "n_routed_experts"))
        raise FamilyError(f"{where}: {'/'.join(map(str, archs))} is not supported"
                          f"{' (mixture of experts)' if moe else ''}: qapollo trains {supported()}")
    fam = FAMILIES[arch]
    if raw.get("model_type") not in (None, fam.model_type):
        raise FamilyError(f"{where}: architectures {arch} with model_type {raw['model_type']!r} (expected "
                          f"{fam.model_type!r}): not a {arch}; qapollo trains {supported()}")
    for key, value in fam.fixed.items():
        if raw.get(key, value) != value:
            what = "sliding-window attention is" if key == "use_sliding_window" else "bias terms are"
            raise FamilyError(f"{where}: {arch} with {key}={raw[key]!r}: {what} not supported ({arch} is trained "
                              f"with {key}={value!r}); qapollo trains {supported()}")
    return fam


def window_of(fam: Family, raw: dict) -> int | None:
    """The sliding window a family's config uses (None: full attention). Qwen's switch is refused by `fixed`.
    A config.json without the key gets the config class's default, as its from_pretrained does (Mistral: 4096)."""
    if fam.window != "sliding_window":
        return None
    if "sliding_window" not in raw:
        import transformers
        return getattr(transformers, fam.config_class)().sliding_window
    return raw["sliding_window"]


def head_dim(mcfg) -> int:
    return mcfg.head_dim or mcfg.hidden_size // mcfg.num_attention_heads


def extra_float_elems(mcfg) -> list[int]:
    """Elements of each float tensor one decoder layer has beyond LLaMA's two RMSNorms: the q/k/v biases
    (Qwen2), the q and k norms (Qwen3). What the memory planner adds to the float parameters."""
    fam, hd = family(mcfg.architecture), head_dim(mcfg)
    kv = mcfg.num_key_value_heads or mcfg.num_attention_heads
    out = []
    if fam.qkv_bias:
        out += [mcfg.num_attention_heads * hd, kv * hd, kv * hd]
    if fam.qk_norm:
        out += [hd, hd]
    return out


def config_kwargs(mcfg) -> dict:
    """The transformers config arguments of a ModelConfig (model.architecture's config class)."""
    fam = family(mcfg.architecture)
    kw = dict(
        vocab_size=mcfg.vocab_size, hidden_size=mcfg.hidden_size, intermediate_size=mcfg.intermediate_size,
        num_hidden_layers=mcfg.num_hidden_layers, num_attention_heads=mcfg.num_attention_heads,
        num_key_value_heads=mcfg.num_key_value_heads or mcfg.num_attention_heads, head_dim=head_dim(mcfg),
        max_position_embeddings=mcfg.max_position_embeddings, rms_norm_eps=mcfg.rms_norm_eps,
        rope_theta=mcfg.rope_theta, rope_scaling=dict(mcfg.rope_scaling) if mcfg.rope_scaling else None,
        initializer_range=mcfg.initializer_range, hidden_act="silu", tie_word_embeddings=mcfg.tie_word_embeddings,
        bos_token_id=1, eos_token_id=2, pad_token_id=None, use_cache=False, attn_implementation="sdpa", **fam.fixed)
    if fam.window == "sliding_window":
        kw["sliding_window"] = mcfg.sliding_window
    return kw


def hf_config(mcfg):
    """The transformers config (LlamaConfig, MistralConfig, ...) of a ModelConfig."""
    import transformers
    return getattr(transformers, family(mcfg.architecture).config_class)(**config_kwargs(mcfg))


def model_class(arch: str):
    """The transformers class of a family (LlamaForCausalLM, ...)."""
    import transformers
    return getattr(transformers, family(arch).arch)
