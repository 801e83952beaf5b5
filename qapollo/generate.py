"""`qapollo generate RUN_OR_EXPORT --prompt TEXT`: what the model writes, greedy or sampled (top-p).

A checkpoint runs as trained (int8 weights, its tokenizer; inference.load_for_eval), an HF folder in float
(or `--int8`); the decoding is decode.generate.
"""
from __future__ import annotations

import argparse
import json
import sys

from .decode import generate
from .errors import EvalError
from .inference import load_for_eval


def generate_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="qapollo generate", description="Continue a prompt with a checkpoint or an "
                                 "HF LLaMA folder: greedy by default, or sampled with --temperature / --top-p.")
    ap.add_argument("model", help="checkpoints/<run>, checkpoints/<run>/checkpoint-N, or an HF LLaMA folder")
    ap.add_argument("--prompt", action="append", required=True, help="text to continue (repeat for several)")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="default %(default)s")
    ap.add_argument("--temperature", type=float, default=None,
                    help="sample at this temperature (default: greedy; 1.0 when only --top-p is given)")
    ap.add_argument("--top-p", type=float, default=1.0, help="sample from the top tokens of this probability mass")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (default %(default)s)")
    ap.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default %(default)s)")
    ap.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"])
    ap.add_argument("--int8", action="store_true", help="HF folder: quantize to int8 as model.init_from does")
    ap.add_argument("--json", action="store_true", help="one JSON line per prompt instead of the text")
    args = ap.parse_args(argv)
    temperature = args.temperature if args.temperature is not None else (1.0 if args.top_p < 1 else 0.0)
    if args.max_new_tokens < 1 or temperature < 0 or not 0 < args.top_p <= 1:
        raise EvalError(f"--max-new-tokens must be >= 1, --temperature >= 0 and --top-p in (0, 1] (got "
                        f"{args.max_new_tokens}, {temperature}, {args.top_p})")
    if not all(p.strip() for p in args.prompt):
        raise EvalError("--prompt is empty: give the text to continue")
    model, tok, _, _ = load_for_eval(args.model, args.device, args.dtype, args.int8, progress=False)
    if args.max_new_tokens >= model.config.max_position_embeddings:
        raise EvalError(f"--max-new-tokens {args.max_new_tokens} leaves no room for the prompt: the model has "
                        f"{model.config.max_position_embeddings} positions; lower --max-new-tokens")
    for p in args.prompt:
        r = generate(model, tok, p, args.max_new_tokens, temperature, args.top_p, args.seed, args.stop)
        print(json.dumps(r) if args.json else p + r["completion"])
        sys.stdout.flush()
    return 0
