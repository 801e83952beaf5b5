"""qapollo inside transformers' Trainer: the in-backward optimizer handed to it as the optimizer it expects.

    cfg = qapollo.config_for(model, lr=3e-3, max_steps=200, grad_accum_steps=4)
    trainer = Trainer(model=model, args=TrainingArguments(..., max_steps=200, gradient_accumulation_steps=4,
                                                          max_grad_norm=0),
                      **qapollo.trainer_kwargs(model, cfg, tokenizer))

The weights change inside each backward (layerwise.py); what Trainer calls around it does the bookkeeping:
`optimizer.train()`, which Trainer calls before every micro-batch (as for schedule-free optimizers), opens the
micro-batch (`begin_step`; the last of the K `gradient_accumulation_steps` steps every tensor), `step()` ends
the optimizer step (`end_step`: lr schedule, counters, startup checks), `zero_grad()` has nothing to clear.
The scheduler only reports qapollo's lr (a function of the step, optim/schedule.py) to Trainer's logs.
`QapolloCheckpoints` writes a qapollo checkpoint at each Trainer save into OUTPUT_DIR/qapollo/ (what
`qapollo eval` / `export` read) and loads it back when Trainer resumes from its checkpoint-N.
"""
from __future__ import annotations

import os
import sys

import torch
from transformers import TrainerCallback

from .api import load, save
from .errors import QapolloError
from .layerwise import LayerwiseOptimizer


class TrainerError(QapolloError, RuntimeError):
    """The Trainer did not drive the in-backward optimizer as this module expects."""


class InBackwardOptimizer(torch.optim.Optimizer):
    """A torch optimizer face over LayerwiseOptimizer for transformers.Trainer (see the module docstring)."""

    def __init__(self, opt: LayerwiseOptimizer, grad_accum_steps: int):
        self.opt, self.accum = opt, grad_accum_steps
        self._micro, self._open = 0, False
        # Trainer and its lr scheduler want param groups: one with the model's float tensors and the lr
        params = [p for p in opt.model.parameters() if p.requires_grad]
        super().__init__(params, {"lr": opt.current_lr()})

    def train(self) -> None:
        """Trainer calls this before each micro-batch's forward: close the previous one, open this one."""
        self._close()
        self.opt.begin_step(last_micro=self._micro == self.accum - 1)
        self._micro, self._open = self._micro + 1, True

    def eval(self) -> None:
        pass

    def _close(self) -> None:
        if self._open:
            self._open = False
            self.opt.after_backward()  # the non-finite flags of the micro-batch's in-backward updates

    @torch.no_grad()
    def step(self, closure=None):
        if self._micro == 0:
            raise TrainerError("the optimizer step came without a micro-batch opened by optimizer.train(): this "
                               "transformers Trainer does not drive qapollo's in-backward optimizer; use the plain "
                               "loop of qapollo's README instead")
        self._close()
        # the updates ran inside backward: count the step, advance the lr schedule. Trainer divides each
        # window's loss among the micro-batches it holds (fewer in an epoch's last window): already their mean
        self.opt.end_step(mean_taken=True)
        self._micro = 0
        for g in self.param_groups:
            g["lr"] = self.opt.current_lr()

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass  # every gradient was consumed (and dropped) by its update inside backward

    def state_dict(self) -> dict:
        return {}  # the optimizer state is saved as safetensors by QapolloCheckpoints, not in Trainer's pickle

    def load_state_dict(self, state_dict: dict) -> None:
        pass


class QapolloSchedule(torch.optim.lr_scheduler.LRScheduler):
    """Reports qapollo's lr to Trainer (the schedule itself is qapollo's, once per optimizer step)."""

    def __init__(self, optimizer: InBackwardOptimizer):
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        return [self.optimizer.opt.current_lr() for _ in self.optimizer.param_groups]


