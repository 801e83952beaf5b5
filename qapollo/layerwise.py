"""Optimizer steps taken per tensor inside backward, so no full-model gradient ever exists.

Every trainable tensor gets one updater:
  * projection matrices (int8 `Int8Linear` or float `nn.Linear.weight`): APOLLO / APOLLO-Mini
    (optim/apollo.py), or torch AdamW for the `adamw` baseline;
  * embeddings, RMSNorms, lm_head: bitsandbytes 8-bit Adam used per tensor as a library (or torch AdamW);
    with model.lean_head the embedding and lm_head are int8 and take APOLLO-Mini too: the embedding's
    gradient comes as its batch rows (model.RowGrad, `step_rows`), lm_head's slice by slice from inside
    the loss backward (loss.HeadGradSlices, `step_slices`), so neither gradient is ever whole.

int8 matrices get their gradient from `Int8Linear`'s backward (uint8 tensors cannot carry autograd
hooks); float tensors through `register_post_accumulate_grad_hook`. Each hook updates the tensor and
drops the gradient at once. The learning rate is a pure function of the one global step counter, so
every tensor sees the same schedule, exactly once per optimizer step, starting above zero.

Gradient accumulation (K micro-batches per optimizer step), two modes:
  * exact: on all micro-batches but the last the hooks only accumulate; on the last they add the
    accumulated part and step. Exact, but one full gradient stays resident between micro-batches.
  * lagged: APOLLO matrices apply each micro-batch's share at once, at the previous window's step size,
    and keep only the projected gradient and a sketch (optim/apollo.py); float tensors (embeddings, norms,
    lm_head) accumulate as in exact mode. Resident extra: the float tensors' gradients (0.49 GiB at 7B).
  When the spike guard skipped micro-batches, the tensors that step once per step take the mean of those
  used (the loss of each is divided by K before anyone knows how many will be skipped).

Data parallel (distributed.py): every gradient is averaged over the ranks before its update, so every
rank applies the same one. In exact mode that is one all-reduce per tensor per optimizer step (on the
accumulated gradient); in lagged mode the matrices update on every micro-batch, so their micro-batch
gradients are averaged each time (K all-reduces per step), the float tensors' once.

Non-finite gradients never reach a weight: APOLLO's multiplier is zeroed on device (no host sync per
tensor), a float tensor's update is skipped; `after_backward` reads the flags once and names the tensor.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import fused, quant
from .config import ConfigError
from .model import Int8Linear, RowGrad, int8_modules, matrix_names, tensor_seed
from .optim import apollo


class UpdateCheckError(RuntimeError):
    """A trainable tensor did not change, or did not get a gradient, in an optimizer step."""


class NonFiniteGradient(UpdateCheckError):
    """A gradient with inf/nan reached an update hook; `names` lists the tensors (none was written)."""

    def __init__(self, names: list[str], step: int):
        self.names, self.step = names, step
        more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
        super().__init__(f"non-finite gradient (inf/nan) in {names[0]}{more} at step {step}: no weight took it, "
                         f"but other tensors of this step were already updated inside backward")


def lr_at(step: int, base_lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup then cosine to min_lr_ratio·lr. `step` is 0 for the first update, whose lr is > 0."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return base_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class ApolloUpdater:
    """APOLLO / APOLLO-Mini on one matrix, int8 (dequant → update → requant in fp32) or float.

    lagged=True: the lagged-scale accumulation mode over windows of `window` micro-batches (one call per
    micro-batch, `commit` per step)."""

    def __init__(self, name: str, target, ocfg, seed: int, stochastic: bool, lagged: bool = False, window: int = 1):
        self.name, self.target, self.o = name, target, ocfg
        self.stochastic, self.lagged, self.window = stochastic, lagged, window
        self.finite = None
        self.sr_seed = tensor_seed(seed, "sr:" + name)
        shape = target.shape if isinstance(target, Int8Linear) else tuple(target.shape)
        self.shape = tuple(shape)
        device = target.weight_codes.device if isinstance(target, Int8Linear) else target.device
        self.state = apollo.init_state(self.shape, ocfg.rank, tensor_seed(seed, "proj:" + name), device)
        # the compiled whole-matrix kernel or the eager row-chunk reference (model.fused_update)
        self._update_int8 = fused.update_quantized_ if getattr(target, "fused", False) else quant.update_quantized_

    def _hparams(self) -> dict:
        o = self.o
        return dict(rank=o.rank, scale_type=o.scale_type, update_proj_gap=o.update_proj_gap, beta1=o.beta1,
                    beta2=o.beta2, eps=o.eps, norm_growth_limit=o.norm_growth_limit, limiter_decay=o.limiter_decay)

    def step(self, grad: torch.Tensor, lr: float, count_changes: bool, last: bool = True) -> int:
        """One update (exact) or one micro-batch's share (lagged; `last`: the window's last micro-batch)."""
        if isinstance(grad, RowGrad):
            return self.step_rows(grad, lr, count_changes, last)
        if self.lagged:
            c = apollo.lagged_multiplier(grad, self.state, window=self.window, last=last, **self._hparams())
        else:
            c = apollo.apollo_multiplier(grad, self.state, **self._hparams())
        self.finite = self.state.pop("finite")  # a device bool: read once per micro-batch, not here
        return 0 if c is None else self._apply(grad, c, lr, count_changes)

    # ---- gradients that are never whole (model.lean_head) -----------------------------------------
    def _int8_coef(self, c: torch.Tensor | None, lr: float) -> torch.Tensor | None:
        self.finite = self.state.pop("finite")
        return None if c is None else (c * (-lr * math.sqrt(self.o.scale))).float()

    def step_rows(self, grad: RowGrad, lr: float, count_changes: bool, last: bool = True) -> int:
        """A sparse gradient (the int8 embedding: the batch's rows). R = G Pᵀ is zero outside those rows
        (the vocabulary side is the larger one, so P compresses the hidden side), ‖G‖ is theirs: the
        tensor-wise APOLLO-Mini step is exact. Rows not in the batch keep their weights; their moments decay
        as the dense step's would."""
        st, t = self.state, self.target
        g = grad.values
        self._refresh(g.device)
        math_dtype = torch.promote_types(g.dtype, torch.float32)
        r = torch.zeros(st["exp_avg"].shape, dtype=math_dtype, device=g.device)
        r.index_add_(0, grad.rows, (g @ st["proj"].to(g.dtype).T).to(math_dtype))  # apollo.project's m>=n side
        h = self._sketch(g.device)
        if h is not None:  # apollo.sketch on the rows present (A·G, G zero elsewhere)
            h = h[1][:, grad.rows] @ g.to(h[1].dtype)
        c = self._multiplier(r, torch.linalg.vector_norm(g, dtype=math_dtype), last, h)
        coef = self._int8_coef(c, lr)
        if coef is None:
            return 0
        return quant.update_rows_(t.weight_codes, t.weight_scale, t.weight_zero, t.group_size, grad.rows, g, coef,
                                  stochastic=self.stochastic, seed=tensor_seed(self.sr_seed, self._noise_key()),
                                  count_changes=count_changes, keep=~self.finite)

    def step_slices(self, src, lr: float, count_changes: bool, last: bool = True) -> int:
        """lm_head's gradient given slice by slice (loss.HeadGradSlices), read twice: first R = G Pᵀ (row
        slices of it) and ‖G‖² summed over slices give APOLLO-Mini's scale; then each slice is recomputed and
        applied to its rows at once. The full gradient never exists; the step is the exact (not lagged) one,
        at the price of recomputing the head's logits once more."""
        st, t = self.state, self.target
        self._refresh(t.weight_codes.device)
        r = torch.zeros(st["exp_avg"].shape, dtype=torch.float32, device=t.weight_codes.device)
        sq = torch.zeros((), dtype=torch.float32, device=r.device)
        h = self._sketch(r.device)  # lagged: (the sketch's sum, A)

        def measure(sl, g):
            r[sl] = (g @ st["proj"].to(g.dtype).T).to(torch.float32)  # rows of apollo.project(G) (V >= h)
            sq.add_(torch.linalg.vector_norm(g, dtype=torch.float32).square())
            if h is not None:
                h[0].add_(h[1][:, sl] @ g.to(torch.float32))  # apollo.sketch, slice by slice
        src.each(measure)
        coef = self._int8_coef(self._multiplier(r, sq.sqrt(), last, None if h is None else h[0]), lr)
        if coef is None:  # lagged window without a committed scale: nothing to apply before its last micro-batch
            return 0
        seed, keep = tensor_seed(self.sr_seed, self._noise_key()), ~self.finite
        changed, n = [0], self.shape[1]

        def apply(sl, g):
            changed[0] += quant.update_quantized_(*t.row_block(sl.start, sl.stop), t.group_size, g, coef, None,
                                                  stochastic=self.stochastic, seed=seed,
                                                  count_changes=count_changes, keep=keep, offset=sl.start * n)
        src.each(apply)
        return changed[0]

    def _refresh(self, device) -> None:
        # lagged: P stays fixed for a whole window (drawn at its first micro-batch), as lagged_multiplier does
        if not self.lagged or not self.state.get("r_count"):
            apollo.refresh_projection(self.shape, self.state, self.o.rank, self.o.update_proj_gap, device)

    def _sketch(self, device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Lagged mode: (zeros of the sketch's shape, this window's sketch matrix A) for a gradient given by
        rows or slices (m >= n: the sketch is A·G, SKETCH_ROWS × n); None in exact mode."""
        if not self.lagged:
            return None
        a = apollo.sketch_matrix(self.shape, self.state, device)
        return torch.zeros(a.shape[0], self.shape[1], device=device), a

    def _multiplier(self, r: torch.Tensor, g_norm: torch.Tensor, last: bool,
                    h: torch.Tensor | None = None) -> torch.Tensor | None:
        o = self.o
        hp = dict(shape=self.shape, beta1=o.beta1, beta2=o.beta2, eps=o.eps, norm_growth_limit=o.norm_growth_limit,
                  limiter_decay=o.limiter_decay)
        if self.lagged:
            return apollo.lagged_projected_multiplier(r, g_norm, h, self.state, window=self.window, last=last, **hp)
        return apollo.projected_multiplier(r, g_norm, self.state, **hp)

    def commit(self) -> None:
        """Step boundary (lagged mode): moments take the window's projected gradient once, the limiter the
        window's update; the resulting c is the next window's."""
        if self.lagged:
            o = self.o
            apollo.lagged_commit(self.state, shape=self.shape, scale_type=o.scale_type, window=self.window,
                                 beta1=o.beta1, beta2=o.beta2, eps=o.eps, norm_growth_limit=o.norm_growth_limit,
                                 limiter_decay=o.limiter_decay)

    def _noise_key(self) -> str:
        # exact: one update per step; lagged: one per micro-batch, each with its own rounding noise
        st = self.state
        return f"{st['step']}:{st['r_count']}" if self.lagged else str(st["step"])

    def _apply(self, grad: torch.Tensor, c: torch.Tensor, lr: float, count_changes: bool) -> int:
        # W ← (W + coef⊙G)·decay with coef = -lr·√scale·c and decay = 1 - lr·wd (decoupled weight decay on
        # the updated weight, as in the reference). Both stay on the device: no host sync, and the compiled
        # kernel takes them as tensors (a Python float would recompile it every step).
        coef = c * (-lr * math.sqrt(self.o.scale))  # c is fp32 (fp64 for fp64 gradients)
        wd = self.o.weight_decay
        once = not self.lagged or self.state["r_count"] == 1  # lagged: decay once per window, not per micro-batch
        decay = torch.full((), 1.0 - lr * wd, device=grad.device) if wd and once else None
        if isinstance(self.target, Int8Linear):
            t = self.target
            # Rounding noise is a function of (seed, tensor, step, element): reproducible, order- and
            # device-independent, nothing to save for resume (quant.sr_bits). A non-finite gradient
            # (c = 0, the flag false) leaves codes, scales and zeros as they were (keep).
            return self._update_int8(t.weight_codes, t.weight_scale, t.weight_zero, t.group_size, grad,
                                     coef.float(), decay, stochastic=self.stochastic,
                                     seed=tensor_seed(self.sr_seed, self._noise_key()),
                                     count_changes=count_changes, keep=~self.finite)
        p = self.target
        before = p.detach().clone() if count_changes else None
        with torch.no_grad():
            d = grad.to(coef.dtype) * coef
            # c is 0 for a non-finite gradient; 0·inf = nan, so clear those too: nothing reaches the weight
            torch.nan_to_num_(d, nan=0.0, posinf=0.0, neginf=0.0)
            new = p.to(coef.dtype) + d  # a new tensor: p stays as it was until the select below
            if decay is not None:
                new *= decay
            p.copy_(torch.where(self.finite, new.to(p.dtype), p))
        return int((p != before).sum()) if count_changes else 0

    def finite_flag(self):
        """Device bool of the last call: was the gradient finite (read once per micro-batch)."""
        return self.finite


class TorchAdamUpdater:
    """One float tensor with per-tensor optimizers: bitsandbytes 8-bit AdamW or torch AdamW.

    Large tensors (embedding, lm_head: 131M elements at 7B) are updated in row chunks, each chunk a
    Parameter *view* of the tensor with its own optimizer: bitsandbytes' CPU path dequantizes both 8-bit
    states to fp32 (≈ 20 bytes of transient per element, 2.4 GiB at 7B) and chunking bounds that. The
    chunks hold whole 4096-element blocks, so the blockwise 8-bit states are the same as unchunked.
    """

    CHUNK_ELEMS = 1 << 22

    def __init__(self, name: str, param: nn.Parameter, kind: str, ocfg, weight_decay: float):
        self.name, self.param = name, param
        self.finite = True
        betas = (ocfg.beta1, ocfg.beta2)
        if kind == "adam8bit":
            import bitsandbytes as bnb  # used as a library, never subclassed
            make = lambda ps: bnb.optim.AdamW8bit(ps, lr=ocfg.lr, betas=betas, eps=ocfg.eps, weight_decay=weight_decay)
        else:
            make = lambda ps: torch.optim.AdamW(ps, lr=ocfg.lr, betas=betas, eps=ocfg.eps, weight_decay=weight_decay)
        self.chunks = []  # (row slice, Parameter view, optimizer)
        rows = self._rows_per_chunk(tuple(param.shape))
        for r0 in range(0, param.shape[0] if param.dim() else 1, rows):
            sl = slice(r0, min(param.shape[0], r0 + rows)) if param.dim() else slice(None)
            view = param if rows >= (param.shape[0] if param.dim() else 1) else nn.Parameter(param.data[sl])
            self.chunks.append((sl, view, make([view])))

    def _rows_per_chunk(self, shape: tuple) -> int:
        if len(shape) < 2:
            return shape[0] if shape else 1
        row = math.prod(shape[1:])
        unit = 4096 // math.gcd(row, 4096)  # rows per whole number of 4096-element blocks
        return max(unit, self.CHUNK_ELEMS // row // unit * unit)

    def step(self, grad: torch.Tensor, lr: float, count_changes: bool, last: bool = True) -> int:
        p, changed = self.param, 0
        # a host sync per float tensor (2·layers + 3 of them): Adam's moments would move the weight even
        # for a zeroed gradient, so a bad one must skip the update, which needs the answer on the host
        self.finite = bool(torch.isfinite(grad).all())
        if not self.finite:
            p.grad = None
            return 0
        for sl, view, opt in self.chunks:
            # the startup guard compares chunk by chunk: whole-tensor, copy + mask (+ CUDA's int64 sum) was 1.4 GB at 7B
            before = view.detach().clone() if count_changes else None
            view.grad = grad if view is p else grad[sl]
            opt.param_groups[0]["lr"] = lr
            opt.step()
            view.grad = None
            if count_changes:
                changed += int((view.detach() != before).sum())
        p.grad = None
        return changed

    def finite_flag(self) -> bool:
        return self.finite

    def commit(self) -> None:
        pass

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, scalars) keyed `c<i>.<key>`: the raw state of each chunk's optimizer."""
        tensors, scalars = {}, {}
        for i, (_, view, opt) in enumerate(self.chunks):
            for k, v in opt.state.get(view, {}).items():
                (tensors if torch.is_tensor(v) else scalars)[f"c{i}.{k}"] = v
        return tensors, scalars

    def load_state_dict(self, tensors: dict[str, torch.Tensor], scalars: dict) -> None:
        for i, (_, view, opt) in enumerate(self.chunks):
            new = {k.split(".", 1)[1]: v for k, v in scalars.items() if k.startswith(f"c{i}.")}
            for key, v in tensors.items():
                if not key.startswith(f"c{i}."):
                    continue
                k = key.split(".", 1)[1]
                if k == "step":  # torch keeps AdamW's step tensor on the CPU (non-capturable)
                    new[k] = v
                elif isinstance(opt, torch.optim.AdamW) and v.is_floating_point():
                    new[k] = v.to(view.device, view.dtype)  # what torch's own load_state_dict does
                else:
                    new[k] = v.to(view.device)  # bitsandbytes: uint8 states, fp32 absmax/qmap as saved
            opt.state[view] = new


class LayerwiseOptimizer:
    """Owns the updaters, the global step and the hooks that run them inside backward.

    Per optimizer step: `begin_step` before each micro-batch's backward, `after_backward` after it,
    `end_step` once at the end (or `abandon_step` when every micro-batch of the step was skipped).
    """

    def __init__(self, model: nn.Module, ocfg, max_steps: int, seed: int = 0, stochastic_round: bool = True,
                 accum_mode: str = "exact", reducer=None, grad_accum_steps: int = 1):
        self.model, self.o, self.max_steps = model, ocfg, max_steps
        # data parallel (distributed.GradAverager): every gradient is averaged over the ranks before its
        # update; None in a single process
        self.reducer = reducer
        self.step_count = 0  # optimizer steps done
        self.updaters: dict[str, object] = {}
        self.lr = 0.0
        self.hooks_enabled = True  # False: only accumulate (earlier micro-batches, two-phase tests)
        self.count_changes = False
        # K micro-batches per optimizer step; lagged mode needs K > 1 (with one micro-batch it is the exact step)
        self.grad_accum_steps = grad_accum_steps
        self.lagged = accum_mode == "lagged" and grad_accum_steps > 1
        self._grad_scale = 1.0  # K / micro-batches used, for tensors stepping once per step (see begin_step)
        self._in_step = False
        self._micro_done = 0  # micro-batches of this step whose backward ran
        self._fired: dict[str, int] = {}
        self._changed: dict[str, int] = {}
        self._flags: list[tuple[str, object]] = []  # (name, finite flag) of this micro-batch's updates
        self._handles = []
        self._matrices = mats = matrix_names(model)  # int8 modules and float projection weights
        self.float_lr_scale = (ocfg.float_lr / ocfg.lr) if ocfg.float_lr else 1.0
        # model.lean_head: the int8 embedding / lm_head (their gradients are never whole: in lagged mode
        # they step on every micro-batch like the matrices; exact accumulation is refused by the config)
        self._lean = {n for n, m in int8_modules(model) if n not in mats}
        if self._lean and reducer is not None:
            raise ConfigError("model.lean_head=true does not run data-parallel yet (its lm_head gradient is never "
                              "whole, so there is nothing to all-reduce): use one process or model.lean_head=false")
        for name, mod in int8_modules(model):
            self.updaters[name] = ApolloUpdater(name, mod, ocfg, seed, stochastic_round, self.lagged, grad_accum_steps)
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if name in mats and ocfg.name != "adamw":
                self.updaters[name] = ApolloUpdater(name, p, ocfg, seed, False, self.lagged, grad_accum_steps)
            elif name in mats:
                self.updaters[name] = TorchAdamUpdater(name, p, "adamw", ocfg, ocfg.weight_decay)
            else:
                kind = "adamw" if ocfg.name == "adamw" else ocfg.float_optim
                self.updaters[name] = TorchAdamUpdater(name, p, kind, ocfg, 0.0)
        # tensors that step on every micro-batch (lagged mode); all others step once per optimizer step
        self._every_micro = {n for n, u in self.updaters.items() if isinstance(u, ApolloUpdater) and u.lagged}
        self._attach()

    # ---- hooks -------------------------------------------------------------------------------
    def _attach(self) -> None:
        for name, mod in int8_modules(self.model):
            mod.grad_hook = self._int8_hook
            mod.slice_hook = self._slice_hook
        for name, p in self.model.named_parameters():
            if name in self.updaters:
                self._handles.append(p.register_post_accumulate_grad_hook(self._make_float_hook(name)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for _, mod in int8_modules(self.model):
            mod.grad_hook = mod.slice_hook = None

    def _steps_now(self, name: str) -> bool:
        return self.hooks_enabled or name in self._every_micro

    def _int8_hook(self, mod: Int8Linear, grad: torch.Tensor) -> None:
        if mod.weight_grad is not None:  # earlier micro-batches of this step (exact mode)
            grad = grad + mod.weight_grad
            mod.weight_grad = None
        if not self._steps_now(mod.param_name):
            mod.weight_grad = grad
            return
        self._run(mod.param_name, grad)

    def _slice_hook(self, mod: Int8Linear, src) -> None:
        """lm_head (model.lean_head) inside the loss backward: updated slice by slice when it steps now;
        otherwise (a two-phase reference run) its gradient is made whole and kept like any other."""
        name = mod.param_name
        if not self._steps_now(name) or mod.weight_grad is not None or self.reducer is not None:
            self._int8_hook(mod, src.full())
            return
        upd = self.updaters[name]
        changed = upd.step_slices(src, self._lr_of(name), self.count_changes, last=self.hooks_enabled)
        self._record(name, upd, changed)

    def _make_float_hook(self, name: str):
        def hook(p: torch.Tensor) -> None:
            if not self._steps_now(name) or p.grad is None:
                return  # .grad keeps accumulating until the last micro-batch
            grad, p.grad = p.grad, None
            self._run(name, grad)
        return hook

    def _run(self, name: str, grad: torch.Tensor) -> None:
        """The one way into an update: with several ranks the gradient is averaged first (maybe later in
        backward, at the latest in `after_backward`), so every rank applies the same update."""
        if self.reducer is None:
            self._update(name, grad)
        else:
            self.reducer.submit(grad, lambda g: self._update(name, g))

    def _update(self, name: str, grad: torch.Tensor) -> None:
        if self._grad_scale != 1.0 and name not in self._every_micro:
            grad = grad * self._grad_scale  # the step's mean over the micro-batches the guard let through
        upd = self.updaters[name]
        lr = self._lr_of(name)
        self._record(name, upd, upd.step(grad, lr, self.count_changes, last=self.hooks_enabled))

    def _lr_of(self, name: str) -> float:
        """`lr` for the APOLLO matrices; float_lr for embedding, lm_head and norms, whatever steps them: with
        model.lean_head, APOLLO-Mini on the embedding / lm_head at the matrices' lr diverged at width 4096
        (2-layer probe: 9.46 at step 7, 11.38 at step 11, above the first step's 11.20)."""
        return self.lr if name in self._matrices else self.lr * self.float_lr_scale

    def _record(self, name: str, upd, changed: int) -> None:
        self._flags.append((name, upd.finite_flag()))
        self._fired[name] = self._fired.get(name, 0) + 1
        self._changed[name] = self._changed.get(name, 0) + changed

    def forget_accumulation(self, reference: bool) -> None:
        """A resume that changed the accumulation: lagged windows predict their own scale again and, with
        reference=True, the limiters start afresh (optim/apollo.forget_accumulation)."""
        for u in self.updaters.values():
            if isinstance(u, ApolloUpdater):
                apollo.forget_accumulation(u.state, reference)

    def state_bytes(self) -> int:
        """Bytes of optimizer state held for all tensors (moments, projections, 8-bit states)."""
        total = 0
        for u in self.updaters.values():
            if isinstance(u, ApolloUpdater):
                tensors = [v for v in u.state.values() if torch.is_tensor(v)]
            else:
                tensors = list(u.state_dict()[0].values())
            total += sum(t.numel() * t.element_size() for t in tensors)
        return total

    # ---- step bookkeeping ----------------------------------------------------------------------
    def current_lr(self) -> float:
        o = self.o
        return lr_at(self.step_count, o.lr, o.warmup_steps, self.max_steps, o.min_lr_ratio)

    def begin_step(self, last_micro: bool = True, check: bool = False) -> None:
        """Call before each micro-batch's backward; `last_micro` makes its once-per-step hooks step."""
        if not self._in_step:
            self._in_step, self._micro_done = True, 0
            self._fired, self._changed = {}, {}
        self.lr = self.current_lr()
        self.hooks_enabled = last_micro
        self.count_changes = check
        self._flags = []
        # the loss of every micro-batch is divided by K; when the spike guard skipped some, the once-per-step
        # tensors step on the mean of those used, as the lagged windows commit it (apollo.lagged_commit)
        self._grad_scale = self._mean_scale(self._micro_done + 1) if last_micro else 1.0

    def _mean_scale(self, used: int) -> float:
        return self.grad_accum_steps / used if 0 < used < self.grad_accum_steps else 1.0

    def after_backward(self) -> None:
        """Call after each micro-batch's backward: one host read of the non-finite flags of its updates."""
        if self.reducer is not None:
            self.reducer.drain()  # the last averaged gradients are applied before the flags are read
        self._micro_done += 1
        flags, self._flags = self._flags, []
        on_device = [(n, f) for n, f in flags if torch.is_tensor(f)]
        bad = [n for n, f in flags if f is False]
        if on_device:
            ok = torch.stack([f.reshape(()) for _, f in on_device])
            if not bool(ok.all()):
                bad += [n for (n, _), good in zip(on_device, ok.tolist()) if not good]
        if bad:
            self._in_step = False
            raise NonFiniteGradient(bad, self.step_count + 1)

    def _pending(self) -> bool:
        return any(m.weight_grad is not None for _, m in int8_modules(self.model)) or \
            any(p.grad is not None for n, p in self.model.named_parameters() if n in self.updaters)

    def end_step(self, check: bool = False) -> None:
        """Call after the last micro-batch's backward: apply what is still pending (its last micro-batch
        was skipped), commit the lagged scales, verify every tensor stepped, count the step."""
        if self._pending():
            self._grad_scale = self._mean_scale(self._micro_done)
            self.step_pending(check)
            self.after_backward()
            self._micro_done -= 1  # not a micro-batch of its own
        for u in self.updaters.values():
            u.commit()
        self._in_step = False
        micro = max(1, self._micro_done)
        want = {n: (micro if n in self._every_micro else 1) for n in self.updaters}
        missing = [n for n in self.updaters if self._fired.get(n, 0) != want[n]]
        if missing:
            raise UpdateCheckError(
                f"{len(missing)} trainable tensor(s) got no gradient (or more than one) in step "
                f"{self.step_count + 1}: {', '.join(missing[:8])}{' …' if len(missing) > 8 else ''}")
        if check:
            frozen = [n for n in self.updaters if self._changed.get(n, 0) == 0]
            if frozen:
                raise UpdateCheckError(
                    f"startup check failed: {len(frozen)} trainable tensor(s) did not change in the first "
                    f"update: {', '.join(frozen[:8])}{' …' if len(frozen) > 8 else ''}. The run would silently "
                    f"train nothing there; check the lr ({self.lr:g}) and the hooks, or set "
                    f"train.check_updates=false to skip this check")
        self.count_changes = False
        self._grad_scale = 1.0
        self.step_count += 1

    def abandon_step(self) -> None:
        """Every micro-batch of this step was skipped: nothing was applied or accumulated; not counted."""
        self._in_step = False
        self.count_changes = False

    def step_pending(self, check: bool | None = None) -> None:
        """Two-phase update: apply every accumulated gradient now (used by tests and as a reference)."""
        self.hooks_enabled = True
        if check is not None:
            self.count_changes = check
        for name, mod in int8_modules(self.model):
            if mod.weight_grad is not None:
                g, mod.weight_grad = mod.weight_grad, None
                self._run(name, g)
        for name, p in self.model.named_parameters():
            if name in self.updaters and p.grad is not None:
                g, p.grad = p.grad, None
                self._run(name, g)
