"""Memory planner: the peak of one training step, arithmetic from a Config alone (nothing is built).

`predict_peak(cfg, device_type)` adds up what one training step keeps alive — int8 codes, scales and
zero points, float params, their optimizer states, APOLLO states (`persistent_bytes`) — and the largest
of the step's phases on top of it, each with a function of its own:

    loss      saved activations + the loss's (N, V) tensors (HF: logits, fp32 upcast, log-softmax,
              its gradient: 12·N·V bytes at the backward's start; chunked loss: a few MiB)
    head      saved activations + lm_head's weight gradient + its optimizer update (+ the first step's
              copy for the startup guard)
    layer     activations + the largest matrix's backward (its dequantized copy, or its weight gradient
              + the update's buffers: row chunks in the eager path, none in the compiled one) +
              activation gradients; step 1 adds the startup guard's copy of the codes (compiled path)
    embed     the embedding's dense gradient + its optimizer update

Names: tokens = batch·seq (N), vocab (V), hidden (h), inter (I), dtype_bytes (s: bf16 on CUDA, fp32 on the CPU unless
model.dtype says otherwise). Saved activations per decoder layer are counted from the tensors HF's LlamaDecoderLayer
keeps for backward (two RMSNorms (4+2s)·N·h each: fp32 input + normalized + weighted output; attention 5·s·N·h: rotated
q and k, v, SDPA output, its contiguous copy; MLP 4·s·N·I: gate, silu(gate), up, their product; q is heads·head_dim
wide, families.head_dim; Qwen3's q/k norms add (4+s)·N per element of q and k, BENCHMARKS.md issue 29). With activation
checkpointing only each layer's input (s·N·h) is kept and one layer is recomputed at a time.

What the prediction means: CUDA's `max_memory_allocated` (the ≈0.4 GiB context reported beside it); on the
CPU, the peak of live tensor bytes of meter.LiveTensorCounter (`rss_bytes` adds the process's ≈0.45 GiB).
The measurements behind the constants are in BENCHMARKS.md.
"""
from __future__ import annotations

from dataclasses import dataclass

from .distributed import GradAverager
from .families import extra_float_elems, family, head_dim
from .fused import wanted
from .sizes import FLOAT_CHUNK_ELEMS, SKETCH_ROWS, chunk_elems, head_slice_rows, loss_chunk_rows

GiB, MiB = 1 << 30, 1 << 20
CUDA_CONTEXT_BYTES = int(0.4 * GiB)
# cuBLAS(Lt) workspaces from the caching allocator on Hopper, 32 MiB per thread that runs matmuls (the
# forward's and autograd's device thread)
CUBLAS_WORKSPACE_BYTES = 2 * 32 * MiB
CPU_PROCESS_BYTES = int(0.45 * GiB)  # python + torch + transformers + bitsandbytes, before any tensor
BNB_BLOCK = 256
BNB_MIN_8BIT = 4096
# Bytes per element of a row chunk of the eager int8 path (measured): the update's fp32 code-unit values,
# the int64 noise and rounding threshold; the dequantize's fp32 temporaries into a bf16 output. The
# compiled path (fused.py) has none: whole matrix, no fp32 copy.
UPDATE_CHUNK_BYTES = 26
DEQUANT_CHUNK_BYTES = 8
ROWS_EXTRA_BYTES = 10  # quant.update_rows_ beside update_groups' buffers: int64 noise start, gathered/new codes


def fmt(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / MiB:.1f} MiB"


def dtype_bytes(name: str, device_type: str) -> int:
    if name == "auto":
        return 2 if device_type == "cuda" else 4
    return {"float32": 4, "bfloat16": 2, "float16": 2}[name]


