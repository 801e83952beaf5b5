#!/usr/bin/env python3
"""Measure the memory and speed of N training steps of any config; print ONE JSON line.

    python benchmarks/memory.py --config configs/llama_20m.yaml --steps 3 train.batch_size=4
    python benchmarks/memory.py --config configs/llama_7b.yaml --steps 3 train.seq_len=2048   # on a GPU
    python benchmarks/memory.py --config configs/llama_60m.yaml --steps 2 train.batch_size=4 \
        train.grad_accum_steps=4 train.accum_mode=lagged             # K micro-batches per optimizer step

CUDA: peak torch.cuda.max_memory_allocated / max_memory_reserved / num_alloc_retries, step time,
tokens/s, MFU. CPU: peak RSS and peak live tensor bytes (qapollo.meter.LiveTensorCounter, the
GPU-equivalent figure; --no-counter skips it, it slows small ops). The planner's prediction sits beside
the measurement. Batches are random tokens (memory and speed do not depend on their values). The step is
the trainer's: same model build, checkpointing, in-backward optimizer and loss (--loss hf for HF's).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Peak dense bf16 FLOP/s (no sparsity), by device-name substring.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12,
              "3090": 71e12, "A6000": 155e12, "V100": 125e12, "T4": 65e12}


def flops_per_token(cfg) -> float:
    """Model FLOPs per trained token (6·params + attention), as in the PaLM/nanoGPT MFU."""
    m, t = cfg.model, cfg.train
    from qapollo.planner import matrix_shapes
    n = m.num_hidden_layers * sum(a * b for _, a, b in matrix_shapes(m)) + m.vocab_size * m.hidden_size
    return 6 * n + 12 * m.num_hidden_layers * m.hidden_size * t.seq_len


class Timeline:
    """CUDA: around every optimizer update, the bytes allocated and the peak since the last mark.

    The peak between marks shows which part of the step (forward, loss backward, a layer's backward, an
    update) holds the step's maximum; the per-step maximum is unchanged (max over the intervals).
    """

    def __init__(self, opt, dev, path: str):
        import torch
        self.torch, self.dev, self.f = torch, dev, open(path, "w")
        self.peak = self.step_alloc = self.step_reserved = 0  # maxima: whole run, this step (allocated, reserved)
        run = opt._run

        def wrapped(name, grad):
            self.mark("bwd>" + name)
            run(name, grad)
            self.mark("upd:" + name)
        opt._run = wrapped

    def mark(self, label: str) -> None:
        cuda = self.torch.cuda
        peak = cuda.max_memory_allocated(self.dev)
        self.peak = max(self.peak, peak)
        self.step_alloc = max(self.step_alloc, peak)
        self.step_reserved = max(self.step_reserved, cuda.max_memory_reserved(self.dev))
        self.f.write(json.dumps({"at": label, "alloc": cuda.memory_allocated(self.dev), "peak": peak}) + "\n")
        cuda.reset_peak_memory_stats(self.dev)

    def close(self) -> None:
        self.f.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--loss", default="trainer", choices=["trainer", "hf", "chunked"],
                    help="trainer: what qapollo.train uses; hf: model(labels=x).loss; chunked: qapollo.loss")
    ap.add_argument("--no-counter", action="store_true", help="CPU: skip the live tensor counter")
    ap.add_argument("--label", default="", help="free text copied into the JSON line")
    ap.add_argument("--profile", default="", help="write a torch.profiler table of the last step to this file")
    ap.add_argument("--timeline", default="", help="CUDA: write allocated bytes and the peak between "
                    "optimizer updates (one JSON line per update) here")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args(argv)

    import torch
    want_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if want_cuda:
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    from qapollo.config import load_config
    from qapollo.engine import build, micro_batch
    from qapollo.layerwise import UpdateCheckError
    from qapollo.meter import LiveTensorCounter, resident_tensor_bytes
    from qapollo.metrics import peak_rss_bytes
    from qapollo.planner import predict_peak
    from qapollo import loss as qloss

    cfg = load_config(args.config, args.overrides + [f"train.device={'cuda' if want_cuda else 'cpu'}"])
    dev = torch.device("cuda" if want_cuda else "cpu")
    chunked = {"trainer": True, "hf": False, "chunked": True}[args.loss]  # the trainer's loss is the chunked one
    plan = predict_peak(cfg, dev.type, chunked_loss=chunked)
    rec = {"label": args.label, "config": args.config, "overrides": args.overrides, "device": dev.type,
           "device_name": torch.cuda.get_device_name(dev) if want_cuda else "cpu",
           "torch": torch.__version__, "threads": torch.get_num_threads(), "steps": args.steps,
           "batch_size": cfg.train.batch_size, "seq_len": cfg.train.seq_len,
           "grad_accum_steps": cfg.train.grad_accum_steps, "accum_mode": cfg.train.accum_mode,
           "activation_checkpointing": cfg.model.activation_checkpointing, "loss": "chunked" if chunked else "hf",
           "predicted_peak_bytes": plan["peak_bytes"], "predicted_phase": plan["phase"],
           "predicted_persistent_bytes": plan["persistent_bytes"]}
    t0 = time.perf_counter()
    cfg.train.max_steps = max(cfg.train.max_steps, args.steps)
    model, opt = build(cfg, dev)
    rec["build_s"] = round(time.perf_counter() - t0, 2)
    gen = torch.Generator().manual_seed(0)
    B, T, K = cfg.train.batch_size, cfg.train.seq_len, cfg.train.grad_accum_steps
    use_counter = dev.type == "cpu" and not args.no_counter
    if use_counter and any(m.fused for m in model.modules() if hasattr(m, "fused")):
        use_counter = False  # torch.compile refuses to run under a TorchDispatchMode such as the counter
        rec["live_counter"] = "off: compiled int8 kernels (model.fused_update) cannot run under it"

    times, live_peaks = [], []
    timeline = Timeline(opt, dev, args.timeline) if (want_cuda and args.timeline) else None
    if want_cuda:
        torch.cuda.synchronize()
        rec["allocated_after_build"] = torch.cuda.memory_allocated(dev)
        rec["peak_allocated_per_step"], rec["peak_reserved_per_step"] = [], []
    for i in range(args.steps):
        check = i == 0 and cfg.train.check_updates
        counter = LiveTensorCounter() if use_counter else None
        base = resident_tensor_bytes(model, opt.resident_tensors()) if use_counter else 0
        gc.collect()
        if want_cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        ts = time.perf_counter()
        if counter:
            counter.__enter__()
        prof = None
        if args.profile and i == args.steps - 1:
            acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if want_cuda else [])
            prof = torch.profiler.profile(activities=acts)
            prof.__enter__()
        try:
            for micro in range(K):  # the trainer's micro-batches: K backwards, one optimizer step
                x = torch.randint(0, cfg.model.vocab_size, (B, T), generator=gen).to(dev)

                def loss_fn(model, x):
                    loss = qloss.causal_lm_loss(model, x) if chunked else model(input_ids=x, labels=x).loss
                    if timeline:
                        timeline.mark(f"step{i + 1}.{micro}:forward")
                    return loss
                loss_val, _ = micro_batch(model, opt, x, last=micro == K - 1, accum=K, check=check, loss_fn=loss_fn)
            try:
                opt.end_step(check=check)
            except UpdateCheckError as e:  # record it (bf16 norms may not move at warmup lr), go on
                rec["startup_check_error"] = str(e)[:300]
                opt.count_changes = False
                opt.step_count += 1
        finally:
            if counter:
                counter.__exit__(None, None, None)
        if want_cuda:
            torch.cuda.synchronize()
            if timeline:  # it resets the peak at each mark: the step's peak is the max over its intervals
                timeline.mark(f"step{i + 1}:end")
                rec["peak_allocated_per_step"].append(timeline.step_alloc)
                rec["peak_reserved_per_step"].append(timeline.step_reserved)
                timeline.step_alloc = timeline.step_reserved = 0
            else:
                rec["peak_allocated_per_step"].append(torch.cuda.max_memory_allocated(dev))
                rec["peak_reserved_per_step"].append(torch.cuda.max_memory_reserved(dev))
        times.append(time.perf_counter() - ts)
        if prof is not None:
            prof.__exit__(None, None, None)
            key = "self_cuda_time_total" if want_cuda else "self_cpu_time_total"
            with open(args.profile, "w") as f:
                f.write(prof.key_averages().table(sort_by=key, row_limit=40))
        if counter:
            live_peaks.append(base + counter.peak)
        rec.setdefault("first_loss", loss_val)
    rec["step_times_s"] = [round(t, 3) for t in times]
    timed = times[1:] if len(times) > 1 else times  # the first step creates optimizer states
    if args.profile and len(timed) > 1:
        timed = timed[:-1]  # the profiled last step runs slower
    med = statistics.median(timed)
    rec["step_time_median_s"] = round(med, 4)
    rec["tokens_per_s"] = round(B * T * K / med, 1)
    if want_cuda:
        if timeline:
            timeline.close()
            rec["timeline_peak"] = timeline.peak
        rec["max_memory_allocated"] = max(rec["peak_allocated_per_step"])
        rec["max_memory_reserved"] = max(rec["peak_reserved_per_step"])
        rec["num_alloc_retries"] = torch.cuda.memory_stats(dev).get("num_alloc_retries", 0)
        rec["num_ooms"] = torch.cuda.memory_stats(dev).get("num_ooms", 0)
        name = rec["device_name"]
        peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
        rec["peak_flops"] = peak
        rec["mfu"] = round(flops_per_token(cfg) * B * T * K / med / peak, 4) if peak else None
        measured = rec["max_memory_allocated"]
    else:
        rec["peak_rss_bytes"] = peak_rss_bytes()
        rec["predicted_rss_bytes"] = plan["rss_bytes"]
        if live_peaks:
            rec["peak_live_tensor_bytes"] = max(live_peaks)
            rec["live_peak_per_step"] = live_peaks
        measured = rec.get("peak_live_tensor_bytes")
    if measured:
        rec["predicted_over_measured"] = round(plan["peak_bytes"] / measured, 4)
    print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
