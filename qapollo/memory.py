"""Memory planner (arithmetic from a Config alone) and a live-tensor meter for CPU measurements.

`predict_peak(cfg, device_type)` adds up what one training step keeps alive — int8 codes, scales and
zero points, float params, their optimizer states, APOLLO states — and the largest of the step's
phases on top of it:

    loss      saved activations + the loss's (N, V) tensors (HF: logits, fp32 upcast, log-softmax,
              its gradient: 12·N·V bytes at the backward's start; chunked loss: a few MiB)
    head      saved activations + lm_head's weight gradient + its optimizer update (+ the first step's
              copy for the startup guard)
    layer     activations + the largest matrix's backward (its dequantized copy, or its weight gradient
              + the update's buffers: row chunks in the eager path, none in the compiled one) +
              activation gradients; step 1 adds the startup guard's copy of the codes (compiled path)
    embed     the embedding's dense gradient + its optimizer update

N = batch·seq tokens, V vocab, h hidden, I intermediate, s bytes of the compute dtype (bf16 on CUDA,
fp32 on CPU unless model.dtype says otherwise). Saved activations per decoder layer, counted from the
tensors HF's LlamaDecoderLayer keeps for backward (two RMSNorms (4+2s)·N·h each: fp32 input + normalized
+ weighted output; attention 5·s·N·h: rotated q and k, v, SDPA output, its contiguous copy; MLP
4·s·N·I: gate, silu(gate), up, their product). With activation checkpointing only each layer's input
(s·N·h) is kept and one layer is recomputed at a time.

What the prediction means: on CUDA, `torch.cuda.max_memory_allocated` (the CUDA context, ≈0.4 GiB,
is reported beside it, not in it); on CPU, the peak of live tensor bytes measured by
`LiveTensorCounter` (and `rss_bytes` adds the process's own ≈0.45 GiB for a peak-RSS estimate).
The CPU differs from CUDA in two places that are modelled explicitly: fp32 float params by default,
and bitsandbytes' CPU 8-bit Adam, which dequantizes both states to fp32 (≈18 bytes per element of
transient; CUDA's fused kernel needs none).
"""
from __future__ import annotations

import argparse
import re
import sys
import weakref

import torch

from . import quant
from .fused import wanted
from .optim.apollo import SKETCH_ROWS

GiB = 1 << 30
MiB = 1 << 20
CUDA_CONTEXT_BYTES = int(0.4 * GiB)
# cuBLAS(Lt) workspaces come from the caching allocator on Hopper, 32 MiB per thread that runs matmuls:
# the forward's (main thread) and autograd's device thread. H100: allocated after step 1 was 64 MiB above
# the planned persistent bytes.
CUBLAS_WORKSPACE_BYTES = 2 * 32 * MiB
CPU_PROCESS_BYTES = int(0.45 * GiB)  # python + torch + transformers + bitsandbytes, before any tensor
BNB_BLOCK = 256
BNB_MIN_8BIT = 4096
# Bytes per element of a row chunk of the eager int8 path (quant.py; LiveTensorCounter on CPU): the
# update's fp32 code-unit values, the int64 noise and rounding threshold (25.2 B measured), the dequantize's
# fp32 temporaries into a bf16 output (8 B). The compiled path (fused.py) has none: whole matrix, no
# fp32 copy.
UPDATE_CHUNK_BYTES = 26
DEQUANT_CHUNK_BYTES = 8
FLOAT_CHUNK_ELEMS = 1 << 22  # layerwise.TorchAdamUpdater.CHUNK_ELEMS (float tensors' optimizer chunks)
LOSS_CHUNK_ELEMS = 1 << 22  # loss.py: N·chunk elements of logits at a time
HEAD_SLICE_ELEMS = 1 << 20  # loss.HEAD_SLICE_ELEMS: rows·hidden of one int8 lm_head slice (model.lean_head)
# quant.update_rows_ beside update_groups' buffers: int64 noise start per element, gathered and new codes
ROWS_EXTRA_BYTES = 10


