"""`qapollo eval RUN_OR_EXPORT --data FILE...`: loss and perplexity of a model on local text
(`--tasks NAMES`: lm-evaluation-harness scores, harness.py).

RUN_OR_EXPORT is a run dir (its newest intact checkpoint), a checkpoint-<step> dir, or a Hugging Face
LLaMA folder (a `qapollo export`, or any model `model.init_from` accepts). A checkpoint is evaluated
exactly as trained (int8 weights, its tokenizer, its seq_len); an HF folder with `LlamaForCausalLM`
in float (`--int8`: quantized the way init_from does, which is what continued training starts from and
what fits a 7B into a 12 GB GPU).

The text goes through training's own path (data.py): documents of .txt/.jsonl/.parquet files, each
`<s> ids </s>`, concatenated and cut into seq_len blocks in order, the tail dropped, as the eval split
is packed (Data.val_batches). The loss is the mean over every predicted token (seq_len - 1 per block).
One JSON line goes to stdout: model, checkpoint, data, seq_len, blocks, tokens (predicted), loss, ppl.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile

import numpy as np
import torch


class EvalError(ValueError):
    """Bad eval arguments; the message says what to change."""


def load_checkpoint_model(spec: str, device: torch.device, dtype: str | None):
    """(model, tokenizer spec, seq_len, checkpoint path) of a run dir or checkpoint-<step> dir."""
    from .checkpoint import load_model_tensors, read_config
    from .export import find_checkpoint
    from .model import build_model
    ckpt = find_checkpoint(spec)
    cfg = read_config(ckpt)
    if dtype:
        cfg.model.dtype = dtype
    model = build_model(cfg.model, device, init=False)
    load_model_tensors(model, os.path.join(ckpt, "model.safetensors"))
    tok_dir = os.path.join(ckpt, "tokenizer")
    return model, tok_dir if os.path.isdir(tok_dir) else cfg.data.tokenizer, cfg.train.seq_len, ckpt


def load_hf_model(path: str, device: torch.device, dtype: str | None, int8: bool, group_size: int,
                  progress: bool):
    """(model, tokenizer spec, seq_len) of an HF LLaMA folder: float via transformers, or int8 as init_from."""
    from .config import Config
    from .hf_import import apply_shape, check_tensors, check_tokenizer, load_weights, read_shape, scan_tensors
    from .model import build_model, resolve_dtype
    cfg = Config()
    m = cfg.model
    m.init_from, m.dtype, m.weight_quant, m.group_size = path, dtype or "auto", int8, group_size
    cfg.train.seq_len = 2  # evaluate() checks its seq_len against the model's context
    apply_shape(cfg, read_shape(path), f"{path}/config.json")
    check_tokenizer(cfg, path)  # the folder's tokenizer, with the model's vocabulary
    seq_len = min(cfg.model.max_position_embeddings, 2048)
    if int8:
        found = scan_tensors(path)
        check_tensors(path, found, cfg.model)
        model = build_model(cfg.model, device, init=False)
        load_weights(model, found, progress)
        return model, path, seq_len
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(path, dtype=resolve_dtype(cfg.model.dtype, device)).to(device)
    return model, path, seq_len


def token_stream(files: list[str], tok, text_field: str, max_tokens: int | None, progress: bool) -> np.ndarray:
    """Training's token stream (data.py: documents → <s> ids </s>) of local files, up to max_tokens."""
    from tqdm import tqdm

    from .pretokenize import default_num_proc, write_tokens
    from .textfiles import iter_file_documents, resolve_paths
    paths = resolve_paths(files, what="--data")
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    with tempfile.TemporaryDirectory() as d, \
            tqdm(total=max_tokens, unit="tok", unit_scale=True, desc="tokenizing", disable=not progress) as bar:
        out = os.path.join(d, "tokens.bin")
        write_tokens(iter_file_documents(paths, text_field), tok, out, dtype, max_tokens, bar, default_num_proc())
        return np.fromfile(out, dtype=dtype)


def load_for_eval(spec: str, device: str = "auto", dtype: str | None = None, int8: bool = False,
                  group_size: int = 128, progress: bool = True):
    """(model in eval mode, tokenizer, default seq_len, checkpoint path or None) of a run dir, a
    checkpoint-<step> dir or an HF LLaMA folder: what `qapollo eval` and `qapollo generate` read."""
    from .tokenizer import load_tokenizer
    from .train import pick_device
    dev = pick_device(device)
    ckpt = None
    if os.path.isdir(spec) and os.path.isfile(os.path.join(spec, "config.json")):
        model, tok_spec, default_len = load_hf_model(spec, dev, dtype, int8, group_size, progress)
    elif os.path.isdir(spec):
        if int8:
            raise EvalError("--int8 is for Hugging Face folders: a checkpoint is evaluated as it was trained")
        model, tok_spec, default_len, ckpt = load_checkpoint_model(spec, dev, dtype)
    else:
        raise EvalError(f"{spec}: no such run dir, checkpoint-<step> dir or Hugging Face model folder")
    model.eval()
    return model, load_tokenizer(tok_spec), default_len, ckpt


