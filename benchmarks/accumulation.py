#!/usr/bin/env python3
"""Lagged accumulation against the exact large batch: how far the weights move per optimizer step.

A 2-layer model at the 20M width (hidden 256, the shipped 32k tokenizer) trains on the shipped corpus with
K = 8 micro-batches of 2 × 64 per step, float projection matrices (so a weight change is the update itself,
without rounding noise), lr 3e-3 after 10 warmup steps. Four measurements, each as the ratio of the
matrices' update norm (all projection matrices together, and the spread over single matrices):

  first    the first window (step 1) in lagged mode against the exact step on the same micro-batches
  resume   an exact-mode state after 5 steps continued one step in lagged mode (no lagged step size
           carried over) against the same step in exact mode
  skip     a window whose spike guard skipped 7 of 8 micro-batches: the next step's update against the next
           step of a run without the skip, from the same weights (each mode against itself), limiter on
           and off; windows of one batch eight times (only the mechanics can differ) or of eight batches
  limiter  30 steps lagged and 30 steps exact on the same tokens: steps 11-30, the ratio of the mean update
           norms, the mean of the per-step ratios, and how often the norm-growth limiter cut the step
  window   the skip window itself: step 15 taken as the trainer takes it (engine.optimizer_step, a guard that
           skips micro-batches 2-8) against the same step of a run without the skip, identical until then:
           the ratio of the update norms and their cosine, each mode against itself

    python benchmarks/accumulation.py                       # all four, about 4 minutes on 2 cores
    python benchmarks/accumulation.py --only first skip window

Prints a table and writes benchmarks/results/accumulation.json.
"""
from __future__ import annotations

import argparse
import json
import lzma
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qapollo.config import load_config  # noqa: E402
from qapollo.engine import build, micro_batch  # noqa: E402
from qapollo.model import matrix_names  # noqa: E402
from qapollo.optim import apollo  # noqa: E402
from qapollo.tokenizer import load_tokenizer  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
K, B, T, STEPS, WARMUP = 8, 2, 64, 30, 10


class Stream:
    """Deterministic micro-batches of the shipped corpus: micro-batch i is always the same B × T tokens."""

    def __init__(self, seed: int):
        text = lzma.open(os.path.join(HERE, "..", "qapollo/assets/corpus/shakespeare.train.txt.xz"), "rt").read(600_000)
        self.ids = torch.tensor(load_tokenizer(None).encode(text))
        self.seed = seed

    def batch(self, i: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + i)
        starts = torch.randint(0, len(self.ids) - T - 1, (B,), generator=g)
        return torch.stack([self.ids[s:s + T] for s in starts])


def build_run(mode: str, limiter: float):
    cfg = load_config("configs/llama_20m.yaml", [
        "model.num_hidden_layers=2", "model.weight_quant=false", "optim.lr=3e-3", f"optim.warmup_steps={WARMUP}",
        f"optim.norm_growth_limit={limiter}", f"train.max_steps={STEPS}", "train.seed=0", f"train.accum_mode={mode}",
        f"train.grad_accum_steps={K}"])
    return build(cfg, "cpu")


def matrices(model) -> dict[str, torch.Tensor]:
    names = matrix_names(model)
    return {n: p.detach().clone() for n, p in model.named_parameters() if n in names}


def step(model, opt, stream: Stream, s: int, skip=(), same: bool = False) -> None:
    """One optimizer step as the trainer takes it: micro-batches the guard skipped get no backward. same:
    all K micro-batches are the step's first (their mean is then the same whatever is skipped)."""
    used = [i for i in range(K) if i not in skip]
    for i in used:
        micro_batch(model, opt, stream.batch(s * K + (0 if same else i)), last=i == K - 1, accum=K)
    if used:
        opt.end_step()
    else:
        opt.abandon_step()


def measured_step(model, opt, stream, s, skip=(), same: bool = False) -> dict[str, float]:
    before = matrices(model)
    step(model, opt, stream, s, skip, same)
    return {n: (w - before[n]).norm().item() for n, w in matrices(model).items()}


def total(d: dict[str, float]) -> float:
    return sum(v * v for v in d.values()) ** 0.5


def ratio(a: dict[str, float], b: dict[str, float]) -> dict:
    per = [a[n] / b[n] for n in a if b[n] > 0]
    return {"total": total(a) / total(b), "min": min(per), "max": max(per)}


def first(stream) -> dict:
    out = {}
    for lim in (1.01, 0.0):
        runs = {mode: measured_step(*build_run(mode, lim), stream, 0) for mode in ("exact", "lagged")}
        out[f"limiter {lim}"] = ratio(runs["lagged"], runs["exact"])
    return out


