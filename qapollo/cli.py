"""Command line: `qapollo train|plan|export|eval|tokenizer|plot …` (run_7b.py is `qapollo train` with the 7B config).

Bad input ends with one line `error: …` naming the problem and the fix, and exit status 2, before anything
is allocated or written where it can be checked up front: every such error derives from errors.QapolloError. `--debug` (anywhere on the command line) re-raises
instead, with the traceback. Anything else (a bug) ends with its traceback.
"""
from __future__ import annotations

import argparse
import math
import sys

from .config import DEFAULT_CONFIG  # noqa: F401  (run_7b.py takes it from here)
from .errors import QapolloError
from .stops import Interrupted, exit_code, signal_name


def cmd_train(argv: list[str], default_config: str | None = None) -> int:
    ap = argparse.ArgumentParser(prog="qapollo train", description="Pre-train a LLaMA with int8 weights and APOLLO-Mini.")
    ap.add_argument("--config", default=default_config,
                    help="YAML run config (default: " + (default_config or "qapollo's built-in defaults, a 512-wide "
                                                         "8-layer model; configs/llama_7b.yaml is the 7B recipe") + ")")
    ap.add_argument("--resume", default=None, help="checkpoint dir, run dir, or 'auto'")
    ap.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.005 train.max_steps=200")
    args = ap.parse_intermixed_args(argv)  # overrides before or after the flags (--resume auto train.max_steps=5)
    from .config import load_config
    from .distributed import is_main
    from .train import train
    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"resume={args.resume}")
    if args.config is None and args.resume not in (None, "auto"):  # the checkpoint's own config
        from .checkpoint import resume_config
        cfg = resume_config(args.resume, overrides)
    else:
        cfg = load_config(args.config, overrides)
        if args.config is None and not cfg.model.init_from and is_main():  # run_7b.py passes the 7B recipe
            print("qapollo: note: no --config: training qapollo's built-in defaults (a 512-wide, 8-layer model), not "
                  "the 7B recipe (--config configs/llama_7b.yaml, or python run_7b.py)", file=sys.stderr)
    try:
        result = train(cfg, progress=not args.no_progress)
    except Interrupted as e:  # a second Ctrl-C/SIGTERM: stopped at once, nothing saved
        if is_main():
            print(f"qapollo: {e}", file=sys.stderr, flush=True)
        return exit_code(e.signum)
    loss = "" if math.isnan(result["loss"]) else f", loss {result['loss']:.4f}"  # nan: no step ran
    if is_main():  # torchrun: rank 0 reports for all; the step named is the one saved
        if result["signal"] is not None:
            print(f"stopped by {signal_name(result['signal'])}: saved step {result['step']} in "
                  f"{result['checkpoint']}{loss}, tokens {result['tokens']}; continue with --resume auto", flush=True)
        else:
            print(f"done: step {result['step']}{loss}, tokens {result['tokens']}", flush=True)
    # a run stopped by a signal exits as shells report one (130 SIGINT, 143 SIGTERM), so schedulers can tell
    return 0 if result["signal"] is None else exit_code(result["signal"])


def main(argv: list[str] | None = None, default_config: str | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    commands = {"train", "plan", "export", "eval", "generate", "tokenizer", "plot"}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: qapollo {train,plan,export,eval,generate,tokenizer,plot} ...\n"
              "  train      pre-train a LLaMA (qapollo train --config configs/llama_20m.yaml key=value ...)\n"
              "  plan       print the memory plan of a config before allocating anything\n"
              "  export     write an HF-loadable bf16 model from a checkpoint\n"
              "  eval       loss and perplexity on text (qapollo eval RUN --data F...), or lm-evaluation-harness\n"
              "             scores (qapollo eval RUN --tasks hellaswag,arc_easy,piqa)\n"
              "  generate   what the model writes (qapollo generate RUN --prompt TEXT [--top-p 0.9])\n"
              "  tokenizer  train a sentencepiece BPE tokenizer (qapollo tokenizer train CORPUS... --vocab N OUT/)\n"
              "  plot       draw loss/eval curves of runs from their metrics.jsonl\n"
              "  --debug    show the traceback of an error instead of its one-line message")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    cmd, rest = argv[0], argv[1:]
    try:
        if cmd == "train":
            return cmd_train(rest, default_config)
        if cmd == "tokenizer":
            from .tokenizer import tokenizer_main
            return tokenizer_main(rest)
        if cmd == "plan":
            from .plan import plan_main
            return plan_main(rest)
        if cmd == "export":
            from .export import export_main
            return export_main(rest)
        if cmd == "eval":
            from .evaluate import eval_main
            return eval_main(rest)
        if cmd == "generate":
            from .generate import generate_main
            return generate_main(rest)
        if cmd == "plot":
            from .plot import plot_main
            return plot_main(rest)
    except QapolloError as e:  # every error a user can fix (errors.py); anything else is a bug
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside the training loop's own handling (tokenizing, eval, export)
        if debug:
            raise
        print(f"error: interrupted: {cmd} stopped (Ctrl-C)", file=sys.stderr)
        return 130  # what shells report for SIGINT
    return 2


if __name__ == "__main__":
    sys.exit(main())
