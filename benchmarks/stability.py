#!/usr/bin/env python3
"""Width-faithful stability probe: does the loss fall without spikes at a given peak lr and batch?

A config's model keeps its width, vocabulary, optimizer, dtype and int8 path, but gets only a few decoder
layers, so a 7B-width model trains a few dozen steps on a CPU. Each setting runs the real trainer step
(in-backward updates, spike guard off so instability shows) with a linear warmup to the peak lr, then that
lr held constant (no decay: the probe asks whether the peak itself is stable), from the same init and data.

    python benchmarks/stability.py --name 7b_w4096 --lrs 3e-4 1e-3 3e-3            # 7B width, 2 layers
    python benchmarks/stability.py --name widths --widths 256 1024 4096 --lrs 1e-3 3e-3
    python benchmarks/stability.py --name accum --accum 1 4 --lrs 1e-3 2e-3         # tokens per step via K

Verdict of a setting (`ok`): every loss is finite; no loss after the warmup is above the first step's; no
spike, i.e. no loss more than --spike nats above the lowest loss seen before it; and the mean of the last
five losses is at least --min-drop below the first. The largest ok lr per (width, tokens per step) is the
probe's answer. Results are appended setting by setting to benchmarks/results/stability_<name>.json (a
rerun skips settings already there: a long sweep can be stopped and continued) and drawn to .png.
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qapollo.config import DEFAULT_CONFIG, load_config  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def setting_overrides(args, width: int | None, batch: int, accum: int, lr: float, float_lr: float | None) -> list[str]:
    over = [f"model.num_hidden_layers={args.layers}", "model.activation_checkpointing=false",  # same math, faster
            f"optim.lr={lr}", f"optim.warmup_steps={args.warmup}", "optim.min_lr_ratio=1.0",
            f"train.max_steps={args.steps}", f"train.batch_size={batch}", f"train.seq_len={args.seq_len}",
            f"train.grad_accum_steps={accum}", f"train.accum_mode={'lagged' if accum > 1 else 'exact'}",
            "train.skip_spikes=false", f"train.seed={args.seed}", "eval.every=0", "train.save_every=0",
            f"train.output_dir={args.run_root}", f"train.run_name=probe-{os.getpid()}-{time.time_ns()}"]
    if float_lr is not None:
        over.append(f"optim.float_lr={float_lr}")
    if width:  # keep the config's aspect: intermediate/hidden and the head size
        base = load_config(args.config, [])
        m = base.model
        head = m.hidden_size // m.num_attention_heads
        inter = round(m.intermediate_size * width / m.hidden_size / 8) * 8
        over += [f"model.hidden_size={width}", f"model.intermediate_size={inter}",
                 f"model.num_attention_heads={max(1, width // head)}"]
    return over + list(args.overrides)


def verdict(losses: list[float], warmup: int, spike: float, min_drop: float) -> dict:
    first = losses[0]
    finite = all(math.isfinite(x) for x in losses)
    after = losses[warmup:] if finite else []
    jumps = [losses[i] - min(losses[:i]) for i in range(1, len(losses))] if finite else []
    last5 = sum(losses[-5:]) / len(losses[-5:]) if finite and len(losses) >= 5 else float("nan")
    out = {"finite": finite, "first": first, "last5_mean": last5,
           "max_after_warmup": max(after) if after else float("nan"),
           "max_jump": max(jumps) if jumps else float("nan")}
    out["ok"] = bool(finite and len(losses) >= 5 and out["max_after_warmup"] <= first and out["max_jump"] <= spike
                     and last5 <= first - min_drop)
    return out


def run_setting(args, over: list[str]) -> dict:
    from qapollo.layerwise import UpdateCheckError
    from qapollo.train import Trainer, TrainError
    cfg = load_config(args.config, over)
    tr = Trainer(cfg, progress=False)
    tr.setup()
    losses, times, error = [], [], None
    try:
        for _ in range(args.steps):
            t0 = time.perf_counter()
            loss = tr.train_step()
            times.append(time.perf_counter() - t0)
            losses.append(loss)
            print(f"  step {len(losses)}: loss {loss:.4f} ({times[-1]:.1f} s)", file=sys.stderr, flush=True)
    except (TrainError, UpdateCheckError) as e:  # a non-finite loss or gradient: diverged
        error = str(e).splitlines()[0]
        losses.append(float("nan"))
    m, t = cfg.model, cfg.train
    rec = {"width": m.hidden_size, "intermediate": m.intermediate_size, "heads": m.num_attention_heads,
           "layers": m.num_hidden_layers, "vocab": m.vocab_size, "dtype": m.dtype, "int8": m.weight_quant,
           "optim": cfg.optim.name, "batch_size": t.batch_size, "seq_len": t.seq_len, "accum": t.grad_accum_steps,
           "tokens_per_step": t.batch_size * t.seq_len * t.grad_accum_steps, "lr": cfg.optim.lr,
           "float_lr": cfg.optim.float_lr if cfg.optim.float_lr else cfg.optim.lr, "warmup": cfg.optim.warmup_steps,
           "losses": losses, "step_s_median": sorted(times)[len(times) // 2] if times else None, "error": error,
           "overrides": over}
    rec.update(verdict(losses, args.warmup, args.spike, args.min_drop))
    del tr
    gc.collect()
    return rec


def identity(over: list[str]) -> str:
    """A setting's identity for skipping done work: its overrides without the unique run name."""
    return json.dumps([o for o in over if not o.startswith("train.run_name=")])


