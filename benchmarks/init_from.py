"""Peak RSS and time of `model.init_from`: the import of an HF LLaMA folder into qapollo's int8 model.

    python benchmarks/init_from.py --folder /tmp/hf_llama [--hidden 2048 --intermediate 5504 --layers 12]
    python benchmarks/init_from.py --folder /models/Llama-2-7b-hf           # an existing folder is used as is

A missing --folder is created first: a random LlamaForCausalLM of the given shape in bf16, saved with
save_pretrained in 500 MB shards, with the shipped tokenizer. The import then runs in a fresh process
(what the trainer does before its first step: read config.json and the headers, build on meta, stream
every tensor), so its peak RSS is the import's alone. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_folder(path: str, hidden: int, intermediate: int, layers: int, heads: int, kv: int, vocab: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qapollo.tokenizer import load_tokenizer
    conf = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048)
    model = LlamaForCausalLM._from_config(conf, dtype=torch.bfloat16)
    model.save_pretrained(path, max_shard_size="500MB")
    load_tokenizer(None).save(path)


def import_once(folder: str, dtype: str) -> dict:
    """Run in the child process: the trainer's import path, nothing else."""
    import torch

    from qapollo.config import load_config
    from qapollo.hf_import import load_weights, resolve_init_from
    from qapollo.model import build_model, weight_bytes
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    cfg = load_config(None, [f"model.init_from={folder}", f"model.dtype={dtype}", "train.seq_len=2"])
    found = resolve_init_from(cfg, run_dir="/nonexistent")
    t1 = time.perf_counter()
    model = build_model(cfg.model, torch.device("cpu"), init=False)
    load_weights(model, found, progress=False)
    t2 = time.perf_counter()
    files = {f for f, _, _ in found.values()}
    return {"folder": folder, "dtype": dtype, "file_bytes": sum(os.path.getsize(f) for f in files),
            "model_bytes": weight_bytes(model), "rss_before_bytes": rss0,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "check_s": round(t1 - t0, 2), "load_s": round(t2 - t1, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", required=True)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5504)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", default="bfloat16", help="model.dtype of the import (the float tensors)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(import_once(args.folder, args.dtype)))
        return
    if not os.path.isdir(args.folder):
        make_folder(args.folder, args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads, args.vocab)
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--folder", args.folder, "--dtype", args.dtype,
                          "--child"], cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    if out.returncode:
        sys.exit(out.stderr[-2000:])
    print(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
