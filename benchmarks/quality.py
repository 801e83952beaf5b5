#!/usr/bin/env python3
"""Quality ablation: one small LLaMA, one token stream of the shipped real-text corpus, five methods.

    python benchmarks/quality.py                 # the full ablation (about an hour on 2 CPU cores)
    python benchmarks/quality.py --steps 20 --quick   # smoke run of the runner itself

Methods (same model shape, data order, schedule and hooks; only the optimizer/weights differ):
  adamw              torch AdamW on float weights, at three learning rates (best one reported as `adamw`)
  apollo             float weights, APOLLO (channel-wise, rank = hidden/4, scale 1)
  apollo_mini        float weights, APOLLO-Mini (tensor-wise, rank 1, scale 128)
  q_apollo_mini      int8 weights + stochastic rounding, APOLLO-Mini
  q_apollo_mini_rtn  int8 weights + round-to-nearest, APOLLO-Mini
  q_apollo_mini_lean q_apollo_mini with model.lean_head (embedding and lm_head int8 too, factored second
                     moments; `--only q_apollo_mini_lean`)
  q_apollo_mini_lagged8, _exact8, _lean_lagged16, ...: the same tokens per step in K micro-batches of
                     batch / K, lagged or exact accumulation (`--only`, with a --batch-size that K divides)
Two seeds for apollo_mini and q_apollo_mini measure the seed-to-seed noise.

The text is the shipped corpus (held-out works for eval). By default the runner first trains an 8k BPE
tokenizer on the corpus's training split (about a second): with the shipped 32k vocabulary, embeddings
and lm_head would be 70% of a model this small, and every method trains those with the same Adam, which
would dilute exactly the difference under test. `--vocab 0` uses the shipped 32k tokenizer instead.
Writes benchmarks/results/quality.json (with the commit each row ran on) and quality.png; run directories go
to checkpoints/quality/. Each finished row is kept in quality.partial.jsonl as it ends: rerunning the same
command after an interruption trains only the rows still missing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.provenance import git_commit  # noqa: E402
from qapollo.config import Config, validate  # noqa: E402
from qapollo.metrics import read_metrics  # noqa: E402
from qapollo.model import weight_bytes  # noqa: E402
from qapollo.plot import plot_runs  # noqa: E402
from qapollo.train import Trainer  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
COMMIT = None  # the code this process loaded (main sets it before training)


def base_config(args) -> Config:
    cfg = Config()
    m = cfg.model
    m.hidden_size, m.intermediate_size = args.hidden, args.intermediate
    m.num_hidden_layers, m.num_attention_heads = args.layers, args.heads
    m.max_position_embeddings = args.seq_len
    if args.tokenizer:
        cfg.data.tokenizer, m.vocab_size = args.tokenizer, args.vocab
    o = cfg.optim
    o.float_lr = args.float_lr
    o.warmup_steps = max(1, args.steps // 10)  # the paper's 10% warmup, cosine to 10%
    o.min_lr_ratio = 0.1
    t = cfg.train
    t.max_steps, t.batch_size, t.seq_len = args.steps, args.batch_size, args.seq_len
    t.log_every, t.save_every, t.output_dir = max(1, args.steps // 50), 0, args.run_root
    cfg.eval.every, cfg.eval.tokens, cfg.eval.batch_size = max(1, args.steps // 8), args.eval_tokens, 16
    return cfg


def method_config(args, method: str, lr: float, seed: int) -> Config:
    cfg = base_config(args)
    m, o = cfg.model, cfg.optim
    o.lr = lr
    cfg.train.seed = seed
    if method == "adamw":
        m.weight_quant, o.name, o.float_lr = False, "adamw", None
    elif method == "apollo":
        m.weight_quant, o.name, o.scale_type, o.rank, o.scale = False, "apollo", "channel", args.hidden // 4, 1.0
    elif method == "apollo_mini":
        m.weight_quant, o.name, o.scale_type, o.rank, o.scale = False, "apollo_mini", "tensor", 1, 128.0
    elif method == "apollo_mini_no_limiter":  # diagnosis: the norm-growth limiter under small batches
        m.weight_quant, o.name, o.scale_type, o.rank, o.scale = False, "apollo_mini", "tensor", 1, 128.0
        o.norm_growth_limit = 0.0
    elif method == "q_apollo_mini_no_limiter":
        m.weight_quant, o.name, o.scale_type, o.rank, o.scale = True, "apollo_mini", "tensor", 1, 128.0
        o.norm_growth_limit = 0.0
    elif method in ("apollo_mini_peak_limiter", "q_apollo_mini_peak_limiter"):
        m.weight_quant, o.name, o.scale_type, o.rank, o.scale = method.startswith("q_"), "apollo_mini", "tensor", 1, 128.0
        o.limiter_decay = 0.99
    elif method.startswith(("q_apollo_mini_lagged", "q_apollo_mini_exact", "q_apollo_mini_lean_lagged")):
        # gradient accumulation: the same tokens per step as `q_apollo_mini`, in K micro-batches of batch/K
        # (the lean form as the lean presets run it: model.lean_head with lagged accumulation)
        m.weight_quant, o.name, o.scale_type, o.rank, o.scale = True, "apollo_mini", "tensor", 1, 128.0
        mode = "lagged" if "lagged" in method else "exact"
        k = int(method.rsplit(mode, 1)[1])
        if "lean" in method:
            m.lean_head, o.lean_lr = True, args.lean_lr
        if cfg.train.batch_size % k:
            raise SystemExit(f"{method}: --batch-size {cfg.train.batch_size} is not a multiple of {k}")
        cfg.train.batch_size //= k
        cfg.train.grad_accum_steps, cfg.train.accum_mode = k, mode
    elif method == "q_apollo_mini_lean":  # model.lean_head: embedding and lm_head int8 + APOLLO-Mini too
        m.weight_quant, o.name, o.scale_type, o.rank, o.scale = True, "apollo_mini", "tensor", 1, 128.0
        m.lean_head = True
        o.lean_lr = args.lean_lr
    elif method in ("q_apollo_mini", "q_apollo_mini_rtn"):
        m.weight_quant, o.name, o.scale_type, o.rank, o.scale = True, "apollo_mini", "tensor", 1, 128.0
        m.stochastic_round = method == "q_apollo_mini"
        # Round-to-nearest drops most sub-step updates, so the every-tensor-changed startup check would
        # (rightly) stop it: the ablation exists to show that, so the check is off for this one run.
        cfg.train.check_updates = m.stochastic_round
    else:
        raise ValueError(method)
    cfg.train.run_name = f"{method}_lr{lr:g}_s{seed}"
    validate(cfg)
    return cfg


def run_one(cfg: Config, method: str) -> dict:
    run_dir = os.path.join(cfg.train.output_dir, cfg.train.run_name)
    if os.path.isdir(run_dir):  # a fresh run each time: never resume a stale ablation run
        import shutil
        shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    tr = Trainer(cfg, progress=False)
    tr.setup()
    res = tr.fit()
    if tr.stop_requested:  # Ctrl-C / SIGTERM: the trainer saved and stopped; stop the ablation too
        raise SystemExit(f"interrupted during {cfg.train.run_name}")
    wall = time.perf_counter() - t0
    ev = tr.last_eval or tr.evaluate()
    row = {"method": method, "lr": cfg.optim.lr, "seed": cfg.train.seed, "tokens": tr.tokens_seen,
           "steps": cfg.train.max_steps, "val_loss": ev["eval_loss"], "val_ppl": ev["eval_ppl"],
           "train_loss": res["loss"], "wall_s": round(wall, 1), "optimizer_state_bytes": tr.opt.state_bytes(),
           "weight_bytes": weight_bytes(tr.model), "skips": tr.guard.skips,
           "batch_size": cfg.train.batch_size, "grad_accum_steps": cfg.train.grad_accum_steps,
           "float_lr": cfg.optim.float_lr, "lean_lr": cfg.optim.lean_lr, "run_dir": run_dir, "commit": COMMIT}
    print(json.dumps(row), flush=True)
    return row


def plan(args) -> list[tuple[str, float, int]]:
    runs = [("adamw", lr, 0) for lr in args.adamw_lrs]
    runs += [("apollo", args.lr, 0), ("apollo_mini", args.lr, 0), ("q_apollo_mini", args.lr, 0),
             ("q_apollo_mini_rtn", args.lr, 0)]
    runs += [("apollo_mini", args.lr, 1), ("q_apollo_mini", args.lr, 1)]
    if args.only:
        runs = [(m, args.lr, s) for m in args.only for s in args.seeds]
    return runs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--steps", type=int, default=320)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192, help="BPE vocab trained on the corpus; 0: shipped 32k")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=65536)
    ap.add_argument("--lr", type=float, default=0.01,
                    help="APOLLO lr (the paper's 0.01; at this model size and batch 0.003 is better: BENCHMARKS.md)")
    ap.add_argument("--float-lr", type=float, default=None,
                    help="lr of embeddings/norms/lm_head for the APOLLO methods (default: the same as --lr)")
    ap.add_argument("--adamw-lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    ap.add_argument("--only", nargs="+", default=None, help="run just these methods (at --lr), e.g. apollo_mini_no_limiter")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds for --only")
    ap.add_argument("--lean-lr", type=float, default=None,
                    help="optim.lean_lr of q_apollo_mini_lean (default: the float lr)")
    ap.add_argument("--results-name", default="quality", help="file stem of the results json/png")
    ap.add_argument("--run-root", default="checkpoints/quality")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny eval, results under /tmp")
    ap.add_argument("--reverse", action="store_true",
                    help="train the plan's rows from the last: a second process beside the first (rows either has "
                         "finished are skipped; the one that ends last writes the results)")
    args = ap.parse_args(argv)
    global COMMIT
    COMMIT = git_commit()
    if args.quick:
        args.eval_tokens, args.out, args.run_root = 8192, "/tmp/qapollo_quality", "/tmp/qapollo_quality/runs"
    os.makedirs(args.out, exist_ok=True)
    args.tokenizer = None
    if args.vocab:
        args.tokenizer = ablation_tokenizer(args.vocab, args.run_root)
    setup = {k: getattr(args, k) for k in ("hidden", "intermediate", "layers", "heads", "steps", "batch_size",
                                           "seq_len", "eval_tokens", "lr", "float_lr", "lean_lr", "vocab")}
    # each finished row is kept at once: a rerun of the same command continues with the rows still missing,
    # and a second process with --reverse trains the plan from its end (both skip what the other finished)
    partial = os.path.join(args.out, f"{args.results_name}.partial.jsonl")
    runs = plan(args)
    for m, lr, s in reversed(runs) if args.reverse else runs:
        if row_key(m, lr, s) in finished_rows(partial, setup):
            print(f"{row_key(m, lr, s)}: finished already, kept", flush=True)
            continue
        claim = f"{partial}.{m}_lr{lr:g}_s{s}.pid"
        if not take(claim):
            print(f"{row_key(m, lr, s)}: under way in process {open(claim).read()}, skipped", flush=True)
            continue
        row = run_one(method_config(args, m, lr, s), m)
        with open(partial, "a") as f:
            f.write(json.dumps({**row, "setup": setup}) + "\n")
        os.remove(claim)
    done = finished_rows(partial, setup)
    missing = [row_key(*r) for r in runs if row_key(*r) not in done]
    if missing:
        print(f"rows still under way in another process: {', '.join(missing)}; it writes the results")
        return 0
    rows = [done[row_key(*r)] for r in runs]
    adamw = [r for r in rows if r["method"] == "adamw"]
    best = min(adamw, key=lambda r: r["val_loss"]) if adamw else None
    for r in rows:
        if r["method"] == "adamw":
            r["method"] = "adamw" if r is best else f"adamw_lr{r['lr']:g}"
    commits = sorted({r["commit"] for r in rows})
    with open(os.path.join(args.out, f"{args.results_name}.json"), "w") as f:
        json.dump({"setup": setup, "machine": machine(), "commit": commits[0] if len(commits) == 1 else commits,
                   "runs": rows}, f, indent=1)
    if os.path.exists(partial):  # the process beside may have ended at the same moment
        os.remove(partial)
    curves = {f"{r['method']} (s{r['seed']})": read_metrics(os.path.join(r["run_dir"], "metrics.jsonl"))
              for r in rows}
    plot_runs(curves, os.path.join(args.out, f"{args.results_name}.png"),
              title=f"LLaMA {args.hidden}x{args.layers}, {rows[0]['tokens']:,} tokens, shipped corpus")
    print(table(rows))
    return 0


def take(claim: str) -> bool:
    """Claim a row for this process (a file holding its pid); a claim whose process has ended is taken over."""
    try:
        fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            os.kill(int(open(claim).read() or 0), 0)
            return False  # its process is alive
        except (ProcessLookupError, ValueError):
            os.remove(claim)
            return take(claim)
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return True


def row_key(method: str, lr: float, seed: int) -> str:
    return f"{method} {lr:g} {seed}"


def finished_rows(partial: str, setup: dict) -> dict:
    """The rows of this setup finished so far (by this process, an interrupted one, or one beside it)."""
    done = {}
    if os.path.exists(partial):
        for line in open(partial):
            r = json.loads(line)
            if r.pop("setup") == setup:
                done[row_key(r["method"], r["lr"], r["seed"])] = r
    return done


def ablation_tokenizer(vocab: int, root: str) -> str:
    """An 8k-style BPE trained on the shipped corpus's training split (never on the held-out works)."""
    import glob
    from qapollo.data import CORPUS_DIR
    from qapollo.tokenizer import train_tokenizer
    out = os.path.join(root, f"tokenizer-{vocab}")
    if not os.path.exists(os.path.join(out, "tokenizer.model")):
        train_tokenizer(sorted(glob.glob(os.path.join(CORPUS_DIR, "*.train.txt.xz"))), vocab, out)
    return out


def machine() -> str:
    import platform
    import torch
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def table(rows) -> str:
    lines = ["| method | lr | seed | tokens | val loss | val ppl | wall s | optimizer state | weights |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['lr']:g} | {r['seed']} | {r['tokens']:,} | {r['val_loss']:.4f} | "
                     f"{r['val_ppl']:.2f} | {r['wall_s']:.0f} | {r['optimizer_state_bytes'] / 2**20:.2f} MiB | "
                     f"{r['weight_bytes'] / 2**20:.1f} MiB |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
