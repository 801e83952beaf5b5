"""Optimizer steps taken per tensor inside backward, so no full-model gradient ever exists.

Every trainable tensor gets one updater:
  * projection matrices (int8 `Int8Linear` or float `nn.Linear.weight`): APOLLO / APOLLO-Mini
    (optim/apollo.py), or torch AdamW for the `adamw` baseline;
  * embeddings, RMSNorms, lm_head: bitsandbytes 8-bit Adam used per tensor as a library (or torch AdamW),
    through an fp32 copy when they are bf16 / fp16 and stochastically rounded back (model.float_store);
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
  used (the loss of each is divided by K before anyone knows how many will be skipped). In lagged mode the
  trainer's step instead runs the last accepted micro-batch again in place of each skipped one
  (engine.optimizer_step), so the window is K backward passes and its matrices apply a whole step.

Data parallel (distributed.py): every gradient is averaged over the ranks before its update, so every
rank applies the same one. In exact mode that is one all-reduce per tensor per optimizer step (on the
accumulated gradient); in lagged mode the matrices update on every micro-batch, so their micro-batch
gradients are averaged each time (K all-reduces per step), the float tensors' once.

Non-finite gradients never reach a weight: APOLLO's multiplier is zeroed on device (no host sync per
tensor), a float tensor's update is skipped; `after_backward` reads the flags once and names the tensor.
"""
from __future__ import annotations

import torch
from torch import nn

from .config import ConfigError
from .errors import QapolloError
from .model import Int8Linear, RowGrad, TiedGrad, float_store, int8_modules, matrix_names, tensor_seed, tied_int8
from .optim.schedule import lr_at
from .optim.factored import FactoredUpdater
from .optim.updaters import ApolloUpdater, TorchAdamUpdater


class UpdateCheckError(QapolloError, RuntimeError):
    """A trainable tensor did not change, or did not get a gradient, in an optimizer step."""


class NonFiniteGradient(UpdateCheckError):
    """A gradient with inf/nan reached an update hook; `names` lists the tensors (none was written)."""

    def __init__(self, names: list[str], step: int):
        self.names, self.step = names, step
        more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
        super().__init__(f"non-finite gradient (inf/nan) in {names[0]}{more} at step {step}: no weight took it, "
                         f"but other tensors of this step were already updated inside backward")


def make_updaters(model: nn.Module, ocfg, seed: int, stochastic_round: bool, lagged: bool, window: int) -> dict:
    """One updater per trainable tensor (see the module docstring), keyed by the tensor's name."""
    mats = matrix_names(model)
    updaters = {}
    def store_for(name):  # bf16 / fp16 float tensors: stochastically rounded stores, as the int8 ones
        return float_store(tensor_seed(seed, "sr:" + name)) if stochastic_round else None

    def apollo_on(name, target, stochastic):
        return ApolloUpdater(name, target, ocfg, tensor_seed(seed, "proj:" + name), tensor_seed(seed, "sr:" + name),
                             stochastic, lagged, window, store=store_for(name))
    for name, mod in int8_modules(model):
        if name not in mats and ocfg.lean_optim == "factored":  # model.lean_head's embedding / lm_head
            updaters[name] = FactoredUpdater(name, mod, ocfg, tensor_seed(seed, "sketch:" + name),
                                             tensor_seed(seed, "sr:" + name), stochastic_round, lagged, window)
            continue
        updaters[name] = apollo_on(name, mod, stochastic_round)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name in mats and ocfg.name != "adamw":
            updaters[name] = apollo_on(name, p, False)
        elif name in mats:
            updaters[name] = TorchAdamUpdater(name, p, "adamw", ocfg, ocfg.weight_decay, store=store_for(name))
        else:
            kind = "adamw" if ocfg.name == "adamw" else ocfg.float_optim
            updaters[name] = TorchAdamUpdater(name, p, kind, ocfg, 0.0, store=store_for(name))
    return updaters