class QapolloCheckpoints(TrainerCallback):
    """At each Trainer save, a qapollo checkpoint in OUTPUT_DIR/qapollo/checkpoint-<step> (safetensors: model,
    optimizer states, RNG); when Trainer resumes at step N, qapollo's checkpoint-N is loaded back."""

    def __init__(self, model, opt: LayerwiseOptimizer, cfg, tokenizer=None):
        self.model, self.opt, self.cfg, self.tokenizer = model, opt, cfg, tokenizer

    def on_train_begin(self, args, state, control, **kwargs):
        check_arguments(args, self.cfg)
        if state.max_steps != self.cfg.train.max_steps:  # TrainingArguments.max_steps, or num_train_epochs
            adopt_step_count(self.opt, self.cfg, state.max_steps)
        if state.global_step > 0 and self.opt.step_count != state.global_step:
            load(os.path.join(args.output_dir, "qapollo", f"checkpoint-{state.global_step}"), self.model, self.opt,
                 self.cfg)

    def on_save(self, args, state, control, **kwargs):
        save(os.path.join(args.output_dir, "qapollo"), self.model, self.opt, self.cfg, self.tokenizer,
             keep=args.save_total_limit or 0)


def adopt_step_count(opt: LayerwiseOptimizer, cfg, steps: int) -> None:
    """The run is as long as Trainer makes it (its max_steps, or num_train_epochs over the data): the lr
    schedule (warmup, then cosine to min_lr) is laid over those steps instead of cfg.train.max_steps."""
    print(f"qapollo: note: Trainer runs {steps} optimizer steps; the lr schedule follows them instead of "
          f"train.max_steps={cfg.train.max_steps}", file=sys.stderr)
    cfg.train.max_steps = opt.max_steps = steps


def check_arguments(args, cfg) -> None:
    """TrainingArguments that the in-backward optimizer cannot honour are refused before the first step."""
    t = cfg.train
    if args.world_size > 1:
        raise TrainerError(f"{args.world_size} processes: with Trainer, DDP/FSDP/DeepSpeed would average or shard "
                           f"gradients after qapollo has already applied them inside backward; run several GPUs "
                           f"with `torchrun ... qapollo train` (README, 'Several GPUs')")
    if args.gradient_accumulation_steps != t.grad_accum_steps:
        raise TrainerError(f"TrainingArguments.gradient_accumulation_steps={args.gradient_accumulation_steps} but "
                           f"the qapollo config has grad_accum_steps={t.grad_accum_steps}: give both the same value")
    if args.max_grad_norm:
        raise TrainerError(f"TrainingArguments.max_grad_norm={args.max_grad_norm}: no whole gradient exists to "
                           f"clip (each is applied inside backward); set max_grad_norm=0 (APOLLO's norm-growth "
                           f"limiter bounds each update)")
    if args.fp16:
        raise TrainerError("TrainingArguments.fp16=True scales the loss (GradScaler) and the updates inside "
                           "backward would take the scaled gradients; use bf16 or fp32")


def trainer_kwargs(model, cfg, tokenizer=None) -> dict:
    """Make `model` int8 with the in-backward optimizer of `cfg` (api.prepare) and return what Trainer takes:
    `optimizers` and `callbacks`. TrainingArguments must agree with cfg: gradient_accumulation_steps =
    cfg.train.grad_accum_steps, max_grad_norm=0 (no gradient is ever whole to clip; APOLLO's norm-growth
    limiter bounds each update). The lr schedule runs over Trainer's step count (TrainingArguments.max_steps,
    or num_train_epochs over the data), with a note when it differs from cfg.train.max_steps."""
    from .api import prepare
    opt = prepare(model, cfg)
    optimizer = InBackwardOptimizer(opt, cfg.train.grad_accum_steps)
    return {"optimizers": (optimizer, QapolloSchedule(optimizer)),
            "callbacks": [QapolloCheckpoints(model, opt, cfg, tokenizer)]}