def summary(runs: list[dict]) -> list[dict]:
    """Largest ok lr per (width, tokens per step, float lr rule)."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["width"], r["tokens_per_step"], r["accum"], r["float_lr"] if r["float_lr"] != r["lr"] else "= lr"),
                          []).append(r)
    out = []
    for (w, tok, k, flr), rs in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        ok = [r["lr"] for r in rs if r["ok"]]
        out.append({"width": w, "tokens_per_step": tok, "accum": k, "float_lr": flr,
                    "lrs_tried": sorted(r["lr"] for r in rs), "largest_ok_lr": max(ok) if ok else None})
    return out


def table(runs: list[dict]) -> str:
    lines = ["| width | layers | tokens/step (batch×seq×K) | lr | float lr | first | last-5 mean | max after warmup | "
             "max jump | ok | s/step |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['width']} | {r['layers']} | {r['tokens_per_step']:,} ({r['batch_size']}×{r['seq_len']}×"
                     f"{r['accum']}) | {r['lr']:g} | {r['float_lr']:g} | {r['first']:.3f} | {r['last5_mean']:.3f} | "
                     f"{r['max_after_warmup']:.3f} | {r['max_jump']:.2f} | {'yes' if r['ok'] else 'no'} | "
                     f"{r['step_s_median'] or float('nan'):.1f} |")
    return "\n".join(lines)


def plot(runs: list[dict], path: str, title: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    panels = sorted({(r["width"], r["tokens_per_step"]) for r in runs})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (w, tok) in zip(axes[0], panels):
        for r in sorted((r for r in runs if (r["width"], r["tokens_per_step"]) == (w, tok)),
                        key=lambda r: (r["lr"], r["float_lr"])):
            ys = [min(x, 20.0) if math.isfinite(x) else 20.0 for x in r["losses"]]
            label = f"lr {r['lr']:g}" + (f", float {r['float_lr']:g}" if r["float_lr"] != r["lr"] else "")
            ax.plot(range(1, len(ys) + 1), ys, lw=1.2, ls="-" if r["ok"] else "--", label=label + ("" if r["ok"] else " ✗"))
        ax.set_title(f"width {w}, {tok:,} tokens/step")
        ax.set_xlabel("step")
        ax.set_ylabel("train loss (clipped at 20)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> str:
    import platform
    import torch
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=DEFAULT_CONFIG, help="config whose width/vocab/optimizer/dtype are probed")
    ap.add_argument("--name", required=True, help="results go to benchmarks/results/stability_<name>.json/.png")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers of the reduced-depth model")
    ap.add_argument("--widths", type=int, nargs="+", default=[0], help="hidden sizes to probe (0: the config's)")
    ap.add_argument("--lrs", type=float, nargs="+", required=True, help="peak lrs of the APOLLO matrices")
    ap.add_argument("--float-lrs", type=float, nargs="+", default=[0.0],
                    help="peak lrs of embeddings/norms/lm_head (0: the config's optim.float_lr rule)")
    ap.add_argument("--batch", type=int, nargs="+", default=[8], help="micro-batch sizes")
    ap.add_argument("--accum", type=int, nargs="+", default=[1], help="micro-batches per step (lagged mode)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--spike", type=float, default=1.0, help="a loss this many nats above the lowest before it is a spike")
    ap.add_argument("--min-drop", type=float, default=1.0, help="last-5 mean must be this far below the first loss")
    ap.add_argument("--run-root", default="/tmp/qapollo_stability")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("overrides", nargs="*", help="more dotted config overrides for every setting")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"stability_{args.name}.json")
    runs = json.load(open(path))["runs"] if os.path.exists(path) else []
    done = {identity(r["overrides"]) for r in runs}
    for width, batch, accum, lr, flr in itertools.product(args.widths, args.batch, args.accum, args.lrs, args.float_lrs):
        over = setting_overrides(args, width or None, batch, accum, lr, flr or None)
        ident = identity(over)
        if ident in done:
            continue
        print(f"setting: width {width or 'config'}, batch {batch}×{args.seq_len}×{accum}, lr {lr:g}, float lr "
              f"{flr or 'config'}", file=sys.stderr, flush=True)
        runs.append(run_setting(args, over))
        done.add(ident)
        setup = {k: getattr(args, k) for k in ("config", "layers", "seq_len", "steps", "warmup", "seed", "spike", "min_drop")}
        with open(path, "w") as f:
            json.dump({"setup": setup, "machine": machine(), "runs": runs, "summary": summary(runs)}, f, indent=1)
        plot(runs, path[:-5] + ".png", f"stability probe: {args.layers}-layer models, warmup {args.warmup} then "
                                       f"constant lr (dashed: not ok)")
    print(table(runs))
    print(json.dumps(summary(runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