class LayerwiseOptimizer:
    """Owns the updaters, the global step and the hooks that run them inside backward.

    Per optimizer step: `begin_step` before each micro-batch's backward, `after_backward` after it,
    `end_step` once at the end (or `abandon_step` when every micro-batch of the step was skipped).
    """

    def __init__(self, model: nn.Module, ocfg, max_steps: int, seed: int = 0, stochastic_round: bool = True,
                 accum_mode: str = "exact", reducer=None, grad_accum_steps: int = 1):
        self.model, self.o, self.max_steps = model, ocfg, max_steps
        self.reducer = reducer  # data parallel: distributed.GradAverager (the module docstring); None: one process
        self.step_count, self.lr = 0, 0.0  # optimizer steps done; the lr of the one under way
        self.hooks_enabled = True  # False: only accumulate (earlier micro-batches, two-phase tests)
        self.count_changes = False
        # K micro-batches per optimizer step; lagged mode needs K > 1 (with one micro-batch it is the exact step)
        self.grad_accum_steps = grad_accum_steps
        self.lagged = accum_mode == "lagged" and grad_accum_steps > 1
        self._grad_scale = 1.0  # K / micro-batches used, for tensors stepping once per step (see begin_step)
        self._in_step = False
        self._micro_done = 0  # micro-batches of this step whose backward ran
        self._replays = 0  # of those, micro-batches run again in place of skipped ones
        self._fired: dict[str, int] = {}
        self._changed: dict[str, int] = {}
        self._flags: list[tuple[str, object]] = []  # (name, finite flag) of this micro-batch's updates
        self._handles = []
        self._matrices = mats = matrix_names(model)  # int8 modules and float projection weights
        self.float_lr_scale = (ocfg.float_lr / ocfg.lr) if ocfg.float_lr else 1.0
        self.lean_lr_scale = (ocfg.lean_lr / ocfg.lr) if ocfg.lean_lr else self.float_lr_scale
        # model.lean_head: the int8 embedding / lm_head (their gradients are never whole: in lagged mode
        # they step on every micro-batch like the matrices; exact accumulation is refused by the config)
        self._lean = {n for n, m in int8_modules(model) if n not in mats}
        if self._lean and reducer is not None:
            raise ConfigError("model.lean_head=true does not run data-parallel yet (its lm_head gradient is never "
                              "whole, so there is nothing to all-reduce): use one process or model.lean_head=false")
        self.updaters = make_updaters(model, ocfg, seed, stochastic_round, self.lagged, grad_accum_steps)
        # tensors that step on every micro-batch (lagged mode); all others step once per optimizer step
        self._every_micro = {n for n, u in self.updaters.items() if u.lagged}
        # model.lean_head with tied embeddings: one int8 tensor, two gradients in each backward. lm_head's
        # comes first, from the loss, slice by slice; the embedding's rows at the end of backward. Two
        # updates (two commits of the factored mean squares, two clips) would not be the optimizer's step
        # on their sum, and lm_head's gradient cannot be kept whole (what lean_head avoids). So lm_head's
        # part waits as its recipe (loss.HeadGradSlices keeps the hidden states, tokens × h, not the V × h
        # gradient) until the rows arrive; then the sum goes through the updater once, slice by slice with
        # the rows added (model.TiedGrad): the exact step on the summed gradient, for one more
        # recomputation of lm_head's slices.
        self._tied, self._head_part = tied_int8(model), None
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
        if mod.weight_grad is not None:  # earlier micro-batches of this step (exact mode), or the tied lm_head's
            grad = _plus(grad, mod.weight_grad)
            mod.weight_grad = None
        if not self._steps_now(mod.param_name):
            mod.weight_grad = grad
            return
        if mod.param_name == self._tied and not isinstance(grad, RowGrad):  # a whole lm_head gradient (HF's loss)
            self._head_part = grad if self._head_part is None else grad + self._head_part
            return
        self._run(mod.param_name, grad)

    def _slice_hook(self, mod: Int8Linear, src) -> None:
        """lm_head (model.lean_head) inside the loss backward: updated slice by slice when it steps now;
        otherwise (a two-phase reference run) its gradient is made whole and kept like any other."""
        name = mod.param_name
        if not self._steps_now(name) or mod.weight_grad is not None or self.reducer is not None:
            self._int8_hook(mod, src.full())
            return
        if name == self._tied:  # waits for the embedding's rows (see __init__)
            self._head_part = src
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
        upd, lr = self.updaters[name], self._lr_of(name)
        part = self._head_part if name == self._tied else None
        if part is not None:  # the tied embedding / lm_head: both gradients in one step (see __init__)
            self._head_part = None
            if torch.is_tensor(part):
                grad = _plus(part, grad)
            else:
                changed = upd.step_slices(TiedGrad(part, grad), lr, self.count_changes, last=self.hooks_enabled)
                self._record(name, upd, changed)
                return
        if isinstance(grad, RowGrad):  # the int8 embedding (model.lean_head): the batch's rows only
            changed = upd.step_rows(grad.rows, grad.values, lr, self.count_changes, last=self.hooks_enabled)
        else:
            changed = upd.step(grad, lr, self.count_changes, last=self.hooks_enabled)
        self._record(name, upd, changed)

    def _lr_of(self, name: str) -> float:
        """`lr` for the APOLLO matrices; float_lr for embedding, lm_head and norms, whatever steps them;
        model.lean_head's int8 embedding / lm_head take lean_lr when it is set (BENCHMARKS.md, issue 22)."""
        if name in self._matrices:
            return self.lr
        return self.lr * (self.lean_lr_scale if name in self._lean else self.float_lr_scale)

    def _record(self, name: str, upd, changed: int) -> None:
        self._flags.append((name, upd.finite_flag()))
        self._fired[name] = self._fired.get(name, 0) + 1
        self._changed[name] = self._changed.get(name, 0) + changed

    # ---- state ---------------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Every updater's state as `<tensor name>.<key>` tensors + a JSON layout {name: {kind, tensors,
        scalars}} (what optimizer.safetensors holds)."""
        tensors, layout = {}, {}
        for name, upd in self.updaters.items():
            state, scalars = upd.state_dict()
            tensors.update({f"{name}.{k}": v for k, v in state.items()})
            layout[name] = {"kind": upd.kind, "tensors": sorted(state), "scalars": scalars}
        return tensors, layout

    def load_state_dict(self, tensors: dict[str, torch.Tensor], layout: dict) -> None:
        """The inverse of state_dict; the step counter is the trainer's to set."""
        for name, upd in self.updaters.items():
            entry = layout[name]
            upd.load_state_dict({k: tensors[f"{name}.{k}"] for k in entry["tensors"]}, entry["scalars"])

    def state_spec(self) -> dict[str, tuple[dict[str, tuple], tuple[str, ...]]]:
        """{tensor name: (the shapes its state tensors must have, the keys it must hold)} for a checkpoint's
        validation (checkpoint/validation.py); a key of unknown shape is absent from the shapes."""
        return {name: upd.state_spec() for name, upd in self.updaters.items()}

    def resident_tensors(self) -> list[torch.Tensor]:
        """Every tensor of optimizer state held now (moments, projections, 8-bit states, lagged sums)."""
        return [t for u in self.updaters.values() for t in u.resident_tensors()]

    def state_bytes(self) -> int:
        """Bytes of optimizer state held for all tensors."""
        return sum(t.numel() * t.element_size() for t in self.resident_tensors())

    def accumulation(self, tokens_per_step: int) -> dict:
        """What a lagged step size and the limiter's reference are measured on (saved with a checkpoint)."""
        return {"accum_mode": "lagged" if self.lagged else "exact", "grad_accum_steps": self.grad_accum_steps,
                "tokens_per_step": tokens_per_step}

    def adopt_accumulation(self, then: dict, now: dict) -> bool:
        """A resume from state measured with the accumulation `then` (None in the record: checkpoints written
        before it was kept, which held a per-micro-batch lagged state). The lagged step size is dropped when
        the mode or K changed (the next window measures its own, applied at its last micro-batch: one step of
        the right size), the limiter's reference too when the tokens per step changed. True when the change
        is worth a note."""
        def lagged(rec):  # lagged with one micro-batch is the exact step
            return rec["accum_mode"] == "lagged" and rec["grad_accum_steps"] > 1
        if then.get("tokens_per_step") is None:
            if lagged(then):
                self._forget_accumulation(reference=True)
            return False
        same_window = lagged(then) == lagged(now) and (not lagged(now) or then["grad_accum_steps"] == now["grad_accum_steps"])
        same_tokens = then["tokens_per_step"] == now["tokens_per_step"]
        if same_window and same_tokens:
            return False
        self._forget_accumulation(reference=not same_tokens)
        return True

    def _forget_accumulation(self, reference: bool) -> None:
        for u in self.updaters.values():
            u.forget_accumulation(reference)

    # ---- step bookkeeping ----------------------------------------------------------------------
    def current_lr(self) -> float:
        o = self.o
        return lr_at(self.step_count, o.lr, o.warmup_steps, self.max_steps, o.min_lr_ratio)

    def begin_step(self, last_micro: bool = True, check: bool = False, replay: int = 0) -> None:
        """Call before each micro-batch's backward; `last_micro` makes its once-per-step hooks step; `replay`:
        a micro-batch of this step run again in place of one the spike guard skipped, how many such replays
        are left counting this one (engine.optimizer_step)."""
        if not self._in_step:
            self._in_step, self._micro_done, self._replays = True, 0, 0
            self._fired, self._changed = {}, {}
        self._replays += replay > 0
        for u in self.updaters.values():
            if isinstance(u, ApolloUpdater):  # lagged windows: replays apply the rest of the window's step
                u.replays_left = replay
        self.lr = self.current_lr()
        self.hooks_enabled = last_micro
        self.count_changes = check
        self._flags = []
        self._head_part = None
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

    def end_step(self, check: bool = False, mean_taken: bool = False) -> None:
        """Call after the last micro-batch's backward: apply what is still pending (its last micro-batch
        was skipped), commit the lagged scales, verify every tensor stepped, count the step. mean_taken: the
        caller divided the losses among the micro-batches it ran (transformers' Trainer does in an epoch's
        last, shorter window), so their sum is already their mean: nothing is scaled by K/used."""
        if self._pending():
            self._grad_scale = 1.0 if mean_taken else self._mean_scale(self._micro_done)
            self.step_pending(check)
            self.after_backward()
            self._micro_done -= 1  # not a micro-batch of its own
        # a window of replays, or a shorter one whose mean the caller took, is not K distinct micro-batches:
        # it cannot measure their alignment; the latter commits as a whole window of those it had
        short = mean_taken and 0 < self._micro_done < self.grad_accum_steps
        for u in self.updaters.values():
            if isinstance(u, ApolloUpdater):
                u.commit(measured=not (self._replays or short), window=self._micro_done if short else None)
            else:
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


def _plus(a, b):
    """The sum of two gradients of one tensor, dense or model.RowGrad (a dense one makes the sum dense)."""
    if isinstance(a, RowGrad) and isinstance(b, RowGrad):
        return a + b
    return (a.dense() if isinstance(a, RowGrad) else a) + (b.dense() if isinstance(b, RowGrad) else b)
