"""`qapollo export checkpoints/<run>[/checkpoint-N] OUT/`: an HF folder in bf16 (--dtype), of the run's own class
(`LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM`, `Qwen3ForCausalLM`: families.py).

The int8 projections are dequantized (codes, per-group scale and zero point → bf16) and written with
their HF names, one tensor at a time: the header of a safetensors file needs only shapes, so no more
than one tensor is ever in memory and a 7B export needs far less RAM than the model. Shards above
--max-shard-size get a `model.safetensors.index.json`, as `save_pretrained` writes them. config.json,
generation_config.json and the tokenizer files (copied from the checkpoint) make the folder load with
`<its class>.from_pretrained(OUT)` (or AutoModelForCausalLM) / `AutoTokenizer.from_pretrained(OUT)`, offline.
Float tensors beside the matrices (Qwen2's biases, Qwen3's q/k norms) are written under their HF names too.

OUT is built in a temporary sibling folder and renamed into place at the end; an existing non-empty
OUT is an error unless --force.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import time

import torch

from . import checkpoint as ck
from .checkpoint import find_checkpoint
from .errors import QapolloError


class ExportError(QapolloError, RuntimeError):
    """Bad export arguments; the message says what to change."""


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_size(text: str) -> int:
    """'5GB' → 5·10⁹ bytes (decimal units, as transformers' max_shard_size); 'MiB'/'GiB' binary."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ExportError(f"--max-shard-size {text!r}: give a size such as 5GB, 500MB or 2GiB")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * mult)


def plan_tensors(cfg, f, path: str, dtype: torch.dtype = torch.bfloat16) -> list[tuple[str, tuple, torch.dtype,
                                                                                    object]]:
    """(HF name, shape, dtype, producer) for every weight of the HF model, in its state_dict order (a tied
    lm_head is left out, as save_pretrained does)."""
    from . import quant
    from .hf_import import expected_tensors
    keys = set(f.keys())
    items = []
    for name, shape in expected_tensors(cfg.model).items():
        base = name[: -len(".weight")]
        if f"{base}.weight_codes" in keys:
            gs = cfg.model.group_size
            ck.check_tensor(path, f, f"{base}.weight_codes", shape)
            ck.check_tensor(path, f, f"{base}.weight_scale", (shape[0] * shape[1] // gs,))
            ck.check_tensor(path, f, f"{base}.weight_zero", (shape[0] * shape[1] // gs,))

            def get(base=base, gs=gs):
                return quant.dequantize(f.get_tensor(f"{base}.weight_codes"), f.get_tensor(f"{base}.weight_scale"),
                                        f.get_tensor(f"{base}.weight_zero"), gs, dtype)
        else:
            ck.check_tensor(path, f, name, shape)

            def get(name=name):
                return f.get_tensor(name).to(dtype)
        items.append((name, shape, dtype, get))
    return items


def shard(items: list, max_bytes: int) -> list[list]:
    """Greedy split in order, a new shard when the next tensor would pass max_bytes."""
    shards, cur, size = [], [], 0
    for it in items:
        n = it[2].itemsize * int(torch.Size(it[1]).numel())
        if cur and size + n > max_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(it)
        size += n
    return shards + [cur] if cur else shards


def hf_config(cfg, tok, dtype: str = "bfloat16") -> dict:
    from .families import hf_config as family_config
    hf = family_config(cfg.model)
    hf.architectures = [cfg.model.architecture]
    hf.bos_token_id = tok.bos_id if tok.bos_id is not None and tok.bos_id >= 0 else None
    hf.eos_token_id = tok.eos_id
    hf.pad_token_id = _pad_id(tok)
    hf.use_cache = True  # off while training; on for generation
    hf.dtype = DTYPES[dtype]
    d = {k: v for k, v in hf.to_dict().items() if k not in _GENERIC_KEYS}
    d["torch_dtype"] = dtype  # the transformers 4.x name of "dtype"
    return d


# PretrainedConfig fields that say nothing about a causal LM (save_pretrained leaves them out too)
_GENERIC_KEYS = {"_name_or_path", "id2label", "label2id", "chunk_size_feed_forward", "is_encoder_decoder",
                 "output_attentions", "output_hidden_states", "problem_type", "return_dict"}


def _pad_id(tok):
    if hasattr(tok, "sp"):  # sentencepiece: LLaMA's models have no pad piece (pad_id -1)
        p = tok.sp.pad_id()
        return p if p >= 0 else None
    return getattr(getattr(tok, "tok", None), "pad_token_id", None)


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def export(spec: str, out: str, force: bool = False, max_shard_bytes: int = 5 * 10**9,
           dtype: str = "bfloat16") -> dict:
    """Write the HF folder (tensors in `dtype`: bfloat16, float16 or float32); returns a summary (checkpoint,
    shards, bytes, seconds)."""
    from transformers import GenerationConfig

    out = os.path.normpath(out)
    if os.path.isfile(out) or (os.path.isdir(out) and os.listdir(out) and not force):
        raise ExportError(f"{out} exists and is not empty: choose another folder or pass --force to replace it")
    t0 = time.perf_counter()
    ckpt = find_checkpoint(spec)
    cfg = ck.read_config(ckpt)
    from .hf_import import checkpoint_tokenizer
    tok = checkpoint_tokenizer(ckpt, cfg)  # refused before anything is written when it does not fit the model
    tmp = f"{out}.tmp-export-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    path = os.path.join(ckpt, "model.safetensors")
    try:
        with ck.open_safetensors(path) as f:
            items = plan_tensors(cfg, f, path, DTYPES[dtype])
            shards = shard(items, max_shard_bytes)
            names = (["model.safetensors"] if len(shards) == 1 else
                     [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
            weight_map, total = {}, 0
            for fname, part in zip(names, shards):
                ck.write_safetensors(os.path.join(tmp, fname), part, {"format": "pt"})
                for name, shape, _, _ in part:
                    weight_map[name] = fname
                    total += DTYPES[dtype].itemsize * int(torch.Size(shape).numel())
        if len(shards) > 1:
            _write_json(os.path.join(tmp, "model.safetensors.index.json"),
                        {"metadata": {"total_size": total}, "weight_map": weight_map})
        conf = hf_config(cfg, tok, dtype)
        _write_json(os.path.join(tmp, "config.json"), conf)
        GenerationConfig(bos_token_id=conf["bos_token_id"], eos_token_id=conf["eos_token_id"],
                         pad_token_id=conf["pad_token_id"]).save_pretrained(tmp)
        tok.save(tmp)
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"checkpoint": ckpt, "out": out, "files": names, "bytes": total, "seconds": time.perf_counter() - t0}


def export_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="qapollo export",
                                 description="Write a dequantized HF model folder (the run's class) from a checkpoint.")
    ap.add_argument("checkpoint", help="checkpoints/<run> (its newest intact checkpoint) or checkpoints/<run>/checkpoint-N")
    ap.add_argument("out", help="output folder (must be new or empty unless --force)")
    ap.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    ap.add_argument("--max-shard-size", default="5GB", help="shard above this size (default %(default)s)")
    ap.add_argument("--dtype", default="bfloat16", choices=list(DTYPES),
                    help="tensor dtype (default %(default)s; float32 keeps the dequantized weights exactly)")
    args = ap.parse_args(argv)
    r = export(args.checkpoint, args.out, args.force, parse_size(args.max_shard_size), args.dtype)  # errors: cli.py
    print(f"exported {r['checkpoint']} -> {r['out']}: {len(r['files'])} shard(s), {r['bytes'] / 2**20:.1f} MiB "
          f"{args.dtype}, {r['seconds']:.1f}s")
    return 0
