"""One updater per trainable tensor, each with the same interface: `step` (one update, or a lagged window's
micro-batch), `commit` (the step boundary), `finite_flag`, and its state as `state_dict` /
`load_state_dict` / `state_spec` (the tensors a checkpoint holds for it: names, shapes, the required ones).

  * ApolloUpdater: APOLLO / APOLLO-Mini (apollo.py) on a projection matrix, int8 or float.
  * TorchAdamUpdater: bitsandbytes 8-bit AdamW or torch AdamW on a float tensor (embeddings, norms, lm_head).

An int8 target is any module with `shape`, `device` and the three in-place updates `add_update_`,
`add_rows_` and `add_slice_` (model.Int8Linear): the updater computes the multiplier, the module owns its
storage and the rounding. Nothing here imports the rest of qapollo.
"""
from __future__ import annotations

import logging
import math

import torch
from torch import nn

from . import apollo, apollo_state

# Float tensors' optimizers run over row chunks of at most this many elements (planner.py plans with it)
FLOAT_CHUNK_ELEMS = 1 << 22


def _not_the_4bit_kernel_note(record: logging.LogRecord) -> bool:
    msg = record.getMessage()
    return not (msg.startswith("Failed to load CPU gemm_4bit_forward") or "kernels-community/quantization-bitsandbytes"
                in msg)


def import_bitsandbytes():
    """bitsandbytes, without its import-time warnings that it could not fetch (or, offline, verify) a 4-bit CPU
    matmul kernel from the Hugging Face Hub (kernels-community): qapollo uses only its 8-bit AdamW, never 4-bit
    matmuls."""
    for name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
        logging.getLogger(name).addFilter(_not_the_4bit_kernel_note)
    import bitsandbytes as bnb  # used as a library, never subclassed
    return bnb


def is_int8(target) -> bool:
    return hasattr(target, "add_update_")


def low_precision(t: torch.Tensor) -> bool:
    """bf16 / fp16: too coarse to take a small update by rounding to nearest (a `store` rounds it instead)."""
    return t.dtype in (torch.bfloat16, torch.float16)