def parse_bytes(text: str) -> int:
    """'12GiB', '12GB', '800MiB', '1.5G', '123456' → bytes (G/GiB = 2^30, GB = 10^9)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", str(text))
    if not m:
        raise ValueError(f"cannot read a size from '{text}': use e.g. 12GiB, 800MiB, 10GB")
    num, unit, suffix = float(m.group(1)), m.group(2).upper(), m.group(3) or ""
    base = 1000 if suffix.upper() == "B" and unit and not suffix.lower().startswith("i") else 1024
    return int(num * base ** {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit])


def fmt(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / MiB:.1f} MiB"


def _dtype_bytes(name: str, device_type: str) -> int:
    if name == "auto":
        return 2 if device_type == "cuda" else 4
    return {"float32": 4, "bfloat16": 2, "float16": 2}[name]


def matrix_shapes(mcfg) -> list[tuple[str, int, int]]:
    """(name, out, in) of one decoder layer's projections."""
    h, i = mcfg.hidden_size, mcfg.intermediate_size
    hd = h // mcfg.num_attention_heads
    kv = (mcfg.num_key_value_heads or mcfg.num_attention_heads) * hd
    return [("q_proj", h, h), ("k_proj", kv, h), ("v_proj", kv, h), ("o_proj", h, h),
            ("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)]


def _float_optim_bytes(n: int, kind: str, s: int, device_type: str) -> tuple[int, int]:
    """(persistent state bytes, transient bytes of one update) of one float tensor of n elements."""
    if kind == "adam8bit":
        if n < BNB_MIN_8BIT:
            return 8 * n, 0
        blocks = -(-n // BNB_BLOCK)
        state = 2 * n + 2 * 4 * blocks
        # CUDA: one fused kernel. CPU: both states dequantized to fp32, an fp32 grad copy, sqrt and the
        # denominator (measured with LiveTensorCounter: 20 bytes/element, fp32 or bf16 params), for one
        # row chunk at a time (layerwise.TorchAdamUpdater.CHUNK_ELEMS).
        transient = 0 if device_type == "cuda" else 20 * min(n, FLOAT_CHUNK_ELEMS)
        return state, transient
    # torch AdamW: exp_avg and exp_avg_sq like the param; sqrt and denominator temporaries (per chunk)
    return 2 * s * n, 2 * s * min(n, FLOAT_CHUNK_ELEMS)


def _int8_transients(s: int, mn: int, device_type: str, fused: bool) -> tuple[int, int, int]:
    """(dequantize, update, extra for the step-1 startup guard) transient bytes of an m·n int8 matrix.

    Eager: row chunks of quant.chunk_elems(device) elements (CPU 256K, CUDA 8M); the gradient is upcast
    chunk by chunk inside them (an earlier whole-gradient fp32 copy on CPU with bf16 is gone: a 4096 ×
    11008 bf16 update measured 7.6 MB of transient = 29 B × 256K, not 4 B × 45M). Compiled: the
    s-byte output / the gradient only; the guard copies the old codes (1 B/elem) and compares them in
    4M-element chunks (bool mask + CUDA's int64 sum)."""
    if fused:
        return s * mn, s * mn, mn + (1 + 8) * min(mn, 1 << 22)
    chunk = min(mn, quant.chunk_elems(device_type))
    dequant = 8 * mn if s == 4 else s * mn + DEQUANT_CHUNK_BYTES * chunk  # fp32: whole (output + a temporary)
    return dequant, s * mn + UPDATE_CHUNK_BYTES * chunk, 0


def predict_peak(cfg, device_type: str = "cuda", chunked_loss: bool | None = None, world_size: int = 1) -> dict:
    """The memory plan of one training step of `cfg` on `device_type` ('cuda' or 'cpu'); bytes, per rank
    of `world_size` data-parallel ranks (each holds the whole model: only the all-reduce terms grow).

    Returns a dict with the components, each phase's total, 'phase' (the largest), 'peak_bytes'
    (the prediction: max_memory_allocated on CUDA, peak live tensor bytes on CPU), 'context_bytes'
    and 'rss_bytes' (CPU: peak + process overhead).
    """
    m, o, t = cfg.model, cfg.optim, cfg.train
    if chunked_loss is None:
        try:
            from .loss import loss_is_chunked
            chunked_loss = loss_is_chunked(cfg)
        except ImportError:
            chunked_loss = False
    s = _dtype_bytes(m.dtype, device_type)
    h, I, L, V = m.hidden_size, m.intermediate_size, m.num_hidden_layers, m.vocab_size
    N = t.batch_size * t.seq_len
    hd = h // m.num_attention_heads
    kv = (m.num_key_value_heads or m.num_attention_heads) * hd
    mats = matrix_shapes(m)
    mat_elems = L * sum(a * b for _, a, b in mats)
    mn_max = max(a * b for _, a, b in mats)
    c: dict[str, int] = {}

    # ---- persistent ----------------------------------------------------------------------------
    tied = m.tie_word_embeddings  # lm_head is the embedding: one V·h tensor and one optimizer state
    lean = m.lean_head  # embed and lm_head int8 with APOLLO-Mini (config refuses it with tied/float weights)
    float_tensors = [V * h] * (1 if tied else 2) + [h] * (2 * L + 1)  # embed, lm_head, norms
    if lean:
        float_tensors = [0, 0] + [h] * (2 * L + 1)  # keeps fstate[0] / fstate[1] as embed / lm_head
    if m.weight_quant:
        int8_elems = mat_elems + (2 * V * h if lean else 0)
        groups = int8_elems // m.group_size
        c["int8_codes"] = int8_elems
        c["int8_scales"] = 4 * groups
        c["int8_zeros"] = groups
    else:
        c["matrix_params"] = s * mat_elems
    c["float_params"] = s * sum(float_tensors)
    fkind = "adamw" if o.name == "adamw" else o.float_optim
    fstate = [_float_optim_bytes(n, fkind, s, device_type) for n in float_tensors]
    c["float_optim_states"] = sum(a for a, _ in fstate)
    if o.name == "adamw":
        c["matrix_optim_states"] = 2 * s * mat_elems
        c["apollo_states"] = 0
    else:
        # M and V (fp32, max(m,n)·rank each) + the projection (fp32, min(m,n)·rank) + prev norm
        c["apollo_states"] = L * sum(4 * o.rank * (2 * max(a, b) + min(a, b)) + 4 for _, a, b in mats)
        if lean:  # the same for the (V, h) embedding and lm_head, V >= h
            c["apollo_states"] += 2 * (4 * o.rank * (2 * V + h) + 4)
    lagged = t.accum_mode == "lagged" and o.name != "adamw"
    if lagged:
        # + the window's summed projected gradient (max(m,n)·rank), its sketch's sum (SKETCH_ROWS·min(m,n))
        # and the step size (1 or per channel) (optim/apollo.py)
        c["apollo_states"] += L * sum(4 * o.rank * max(a, b) + 4 * SKETCH_ROWS * min(a, b)
                                      + 4 * (1 if o.scale_type == "tensor" else max(a, b)) for _, a, b in mats)
        if lean:
            c["apollo_states"] += 2 * (4 * o.rank * V + 4 * SKETCH_ROWS * h + 4)
    if t.grad_accum_steps > 1:
        if lagged:
            # only the float tensors (embed, lm_head, norms) accumulate a gradient (layerwise.py)
            c["accumulated_grads"] = s * sum(float_tensors)
        else:
            # hooks only accumulate on earlier micro-batches: one full gradient stays resident (layerwise.py)
            c["accumulated_grads"] = s * (mat_elems + sum(float_tensors))
    persistent = sum(c.values())

    # ---- activations -----------------------------------------------------------------------------
    norm = (4 + 2 * s) * N * h
    per_layer = 2 * norm + s * N * (3 * h + 2 * kv) + 4 * s * N * I + 4 * N * m.num_attention_heads
    c_act_full = L * per_layer + norm
    c_act_ckpt = L * s * N * h + norm
    ckpt = m.activation_checkpointing
    acts = c_act_ckpt if ckpt else c_act_full
    if chunked_loss:
        ck = max(1, min(V, LOSS_CHUNK_ELEMS // max(1, N)))
        loss_saved = 8 * N  # per-token logsumexp and target logit (fp32)
        # one vocab slice: fp32 logits, (z - max) and exp(...) (12 B/elem) + fp32 grad_h and its cast
        loss_peak = 12 * N * ck + 4 * N * h + s * N * h
    else:
        loss_saved = 4 * N * V  # log_softmax output, fp32
        loss_peak = 12 * N * V  # saved output + its grad + the input's grad (fp32) at the backward start

    # ---- phases ----------------------------------------------------------------------------------
    # Step 1 differs: the startup guard copies each float tensor's row chunk before its update ((s+1)·n
    # with the comparison's bool mask), and the embedding's optimizer states do not exist yet when lm_head steps.
    first_check = t.check_updates
    head_t, emb_t = (0 if tied else fstate[1][1]), fstate[0][1]
    # chunk by chunk (layerwise.py); CUDA sums the bool mask through an int64 copy (8 B/elem). Whole-tensor,
    # that was 1.4 GB at 7B on an H100 (measured peak 8.92 → 7.67 GiB once chunked).
    clone = (s + 1 + (8 if device_type == "cuda" else 0)) * min(V * h, FLOAT_CHUNK_ELEMS) if first_check else 0
    phases = {}
    phases["loss"] = acts + loss_peak
    # With accumulation the gradient being stepped is the resident accumulated one (counted above): the
    # new micro-batch's gradient is added into it in place and freed before the update's transients.
    acc = t.grad_accum_steps > 1

    def grad_then_update(transient: int) -> int:
        return max(s * V * h, transient) if acc else s * V * h + transient
    phases["head"] = acts + s * N * h + grad_then_update(max(head_t, 0))
    phases["head (step 1)"] = phases["head"] + (0 if tied else clone) - fstate[0][0]
    if lean:
        # lm_head's gradient only slice by slice (loss.HeadGradSlices, read twice): the hidden states' fp32
        # gradient, R (fp32, V), one slice's dequantized rows, logits/softmax and gradient, and its update
        phases["head"] = acts + s * N * h + 4 * N * h + 4 * V + _lean_head_slice_bytes(s, N, V, h, device_type)
        phases["head (step 1)"] = phases["head"]
        # the forward's slices: dequantizing one (two fp32 temporaries + the s-byte cast unless fp32), then
        # its logits, (z - max) and exp (12 B per token·row; the rows are freed once the matmul is done)
        rows = _head_rows(N, V, h)
        loss_peak = max((8 + (s if s != 4 else 0)) * rows * h, 12 * N * rows)
        phases["loss"] = acts + loss_peak
    # one decoder layer's backward: the largest matrix dequantized (into an s-byte output) or its weight
    # gradient plus the update's buffers, over ~3 activation gradients
    guard_t = 0
    if m.weight_quant:
        dequant_t, upd, guard_t = _int8_transients(s, mn_max, device_type, wanted(m.fused_update, device_type))
        mat_t = max(dequant_t, upd)
    elif o.name == "adamw":
        mat_t = s * mn_max + 2 * s * mn_max
    else:
        mat_t = s * mn_max + 4 * mn_max * 2
    grads = 3 * s * N * max(h, I)
    if tied and not acc:  # lm_head's gradient waits in the shared tensor's .grad until the embedding's arrives
        grads += s * V * h
    if ckpt:
        phases["layer"] = c_act_ckpt + per_layer + grads + mat_t
    else:
        phases["layer"] = c_act_full + grads + mat_t
    if first_check and guard_t:
        phases["layer (step 1)"] = phases["layer"] + guard_t
    # tied: lm_head's gradient is still held when the embedding's arrives (one tensor, one update)
    phases["embed"] = (c_act_ckpt - norm if ckpt else 0) + s * N * h + grad_then_update(emb_t) + \
        (s * V * h if tied and not acc else 0)
    phases["embed (step 1)"] = phases["embed"] + clone
    if lean:
        # the batch's rows only (model.RowGrad, fp32) and their int8 update (quant.update_rows_)
        k_elems = min(N, V) * h
        rows_t = (UPDATE_CHUNK_BYTES + ROWS_EXTRA_BYTES) * min(k_elems, quant.chunk_elems(device_type))
        phases["embed"] = (c_act_ckpt - norm if ckpt else 0) + s * N * h + 4 * k_elems + rows_t
        phases["embed (step 1)"] = phases["embed"]
    dp = _data_parallel_extra(world_size, s, mn_max, V * h, head_t, mat_t, acc, lagged, tied)
    for k in phases:
        phases[k] += dp[k.split()[0]]
    phase = max(phases, key=phases.get)
    extra = CUBLAS_WORKSPACE_BYTES if device_type == "cuda" else 0
    peak = persistent + phases[phase] + extra
    return {
        "device_type": device_type, "dtype_bytes": s, "tokens": N, "chunked_loss": chunked_loss,
        "components": c, "persistent_bytes": persistent,
        "activations_bytes": acts, "activations_full_bytes": c_act_full + loss_saved,
        "activations_ckpt_bytes": c_act_ckpt + loss_saved, "loss_saved_bytes": loss_saved,
        "largest_transient": {"dequantize": dequant_t if m.weight_quant else 0,
                              "matrix_grad": s * mn_max,
                              # lean: one lm_head slice's gradient (never the whole V·h one)
                              "embed_or_head_grad": s * (_head_rows(N, V, h) if lean else V) * h,
                              "logits_loss": loss_peak, "float_optim_update": max(head_t, emb_t),
                              "first_step_guard_copy": 0 if lean else clone},
        "lean_head": lean,
        "phases": {k: v + persistent + extra for k, v in phases.items()}, "phase": phase,
        "world_size": world_size, "data_parallel_bytes": dp,
        "tokens_per_step": N * t.grad_accum_steps * world_size,
        "cublas_workspace_bytes": extra,
        "peak_bytes": peak,
        "context_bytes": CUDA_CONTEXT_BYTES if device_type == "cuda" else 0,
        "rss_bytes": peak + CPU_PROCESS_BYTES if device_type == "cpu" else None,
    }


def _head_rows(n_tokens: int, vocab: int, hidden: int) -> int:
    """Rows of one slice of the int8 lm_head (loss.head_slice_rows; the arithmetic copied: no import of loss)."""
    ck = max(1, min(vocab, LOSS_CHUNK_ELEMS // max(1, n_tokens)))
    return max(1, min(ck, HEAD_SLICE_ELEMS // hidden))


def _lean_head_slice_bytes(s: int, N: int, V: int, h: int, device_type: str) -> int:
    """Transients of one lm_head slice in the lean head's backward, two moments that do not overlap: its
    dequantized rows (s B/elem) with the slice's softmax gradient (fp32 and its s-byte cast) and the hidden
    gradient's product; then the slice's gradient (s B/elem) with the eager int8 update's row-chunk buffers."""
    rows = _head_rows(N, V, h)
    _, upd, _ = _int8_transients(s, rows * h, device_type, fused=False)
    logits = s * rows * h + (4 + (s if s != 4 else 0)) * N * rows + (s * N * h if s != 4 else 0)
    return max(logits, upd)


def _data_parallel_extra(world: int, s: int, mn_max: int, head_elems: int, head_t: int, mat_t: int, acc: bool,
                         lagged: bool, tied: bool) -> dict[str, int]:
    """Bytes each phase gains per rank with `world` > 1 ranks (distributed.GradAverager).

    The all-reduces run in place on the gradients, so they need no copy, but one large gradient stays in
    flight while the next is computed, and its update runs then: in a decoder layer's backward that is the
    previous matrix's gradient (none when exact accumulation keeps them resident anyway) or, in the last
    layer, lm_head's with its update (none when it accumulates or is tied); in the embedding's phase the
    last matrix's update runs beside the embedding's gradient. Gradients under SMALL_BYTES wait, packed,
    in buckets: at most ~3 buckets' worth alive. NCCL's own communication buffers are allocated outside
    PyTorch (like the CUDA context) and are not in this plan.
    """
    if world <= 1:
        return {"loss": 0, "head": 0, "layer": 0, "embed": 0}
    from .distributed import GradAverager
    bucket = 3 * (GradAverager.BUCKET_BYTES + GradAverager.SMALL_BYTES)
    prev_matrix = 0 if (acc and not lagged) else s * mn_max
    prev_head = 0 if (acc or tied) else s * head_elems + head_t
    return {"loss": 0, "head": bucket, "layer": bucket + max(prev_matrix, prev_head), "embed": bucket + mat_t}


def one_line(plan: dict, device_name: str = "") -> str:
    d = device_name or plan["device_type"]
    tail = (f"+ {fmt(plan['context_bytes'])} CUDA context" if plan["device_type"] == "cuda"
            else f"≈ {fmt(plan['rss_bytes'])} peak RSS")
    return (f"memory plan: predicted peak {fmt(plan['peak_bytes'])} on {d} ({plan['phase']} phase; "
            f"{fmt(plan['persistent_bytes'])} weights+states) {tail}")


def format_plan(plan: dict, budget: int | None = None) -> str:
    c = plan["components"]
    rows = [("int8 codes", c.get("int8_codes", 0)), ("int8 scales (fp32) + zeros (uint8)",
            c.get("int8_scales", 0) + c.get("int8_zeros", 0))]
    if "matrix_params" in c:
        rows = [("matrix params (float)", c["matrix_params"]), ("matrix optimizer states", c.get("matrix_optim_states", 0))]
    rows += [(f"float params ({plan['dtype_bytes']} B/elem: embed, lm_head, norms)", c["float_params"]),
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
    for k, v in plan["largest_transient"].items():
        out.append(f"    {k:<50}{fmt(v):>12}")
    out.append("  phases (persistent + live at that moment):")
    for k, v in plan["phases"].items():
        out.append(f"    {k:<50}{fmt(v):>12}{'  <- peak' if k == plan['phase'] else ''}")
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
                   f"({fmt(total)} incl. context, {fmt(budget - total)} {'left' if ok else 'over'})")
    return "\n".join(out)


def advice(plan: dict) -> str:
    """What to change when a plan does not fit."""
    tips = {"loss": "lower train.batch_size or train.seq_len",
            "layer": "set model.activation_checkpointing=true or lower train.batch_size / train.seq_len",
            "head": "set model.activation_checkpointing=true, lower train.batch_size, or optim.float_optim=adam8bit",
            "embed": "use optim.float_optim=adam8bit or a smaller model.vocab_size"}
    lean = "" if plan.get("lean_head") else ", or set model.lean_head=true (LLaMA-7B: configs/llama_7b_8gb.yaml)"
    return tips[plan["phase"].split()[0]] + "; or pick a smaller model config" + lean


def plan_main(argv: list[str]) -> int:
    from .config import DEFAULT_CONFIG, ConfigError, load_config
    ap = argparse.ArgumentParser(prog="qapollo plan", description="Print the memory plan of a run config.")
    ap.add_argument("--config", default=DEFAULT_CONFIG, help="YAML run config (default: configs/llama_7b.yaml)")
    ap.add_argument("--budget", default=None, help="memory budget, e.g. 12GiB: say whether the plan fits")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="device to plan for (default cuda)")
    ap.add_argument("--nproc", type=int, default=1, metavar="N",
                    help="plan per GPU of N data-parallel ranks (torchrun --nproc_per_node N; default 1)")
    ap.add_argument("--json", action="store_true", help="print the plan as one JSON line")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.seq_len=2048")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    from .hf_import import plan_shape
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
    if args.json:
        import json
        print(json.dumps(plan))
    else:
        print(format_plan(plan, budget))
    if budget is not None and plan["peak_bytes"] + plan["context_bytes"] > budget:
        print(f"to fit: {advice(plan)}", file=sys.stderr)
        lean = _lean_suggestion(cfg, args.device, args.nproc, budget)
        if lean:
            print(lean, file=sys.stderr)
        return 1
    return 0


def _lean_suggestion(cfg, device: str, nproc: int, budget: int) -> str:
    """When a config does not fit: model.lean_head=true on it, if that is valid and fits; else the 8 GB
    preset (configs/llama_7b_8gb.yaml, batch 1 × 256) when the model has its shape and it fits."""
    import copy
    import os
    from .config import PRESET_8GB, ConfigError, load_config, validate
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
            return (f"with model.lean_head=true (int8 embedding and lm_head with APOLLO-Mini) it fits: {fmt(total)} "
                    f"incl. context; the LLaMA-7B preset for 8 GB cards is configs/llama_7b_8gb.yaml")
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


# ---- measurement ---------------------------------------------------------------------------------
def _dispatch_base():
    from torch.utils._python_dispatch import TorchDispatchMode
    return TorchDispatchMode


class LiveTensorCounter(_dispatch_base()):
    """Peak bytes of live tensor storages allocated while active (CPU: the analogue of CUDA's
    max_memory_allocated minus block rounding). Counts each fresh output storage once (ops whose
    outputs alias an input — views, in-place, out= — allocate nothing) and forgets it when the
    storage dies. Ops implemented in Python outside aten (bitsandbytes' CPU optimizer) are re-dispatched
    with the meter active, so their internal temporaries are counted too.
    """

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.cur = 0
        self.peak = 0

    def reset_peak(self) -> None:
        self.peak = self.cur

    def _free(self, key: int) -> None:
        self.cur -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace not in ("aten", "prims", "profiler"):
            from torch.utils._python_dispatch import _pop_mode, _push_mode
            dev = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
            if dev.type == "cpu":
                _push_mode(self)
                try:
                    out = func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
                finally:
                    _pop_mode()
                self._count(out)
                return out
        out = func(*args, **kwargs)
        if not any(r.alias_info is not None for r in func._schema.returns):
            self._count(out)
        return out

    def _count(self, out) -> None:
        from torch.utils._pytree import tree_flatten
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                key, n = st.data_ptr(), st.nbytes()
                if n and key not in self.live:
                    self.live[key] = n
                    self.cur += n
                    weakref.finalize(st, self._free, key)
                    if self.cur > self.peak:
                        self.peak = self.cur


def resident_tensor_bytes(*objs) -> int:
    """Bytes of the distinct storages of the tensors in modules / optimizer states / tensors given."""
    seen: dict[int, int] = {}

    def add(t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            st = t.untyped_storage()
            seen.setdefault(st.data_ptr(), st.nbytes())
        elif isinstance(t, dict):
            for v in t.values():
                add(v)
        elif isinstance(t, (list, tuple)):
            for v in t:
                add(v)

    for o in objs:
        if isinstance(o, torch.nn.Module):
            for t in list(o.parameters()) + list(o.buffers()):
                add(t)
        else:
            add(o)
    seen.pop(0, None)
    return sum(seen.values())


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def tune_cpu_allocator(mmap_threshold: int = 1 * MiB) -> bool:
    """glibc: serve every allocation ≥ `mmap_threshold` by its own mmap, returned to the OS on free.

    glibc's default threshold grows (up to 32 MiB) after each large free, after which the step's large
    transients (dequantized matrices, the float optimizer's fp32 copies) come from the heap and stay in
    the RSS. A fixed threshold keeps the peak RSS near the peak of live tensors. 1 MiB rather than 4: the
    2 MiB activations of a 7B layer at seq 256 then bypass the heap too, whose holes otherwise kept
    ≈ 0.8 GiB of freed memory resident (7B step: 8.91 → 8.09 GiB peak RSS, same step time; 20M/60M step
    times unchanged within noise). No-op off glibc.
    """
    try:
        import ctypes
        import ctypes.util
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
        libc.mallopt(_M_TRIM_THRESHOLD, int(2 * mmap_threshold))
        return ok
    except (OSError, AttributeError):
        return False
