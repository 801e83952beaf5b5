#!/usr/bin/env python3
"""Where a training step's time goes: forward, backward, the optimizer updates inside it, dequantize.

    python benchmarks/breakdown.py --config configs/llama_20m.yaml --steps 3 train.batch_size=4      # CPU
    python benchmarks/breakdown.py --config configs/llama_7b.yaml --steps 3 --profile /tmp/7b.prof   # CUDA

The step is the trainer's (model build, checkpointing, in-backward optimizer, chunked loss, random
tokens). Step 1 (optimizer states, startup guard, and on the compiled path the compilation) is timed
apart (`first_step_s`, with its own CUDA peak). Then `--steps` plain steps give the clean step time,
tokens/s and (CUDA) the peak memory beside the planner's; then `--steps` instrumented steps split it
(medians, seconds):

    forward_s       the model and the loss, up to the loss value
    backward_s      loss.backward(), *including* the optimizer updates that run inside it, and the
                    trainer's read of the non-finite-gradient flags after it
    optimizer_s     those updates, all tensors; of which
      apollo_s        APOLLO's multiplier of the int8 matrices (projection, moments, norms, limiter)
      int8_update_s   dequantize → add → requantize of the int8 matrices (compiled or eager path)
      float_update_s  embeddings, norms, lm_head (8-bit Adam or AdamW)
    dequant_s       Int8Linear's dequantize calls (forward, checkpoint recomputation, grad_input)
    model_s         step - optimizer - dequantize: matmuls, attention, norms, loss

On CUDA each interval is the GPU time between two CUDA events, idle gaps included (a launch-bound
stretch costs its wall time); on CPU it is wall time. The instrumentation records ~4 events per
matrix per step, so its step is a little slower than the plain one. `--profile FILE` writes a
torch.profiler table of one more step (top ops by self device time). Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

LABELS = ("forward", "backward", "optimizer", "apollo", "int8_update", "float_update", "dequant")


class Clock:
    """Intervals by label: CUDA events (device time) or perf_counter (CPU), summed per step."""

    def __init__(self, torch, cuda: bool):
        self.torch, self.cuda = torch, cuda
        self.pending = defaultdict(list)  # label -> [(start, end)]
        self.on = False

    def now(self):
        if not self.cuda:
            return time.perf_counter()
        e = self.torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def add(self, label: str, start, end) -> None:
        self.pending[label].append((start, end))

    def wrap(self, fn, label: str):
        def timed(*a, **k):
            if not self.on:
                return fn(*a, **k)
            t0 = self.now()
            out = fn(*a, **k)
            self.add(label, t0, self.now())
            return out
        return timed

    def collect(self) -> dict[str, float]:
        """Seconds per label since the last collect (synchronizes the device)."""
        if self.cuda:
            self.torch.cuda.synchronize()
            sec = lambda a, b: a.elapsed_time(b) / 1e3
        else:
            sec = lambda a, b: b - a
        out = {k: sum(sec(a, b) for a, b in v) for k, v in self.pending.items()}
        self.pending.clear()
        return out


def instrument(clock: Clock, model, opt) -> None:
    """Wrap the optimizer hooks, APOLLO's multiplier, the int8 and float updates and dequantize."""
    from qapollo.model import Int8Linear, int8_modules
    from qapollo.optim import apollo
    from qapollo.optim.updaters import TorchAdamUpdater
    opt._run = clock.wrap(opt._run, "optimizer")
    apollo.apollo_multiplier = clock.wrap(apollo.apollo_multiplier, "apollo")
    if hasattr(apollo, "lagged_multiplier"):  # train.accum_mode=lagged
        apollo.lagged_multiplier = clock.wrap(apollo.lagged_multiplier, "apollo")
    for _, m in int8_modules(model):  # the int8 update is the module's own (model.Int8Linear.add_update_)
        m.add_update_ = clock.wrap(m.add_update_, "int8_update")
    for u in opt.updaters.values():
        if isinstance(u, TorchAdamUpdater):
            u.step = clock.wrap(u.step, "float_update")
    Int8Linear.dequantized = clock.wrap(Int8Linear.dequantized, "dequant")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--steps", type=int, default=3, help="plain steps, then as many instrumented steps")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--label", default="", help="free text copied into the JSON line")
    ap.add_argument("--profile", default="", help="write a torch.profiler table of one extra step here")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.fused_update=false")
    args = ap.parse_intermixed_args(argv)

    import torch
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if cuda:
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    from memory import PEAK_FLOPS, flops_per_token  # benchmarks/memory.py
    from qapollo import loss as qloss
    from qapollo.config import load_config
    from qapollo.engine import build
    from qapollo.layerwise import UpdateCheckError
    from qapollo.metrics import peak_rss_bytes
    from qapollo.model import int8_modules
    from qapollo.planner import predict_peak

    dev = torch.device("cuda" if cuda else "cpu")
    cfg = load_config(args.config, args.overrides + [f"train.device={dev.type}"])
    B, T = cfg.train.batch_size, cfg.train.seq_len
    cfg.train.max_steps = max(cfg.train.max_steps, 2 * args.steps + 2)
    cfg.train.grad_accum_steps = 1  # one micro-batch per step: the phases timed below
    model, opt = build(cfg, dev)
    mods = int8_modules(model)
    rec = {"label": args.label, "config": args.config, "overrides": args.overrides, "device": dev.type,
           "device_name": torch.cuda.get_device_name(dev) if cuda else "cpu", "torch": torch.__version__,
           "threads": torch.get_num_threads(), "batch_size": B, "seq_len": T,
           "fused": bool(mods and mods[0][1].fused), "int8_matrices": len(mods),
           "predicted_peak_bytes": predict_peak(cfg, dev.type)["peak_bytes"]}
    clock = Clock(torch, cuda)
    instrument(clock, model, opt)
    gen = torch.Generator().manual_seed(0)

    def step(check: bool = False) -> float:
        x = torch.randint(0, cfg.model.vocab_size, (B, T), generator=gen).to(dev)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        mark = clock.now if clock.on else (lambda: None)
        c0 = mark()
        opt.begin_step(check=check)
        loss = qloss.causal_lm_loss(model, x)
        c1 = mark()
        rec.setdefault("first_loss", loss.item())  # the trainer reads the loss here too (a sync)
        loss.backward()
        opt.after_backward()  # the trainer's one read of the non-finite flags (a sync)
        c2 = mark()
        try:
            opt.end_step(check=check)
        except UpdateCheckError as e:  # bf16 norms may not move at warm-up lr on CPU: record, go on
            rec["startup_check_error"] = str(e)[:300]
            opt.count_changes = False
            opt.step_count += 1
        if clock.on:
            clock.add("forward", c0, c1)
            clock.add("backward", c1, c2)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    rec["first_step_s"] = round(step(check=cfg.train.check_updates), 3)
    if cuda:  # step 1 (startup guard) and the steady state separately
        rec["first_step_max_memory_allocated"] = torch.cuda.max_memory_allocated(dev)
        rec["first_step_max_memory_reserved"] = torch.cuda.max_memory_reserved(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    plain = [step() for _ in range(args.steps)]
    med = statistics.median(plain)
    rec.update(step_s=round(med, 4), step_times_s=[round(t, 4) for t in plain], tokens_per_s=round(B * T / med, 1))
    if cuda:
        rec["max_memory_allocated"] = torch.cuda.max_memory_allocated(dev)
        rec["max_memory_reserved"] = torch.cuda.max_memory_reserved(dev)
        measured = max(rec["max_memory_allocated"], rec["first_step_max_memory_allocated"])
        rec["predicted_over_measured"] = round(rec["predicted_peak_bytes"] / measured, 4)
        peak = next((v for k, v in PEAK_FLOPS.items() if k in rec["device_name"]), None)
        rec["mfu"] = round(flops_per_token(cfg) * B * T / med / peak, 4) if peak else None
    else:
        rec["peak_rss_bytes"] = peak_rss_bytes()  # the whole process so far (the build included)
    clock.on = True
    parts = []
    for _ in range(args.steps):
        clock.collect()
        total = step()
        p = clock.collect()
        p["step"] = total
        parts.append(p)
    clock.on = False
    split = {k: round(statistics.median(p.get(k, 0.0) for p in parts), 4) for k in ("step",) + LABELS}
    split["model"] = round(split["step"] - split["optimizer"] - split["dequant"], 4)
    rec["instrumented_s"] = {k + "_s": v for k, v in split.items()}
    if args.profile:
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        with torch.profiler.profile(activities=acts) as prof:
            step()
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        with open(args.profile, "w") as f:
            f.write(prof.key_averages().table(sort_by=key, row_limit=40))
        rec["profile"] = args.profile
    print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