def matrix_shapes(mcfg) -> list[tuple[str, int, int]]:
    """(name, out, in) of one decoder layer's projections (q and o: heads · head_dim wide)."""
    h, i, hd = mcfg.hidden_size, mcfg.intermediate_size, head_dim(mcfg)
    q = mcfg.num_attention_heads * hd
    kv = (mcfg.num_key_value_heads or mcfg.num_attention_heads) * hd
    return [("q_proj", q, h), ("k_proj", kv, h), ("v_proj", kv, h), ("o_proj", h, q),
            ("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)]


@dataclass
class Step:
    """The numbers of one training step that every phase reads."""
    device_type: str
    s: int  # bytes per element of the compute dtype
    tokens: int  # per micro-batch
    hidden: int
    inter: int
    layers: int
    vocab: int
    heads: int
    q: int  # query width (heads · head_dim)
    kv: int  # key/value width
    layer_floats: list  # elements of each float tensor a layer adds to its two norms (families.extra_float_elems)
    qk_norm: bool  # per-head q/k RMSNorms (Qwen3): saved activations like a norm's over q and k
    matrices: list  # matrix_shapes
    matrix_elems: int  # all layers
    largest_matrix: int  # elements
    tied: bool
    lean: bool
    accumulates: bool  # grad_accum_steps > 1
    lagged: bool
    checkpointing: bool
    first_check: bool  # the startup guard of step 1

    @property
    def vh(self) -> int:
        return self.vocab * self.hidden


def step_of(cfg, device_type: str) -> Step:
    m, o, t = cfg.model, cfg.optim, cfg.train
    mats = matrix_shapes(m)
    hd = head_dim(m)
    kv = (m.num_key_value_heads or m.num_attention_heads) * hd
    return Step(device_type, dtype_bytes(m.dtype, device_type), t.batch_size * t.seq_len, m.hidden_size,
                m.intermediate_size, m.num_hidden_layers, m.vocab_size, m.num_attention_heads,
                m.num_attention_heads * hd, kv, extra_float_elems(m), family(m.architecture).qk_norm, mats,
                m.num_hidden_layers * sum(a * b for _, a, b in mats), max(a * b for _, a, b in mats),
                m.tie_word_embeddings, m.lean_head, t.grad_accum_steps > 1,
                t.accum_mode == "lagged" and o.name != "adamw", m.activation_checkpointing, t.check_updates)


# ---- persistent ------------------------------------------------------------------------------------
def float_optimizer_bytes(n: int, kind: str, s: int, device_type: str, rounds: bool = False) -> tuple[int, int]:
    """(persistent state bytes, transient bytes of one update) of one float tensor of n elements. rounds: a
    bf16 / fp16 tensor stepped through an fp32 copy of each row chunk (it and its gradient: 8 bytes/element
    beside the optimizer's transients) and stochastically rounded back (the copy, the noise as int64, two
    int32 temporaries and the result: 22 bytes/element)."""
    c = min(n, FLOAT_CHUNK_ELEMS)
    if kind == "adam8bit":  # 32-bit states under BNB_MIN_8BIT elements; CUDA: one fused kernel; CPU: both states
        # dequantized to fp32, an fp32 grad copy, sqrt and the denominator (20 B/element, BENCHMARKS.md) per chunk
        state = 2 * n + 2 * 4 * -(-n // BNB_BLOCK) if n >= BNB_MIN_8BIT else 8 * n
        transient = 0 if device_type == "cuda" or n < BNB_MIN_8BIT else 20 * c
    else:  # torch AdamW: exp_avg, exp_avg_sq like the tensor it steps (fp32 when rounding); sqrt, denominator
        state, transient = 2 * (4 if rounds else s) * n, 2 * (4 if rounds else s) * c
    return state, max(transient + 8 * c, 22 * c) if rounds else transient


def float_tensors(st: Step) -> list[int]:
    """Elements of embed, lm_head (absent when tied; 0 when int8 with lean_head), the norms and a family's
    biases / q/k norms (families.extra_float_elems)."""
    rest = [st.hidden] * (2 * st.layers + 1) + st.layer_floats * st.layers
    if st.lean:
        return [0, 0] + rest
    return [st.vh] * (1 if st.tied else 2) + rest


def lean_tensors(st: Step) -> int:
    """The int8 (V, h) tensors of model.lean_head: embedding and lm_head, or the one tensor that is both."""
    return 0 if not st.lean else (1 if st.tied else 2)


def apollo_state_bytes(cfg, st: Step) -> int:
    """M and V (fp32, max(m,n)·rank each) + the projection (fp32, min(m,n)·rank) + the limiter's norm; the
    lagged mode adds the window's ΣR (max(m,n)·rank), its sketch's sum (SKETCH_ROWS·min(m,n)) and the step
    size (1 or per channel)."""
    o = cfg.optim
    shapes = [(a, b) for _, a, b in st.matrices]
    total = st.layers * sum(4 * o.rank * (2 * max(a, b) + min(a, b)) + 4 for a, b in shapes)
    factored = st.lean and o.lean_optim == "factored"
    heads = lean_tensors(st)
    if factored:  # the (V, h) embedding and lm_head: row and column mean squares and their window sums
        total += heads * 4 * 2 * (st.vocab + st.hidden)
    elif st.lean:  # the same as a matrix's for the (V, h) embedding and lm_head, V >= h
        total += heads * (4 * o.rank * (2 * st.vocab + st.hidden) + 4)
    if st.lagged:
        per_channel = lambda a, b: 1 if o.scale_type == "tensor" else max(a, b)  # noqa: E731
        total += st.layers * sum(4 * o.rank * max(a, b) + 4 * SKETCH_ROWS * min(a, b) + 4 * per_channel(a, b)
                                 for a, b in shapes)
        if factored:  # two sketch sums (SKETCH_ROWS·h); per row a sketch sum (SKETCH_ROWS) and 4 sums
            total += heads * (2 * 4 * SKETCH_ROWS * st.hidden + 4 * (SKETCH_ROWS + 4) * st.vocab)
        elif st.lean:
            total += heads * (4 * o.rank * st.vocab + 4 * SKETCH_ROWS * st.hidden + 4)
    return total


def persistent_bytes(cfg, st: Step, float_states: list[tuple[int, int]]) -> dict[str, int]:
    """The components alive for the whole step: weights, optimizer states, accumulated gradients."""
    m, o = cfg.model, cfg.optim
    floats, s = float_tensors(st), st.s
    c: dict[str, int] = {}
    if m.weight_quant:
        int8_elems = st.matrix_elems + lean_tensors(st) * st.vh
        groups = int8_elems // m.group_size
        c["int8_codes"], c["int8_scales"], c["int8_zeros"] = int8_elems, 4 * groups, groups
    else:
        c["matrix_params"] = s * st.matrix_elems
    c["float_params"] = s * sum(floats)
    c["float_optim_states"] = sum(a for a, _ in float_states)
    if o.name == "adamw":
        c["matrix_optim_states"], c["apollo_states"] = 2 * s * st.matrix_elems, 0
    else:
        c["apollo_states"] = apollo_state_bytes(cfg, st)
    if st.accumulates:
        # lagged: only the float tensors accumulate a gradient; exact: one full gradient stays resident
        c["accumulated_grads"] = s * sum(floats) if st.lagged else s * (st.matrix_elems + sum(floats))
    return c


# ---- activations and the loss ------------------------------------------------------------------------
def norm_bytes(st: Step) -> int:
    return (4 + 2 * st.s) * st.tokens * st.hidden


def layer_activation_bytes(st: Step) -> int:
    """Saved for backward by one decoder layer (the module docstring)."""
    s, n = st.s, st.tokens
    qk_norms = (4 + s) * n * (st.q + st.kv) if st.qk_norm else 0
    return 2 * norm_bytes(st) + s * n * (3 * st.q + 2 * st.kv) + 4 * s * n * st.inter + 4 * n * st.heads + qk_norms


def activation_bytes(st: Step, checkpointing: bool) -> int:
    if checkpointing:
        return st.layers * st.s * st.tokens * st.hidden + norm_bytes(st)
    return st.layers * layer_activation_bytes(st) + norm_bytes(st)


def loss_bytes(st: Step, chunked: bool) -> tuple[int, int]:
    """(saved for backward, peak at the backward's start) of the loss."""
    n, v, h, s = st.tokens, st.vocab, st.hidden, st.s
    if chunked:
        # saved: the per-token logsumexp and target logit (fp32); one vocab slice: fp32 logits, (z - max)
        # and exp(...) (12 B/elem) + fp32 grad_h and its cast
        saved, peak = 8 * n, 12 * n * loss_chunk_rows(n, v) + 4 * n * h + s * n * h
    else:
        saved, peak = 4 * n * v, 12 * n * v  # log_softmax output; + its grad + the input's grad (fp32)
    if st.lean:
        # the int8 head's forward slices: dequantizing one (two fp32 temporaries + the s-byte cast unless
        # fp32), then its logits, (z - max) and exp (12 B per token·row)
        rows = head_slice_rows(n, v, h)
        peak = max((8 + (s if s != 4 else 0)) * rows * h, 12 * n * rows)
    return saved, peak


# ---- phases ------------------------------------------------------------------------------------------
def int8_transients(s: int, elems: int, device_type: str, fused: bool) -> tuple[int, int, int]:
    """(dequantize, update, extra for the step-1 startup guard) transient bytes of an int8 matrix.

    Eager: row chunks of quant.chunk_elems(device) elements, the gradient upcast chunk by chunk inside
    them. Compiled: the s-byte output / the gradient only; the guard copies the old codes (1 B/elem) and
    compares them in 4M-element chunks (bool mask + CUDA's int64 sum)."""
    if fused:
        return s * elems, s * elems, elems + (1 + 8) * min(elems, 1 << 22)
    chunk = min(elems, chunk_elems(device_type))
    dequant = 8 * elems if s == 4 else s * elems + DEQUANT_CHUNK_BYTES * chunk  # fp32: whole (output + a temporary)
    return dequant, s * elems + UPDATE_CHUNK_BYTES * chunk, 0


def guard_copy_bytes(st: Step) -> int:
    """The startup guard's copy of a float tensor's row chunk before its update ((s+1)·n with the
    comparison's bool mask; CUDA sums the mask through an int64 copy)."""
    if not st.first_check:
        return 0
    return (st.s + 1 + (8 if st.device_type == "cuda" else 0)) * min(st.vh, FLOAT_CHUNK_ELEMS)


def grad_then_update(st: Step, transient: int) -> int:
    """A (V, h) gradient and its update. With accumulation the gradient stepped is the resident accumulated
    one (counted as persistent): the new one is added into it and freed before the update's transients."""
    return max(st.s * st.vh, transient) if st.accumulates else st.s * st.vh + transient


def lean_head_slice_bytes(st: Step, update: bool = True) -> int:
    """Transients of one lm_head slice in the lean head's backward, two moments that do not overlap: its
    dequantized rows with the slice's softmax gradient (fp32 and its s-byte cast) and the hidden gradient's
    product; then (update=True; tied, the update waits for the embedding's phase) the slice's gradient with
    the eager int8 update's row-chunk buffers."""
    s, n, h = st.s, st.tokens, st.hidden
    rows = head_slice_rows(n, st.vocab, h)
    _, update, _ = int8_transients(s, rows * h, st.device_type, fused=False)
    logits = s * rows * h + (4 + (s if s != 4 else 0)) * n * rows + (s * n * h if s != 4 else 0)
    return max(logits, update) if update else logits


def head_phases(st: Step, acts: int, head_update: int, embed_state: int) -> dict[str, int]:
    """lm_head's gradient and update, in the loss backward. Step 1: the guard's copy, and the embedding's
    optimizer states do not exist yet."""
    n, h = st.tokens, st.hidden
    if st.lean:  # slice by slice: the hidden states' fp32 gradient, R (fp32, V), one slice's transients
        head = acts + st.s * n * h + 4 * n * h + 4 * st.vocab + lean_head_slice_bytes(st, update=not st.tied)
        return {"head": head, "head (step 1)": head}
    head = acts + st.s * n * h + grad_then_update(st, max(head_update, 0))
    return {"head": head, "head (step 1)": head + (0 if st.tied else guard_copy_bytes(st)) - embed_state}


def matrix_transient_bytes(cfg, st: Step) -> tuple[int, int, int]:
    """(the largest matrix's backward transient, its dequantize, the step-1 guard's extra)."""
    s, mn = st.s, st.largest_matrix
    if cfg.model.weight_quant:
        dequant, update, guard = int8_transients(s, mn, st.device_type, wanted(cfg.model.fused_update, st.device_type))
        return max(dequant, update), dequant, guard
    if cfg.optim.name == "adamw":
        return s * mn + 2 * s * mn, 0, 0
    return s * mn + 4 * mn * 2, 0, 0


def layer_phases(st: Step, matrix_t: int, guard_t: int) -> dict[str, int]:
    """One decoder layer's backward: the largest matrix's transient over ~3 activation gradients."""
    grads = 3 * st.s * st.tokens * max(st.hidden, st.inter)
    if st.tied and not st.accumulates and not st.lean:  # lm_head's gradient waits in .grad for the embedding's
        grads += st.s * st.vh
    elif st.tied and st.lean:  # lm_head's part waits as its recipe: the hidden states, target, lse, coef
        grads += st.s * st.tokens * st.hidden + 16 * st.tokens
    if st.checkpointing:
        layer = activation_bytes(st, True) + layer_activation_bytes(st) + grads + matrix_t
    else:
        layer = activation_bytes(st, False) + grads + matrix_t
    out = {"layer": layer}
    if st.first_check and guard_t:
        out["layer (step 1)"] = layer + guard_t
    return out


def embed_phases(st: Step, embed_update: int) -> dict[str, int]:
    """The embedding's gradient and update, at the end of backward."""
    n, h, s = st.tokens, st.hidden, st.s
    held = activation_bytes(st, True) - norm_bytes(st) if st.checkpointing else 0
    if st.lean:  # the batch's rows only (model.RowGrad, fp32) and their int8 update (quant.update_rows_)
        rows = min(n, st.vocab) * h
        rows_t = (UPDATE_CHUNK_BYTES + ROWS_EXTRA_BYTES) * min(rows, chunk_elems(st.device_type))
        embed = held + s * n * h + 4 * rows + rows_t
        if st.tied:  # the one tied tensor's step: lm_head's slices recomputed with the rows added (TiedGrad)
            embed = held + s * n * h + 4 * rows + s * n * h + 16 * n + max(rows_t, lean_head_slice_bytes(st) + 4 * rows)
        return {"embed": embed, "embed (step 1)": embed}
    # tied: lm_head's gradient is still held when the embedding's arrives (one tensor, one update)
    embed = held + s * n * h + grad_then_update(st, embed_update) + (s * st.vh if st.tied and not st.accumulates else 0)
    return {"embed": embed, "embed (step 1)": embed + guard_copy_bytes(st)}


def data_parallel_extra(st: Step, world: int, head_update: int, matrix_t: int) -> dict[str, int]:
    """Bytes each phase gains per rank with `world` > 1 ranks (distributed.GradAverager).

    The all-reduces run in place on the gradients, so they need no copy, but one large gradient stays in
    flight while the next is computed, and its update runs then: in a decoder layer's backward that is the
    previous matrix's gradient (none when exact accumulation keeps them resident anyway) or, in the last
    layer, lm_head's with its update (none when it accumulates or is tied); in the embedding's phase the
    last matrix's update runs beside the embedding's gradient. Gradients under SMALL_BYTES wait, packed,
    in buckets: at most ~3 buckets' worth alive. NCCL's own buffers are outside PyTorch (not planned)."""
    if world <= 1:
        return {"loss": 0, "head": 0, "layer": 0, "embed": 0}
    bucket = 3 * (GradAverager.BUCKET_BYTES + GradAverager.SMALL_BYTES)
    prev_matrix = 0 if (st.accumulates and not st.lagged) else st.s * st.largest_matrix
    prev_head = 0 if (st.accumulates or st.tied) else st.s * st.vh + head_update
    return {"loss": 0, "head": bucket, "layer": bucket + max(prev_matrix, prev_head), "embed": bucket + matrix_t}


# ---- the plan ----------------------------------------------------------------------------------------
def predict_peak(cfg, device_type: str = "cuda", chunked_loss: bool = True, world_size: int = 1) -> dict:
    """The memory plan of one training step of `cfg` on `device_type` ('cuda' or 'cpu'); bytes, per rank
    of `world_size` data-parallel ranks (each holds the whole model: only the all-reduce terms grow).
    chunked_loss=False plans HF's full-logits loss (the trainer always uses the chunked one).

    Returns the components, each phase's total, 'phase' (the largest), 'peak_bytes' (the prediction: see the
    module docstring), 'context_bytes' and 'rss_bytes' (CPU: peak + process overhead).
    """
    st = step_of(cfg, device_type)
    kind = "adamw" if cfg.optim.name == "adamw" else cfg.optim.float_optim
    rounds = st.s < 4 and cfg.model.stochastic_round  # bf16 / fp16 float tensors step through fp32 copies
    float_states = [float_optimizer_bytes(n, kind, st.s, device_type, rounds) for n in float_tensors(st)]
    components = persistent_bytes(cfg, st, float_states)
    persistent = sum(components.values())
    acts = activation_bytes(st, st.checkpointing)
    loss_saved, loss_peak = loss_bytes(st, chunked_loss)
    head_update = 0 if st.tied else float_states[1][1]
    embed_update = float_states[0][1]
    matrix_t, dequant_t, guard_t = matrix_transient_bytes(cfg, st)
    phases = {"loss": acts + loss_peak, **head_phases(st, acts, head_update, float_states[0][0]),
              **layer_phases(st, matrix_t, guard_t), **embed_phases(st, embed_update)}
    dp = data_parallel_extra(st, world_size, head_update, matrix_t)
    phases = {k: v + dp[k.split()[0]] for k, v in phases.items()}
    phase = max(phases, key=phases.get)
    extra = CUBLAS_WORKSPACE_BYTES if device_type == "cuda" else 0
    peak = persistent + phases[phase] + extra
    head_rows = head_slice_rows(st.tokens, st.vocab, st.hidden) if st.lean else st.vocab
    return {
        "device_type": device_type, "dtype_bytes": st.s, "tokens": st.tokens, "chunked_loss": chunked_loss,
        "components": components, "persistent_bytes": persistent,
        "activations_bytes": acts, "activations_full_bytes": activation_bytes(st, False) + loss_saved,
        "activations_ckpt_bytes": activation_bytes(st, True) + loss_saved, "loss_saved_bytes": loss_saved,
        "largest_transient": {"dequantize": dequant_t, "matrix_grad": st.s * st.largest_matrix,
                              "embed_or_head_grad": st.s * head_rows * st.hidden,  # lean: one lm_head slice's
                              "logits_loss": loss_peak, "float_optim_update": max(head_update, embed_update),
                              "first_step_guard_copy": 0 if st.lean else guard_copy_bytes(st)},
        "lean_head": st.lean, "activation_checkpointing": st.checkpointing, "world_size": world_size,
        "phases": {k: v + persistent + extra for k, v in phases.items()}, "phase": phase, "data_parallel_bytes": dp,
        "tokens_per_step": st.tokens * cfg.train.grad_accum_steps * world_size, "cublas_workspace_bytes": extra,
        "peak_bytes": peak, "context_bytes": CUDA_CONTEXT_BYTES if device_type == "cuda" else 0,
        "rss_bytes": peak + CPU_PROCESS_BYTES if device_type == "cpu" else None,
    }


def one_line(plan: dict, device_name: str = "") -> str:
    d = device_name or plan["device_type"]
    tail = (f"+ {fmt(plan['context_bytes'])} CUDA context" if plan["device_type"] == "cuda"
            else f"≈ {fmt(plan['rss_bytes'])} peak RSS")
    return (f"memory plan: predicted peak {fmt(plan['peak_bytes'])} on {d} ({plan['phase']} phase; "
            f"{fmt(plan['persistent_bytes'])} weights+states) {tail}")


def advice(plan: dict) -> str:
    """What to change when a plan does not fit."""
    ckpt = "" if plan.get("activation_checkpointing") else "set model.activation_checkpointing=true, "  # not if on
    tips = {"loss": "lower train.batch_size or train.seq_len",
            "layer": f"{ckpt}lower train.batch_size / train.seq_len",
            "head": f"{ckpt}lower train.batch_size, or optim.float_optim=adam8bit",
            "embed": "use optim.float_optim=adam8bit or a smaller model.vocab_size"}
    lean = "" if plan.get("lean_head") else ", or set model.lean_head=true (LLaMA-7B: configs/llama_7b_8gb.yaml)"
    return tips[plan["phase"].split()[0]] + "; or pick a smaller model config" + lean