@torch.no_grad()
def evaluate(spec: str, files: list[str], seq_len: int | None = None, batch_size: int = 4,
             max_tokens: int | None = None, text_field: str = "text", device: str = "auto", dtype: str | None = None,
             int8: bool = False, group_size: int = 128, progress: bool = True) -> dict:
    from tqdm import tqdm

    from .data import Data
    from .loss import causal_lm_loss
    if batch_size < 1 or (seq_len is not None and seq_len < 2) or (max_tokens is not None and max_tokens < 2):
        raise EvalError("--batch-size must be >= 1, --seq-len and --max-tokens >= 2")
    model, tok, default_len, ckpt = load_for_eval(spec, device, dtype, int8, group_size, progress)
    dev = next(model.parameters()).device
    seq_len = seq_len or default_len
    if seq_len > model.config.max_position_embeddings:
        raise EvalError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings "
                        f"{model.config.max_position_embeddings}")
    tokens = token_stream(files, tok, text_field, max_tokens, progress)
    blocks = Data(tok, None, tokens, seq_len, len(tokens), {}).val_batches(batch_size)  # training's eval packing
    n_blocks = sum(len(b) for b in blocks)
    if n_blocks == 0:
        raise EvalError(f"the text gives {len(tokens)} tokens, fewer than one block of --seq-len {seq_len}: "
                        f"add text or lower --seq-len")
    total, count = 0.0, 0
    for x in tqdm(blocks, desc="eval", unit="batch", disable=not progress):
        n = x.shape[0] * (x.shape[1] - 1)  # predicted tokens: the loss is their mean
        total += causal_lm_loss(model, x.to(dev)).float().item() * n
        count += n
    loss = total / count
    return {"model": spec, "checkpoint": ckpt, "data": list(files), "seq_len": seq_len,
            "blocks": n_blocks, "tokens": count, "loss": loss, "ppl": math.exp(min(loss, 50.0))}


def eval_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="qapollo eval", description="Loss and perplexity of a checkpoint or an HF "
                                 "LLaMA folder on local text (--data), or lm-evaluation-harness scores (--tasks); "
                                 "one JSON line on stdout.")
    ap.add_argument("model", help="checkpoints/<run>, checkpoints/<run>/checkpoint-N, or an HF LLaMA folder")
    ap.add_argument("--data", nargs="+", help=".txt/.jsonl/.parquet files or globs (+.gz/.xz)")
    ap.add_argument("--tasks", help="lm-eval task names, comma separated (e.g. hellaswag,arc_easy,piqa)")
    ap.add_argument("--include-path", default=None, help="--tasks: a folder of your own lm-eval task YAML files")
    ap.add_argument("--num-fewshot", type=int, default=None, help="--tasks: few-shot examples (default: the task's)")
    ap.add_argument("--limit", type=float, default=None, help="--tasks: at most this many documents per task "
                    "(< 1: a fraction), for a quick look")
    ap.add_argument("--seed", type=int, default=0, help="--tasks: lm-eval's seeds (few-shot sampling)")
    ap.add_argument("--output", default=None, help="--tasks: also write lm-eval's full results JSON here")
    ap.add_argument("--seq-len", type=int, default=None,
                    help="tokens per block (default: the run's train.seq_len; HF folder: min(context, 2048))")
    ap.add_argument("--batch-size", type=int, default=4, help="blocks (--tasks: requests) per forward "
                    "(default %(default)s)")
    ap.add_argument("--max-tokens", type=int, default=None, help="read at most this many tokens of the text")
    ap.add_argument("--text-field", default="text", help="jsonl/parquet field holding the text (default %(default)s)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default %(default)s)")
    ap.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"],
                    help="compute dtype (default: the run's model.dtype; HF folder: auto = bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--int8", action="store_true", help="HF folder: quantize to int8 as model.init_from does")
    ap.add_argument("--group-size", type=int, default=128, help="int8 group size with --int8 (default %(default)s)")
    ap.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = ap.parse_args(argv)
    if (args.data is None) == (args.tasks is None):
        raise EvalError("give --data FILE... (loss and perplexity on text) or --tasks NAMES (lm-evaluation-harness), "
                        "one of the two")
    if args.tasks is not None:
        if args.batch_size < 1 or (args.limit is not None and args.limit <= 0):
            raise EvalError("--batch-size must be >= 1 and --limit > 0")
        from .harness import tasks_main
        return tasks_main(args)
    r = evaluate(args.model, args.data, args.seq_len, args.batch_size, args.max_tokens, args.text_field,
                 args.device, args.dtype, args.int8, args.group_size, progress=not args.no_progress)
    print(json.dumps(r))
    return 0