def resume(stream) -> dict:
    """Exact for 5 steps, then one step in each mode from that same state (as a resume from an exact
    checkpoint into lagged mode: no lagged step size)."""
    model, opt = build_run("exact", 1.01)
    for s in range(5):
        step(model, opt, stream, s)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    lagged_model, lagged_opt = build_run("lagged", 1.01)
    lagged_model.load_state_dict(state)
    lagged_opt.load_state_dict(*opt.state_dict())  # the exact run's optimizer state, as a checkpoint carries it
    lagged_opt.step_count = opt.step_count
    lagged_opt.adopt_accumulation(opt.accumulation(0), lagged_opt.accumulation(0))  # exact → lagged: no step size
    return ratio(measured_step(lagged_model, lagged_opt, stream, 5), measured_step(model, opt, stream, 5))


def skip(stream) -> dict:
    """Step 15 skips micro-batches 2-8 in one run and not in the other; then both runs take step 16 from the
    same weights (the no-skip run's), so the two step-16 updates differ only by the optimizer state each
    step 15 committed. With `same`, every step's micro-batches are one batch K times: the mean of those used
    is then the whole window's, and a correct rule commits the same state. Without, the state committed from
    one micro-batch differs from the one from eight as a batch of 2 differs from a batch of 16."""
    out = {}
    for same in (True, False):
        for lim in (1.01, 0.0):
            for mode in ("exact", "lagged"):
                runs = [build_run(mode, lim) for _ in range(2)]
                for s in range(15):
                    for i, (model, opt) in enumerate(runs):
                        step(model, opt, stream, s, range(1, K) if s == 14 and i == 0 else (), same=same)
                runs[0][0].load_state_dict(runs[1][0].state_dict())
                norms = [measured_step(model, opt, stream, 15, same=same) for model, opt in runs]
                out[f"{'one batch' if same else 'eight batches'} per window, {mode}, limiter {lim}"] = ratio(*norms)
    return out


class SkipAfterFirst:
    """A spike guard stand-in: when armed, every micro-batch of a step after its first is skipped."""

    def __init__(self):
        self.armed, self.seen = False, 0

    def reason_to_skip(self, loss):
        self.seen += 1
        return "skipped by the benchmark" if self.armed and self.seen > 1 else None

    def accept(self, loss):
        pass


def window(stream) -> dict:
    from qapollo.engine import optimizer_step
    out = {}
    for mode in ("exact", "lagged"):
        deltas = []
        for skipping in (False, True):
            model, opt = build_run(mode, 1.01)
            guard = SkipAfterFirst()
            for s in range(15):
                guard.armed, guard.seen = skipping and s == 14, 0
                before = matrices(model)
                optimizer_step(model, opt, [stream.batch(s * K + i) for i in range(K)], guard=guard)
            deltas.append({n: w - before[n] for n, w in matrices(model).items()})
        full, skipped = (torch.cat([d[n].flatten() for n in sorted(d)]) for d in deltas)
        out[mode] = {"norm_ratio": (skipped.norm() / full.norm()).item(),
                     "cosine": torch.nn.functional.cosine_similarity(skipped, full, dim=0).item()}
    out["lagged / exact"] = out["lagged"]["norm_ratio"] / out["exact"]["norm_ratio"]
    return out


def limiter(stream) -> dict:
    cut = {"n": 0, "cut": 0}
    real = apollo._limit

    def counting(c, u_norm, *rest):
        if isinstance(rest[0], dict):  # before the fixes: (state, first, gamma, decay)
            prev, gamma = (None if rest[1] else rest[0]["prev_norm"]), rest[2]
        else:
            prev, gamma = rest[0], rest[1]
        if gamma > 0 and prev is not None and float(prev) > 0:
            cut["n"] += 1
            cut["cut"] += float(u_norm) > gamma * float(prev)
        return real(c, u_norm, *rest)
    apollo._limit = counting
    norms, cuts = {}, {}
    try:
        for mode in ("exact", "lagged"):
            model, opt = build_run(mode, 1.01)
            norms[mode] = []
            for s in range(STEPS):
                if s == WARMUP:
                    cut.update(n=0, cut=0)
                norms[mode].append(total(measured_step(model, opt, stream, s)))
            cuts[mode] = cut["cut"] / max(1, cut["n"])
    finally:
        apollo._limit = real
    lag, ex = norms["lagged"][WARMUP:], norms["exact"][WARMUP:]
    return {"ratio_of_means": statistics.mean(lag) / statistics.mean(ex),
            "mean_of_ratios": statistics.mean(a / b for a, b in zip(lag, ex)),
            "limited_share": cuts, "lagged": norms["lagged"], "exact": norms["exact"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=["first", "resume", "skip", "limiter", "window"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="data draws of the micro-batches")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "accumulation.json"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    todo = args.only or ["first", "resume", "skip", "limiter", "window"]
    result = {"setup": {"K": K, "micro_batch": [B, T], "steps": STEPS, "warmup": WARMUP, "torch": torch.__version__,
                        "threads": torch.get_num_threads()}}
    for seed in args.seeds:
        stream = Stream(seed)
        for name in todo:
            res = globals()[name](stream)
            result.setdefault(name, {})[f"seed {seed}"] = res
            print(f"{name}, seed {seed}: {json.dumps({k: v for k, v in res.items() if k not in ('lagged', 'exact')})}",
                  flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
