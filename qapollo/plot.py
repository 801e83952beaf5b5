"""`qapollo plot RUN_DIR… [-o out.png]`: training loss and eval loss against tokens, from metrics.jsonl."""
from __future__ import annotations

import argparse
import os

from .errors import QapolloError
from .metrics import read_metrics


class PlotError(QapolloError, FileNotFoundError):
    """`qapollo plot` given no run directory, or without matplotlib."""


def plot_runs(runs: dict[str, list[dict]], out: str, title: str = "") -> str:
    """runs: label → metrics records. Draws train loss (thin) and eval loss (markers) vs tokens."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError("plotting needs matplotlib: pip install 'qapollo[plot]'") from None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, recs in runs.items():
        tr = [(r["tokens"], r["loss"]) for r in recs if "loss" in r]
        ev = [(r["tokens"], r["eval_loss"]) for r in recs if "eval_loss" in r]
        if tr:
            line, = ax1.plot(*zip(*tr), lw=1, label=label)
            color = line.get_color()
        else:
            color = None
        if ev:
            ax2.plot(*zip(*ev), marker="o", ms=3, lw=1.2, color=color, label=label)
    for ax, name in ((ax1, "train loss"), (ax2, "eval loss")):
        ax.set_xlabel("tokens")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="qapollo plot", description="Plot loss/eval curves of runs.")
    ap.add_argument("runs", nargs="+", help="run directories (holding metrics.jsonl)")
    ap.add_argument("-o", "--out", default="loss.png", help="output PNG (default: %(default)s)")
    args = ap.parse_args(argv)
    runs = {}
    for d in args.runs:
        path = os.path.join(d, "metrics.jsonl")
        if not os.path.isfile(path):
            what = "no such folder" if not os.path.exists(d) else "no metrics.jsonl in it"
            raise PlotError(f"{d}: {what}; pass run directories (holding metrics.jsonl) such as checkpoints/<run>")
        runs[os.path.basename(os.path.normpath(d))] = read_metrics(path)
    print(plot_runs(runs, args.out))
    return 0
