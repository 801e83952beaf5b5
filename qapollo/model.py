"""Build a transformers causal LM (LlamaForCausalLM or another family of families.py) with int8 projections,
without ever holding it in float.

The model is created on the meta device by the family's own transformers class; every attention/MLP
projection (q, k, v, o, gate, up, down) is swapped for an `Int8Linear` whose uint8 codes are filled
row-chunk by row-chunk from an N(0, 0.02) draw, so a 7B build never has a full floating-point copy of the
matrices. Embeddings, RMSNorms (Qwen3's q/k norms too), projection biases (Qwen2) and lm_head stay floating
point. The model knows nothing of the training loop: an `Int8Linear` hands its weight gradient to whatever
callable sits in `grad_hook`.
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn
import torch.nn.functional as F
from . import families, fused, quant

PROJ_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def tensor_seed(seed: int, name: str) -> int:
    """A stable per-tensor seed: init and projections never depend on iteration order."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def float_store(seed: int):
    """How an updater writes its fp32 result into a bf16 / fp16 float tensor (the embedding and lm_head of
    a bf16 model): stochastically rounded (quant.round_float), the noise a function of (seed, the update's
    key, element) as Int8Linear's is, so chunking and resuming do not change it."""
    def store(values: torch.Tensor, dtype: torch.dtype, key: str, start: int) -> torch.Tensor:
        return quant.round_float(values, dtype, quant.noise_key(tensor_seed(seed, key)) + start)
    return store


class _Int8LinearFn(torch.autograd.Function):
    """y = x Ŵᵀ with Ŵ dequantized on the fly; backward computes dx with the same Ŵ, then dW.

    `anchor` is a 0-element tensor that requires grad: it makes autograd record this node even when x
    does not require grad (else the weight would silently never update; musubi-tuner #90).
    """

    @staticmethod
    def forward(ctx, x, anchor, module):
        ctx.save_for_backward(x)
        ctx.module = module
        return F.linear(x, module.dequantized(x.dtype))

    @staticmethod
    def backward(ctx, gy):
        (x,) = ctx.saved_tensors
        mod = ctx.module
        gx = None
        if ctx.needs_input_grad[0]:
            # dx uses the weight as the forward saw it: this layer is updated only below, after dx.
            gx = gy @ mod.dequantized(gy.dtype)
        gw = gy.reshape(-1, gy.shape[-1]).T @ x.reshape(-1, x.shape[-1])
        mod.receive_grad(gw)
        return gx, None, None


