"""`model.init_from: DIR`: continue pre-training a local Hugging Face folder of a family qapollo trains
(families.py: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM).

DIR holds `config.json` and the weights as safetensors (`model.safetensors`, or shards listed in
`model.safetensors.index.json`), usually with the tokenizer. Everything that can be refused is refused
before the model is allocated, from config.json and the safetensors headers alone: another architecture
(mixture of experts, sliding-window attention in use), bias terms the family has not, a quantized
checkpoint, a missing or misshapen tensor, a tokenizer whose vocabulary differs.

The model shape comes from config.json: init_from sets the class, hidden/intermediate size, layers, heads, kv
heads (grouped-query attention), head_dim, vocabulary, context length, rms_norm_eps, rope theta and scaling, and tied
embeddings. A shape key that the run config also sets explicitly must agree, else it is an error.

The weights are streamed: the model is built on meta and allocated empty (model.build_model), then each
tensor is read from the memory-mapped file row chunk by row chunk, projections rounded to nearest into
int8 (Int8Linear.quantize_from_), the rest copied into the float dtype. The files are reopened every
512 MiB so the pages read leave the resident set: the whole float model is never in memory.

A resume of an init_from run loads its checkpoint like any other: the shape (and tokenizer path) come
from the checkpoint's saved config, and the folder's weights are not read again.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict

import torch

from .checkpoint import LOAD_BATCH_BYTES, CheckpointError, IncompatibleCheckpoint, candidates, is_checkpoint_dir, \
    open_safetensors, read_config, read_state, say
from .config import ConfigError, explicit_keys, validate
from .errors import QapolloError
from .families import FamilyError, family_of, model_class, window_of

# ModelConfig keys that init_from takes from config.json
SHAPE_KEYS = ("architecture", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_theta",
              "rope_scaling", "tie_word_embeddings", "sliding_window")
FLOAT_DTYPES = {"F32", "F16", "BF16"}
INDEX = "model.safetensors.index.json"


class HFImportError(ConfigError):
    """model.init_from names a folder qapollo cannot start from; the message says why and what to do."""


class VocabularyMismatch(QapolloError, ValueError):
    """A checkpoint's tokenizer has more tokens than its model's vocabulary."""


def _fail(path: str, msg: str) -> HFImportError:
    return HFImportError(f"model.init_from {path}: {msg}")


# ---- config.json -------------------------------------------------------------------------------
def read_shape(path: str) -> dict:
    """The ModelConfig shape keys of a folder's config.json; refuses what qapollo's model cannot represent."""
    if not os.path.isdir(path):
        raise _fail(path, "no such folder; set model.init_from to a local Hugging Face model folder (config.json "
                          "+ *.safetensors), e.g. one saved by `huggingface-cli download meta-llama/Llama-2-7b-hf "
                          "--local-dir DIR`")
    file = os.path.join(path, "config.json")
    try:
        with open(file) as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise _fail(path, "no config.json: not a Hugging Face model folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _fail(path, f"config.json is not valid JSON ({e})") from None
    return shape_from_config(raw, f"model.init_from {path}")


def shape_from_config(raw: dict, where: str) -> dict:
    """The ModelConfig shape keys of a config.json (or a transformers config's to_dict()) of a family qapollo
    trains (families.py); `where` names it in errors. Refuses what qapollo's model cannot represent."""
    def bad(msg: str) -> HFImportError:
        return HFImportError(f"{where}: {msg}")
    try:
        fam = family_of(raw, where)
    except FamilyError as e:
        raise HFImportError(str(e)) from None
    if raw.get("quantization_config"):
        raise bad("is a quantized checkpoint (quantization_config in config.json): start from the "
                          "float (bf16/fp16/fp32) model")
    if raw.get("hidden_act", "silu") != "silu":
        raise bad(f"hidden_act {raw['hidden_act']!r}: only LLaMA's silu is supported")
    try:
        shape = {k: raw[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                     "vocab_size")}
    except KeyError as e:
        raise bad(f"config.json lacks {e.args[0]!r}") from None
    heads = shape["num_attention_heads"]
    head_dim = raw.get("head_dim")
    rope = raw.get("rope_parameters") or {}  # transformers 5 writes rope_parameters, 4.x rope_theta/rope_scaling
    scaling = raw.get("rope_scaling") or {k: v for k, v in rope.items() if k != "rope_theta"}
    if scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    shape.update(architecture=fam.arch, num_key_value_heads=raw.get("num_key_value_heads") or heads,
                 head_dim=None if head_dim in (None, shape["hidden_size"] // heads) else head_dim,
                 max_position_embeddings=raw.get("max_position_embeddings", 2048),
                 rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                 rope_theta=float(raw.get("rope_theta", rope.get("rope_theta", 10000.0))),
                 rope_scaling=scaling, tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                 sliding_window=window_of(fam, raw))
    return shape


def apply_shape(cfg, shape: dict, source: str) -> None:
    """Put `shape` into cfg.model; a shape key the config set explicitly to another value is an error."""
    explicit = explicit_keys(cfg)
    for k in SHAPE_KEYS:
        mine = getattr(cfg.model, k)
        if f"model.{k}" in explicit and mine != shape[k]:
            raise HFImportError(f"model.{k}={mine!r} conflicts with {source}'s {k}={shape[k]!r}: model.init_from "
                                f"sets the model shape; remove model.{k} from the config and overrides, or "
                                f"unset it with model.{k}=null")
        setattr(cfg.model, k, shape[k])
    validate(cfg)


def plan_shape(cfg) -> None:
    """For `qapollo plan`: the shape of cfg.model.init_from's config.json (the weights are not read)."""
    if cfg.model.init_from:
        apply_shape(cfg, read_shape(cfg.model.init_from), f"{cfg.model.init_from}/config.json")


# ---- the safetensors files ----------------------------------------------------------------------
def scan_tensors(path: str) -> dict[str, tuple[str, tuple, str]]:
    """{tensor name: (file, shape, safetensors dtype)} from the headers; nothing is read beyond them."""
    index = os.path.join(path, INDEX)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
            raise _fail(path, f"{INDEX} is not a valid index ({e})") from None
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        pickled = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth"))]
        raise _fail(path, "no model.safetensors or model.safetensors.index.json"
                          + (f" (only {pickled[0]}: qapollo never unpickles weights; convert it to safetensors, "
                             f"e.g. load and save_pretrained it with transformers)" if pickled else ""))
    out = {}
    for name in files:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise _fail(path, f"{name} (listed in {INDEX}) is missing: an incomplete download?")
        with open_safetensors(file) as f:
            for k in f.keys():
                sl = f.get_slice(k)
                out[k] = (file, tuple(sl.get_shape()), sl.get_dtype())
    return out


def expected_tensors(mcfg) -> dict[str, tuple]:
    """HF name → shape of every weight the family's class (LlamaForCausalLM, ...) of this shape loads, biases
    and q/k norms included (lm_head is absent when tied)."""
    from .families import hf_config
    with torch.device("meta"):
        ref = model_class(mcfg.architecture)(hf_config(mcfg))
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    if mcfg.tie_word_embeddings:
        want.pop("lm_head.weight", None)
    return want


def check_tensors(path: str, found: dict, mcfg) -> None:
    want = expected_tensors(mcfg)
    bias = sorted(k for k in found if k.endswith(".bias") and k not in want)
    if bias:
        raise _fail(path, f"holds bias tensors ({bias[0]}, ...): bias terms are not supported in "
                          f"{mcfg.architecture}")
    missing = [k for k in want if k not in found]
    if missing:
        raise _fail(path, f"tensor {missing[0]!r} is missing from the safetensors files ({len(missing)} missing): "
                          f"an incomplete download, or not a {mcfg.architecture} with this config.json")
    for k, shape in want.items():
        _, got, dtype = found[k]
        if got != shape:
            raise _fail(path, f"tensor {k!r} has shape {list(got)} but config.json implies {list(shape)}")
        if dtype not in FLOAT_DTYPES:
            raise _fail(path, f"tensor {k!r} is {dtype}: quantized weights are not supported, use the float model")
    # old checkpoints saved the rotary inv_freq buffers; a tied model may still store lm_head
    extra = [k for k in found if k not in want and not k.endswith("rotary_emb.inv_freq") and k != "lm_head.weight"]
    if extra:
        raise _fail(path, f"tensor {extra[0]!r} is not part of a {mcfg.architecture} with this config.json "
                          f"({len(extra)} such)")


# ---- tokenizer ------------------------------------------------------------------------------------
def check_tokenizer(cfg, path: str, other: str = " or set data.tokenizer") -> None:
    """data.tokenizer defaults to the folder's own; its vocabulary must be the model's. `other`: how else to
    give one (`qapollo eval` and `generate` have no tokenizer option: the folder's is the only one)."""
    from .tokenizer import load_tokenizer
    if cfg.data.tokenizer is None:
        if not any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model")):
            raise _fail(path, f"has no tokenizer (tokenizer.json or tokenizer.model): copy the model's tokenizer "
                              f"files into it{other}")
        cfg.data.tokenizer = path
    tok = load_tokenizer(cfg.data.tokenizer)
    if tok.vocab_size != cfg.model.vocab_size:
        raise _fail(path, f"config.json has vocab_size {cfg.model.vocab_size} but tokenizer {cfg.data.tokenizer!r} "
                          f"has {tok.vocab_size} tokens: use the model's own tokenizer (leave data.tokenizer unset) "
                          f"or one with {cfg.model.vocab_size} tokens")


def checkpoint_tokenizer(ckpt: str, cfg):
    """The tokenizer of a checkpoint (`qapollo eval`, `generate`, `export`): the copy in its tokenizer/, or, for
    one saved without (qapollo.save given none), data.tokenizer of its config.yaml, said in a note. Refused in
    one line when it has more tokens than the model's vocabulary (ids past it have no embedding row)."""
    from .tokenizer import load_tokenizer
    folder, vocab = os.path.join(ckpt, "tokenizer"), cfg.model.vocab_size
    saved = os.path.isdir(folder)
    tok = load_tokenizer(folder if saved else cfg.data.tokenizer)
    name = str(tok.name_or_path)
    if tok.vocab_size > vocab and saved:
        raise VocabularyMismatch(f"{ckpt}: its tokenizer/ has {tok.vocab_size} tokens but the model's vocabulary has "
                                 f"{vocab} (ids from {vocab} up have no embedding row): it is not this model's "
                                 f"tokenizer; put the model's own files (tokenizer.model or tokenizer.json) there")
    if tok.vocab_size > vocab:
        raise VocabularyMismatch(f"{ckpt} holds no tokenizer (saved without one) and data.tokenizer of its config.yaml, "
                                 f"{name!r}, has {tok.vocab_size} tokens for a model vocabulary of {vocab}: copy the "
                                 f"model's own tokenizer files (tokenizer.model or tokenizer.json) into {folder}/")
    if not saved:
        say(f"note: {ckpt} holds no tokenizer (saved without one): using data.tokenizer of its config.yaml, {name!r}")
    return tok


def check_resumed_tokenizer(ckpts: list[str], tok, vocab_size: int) -> None:
    """The run to resume was tokenized with this tokenizer: other token ids would silently mean other text.

    Checks the first checkpoint (all of a run share the tokenizer), before any data is tokenized or a
    model built. Older checkpoints without the fingerprint are compared through their saved tokenizer/; a
    checkpoint saved without a tokenizer (qapollo.save) only by the size of its model's vocabulary.
    """
    for ckpt in ckpts[:1]:
        try:
            saved = read_state(ckpt).get("tokenizer")
        except CheckpointError:
            return  # reported, with fallback, when the checkpoint is validated
        folder = os.path.join(ckpt, "tokenizer")
        if saved is None and not os.path.isdir(folder) and tok.vocab_size != vocab_size:
            raise IncompatibleCheckpoint(
                f"cannot resume {ckpt}: it was saved without a tokenizer and data.tokenizer gives "
                f"{str(tok.name_or_path)!r} with {tok.vocab_size} tokens for a model of {vocab_size}: set "
                f"data.tokenizer to the tokenizer the model was trained with")
        if saved is None and os.path.isdir(folder):
            from .tokenizer import load_tokenizer
            old = load_tokenizer(folder)
            saved = {"name": str(old.name_or_path), "vocab_size": old.vocab_size, "fingerprint": old.fingerprint()}
        if saved is not None and saved.get("fingerprint") != tok.fingerprint():
            raise IncompatibleCheckpoint(
                f"cannot resume {ckpt}: it was trained with tokenizer {saved.get('name')!r} (vocab "
                f"{saved.get('vocab_size')}) but data.tokenizer gives {str(tok.name_or_path)!r} (vocab "
                f"{tok.vocab_size}), another tokenizer: resume with data.tokenizer={folder} (the copy saved with "
                f"the run) or start a new train.run_name")


# ---- the run ------------------------------------------------------------------------------------
def resumed_config(cfg, run_dir: str):
    """The saved config of the checkpoint a resume will load (the first readable candidate), or None."""
    spec = run_dir if cfg.resume == "auto" else cfg.resume
    if not spec or not os.path.isdir(spec):
        return None  # a fresh run; a bad --resume is reported by checkpoint.resume_candidates
    for ckpt in [spec] if is_checkpoint_dir(spec) else candidates(spec):
        try:
            return read_config(ckpt)
        except CheckpointError:
            continue
    return None


def resolve_init_from(cfg, run_dir: str) -> dict | None:
    """Before anything is built, put the init_from model's shape and tokenizer into cfg.

    Returns the folder's tensor index for load_weights on a fresh run; None when there is no init_from
    or the run resumes (the shape then comes from the checkpoint's config, the weights from the checkpoint).
    """
    m = cfg.model
    if not m.init_from:
        return None
    path = os.path.expanduser(m.init_from)
    saved = resumed_config(cfg, run_dir)
    if saved is not None:
        explicit = explicit_keys(cfg)  # explicit keys stay: checkpoint.check_compatible names a mismatch
        for k in SHAPE_KEYS:
            if f"model.{k}" not in explicit:
                setattr(m, k, getattr(saved.model, k))
        if cfg.data.tokenizer is None:
            cfg.data.tokenizer = saved.data.tokenizer
        validate(cfg)
        return None
    apply_shape(cfg, read_shape(path), f"{path}/config.json")
    check_tokenizer(cfg, path)
    found = scan_tensors(path)
    check_tensors(path, found, m)
    return found


@torch.no_grad()
def load_weights(model, found: dict, progress: bool = True, batch_bytes: int = LOAD_BATCH_BYTES) -> None:
    """Fill an allocated, uninitialised model (build_model(init=False)) from the scanned safetensors files."""
    from tqdm import tqdm

    from .model import int8_modules
    todo = [(name + ".weight", mod) for name, mod in int8_modules(model)]
    todo += list(model.named_parameters())  # a tied lm_head is the embedding: listed once
    by_file = defaultdict(list)
    for key, target in todo:
        by_file[found[key][0]].append((key, target))
    total = sum(_nbytes(found[k]) for k, _ in todo)
    with tqdm(total=total, unit="B", unit_scale=True, desc="init_from", disable=not progress) as bar:
        for file, items in by_file.items():
            i = 0
            while i < len(items):
                with open_safetensors(file) as f:  # reopened every batch_bytes: read pages leave the RSS
                    done = 0
                    while i < len(items) and done < batch_bytes:
                        key, target = items[i]
                        _load_one(target, f.get_slice(key))
                        done += _nbytes(found[key])
                        bar.update(_nbytes(found[key]))
                        i += 1


def _load_one(target, sl) -> None:
    from . import quant
    from .model import Int8Linear
    if isinstance(target, Int8Linear):
        target.quantize_from_(lambda rows: sl[rows])  # round to nearest, row chunk by row chunk
    elif target.dim() < 2:
        target.copy_(sl[:])
    else:
        for rows, _ in quant.row_chunks(tuple(target.shape), 1):
            target[rows] = sl[rows].to(target.device, target.dtype)


def _nbytes(entry: tuple) -> int:
    _, shape, dtype = entry
    return int(torch.Size(shape).numel()) * (4 if dtype == "F32" else 2)

