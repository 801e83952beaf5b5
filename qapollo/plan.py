"""`qapollo plan`: print the memory plan of a run config (planner.py) before anything is allocated."""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys

from .config import DEFAULT_CONFIG, PRESET_8GB, ConfigError, load_config, validate
from .hf_import import plan_shape
from .planner import advice, fmt, predict_peak


def parse_bytes(text: str) -> int:
    """'12GiB', '12GB', '800MiB', '1.5G', '12' → bytes (G/GiB = 2^30, GB = 10^9; a bare number is GiB: no
    one's card has 12 bytes)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([kKmMgGtT]?)(i?[bB])?\s*", str(text))
    if not m:
        raise ValueError(f"cannot read a size from '{text}': use e.g. 12GiB, 800MiB, 10GB (a bare 12 is 12 GiB)")
    num, unit, suffix = float(m.group(1)), m.group(2).upper(), m.group(3) or ""
    if not unit and not suffix:
        unit = "G"
    base = 1000 if suffix.upper() == "B" and unit and not suffix.lower().startswith("i") else 1024
    return int(num * base ** {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit])


def format_plan(plan: dict, budget: int | None = None) -> str:
    c = plan["components"]
    rows = [("int8 codes", c.get("int8_codes", 0)), ("int8 scales (fp32) + zeros (uint8)",
            c.get("int8_scales", 0) + c.get("int8_zeros", 0))]
    if "matrix_params" in c:
        rows = [("matrix params (float)", c["matrix_params"]), ("matrix optimizer states", c.get("matrix_optim_states", 0))]
    rows += [(f"float params ({plan['dtype_bytes']} B/elem: embed, lm_head, norms, biases)", c["float_params"]),
             ("float optimizer states", c["float_optim_states"]),
             ("APOLLO states (M, V, projection)", c["apollo_states"])]
    out = [f"memory plan ({plan['device_type']}, {plan['tokens']} tokens per micro-batch, "
           f"{'chunked' if plan['chunked_loss'] else 'full-logits'} loss)"]
    if plan["world_size"] > 1:
        dp = plan["data_parallel_bytes"]
        out.append(f"  per GPU of {plan['world_size']} data-parallel ranks ({plan['tokens_per_step']} tokens per "
                   f"optimizer step); all-reduce in flight + buckets: up to {fmt(max(dp.values()))} "
                   f"(NCCL's own buffers are extra, outside PyTorch's allocator)")
    out += [f"  {k:<52}{fmt(v):>12}" for k, v in rows]
    out.append(f"  {'= persistent':<52}{fmt(plan['persistent_bytes']):>12}")
    out.append(f"  {'activations, no checkpointing (+ loss saved)':<52}{fmt(plan['activations_full_bytes']):>12}")
    out.append(f"  {'activations, checkpointing (+ loss saved)':<52}{fmt(plan['activations_ckpt_bytes']):>12}")
    out.append("  transients:")
    out += [f"    {k:<50}{fmt(v):>12}" for k, v in plan["largest_transient"].items()]
    out.append("  phases (persistent + live at that moment):")
    out += [f"    {k:<50}{fmt(v):>12}{'  <- peak' if k == plan['phase'] else ''}" for k, v in plan["phases"].items()]
    if plan["cublas_workspace_bytes"]:
        out.append(f"  {'cuBLAS workspace':<52}{fmt(plan['cublas_workspace_bytes']):>12}")
    out.append(f"  {'PREDICTED PEAK':<52}{fmt(plan['peak_bytes']):>12}"
               + ("  (torch.cuda.max_memory_allocated)" if plan["device_type"] == "cuda" else "  (live tensor bytes)"))
    if plan["device_type"] == "cuda":
        out.append(f"  {'CUDA context (not in max_memory_allocated)':<52}{fmt(plan['context_bytes']):>12}")
    else:
        out.append(f"  {'peak RSS estimate (+ process)':<52}{fmt(plan['rss_bytes']):>12}")
    if budget is not None:
        total = plan["peak_bytes"] + plan["context_bytes"]
        ok = total <= budget
        out.append(f"  budget {fmt(budget)}: {'fits' if ok else 'DOES NOT FIT'} "
                   f"({fmt(total)} incl. context, {fmt(abs(budget - total))} {'left' if ok else 'over'})")
    return "\n".join(out)


def plan_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="qapollo plan", description="Print the memory plan of a run config.")
    ap.add_argument("--config", default=DEFAULT_CONFIG, help="YAML run config (default: configs/llama_7b.yaml)")
    ap.add_argument("--budget", default=None, help="memory budget, e.g. 12GiB or 12 (GiB): say whether the plan "
                    "fits (exit status 1 if not)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="device to plan for (default cuda)")
    ap.add_argument("--nproc", type=int, default=1, metavar="N",
                    help="plan per GPU of N data-parallel ranks (torchrun --nproc_per_node N; default 1)")
    ap.add_argument("--json", action="store_true", help="print the plan as one JSON line")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.seq_len=2048")
    args = ap.parse_intermixed_args(argv)  # overrides before or after the flags
    cfg = load_config(args.config, args.overrides)
    plan_shape(cfg)  # model.init_from: the shape of the folder's config.json
    if args.nproc < 1:
        raise ConfigError(f"--nproc {args.nproc}: the number of ranks must be >= 1")
    if args.nproc > 1 and cfg.model.lean_head:
        raise ConfigError("model.lean_head=true does not run data-parallel yet: plan it with --nproc 1")
    plan = predict_peak(cfg, args.device, world_size=args.nproc)
    try:
        budget = parse_bytes(args.budget) if args.budget else None
    except ValueError as e:
        raise ConfigError(f"--budget: {e}") from None
    fits = None if budget is None else plan["peak_bytes"] + plan["context_bytes"] <= budget
    report = plan if budget is None else {**plan, "budget_bytes": budget, "fits": fits}
    print(json.dumps(report) if args.json else format_plan(plan, budget))
    if fits is False:
        print(f"to fit: {advice(plan)}", file=sys.stderr)
        lean = lean_suggestion(cfg, args.device, args.nproc, budget)
        if lean:
            print(lean, file=sys.stderr)
        return 1
    return 0


LEAN_PRESETS = ("configs/llama_7b_8gb.yaml (LLaMA-7B, 8 GB); continued pre-training on 12 GB of a Llama-3-8B, "
                "Qwen3-8B, Qwen2.5-7B or Mistral-7B folder: configs/llama3_8b_12gb.yaml, configs/qwen3_8b_12gb.yaml, "
                "configs/qwen2.5_7b_12gb.yaml, configs/mistral_7b_12gb.yaml; configs/llama_13b_16gb.yaml "
                "(LLaMA-13B, 16 GB)")


def lean_suggestion(cfg, device: str, nproc: int, budget: int) -> str:
    """When a config does not fit: model.lean_head=true on it, if that is valid and fits; else the 8 GB
    preset (configs/llama_7b_8gb.yaml, batch 1 × 256) when the model has its shape and it fits."""
    if cfg.model.lean_head or nproc > 1:
        return ""

    def total_of(c) -> int:
        plan = predict_peak(c, device)
        return plan["peak_bytes"] + plan["context_bytes"]
    lean = copy.deepcopy(cfg)
    lean.model.lean_head = True
    try:
        validate(lean)
        total = total_of(lean)
        if total <= budget:
            return (f"with model.lean_head=true (int8 embedding and lm_head, factored second moments) it fits: "
                    f"{fmt(total)} incl. context; presets: {LEAN_PRESETS}")
    except ConfigError:
        pass
    if not os.path.exists(PRESET_8GB):
        return ""
    preset = load_config(PRESET_8GB)
    shape = ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")
    if any(getattr(preset.model, k) != getattr(cfg.model, k) for k in shape):
        return ""
    total = total_of(preset)
    if total > budget:
        return ""
    t = preset.train
    return (f"the 8 GB preset configs/llama_7b_8gb.yaml (model.lean_head=true, batch {t.batch_size} × {t.seq_len}"
            f"{f' × {t.grad_accum_steps} micro-batches' if t.grad_accum_steps > 1 else ''}) fits: {fmt(total)} incl. "
            f"context")
