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
import sys
import tempfile

import numpy as np
import torch

from .errors import EvalError
from .harness import load_tasks, make_lm, require_lm_eval, task_manager
from .inference import load_for_eval


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
        docs = iter_file_documents(paths, text_field, field_key="--text-field", files_key="--data")
        write_tokens(docs, tok, out, dtype, max_tokens, bar, default_num_proc())
        return np.fromfile(out, dtype=dtype)


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
        return tasks_main(args)
    r = evaluate(args.model, args.data, args.seq_len, args.batch_size, args.max_tokens, args.text_field,
                 args.device, args.dtype, args.int8, args.group_size, progress=not args.no_progress)
    print(json.dumps(r))
    return 0


def run_tasks(spec: str, tasks: list[str], include_path: str | None = None, num_fewshot: int | None = None,
              limit: float | None = None, batch_size: int = 8, device: str = "auto", dtype: str | None = None,
              int8: bool = False, group_size: int = 128, seed: int = 0, output: str | None = None) -> dict:
    """Score `spec` on lm-eval tasks; {"model", "checkpoint", "tasks": {task: {metric: value}}}."""
    if not tasks:
        raise EvalError("--tasks is empty: give task names, e.g. --tasks hellaswag,arc_easy,piqa")
    if include_path and not os.path.isdir(include_path):
        raise EvalError(f"--include-path {include_path}: no such folder (it holds your task YAML files)")
    lm_eval = require_lm_eval()
    tm = task_manager(tasks, include_path)  # before the model is loaded: a typo costs nothing
    loaded = load_tasks(tm, tasks)  # so does a data set that cannot be read
    model, tok, seq_len, ckpt = load_for_eval(spec, device, dtype, int8, group_size, progress=False)
    lm = make_lm(model, tok, model.config.max_position_embeddings, batch_size)
    res = lm_eval.evaluator.simple_evaluate(model=lm, tasks=loaded, num_fewshot=num_fewshot, limit=limit,
                                            task_manager=tm, log_samples=False, random_seed=seed,
                                            numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    if output:
        with open(output, "w") as f:
            json.dump(res, f, indent=1, default=str)
    scores = {t: {k.removesuffix(",none"): v for k, v in r.items() if k != "alias"} for t, r in res["results"].items()}
    return {"model": spec, "checkpoint": ckpt, "tasks": scores, "n_samples": res.get("n-samples"),
            "num_fewshot": res.get("n-shot"), "limit": limit}


def tasks_main(args) -> int:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    r = run_tasks(args.model, tasks, args.include_path, args.num_fewshot, args.limit, args.batch_size, args.device,
                  args.dtype, args.int8, args.group_size, args.seed, args.output)
    print(json.dumps(r))
    sys.stdout.flush()
    return 0