class Int8Linear(nn.Module):
    """A linear layer stored as uint8 codes + per-group scale and zero point (quant.py); its bias, when the
    family has one (Qwen2's q/k/v), is an ordinary fp32 parameter that the float optimizer steps: in bf16 the
    small updates of continued training would round away, as for the norms (_keep_norms_fp32)."""

    def __init__(self, in_features: int, out_features: int, group_size: int, device,
                 scale_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        n_groups = out_features * in_features // group_size
        self.register_buffer("weight_codes", torch.empty(out_features, in_features, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.empty(n_groups, dtype=scale_dtype, device=device))
        self.register_buffer("weight_zero", torch.empty(n_groups, dtype=torch.uint8, device=device))
        self.register_parameter("bias", None)
        self._anchor = torch.empty(0, device=device, requires_grad=True)
        self.grad_hook = None  # callable(module, grad); None: keep the gradient in .weight_grad
        self.slice_hook = None  # callable(module, slices): lm_head's gradient given slice by slice (lean_head)
        self.weight_grad = None
        self.param_name = ""
        self.fused = False  # compiled whole-matrix kernels (fused.py) instead of the eager row chunks

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def device(self) -> torch.device:
        return self.weight_codes.device

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        deq = fused.dequantize if self.fused else quant.dequantize_chunked
        return deq(self.weight_codes, self.weight_scale, self.weight_zero, self.group_size, dtype)

    @torch.no_grad()
    def quantize_from_(self, rows_fn) -> None:
        """Fill the codes from `rows_fn(row slice)` (float rows, any device) row chunk by row chunk, rounded
        to nearest: no full float copy of the matrix ever exists."""
        dev = self.weight_codes.device
        for rows, gs in quant.row_chunks(self.shape, self.group_size):
            w = rows_fn(rows).to(dev)
            self.weight_codes[rows], self.weight_scale[gs], self.weight_zero[gs] = \
                quant.quantize(w, self.group_size, self.weight_scale.dtype)

    def init_normal_(self, std: float, seed: int) -> None:
        """Draw N(0, std), chunk by chunk, and round to nearest."""
        gen = torch.Generator(device=self.weight_codes.device)
        gen.manual_seed(seed)
        self.quantize_from_(lambda rows: torch.randn((rows.stop - rows.start, self.in_features), generator=gen,
                                                     device=self.weight_codes.device) * std)

    def receive_grad(self, grad: torch.Tensor) -> None:
        if self.grad_hook is not None:
            self.grad_hook(self, grad)
        elif self.weight_grad is None:
            self.weight_grad = grad
        else:
            self.weight_grad += grad

    def receive_slices(self, src) -> None:
        """A gradient that exists only slice by slice (loss.HeadGradSlices: lm_head inside the chunked loss):
        `slice_hook` consumes it slice by slice; without one it is made whole and handed on as usual."""
        if self.slice_hook is not None:
            self.slice_hook(self, src)
        else:
            self.receive_grad(src.full())

    # ---- in-place updates W ← round((W + coef⊙G)·decay) (the optimizer computes coef; optim/updaters.py) ----
    # `noise` = (seed, key): the rounding noise is a function of (seed, tensor, step, element), so it is
    # reproducible, order- and device-independent and needs nothing saved for resume (quant.sr_bits).
    # `keep` (a device bool) leaves codes, scales and zeros as they were (a non-finite gradient).
    def add_update_(self, grad, coef, decay=None, *, stochastic: bool, noise: tuple[int, str],
                    count_changes: bool = False, keep=None) -> int:
        """The whole matrix: the compiled kernel or the eager row-chunk reference (model.fused_update)."""
        update = fused.update_quantized_ if self.fused else quant.update_quantized_
        return update(self.weight_codes, self.weight_scale, self.weight_zero, self.group_size, grad, coef, decay,
                      stochastic=stochastic, seed=tensor_seed(*noise), count_changes=count_changes, keep=keep)

    def add_rows_(self, rows, values, coef, *, stochastic: bool, noise: tuple[int, str], count_changes: bool = False,
                  keep=None) -> int:
        """Only `rows` (distinct, their gradient `values`): the int8 embedding's sparse update."""
        return quant.update_rows_(self.weight_codes, self.weight_scale, self.weight_zero, self.group_size, rows,
                                  values, coef, stochastic=stochastic, seed=tensor_seed(*noise),
                                  count_changes=count_changes, keep=keep)

    def add_slice_(self, sl: slice, grad, coef, *, stochastic: bool, noise: tuple[int, str],
                   count_changes: bool = False, keep=None) -> int:
        """Rows `sl` (whole groups): one slice of the int8 lm_head, with the noise the whole matrix would get."""
        return quant.update_quantized_(*self.row_block(sl.start, sl.stop), self.group_size, grad, coef, None,
                                       stochastic=stochastic, seed=tensor_seed(*noise), count_changes=count_changes,
                                       keep=keep, offset=sl.start * self.in_features)

    def row_block(self, v0: int, v1: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes, scales, zeros) of rows v0:v1 (views); needs in_features % group_size == 0 (whole groups)."""
        g = self.in_features // self.group_size
        return self.weight_codes[v0:v1], self.weight_scale[v0 * g:v1 * g], self.weight_zero[v0 * g:v1 * g]

    def anchor_on(self, device: torch.device) -> torch.Tensor:
        """The empty tensor that requires grad, so that backward reaches this module's hook (on `device`)."""
        if self._anchor.device != device:
            self._anchor = torch.empty(0, device=device, requires_grad=True)
        return self._anchor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _Int8LinearFn.apply(x, self.anchor_on(x.device), self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, group_size={self.group_size}, int8"
                + (", fp32 bias" if self.bias is not None else ""))


class RowGrad:
    """A sparse gradient of an (m, n) matrix: distinct `rows` (k,) int64 and their gradient `values` (k, n).
    What an `Int8Embedding` hands on: only the rows of the batch's tokens are non-zero."""

    def __init__(self, rows: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]):
        self.rows, self.values, self.shape = rows, values, tuple(shape)

    def __add__(self, other: "RowGrad") -> "RowGrad":
        return coalesce(torch.cat([self.rows, other.rows]), torch.cat([self.values, other.values]), self.shape)

    def dense(self) -> torch.Tensor:
        out = torch.zeros(self.shape, dtype=self.values.dtype, device=self.values.device)
        return out.index_add_(0, self.rows, self.values)


def coalesce(rows: torch.Tensor, values: torch.Tensor, shape) -> RowGrad:
    """Sum the values of repeated rows (fp32): one entry per distinct row, rows ascending."""
    uniq, inv = torch.unique(rows, return_inverse=True)
    out = torch.zeros((uniq.shape[0], values.shape[-1]), dtype=torch.float32, device=values.device)
    return RowGrad(uniq, out.index_add_(0, inv, values.float()), shape)


class TiedGrad:
    """The gradient of one int8 tensor that is both embedding and lm_head (model.lean_head, tied): lm_head's
    slices (`head`: loss.HeadGradSlices) with the embedding's rows (a RowGrad) added to the slices they fall
    in, fp32. `each` and `full` as HeadGradSlices'; the (V, h) sum never exists whole."""

    def __init__(self, head, rows: RowGrad):
        self.head, self.rows, self.shape = head, rows, head.shape

    def each(self, fn) -> None:
        r, values = self.rows.rows, self.rows.values.float()

        def plus(sl, g):
            inside = ((r >= sl.start) & (r < sl.stop))[:, None]  # no host sync: rows outside add zeros
            fn(sl, g.float().index_add_(0, (r - sl.start).clamp(0, sl.stop - sl.start - 1), values * inside))
        self.head.each(plus)

    def full(self) -> torch.Tensor:
        return self.head.full().float().index_add_(0, self.rows.rows, self.rows.values.float())


class _Int8EmbeddingFn(torch.autograd.Function):
    """Lookup of int8 rows; backward hands the module a RowGrad (the batch's rows only, summed in fp32):
    the dense (vocab, hidden) gradient never exists."""

    @staticmethod
    def forward(ctx, ids, anchor, module):
        ctx.save_for_backward(ids)
        ctx.module = module
        return quant.dequantize_rows(module.weight_codes, module.weight_scale, module.weight_zero,
                                     module.group_size, ids, module.out_dtype)

    @staticmethod
    def backward(ctx, gy):
        (ids,) = ctx.saved_tensors
        mod = ctx.module
        mod.receive_grad(coalesce(ids.reshape(-1), gy.reshape(-1, gy.shape[-1]), mod.shape))
        return None, None, None


class Int8Embedding(Int8Linear):
    """nn.Embedding stored as uint8 codes + per-group scale/zero (the (vocab, hidden) layout of Int8Linear,
    so checkpoints, export and the optimizer treat it as one more int8 matrix). hidden % group_size == 0:
    a row is whole groups."""

    def __init__(self, num_embeddings: int, embedding_dim: int, group_size: int, device, dtype: torch.dtype):
        super().__init__(embedding_dim, num_embeddings, group_size, device)
        self.out_dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.is_floating_point():  # hidden states: the tied lm_head (model.lean_head, tie_word_embeddings)
            return super().forward(ids)
        return _Int8EmbeddingFn.apply(ids, self.anchor_on(ids.device), self)

    def extra_repr(self) -> str:
        return f"vocab={self.out_features}, dim={self.in_features}, group_size={self.group_size}, int8"


def int8_modules(model: nn.Module):
    """(name, Int8Linear) pairs in model order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Int8Linear)]


def matrix_names(model: nn.Module) -> set[str]:
    """Names of the projection weights (the APOLLO-optimized matrices), int8 or float."""
    out = set()
    for n, m in model.named_modules():
        if n.rsplit(".", 1)[-1] in PROJ_NAMES:
            out.add(n + ".weight" if isinstance(m, nn.Linear) else n)
    return out


def _replace_projections(model: nn.Module, mcfg, device, fill=None) -> None:
    """Every attention/MLP projection becomes an Int8Linear; `fill(linear)` gives the float rows to round
    into it (None: left for the caller to initialise). A bias moves over as an fp32 parameter."""
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in PROJ_NAMES:
                lin = getattr(parent, name, None)
                if lin is None:
                    continue
                q = Int8Linear(lin.in_features, lin.out_features, mcfg.group_size, device)
                if fill is not None:
                    q.quantize_from_(fill(lin))
                if lin.bias is not None:
                    q.bias = nn.Parameter(lin.bias.detach().to(device=device, dtype=torch.float32, copy=True))
                setattr(parent, name, q)


@torch.no_grad()
def quantize_(model: nn.Module, mcfg) -> nn.Module:
    """A transformers model of a family (families.py; built, or from `from_pretrained`) made int8 in place:
    every projection rounded to nearest into an Int8Linear, row chunk by row chunk, as model.init_from does;
    the float tensors (embeddings, norms, lm_head) stay in their dtype, the norms in fp32 when that is lower,
    the projections' biases in fp32."""
    if any(isinstance(m, Int8Linear) for m in model.modules()):
        return model  # already int8
    device = model.model.embed_tokens.weight.device
    _replace_projections(model, mcfg, device, fill=lambda lin: (lambda rows: lin.weight[rows]))
    use_fused = fused.resolve(mcfg.fused_update, device)
    for name, mod in int8_modules(model):
        mod.param_name, mod.fused = name, use_fused
    if model.model.embed_tokens.weight.dtype != torch.float32:
        _keep_norms_fp32(model)
    return model


def _make_head_int8(model: nn.Module, mcfg, dtype: torch.dtype) -> None:
    """model.lean_head: embedding and lm_head as int8 modules (on meta, like the projections); tied, one
    module is both (its forward on hidden states is lm_head's), listed once by int8_modules."""
    v, h = mcfg.vocab_size, mcfg.hidden_size
    model.model.embed_tokens = Int8Embedding(v, h, mcfg.group_size, "meta", dtype)
    model.lm_head = model.model.embed_tokens if mcfg.tie_word_embeddings else Int8Linear(h, v, mcfg.group_size, "meta")


def tied_int8(model: nn.Module) -> str | None:
    """The name of the one int8 module that is both embedding and lm_head, or None."""
    emb = getattr(getattr(model, "model", None), "embed_tokens", None)
    return "model.embed_tokens" if isinstance(emb, Int8Linear) and getattr(model, "lm_head", None) is emb else None


@torch.no_grad()
def build_model(mcfg, device: torch.device | str = "cpu", seed: int = 0, init: bool = True) -> nn.Module:
    """Build and initialise the model of model.architecture (families.py) directly on `device` (int8 projections
    unless weight_quant=false).

    init=False allocates without initialising: the caller fills every tensor (a checkpoint, hf_import)."""
    device = torch.device(device)
    dtype = resolve_dtype(mcfg.dtype, device)
    hf_cfg = families.hf_config(mcfg)
    with torch.device("meta"):
        model = families.model_class(mcfg.architecture)(hf_cfg).to(dtype)  # on meta: only the dtype label changes
        if mcfg.weight_quant:
            _replace_projections(model, mcfg, "meta")
        if mcfg.lean_head:
            _make_head_int8(model, mcfg, dtype)
    model.to_empty(device=device)  # allocates, does not initialise: done below, tensor by tensor
    if mcfg.tie_word_embeddings and not mcfg.lean_head:  # to_empty gave lm_head a tensor of its own: share again
        model.lm_head.weight = model.model.embed_tokens.weight
    use_fused = fused.resolve(mcfg.fused_update, device) if mcfg.weight_quant else False
    for name, mod in int8_modules(model):
        mod.param_name = name
        mod.fused = use_fused
    if init:
        _init_weights(model, mcfg.initializer_range, seed, device)
    if dtype != torch.float32:
        _keep_norms_fp32(model)
    # Rotary frequencies were buffers on meta: recompute them for real.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=hf_cfg).to(device)
    return model


def _init_weights(model: nn.Module, std: float, seed: int, device: torch.device) -> None:
    for name, mod in int8_modules(model):
        mod.init_normal_(std, tensor_seed(seed, name))
    for name, p in model.named_parameters():
        if "norm" in name:
            p.fill_(1.0)
        elif p.dim() == 1:  # a projection's bias (Qwen2), zero as transformers initialises it
            p.zero_()
        else:
            gen = torch.Generator(device=device)
            gen.manual_seed(tensor_seed(seed, name))
            # randn in fp32 then cast: the same init on every dtype
            for rows, _ in quant.row_chunks(tuple(p.shape), 1):
                n = rows.stop - rows.start
                p[rows] = (torch.randn((n, p.shape[1]), generator=gen, device=device) * std).to(p.dtype)


def _keep_norms_fp32(model: nn.Module) -> None:
    """RMSNorm weights stay fp32 when the model computes in bf16/fp16 (8 KB each at 7B).

    A bf16 weight of 1.0 has a 0.0078 ulp: every Adam update smaller than half that (all of warmup at
    lr 0.01) would be rounded away and the norms would silently never train. Their output is cast back
    to the input's dtype so the rest of the model still computes in bf16.
    """
    for mod in model.modules():
        if type(mod).__name__.endswith("RMSNorm"):
            mod.float()
            mod.register_forward_hook(lambda m, args, out: out.to(args[0].dtype))


def count_params(model: nn.Module) -> dict:
    n_int8 = sum(m.weight_codes.numel() for _, m in int8_modules(model))
    n_float = sum(p.numel() for p in model.parameters())
    return {"int8": n_int8, "float": n_float, "total": n_int8 + n_float}


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the trained weights as stored: int8 codes + scales + zeros + float tensors."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for _, m in int8_modules(model):
        total += sum(b.numel() * b.element_size() for b in (m.weight_codes, m.weight_scale, m.weight_zero))
    return total


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Checkpoint each decoder layer (non-reentrant: recomputation sees the weights the forward used,
    because a layer's weights change only inside that layer's own backward, after recomputation)."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
