#!/usr/bin/env python3
"""Planner vs the CPU live-tensor meter, per phase, for model.lean_head; prints ONE JSON line.

    python benchmarks/lean_phases.py --config configs/llama_7b_8gb.yaml model.num_hidden_layers=2

Runs the trainer's step (same build, checkpointing, in-backward optimizer, chunked loss; random tokens)
under `LiveTensorCounter` and records, besides the step's peak, the peak while lm_head is updated slice by
slice (the planner's `head` phase) and while the embedding's rows are updated (`embed`), each as resident
model + states + the meter's live bytes at that moment. Step 1 runs the startup guard when the config has it.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    import torch
    from qapollo.config import load_config
    from qapollo.engine import build, micro_batch
    from qapollo.meter import LiveTensorCounter, resident_tensor_bytes
    from qapollo.optim.updaters import ApolloUpdater
    from qapollo.planner import predict_peak
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    plan = predict_peak(cfg, "cpu")
    cfg.train.seed = 0
    model, opt = build(cfg, "cpu")
    meter: dict = {}
    phase_peak: dict[str, int] = {}

    def watch(method, phase):
        orig = getattr(ApolloUpdater, method)

        def wrapped(self, *a, **k):
            c = meter["c"]
            outer = c.peak
            c.reset_peak()
            try:
                return orig(self, *a, **k)
            finally:
                phase_peak[phase] = max(phase_peak.get(phase, 0), meter["base"] + c.peak)
                c.peak = max(outer, c.peak)
        setattr(ApolloUpdater, method, wrapped)
    watch("step_slices", "head")
    watch("step_rows", "embed")
    gen = torch.Generator().manual_seed(0)
    rows = []
    for i in range(args.steps):
        check = i == 0 and cfg.train.check_updates
        meter["base"] = resident_tensor_bytes(model, opt.resident_tensors())
        gc.collect()
        x = torch.randint(0, cfg.model.vocab_size, (cfg.train.batch_size, cfg.train.seq_len), generator=gen)
        t0 = time.perf_counter()
        with LiveTensorCounter() as c:
            meter["c"] = c
            micro_batch(model, opt, x, check=check)
            opt.end_step(check=check)
        rows.append({"step": i + 1, "measured_peak_bytes": meter["base"] + c.peak, "head_bytes": phase_peak.pop("head", 0),
                     "embed_bytes": phase_peak.pop("embed", 0), "wall_s": round(time.perf_counter() - t0, 1)})
    out = {"config": args.config, "overrides": args.overrides, "predicted_peak_bytes": plan["peak_bytes"],
           "predicted_phase": plan["phase"], "predicted_phases": plan["phases"], "steps": rows,
           "threads": torch.get_num_threads()}
    meas = max(r["measured_peak_bytes"] for r in rows)
    out["predicted_over_measured"] = round(plan["peak_bytes"] / meas, 4)
    for ph in ("head", "embed"):
        m = max(r[f"{ph}_bytes"] for r in rows)
        out[f"{ph}_predicted_over_measured"] = round(plan["phases"][ph] / m, 4) if m else None
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