class ApolloUpdater:
    """APOLLO / APOLLO-Mini on one matrix, int8 (dequant → update → requant in fp32) or float.

    lagged=True: the lagged-scale accumulation mode over windows of `window` micro-batches (one call per
    micro-batch, `commit` per step). `proj_seed` seeds the random projections, `sr_seed` the rounding noise.
    A bf16 / fp16 float target is written through `store(values_fp32, dtype, key, start)` when one is given
    (stochastic rounding), else rounded to nearest."""

    kind = "apollo"

    def __init__(self, name: str, target, ocfg, proj_seed: int, sr_seed: int, stochastic: bool,
                 lagged: bool = False, window: int = 1, store=None):
        self.name, self.target, self.o = name, target, ocfg
        self.stochastic, self.lagged, self.window = stochastic, lagged, window
        self.store = store if not is_int8(target) and low_precision(target) else None
        self.finite = None
        self.sr_seed = sr_seed
        self.shape = tuple(target.shape)
        # lagged: > 0 while the window's skipped micro-batches are replayed (how many replays are left, this one
        # included): those apply the rest of the window's step (apollo._lagged_micro); set by the caller
        self.replays_left = 0
        self.state = apollo.init_state(self.shape, ocfg.rank, proj_seed, target.device)

    def _hparams(self) -> dict:
        o = self.o
        return dict(rank=o.rank, scale_type=o.scale_type, update_proj_gap=o.update_proj_gap, beta1=o.beta1,
                    beta2=o.beta2, eps=o.eps, norm_growth_limit=o.norm_growth_limit, limiter_decay=o.limiter_decay)

    def step(self, grad: torch.Tensor, lr: float, count_changes: bool, last: bool = True) -> int:
        """One update (exact) or one micro-batch's share (lagged; `last`: the window's last micro-batch)."""
        if self.lagged:
            c, self.finite = apollo.lagged_multiplier(grad, self.state, window=self.window, last=last,
                                                      replays_left=self.replays_left, **self._hparams())
        else:
            c, self.finite = apollo.apollo_multiplier(grad, self.state, **self._hparams())
        return 0 if c is None else self._apply(grad, c, lr, count_changes)

    # ---- gradients that are never whole (model.lean_head) -----------------------------------------
    def _int8_coef(self, c: torch.Tensor | None, lr: float) -> torch.Tensor | None:
        return None if c is None else (c * (-lr * math.sqrt(self.o.scale))).float()

    def step_rows(self, rows: torch.Tensor, g: torch.Tensor, lr: float, count_changes: bool, last: bool = True) -> int:
        """A sparse gradient (the int8 embedding: the batch's `rows`, values `g`). R = G Pᵀ is zero outside
        those rows (the vocabulary side is the larger one, so P compresses the hidden side), ‖G‖ is theirs:
        the tensor-wise APOLLO-Mini step is exact. Rows not in the batch keep their weights; their moments
        decay as the dense step's would."""
        st = self.state
        self._refresh(g.device)
        math_dtype = torch.promote_types(g.dtype, torch.float32)
        r = torch.zeros(st["exp_avg"].shape, dtype=math_dtype, device=g.device)
        r.index_add_(0, rows, apollo.project_rows(g, st["proj"]).to(math_dtype))
        h = self._sketch(g.device)
        if h is not None:  # the sketch of the rows present (A·G, G zero elsewhere)
            h = apollo.sketch_rows(g, h[1][:, rows])
        c, self.finite = self._multiplier(r, torch.linalg.vector_norm(g, dtype=math_dtype), last, h)
        coef = self._int8_coef(c, lr)
        if coef is None:
            return 0
        return self.target.add_rows_(rows, g, coef, stochastic=self.stochastic, noise=self._noise(),
                                     count_changes=count_changes, keep=~self.finite)

    def step_slices(self, src, lr: float, count_changes: bool, last: bool = True) -> int:
        """lm_head's gradient given slice by slice (loss.HeadGradSlices), read twice: first R = G Pᵀ (row
        slices of it) and ‖G‖² summed over slices give APOLLO-Mini's scale; then each slice is recomputed and
        applied to its rows at once. The full gradient never exists; the step is the exact (not lagged) one,
        at the price of recomputing the head's logits once more."""
        st, dev = self.state, self.target.device
        self._refresh(dev)
        r = torch.zeros(st["exp_avg"].shape, dtype=torch.float32, device=dev)
        sq = torch.zeros((), dtype=torch.float32, device=dev)
        h = self._sketch(dev)  # lagged: (the sketch's sum, A)

        def measure(sl, g):
            r[sl] = apollo.project_rows(g, st["proj"]).to(torch.float32)
            sq.add_(torch.linalg.vector_norm(g, dtype=torch.float32).square())
            if h is not None:
                h[0].add_(apollo.sketch_rows(g.to(torch.float32), h[1][:, sl]))
        src.each(measure)
        c, self.finite = self._multiplier(r, sq.sqrt(), last, None if h is None else h[0])
        coef = self._int8_coef(c, lr)
        if coef is None:  # lagged window without a committed scale: nothing to apply before its last micro-batch
            return 0
        noise, keep, changed = self._noise(), ~self.finite, [0]

        def apply(sl, g):
            changed[0] += self.target.add_slice_(sl, g, coef, stochastic=self.stochastic, noise=noise,
                                                 count_changes=count_changes, keep=keep)
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

    def _multiplier(self, r: torch.Tensor, g_norm: torch.Tensor, last: bool, h: torch.Tensor | None = None):
        o = self.o
        hp = dict(shape=self.shape, beta1=o.beta1, beta2=o.beta2, eps=o.eps, norm_growth_limit=o.norm_growth_limit,
                  limiter_decay=o.limiter_decay)
        if self.lagged:
            return apollo.lagged_projected_multiplier(r, g_norm, h, self.state, window=self.window, last=last,
                                                      replays_left=self.replays_left, **hp)
        return apollo.projected_multiplier(r, g_norm, self.state, **hp)

    def commit(self, measured: bool = True, window: int | None = None) -> None:
        """Step boundary (lagged mode): moments take the window's projected gradient once, the limiter the
        window's update; the resulting c is the next window's. measured=False: the window's micro-batches
        were not K distinct ones (replays of skipped ones), its alignment is not the next window's; `window`:
        the micro-batches whose sum already is the window's mean (default: K)."""
        if self.lagged:
            o = self.o
            apollo.lagged_commit(self.state, shape=self.shape, scale_type=o.scale_type, window=window or self.window,
                                 beta1=o.beta1, beta2=o.beta2, eps=o.eps, norm_growth_limit=o.norm_growth_limit,
                                 limiter_decay=o.limiter_decay, measured=measured)

    def _noise(self) -> tuple[int, str]:
        """(seed, key) of this update's rounding noise: exact, one update per step; lagged, one per
        micro-batch, each with its own noise."""
        st = self.state
        return self.sr_seed, (f"{st['step']}:{st['r_count']}" if self.lagged else str(st["step"]))

    def _apply(self, grad: torch.Tensor, c: torch.Tensor, lr: float, count_changes: bool) -> int:
        # W ← (W + coef⊙G)·decay with coef = -lr·√scale·c and decay = 1 - lr·wd (decoupled weight decay on
        # the updated weight, as in the reference). Both stay on the device: no host sync, and the compiled
        # kernel takes them as tensors (a Python float would recompile it every step).
        coef = c * (-lr * math.sqrt(self.o.scale))  # c is fp32 (fp64 for fp64 gradients)
        wd = self.o.weight_decay
        # lagged: decay once per window, not per micro-batch: at its first micro-batch, or at the last one of a
        # window without a step size (which commits the window, emptying its count, before applying it)
        once = not self.lagged or self.state["r_count"] <= 1
        decay = torch.full((), 1.0 - lr * wd, device=grad.device) if wd and once else None
        if is_int8(self.target):
            # A non-finite gradient (c = 0, the flag false) leaves codes, scales and zeros as they were (keep).
            return self.target.add_update_(grad, coef.float(), decay, stochastic=self.stochastic,
                                           noise=self._noise(), count_changes=count_changes, keep=~self.finite)
        p = self.target
        before = p.detach().clone() if count_changes else None
        with torch.no_grad():
            d = grad.to(coef.dtype) * coef
            # c is 0 for a non-finite gradient; 0·inf = nan, so clear those too: nothing reaches the weight
            torch.nan_to_num_(d, nan=0.0, posinf=0.0, neginf=0.0)
            new = p.to(coef.dtype) + d  # a new tensor: p stays as it was until the select below
            if decay is not None:
                new *= decay
            new = new.to(p.dtype) if self.store is None else self.store(new.float(), p.dtype, self._noise()[1], 0)
            p.copy_(torch.where(self.finite, new, p))
        return int((p != before).sum()) if count_changes else 0

    def finite_flag(self):
        """Device bool of the last call: was the gradient finite (read once per micro-batch)."""
        return self.finite

    def forget_accumulation(self, reference: bool) -> None:
        """A resume that changed the accumulation (apollo.forget_accumulation)."""
        apollo.forget_accumulation(self.state, reference)

    # ---- state ------------------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, scalars): step/seed as int64 0-d tensors, moments, limiter norm, projection (once drawn),
        the lagged step size and alignment (apollo_state.state_tensors)."""
        return apollo_state.state_tensors(self.state), {}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], scalars: dict) -> None:
        apollo_state.load_state_tensors(self.state, tensors)

    def state_spec(self) -> tuple[dict[str, tuple], tuple[str, ...]]:
        """(shape of every tensor a checkpoint may hold for this matrix, the keys it must hold)."""
        return apollo_state.state_shapes(self.shape, self.o.rank, self.o.scale_type), apollo_state.REQUIRED_STATE

    def resident_tensors(self) -> list[torch.Tensor]:
        return [v for v in self.state.values() if torch.is_tensor(v)]


class TorchAdamUpdater:
    """One float tensor with per-tensor optimizers: bitsandbytes 8-bit AdamW or torch AdamW.

    Large tensors (embedding, lm_head: 131M elements at 7B) are updated in row chunks, each chunk a
    Parameter *view* of the tensor with its own optimizer: bitsandbytes' CPU path dequantizes both 8-bit
    states to fp32 (≈ 20 bytes of transient per element, 2.4 GiB at 7B) and chunking bounds that. The
    chunks hold whole 4096-element blocks, so the blockwise 8-bit states are the same as unchunked.

    A bf16 / fp16 tensor given a `store` is stepped through an fp32 copy of one chunk at a time (the
    optimizer's parameter, empty between steps) and written back with store(values, dtype, key, start):
    stochastic rounding. Rounded to nearest, a trained model's Adam steps are mostly below half an ulp and
    vanish (SmolLM2-135M's bf16 embedding at lr 6e-5: 9.5 % of its elements moved in 74 steps).
    """

    lagged = False  # float tensors accumulate their gradient and step once per optimizer step

    def __init__(self, name: str, param: nn.Parameter, kind: str, ocfg, weight_decay: float, store=None):
        self.name, self.param = name, param
        self.store = store if low_precision(param) else None
        self.finite = True
        betas = (ocfg.beta1, ocfg.beta2)
        if kind == "adam8bit":
            bnb = import_bitsandbytes()
            make = lambda ps: bnb.optim.AdamW8bit(ps, lr=ocfg.lr, betas=betas, eps=ocfg.eps, weight_decay=weight_decay)
        else:
            make = lambda ps: torch.optim.AdamW(ps, lr=ocfg.lr, betas=betas, eps=ocfg.eps, weight_decay=weight_decay)
        self.chunks = []  # (row slice, Parameter view, the parameter its optimizer steps, optimizer)
        rows = self._rows_per_chunk(tuple(param.shape))
        for r0 in range(0, param.shape[0] if param.dim() else 1, rows):
            sl = slice(r0, min(param.shape[0], r0 + rows)) if param.dim() else slice(None)
            view = param if rows >= (param.shape[0] if param.dim() else 1) else nn.Parameter(param.data[sl])
            work = nn.Parameter(torch.empty(0, device=param.device)) if self.store else view
            self.chunks.append((sl, view, work, make([work])))
        self.kind = type(self.chunks[0][3]).__name__  # AdamW8bit | AdamW: the checkpoint layout's kind

    def _rows_per_chunk(self, shape: tuple) -> int:
        if len(shape) < 2:
            return shape[0] if shape else 1
        row = math.prod(shape[1:])
        unit = 4096 // math.gcd(row, 4096)  # rows per whole number of 4096-element blocks
        return max(unit, FLOAT_CHUNK_ELEMS // row // unit * unit)

    def step(self, grad: torch.Tensor, lr: float, count_changes: bool, last: bool = True) -> int:
        p, changed = self.param, 0
        # a host sync per float tensor (2·layers + 3 of them): Adam's moments would move the weight even
        # for a zeroed gradient, so a bad one must skip the update, which needs the answer on the host
        self.finite = bool(torch.isfinite(grad).all())
        if not self.finite:
            p.grad = None
            return 0
        for sl, view, work, opt in self.chunks:
            # the startup guard compares chunk by chunk (a whole-tensor copy: BENCHMARKS.md, GPU section)
            before = view.detach().clone() if count_changes else None
            g = grad if view is p else grad[sl]
            if work is view:
                view.grad = g
            else:  # an fp32 copy of the chunk, stepped, then rounded back with the noise of its elements
                work.data, work.grad = view.detach().float(), g.float()
            opt.param_groups[0]["lr"] = lr
            opt.step()
            if work is not view:
                work.grad = None  # before the rounding's temporaries
                start = (sl.start or 0) * math.prod(p.shape[1:])
                view.detach().copy_(self.store(work.data, view.dtype, str(int(opt.state[work]["step"])), start))
                work.data = torch.empty(0, device=p.device)
            else:
                view.grad = None
            if count_changes:
                changed += int((view.detach() != before).sum())
        p.grad = None
        return changed

    def finite_flag(self) -> bool:
        return self.finite

    def commit(self) -> None:
        pass

    def forget_accumulation(self, reference: bool) -> None:
        pass  # Adam's state does not depend on the accumulation settings

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, scalars) keyed `c<i>.<key>`: the raw state of each chunk's optimizer (bitsandbytes keeps
        `step` as a Python int: it goes to the scalars)."""
        tensors, scalars = {}, {}
        for i, (_, _, work, opt) in enumerate(self.chunks):
            for k, v in opt.state.get(work, {}).items():
                (tensors if torch.is_tensor(v) else scalars)[f"c{i}.{k}"] = v
        return tensors, scalars

    def load_state_dict(self, tensors: dict[str, torch.Tensor], scalars: dict) -> None:
        for i, (_, view, work, opt) in enumerate(self.chunks):
            new = {k.split(".", 1)[1]: v for k, v in scalars.items() if k.startswith(f"c{i}.")}
            for key, v in tensors.items():
                if not key.startswith(f"c{i}."):
                    continue
                k = key.split(".", 1)[1]
                if k == "step":  # torch keeps AdamW's step tensor on the CPU (non-capturable)
                    new[k] = v
                elif isinstance(opt, torch.optim.AdamW) and v.is_floating_point():
                    new[k] = v.to(view.device, work.dtype)  # what torch's own load_state_dict does
                else:
                    new[k] = v.to(view.device)  # bitsandbytes: uint8 states, fp32 absmax/qmap as saved
            opt.state[work] = new

    def state_spec(self) -> tuple[dict[str, tuple], tuple[str, ...]]:
        """Shapes of the per-element states of each chunk (the optimizers' other tensors: any shape)."""
        shapes = {f"c{i}.{k}": tuple(view.shape) for i, (_, view, _, _) in enumerate(self.chunks)
                  for k in ("exp_avg", "exp_avg_sq", "state1", "state2")}
        return shapes, ()

    def resident_tensors(self) -> list[torch.Tensor]:
        return list(self.state_dict()[0].values())
