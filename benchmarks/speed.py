#!/usr/bin/env python3
"""CPU step time of LLaMA-60M: Q-APOLLO-Mini (int8 + SR) vs fp32 torch AdamW, in one process.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/speed.py [--steps 6] [--batch 8] [--seq 256] [--fused] [--profile]

The models are built once; steps alternate between the methods (so background load hits all alike)
and the median of the steps after warm-up is compared. Prints one JSON line with the ratio.
The int8 model runs the default CPU path (model.fused_update=auto: the eager reference); --fused adds
a third model with the compiled kernels (model.fused_update=true; its warm-up step includes compiling).
--profile adds the top ops of one int8 step (torch.profiler, CPU self time).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/llama_60m.yaml")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per method (after 1 warm-up each)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--group", type=int, default=128, help="int8 group size (the paper's 128)")
    ap.add_argument("--fused", action="store_true", help="also time the int8 model with the compiled kernels")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args(argv)

    import torch
    from qapollo.config import load_config
    from qapollo.engine import build, optimizer_step

    common = [f"model.group_size={args.group}", f"train.batch_size={args.batch}", f"train.seq_len={args.seq}", "model.activation_checkpointing=false",
              "train.device=cpu", "model.dtype=float32"]
    methods = {"q_apollo_mini_int8": common,
               "adamw_fp32": common + ["model.weight_quant=false", "optim.name=adamw"]}
    if args.fused:
        methods["q_apollo_mini_int8_fused"] = common + ["model.fused_update=true"]
    runs = {}
    for name, over in methods.items():
        cfg = load_config(args.config, over)
        cfg.train.max_steps, cfg.train.seed = 1000, 0
        runs[name] = (cfg, *build(cfg, "cpu"))
    gen = torch.Generator().manual_seed(0)

    def step(name):
        cfg, model, opt = runs[name]
        x = torch.randint(0, cfg.model.vocab_size, (args.batch, args.seq), generator=gen)
        t0 = time.perf_counter()
        optimizer_step(model, opt, [x])
        return time.perf_counter() - t0

    times = {n: [] for n in runs}
    for n in runs:
        step(n)  # warm-up: optimizer states, allocator, thread pools
    for _ in range(args.steps):
        for n in runs:
            times[n].append(step(n))
    med = {n: statistics.median(v) for n, v in times.items()}
    rec = {"config": args.config, "batch": args.batch, "seq": args.seq, "torch": torch.__version__,
           "threads": torch.get_num_threads(), "steps": args.steps,
           "median_step_s": {n: round(v, 3) for n, v in med.items()},
           "step_times_s": {n: [round(t, 3) for t in v] for n, v in times.items()},
           "ratio_int8_over_adamw": round(med["q_apollo_mini_int8"] / med["adamw_fp32"], 3)}
    if args.fused:
        rec["ratio_int8_fused_over_adamw"] = round(med["q_apollo_mini_int8_fused"] / med["adamw_fp32"], 3)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step("q_apollo_mini_int8")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18), file=sys.stderr)
    print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
