"""The training loop: data → model → in-backward optimizer → metrics, eval and checkpoints."""
from __future__ import annotations

import math
import os
import signal
import time

import torch
from tqdm import tqdm

from . import distributed
from .config import Config, flat_dict, largest_stable_lrs
from .failures import StepFailed, TrainError, on_step_failure  # noqa: F401 (StepFailed: callers import it from here)
from .guard import SpikeGuard
from .layerwise import LayerwiseOptimizer
from .loss import causal_lm_loss
from .hf_import import load_weights, resolve_init_from
from .metrics import MetricsLog, NullMetrics, WandbSink, peak_mem_bytes, require_tensorboard, require_wandb, rss_bytes
from .model import build_model, count_params, enable_activation_checkpointing


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainError(f"train.device={name} but CUDA is not available; use train.device=cpu or auto")
    return torch.device(name)


class Trainer:
    def __init__(self, cfg: Config, progress: bool = True):
        self.cfg = cfg
        self.progress = progress
        # torchrun: one data-parallel replica per process (distributed.py); a no-op in a plain process
        self.dist = distributed.init(pick_device(cfg.train.device))
        self.device = self.dist.device
        self.run_dir = os.path.join(cfg.train.output_dir, cfg.train.run_name)
        self.stop_requested = False
        self.tokens_seen = 0
        self.last_eval = None
        self.plan = None
        # the step under way, from its first batch until its update is complete: while set, the in-memory
        # state may be half-updated (in-backward updates) and every save refuses it (checkpoint.save)
        self.dirty_step: int | None = None
        self._checked_at = None  # step of the last replica check

    def _say(self, msg: str) -> None:
        if self.dist.is_main:  # one writer: rank 0 prints, logs and saves
            tqdm.write(msg)

    # ---- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        from . import checkpoint
        from .data import build_data, check_vocab, repeat_note
        from .tokenizer import load_tokenizer

        cfg, t = self.cfg, self.cfg.train
        if t.tensorboard:
            require_tensorboard()  # fail before anything is built
        if t.wandb:
            require_wandb()
        init_from = resolve_init_from(cfg, self.run_dir)  # model shape from an HF folder (or its checkpoint)
        self._plan_memory()
        self._note_lr()
        # before anything is built: refuse a fresh run over checkpoints, or a resume with another shape,
        # an output folder that cannot be written or lacks room for one checkpoint, another tokenizer
        resume_from = checkpoint.resume_candidates(cfg, self.run_dir)
        checkpoint.check_output_dir(self.run_dir, self.plan)
        tok = load_tokenizer(cfg.data.tokenizer)
        check_vocab(tok, cfg.model.vocab_size)
        checkpoint.check_tokenizer(resume_from, tok)
        torch.manual_seed(t.seed)
        with self.dist.rank_zero_first():  # rank 0 tokenizes into the cache, the others then read it
            self.data = build_data(cfg.data, seq_len=t.seq_len, batch_size=t.batch_size, seed=t.seed,
                                   eval_tokens=cfg.eval.tokens, tokenizer=tok, rank=self.dist.rank,
                                   world_size=self.dist.world)
        if cfg.eval.every > 0:
            self.data.check_eval_tokens()
        note = repeat_note(self.data.info, t.batch_size * t.seq_len * t.grad_accum_steps * self.dist.world, t.max_steps)
        if note:
            self._say(note)
        self.dist.check_same({**flat_dict(cfg), "resume": cfg.resume, "data cache key": self.data.train.key,
                              "train tokens": self.data.info["n_train_tokens"], "torch": torch.__version__})
        self.model = build_model(cfg.model, self.device, seed=t.seed, init=init_from is None)
        if init_from is not None:
            load_weights(self.model, init_from, progress=self.progress and self.dist.is_main)
        self.model.train()
        if cfg.model.activation_checkpointing:
            enable_activation_checkpointing(self.model)
        self.opt = LayerwiseOptimizer(self.model, cfg.optim, t.max_steps, seed=t.seed,
                                      stochastic_round=cfg.model.stochastic_round, accum_mode=t.accum_mode,
                                      reducer=self.dist.grad_averager(), grad_accum_steps=t.grad_accum_steps)
        self.guard = SpikeGuard(t.skip_spikes, t.spike_sigma, t.spike_window, t.max_skips_in_row)
        wandb = WandbSink(self.run_dir, t.wandb_project, t.run_name, cfg.to_dict()) if t.wandb else None
        self.metrics = MetricsLog(os.path.join(self.run_dir, "metrics.jsonl"),
                                  tensorboard_dir=os.path.join(self.run_dir, "tb") if t.tensorboard else None,
                                  wandb=wandb) if self.dist.is_main else NullMetrics()
        checkpoint.resume(self, resume_from)
        self._check_replicas(self.opt.step_count)  # same seed, same checkpoint: identical from the start

    def _plan_memory(self) -> None:
        """Print the planner's peak; refuse a CUDA run predicted not to fit the device (memory.py)."""
        from .memory import advice, fmt, one_line, predict_peak, tune_cpu_allocator
        self.plan = plan = predict_peak(self.cfg, self.device.type, world_size=self.dist.world)
        self._say(one_line(plan, str(self.device)))
        if self.device.type == "cuda":
            os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before CUDA init
            total = torch.cuda.get_device_properties(self.device).total_memory
            if plan["peak_bytes"] + plan["context_bytes"] > total:
                raise TrainError(f"predicted peak {fmt(plan['peak_bytes'])} + {fmt(plan['context_bytes'])} CUDA "
                                 f"context exceeds {torch.cuda.get_device_name(self.device)}'s {fmt(total)}: "
                                 f"{advice(plan)} (see `qapollo plan`)")
        else:
            tune_cpu_allocator()

    def _note_lr(self) -> None:
        """Say so when a peak lr is well above the largest the stability probe found stable at this width."""
        m, o = self.cfg.model, self.cfg.optim
        if o.name == "adamw":
            return
        lr_ok, float_ok = largest_stable_lrs(m.hidden_size)
        for key, lr, ok in (("optim.lr", o.lr, lr_ok),
                            ("optim.float_lr", o.lr if o.float_lr is None else o.float_lr, float_ok)):
            if lr > 2 * ok:
                self._say(f"qapollo: note: {key}={lr:g} is {lr / ok:.1f}x the largest peak lr the stability probe "
                          f"found stable at width {m.hidden_size} ({ok:.3g}; BENCHMARKS.md, 'Stable learning rates'): "
                          f"expect loss spikes (the spike guard skips the worst; a larger batch did not raise the "
                          f"stable lr)")

    # ---- one optimizer step --------------------------------------------------------------------
    def train_step(self) -> float | None:
        """One optimizer step over grad_accum_steps micro-batches; the mean loss of those trained on, or
        None when the spike guard skipped all of them (then nothing changed and the step does not count)."""
        t = self.cfg.train
        check = self.opt.step_count == 0 and t.check_updates
        total, used = 0.0, 0
        for micro in range(t.grad_accum_steps):
            x = next(self.data.train).to(self.device, non_blocking=True)
            self.opt.begin_step(last_micro=micro == t.grad_accum_steps - 1, check=check)
            loss = causal_lm_loss(self.model, x)  # = model(input_ids=x, labels=x).loss, no full logits
            # a device sync, once per micro-batch: the guard decides before backward, on the mean over the
            # ranks, so that every rank takes the same decision (and the guard keeps the same window)
            loss_val = self.dist.mean(loss)
            reason = self.guard.reason_to_skip(loss_val)
            if reason:
                del loss  # frees the graph: no backward, no update
                self._skip(reason, micro)
                continue
            self.guard.accept(loss_val)
            (loss / t.grad_accum_steps).backward()
            self.opt.after_backward()  # raises NonFiniteGradient (no weight took it) naming the tensor
            total += loss_val
            used += 1
            self.tokens_seen += x.numel() * self.dist.world
        if used == 0:
            self.opt.abandon_step()
            return None
        self.opt.end_step(check=check)
        return total / used

    def _skip(self, reason: str, micro: int) -> None:
        t = self.cfg.train
        if not t.skip_spikes:  # guard off: only a non-finite loss gets here, and it stops the run
            raise TrainError(f"{reason} at step {self.opt.step_count + 1}: stopping before the update; lower "
                             f"optim.lr or raise optim.warmup_steps, then resume from the last checkpoint")
        where = f"micro-batch {micro + 1}/{t.grad_accum_steps} of " if t.grad_accum_steps > 1 else ""
        self._say(f"qapollo: skipped {where}step {self.opt.step_count + 1}: {reason}")
        if self.guard.skip():
            raise TrainError(f"{self.guard.in_row} micro-batches in a row skipped by the spike guard (last: {reason}): "
                             f"the run has diverged; lower optim.lr or lengthen optim.warmup_steps")

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.model.eval()
        losses = []
        batches = self.data.val_batches(self.cfg.eval.batch_size)
        for x in batches[self.dist.rank::self.dist.world]:  # ranks share the batches, then sum
            x = x.to(self.device)
            losses.append(causal_lm_loss(self.model, x).float().item())
        self.model.train()
        total, count = self.dist.sum(sum(losses), len(losses))
        loss = total / max(1, count)
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}

    def samples(self) -> list[dict]:
        """Greedy continuations of eval.sample_prompts (generate.py): what the model writes at this step."""
        from .generate import generate
        e = self.cfg.eval
        return [{k: r[k] for k in ("prompt", "completion")}
                for r in (generate(self.model, self.data.tokenizer, p, e.sample_tokens) for p in e.sample_prompts)]

    def _guarded_step(self) -> float | None:
        """train_step with the state marked dirty until it completes: a half-applied step is never saved."""
        self.dirty_step = self.opt.step_count + 1
        try:
            loss = self.train_step()
        except BaseException as e:  # any exception between the first batch and the end of the update
            err = on_step_failure(self, e)  # says what happened and where a resume continues
            if err is e:
                raise
            raise err from e
        self.dirty_step = None
        return loss

    # ---- the loop ------------------------------------------------------------------------------
    def _install_signal_handlers(self) -> None:
        def handler(signum, frame):
            self.stop_requested = True  # finish the current step, save, exit
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                signal.signal(s, handler)
            except ValueError:  # not in the main thread (e.g. called from a test thread)
                pass

    def fit(self) -> dict:
        from . import testhook
        t = self.cfg.train
        self._install_signal_handlers()
        testhook.install(self)  # test-only crash points; a no-op unless QAPOLLO_TEST_HOOK is set
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        n = count_params(self.model)
        self._say(f"qapollo: {n['total'] / 1e6:.1f}M params ({n['int8'] / 1e6:.1f}M int8) on {self.device}, "
                  f"run dir {self.run_dir}")
        start = self.opt.step_count
        if start >= t.max_steps:
            self._say(f"qapollo: already at step {start} (train.max_steps={t.max_steps}): nothing to train; "
                      f"raise train.max_steps to continue")
            return {"step": start, "loss": float("nan"), "tokens": self.tokens_seen}
        bar = tqdm(total=t.max_steps, initial=start, desc="Update steps", ncols=100,
                   disable=not (self.progress and self.dist.is_main), dynamic_ncols=False)
        t_last, tok_last = time.perf_counter(), self.tokens_seen
        loss = float("nan")
        record = {}
        while self.opt.step_count < t.max_steps and not self.dist.any(self.stop_requested):
            lr = self.opt.current_lr()
            step_loss = self._guarded_step()
            if step_loss is None:  # every micro-batch skipped: nothing changed, draw the next ones
                continue
            loss = step_loss
            step = self.opt.step_count
            bar.update(1)
            if step % t.log_every == 0 or step == t.max_steps or step == start + 1 or self._eval_due(step):
                now = time.perf_counter()
                tps = (self.tokens_seen - tok_last) / max(now - t_last, 1e-9)
                t_last, tok_last = now, self.tokens_seen
                record = {"step": step, "loss": loss, "lr": lr, "tokens": self.tokens_seen,
                          "tokens_per_s": tps, "peak_mem_bytes": peak_mem_bytes(self.device),
                          "rss_bytes": rss_bytes(), "skips": self.guard.skips}
                if self._eval_due(step):
                    record.update(self.evaluate())
                    if self.cfg.eval.sample_prompts and self.dist.is_main:
                        record["samples"] = self.samples()
                    self.last_eval = record
                self.metrics.write(record)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}",
                                mem=f"{record['peak_mem_bytes'] / 2**30:.2f}G")
            if t.replica_check_every and (step % t.replica_check_every == 0 or step == start + 1):
                self._check_replicas(step)
            if self._save_due(step):
                self.save()
        bar.close()
        self.save()
        self.metrics.close()
        return {"step": self.opt.step_count, "loss": loss, "tokens": self.tokens_seen, **record}

    def _eval_due(self, step: int) -> bool:
        e = self.cfg.eval.every
        return e > 0 and (step % e == 0 or step == self.cfg.train.max_steps)

    def _save_due(self, step: int) -> bool:
        s = self.cfg.train.save_every
        return s > 0 and step % s == 0 and step < self.cfg.train.max_steps

    def save(self) -> None:
        """Write a checkpoint of the current step (checkpoint/saving.py; refused while dirty_step is set):
        replicas checked, rank 0 writes, the other ranks wait for it."""
        from . import checkpoint
        self._check_replicas(self.opt.step_count)
        outcome, failure = None, None
        if self.dist.is_main:
            try:
                outcome = ("saved", checkpoint.save(self))
            except Exception as e:  # the other ranks wait in the broadcast below: they must learn of it too
                if not self.dist.enabled:
                    raise
                outcome, failure = ("failed", str(e).splitlines()[0] if str(e) else type(e).__name__), e
        outcome = self.dist.broadcast_object(outcome)
        if failure is not None:
            raise failure
        if outcome[0] == "failed":
            raise TrainError(f"rank 0 could not save the checkpoint, so rank {self.dist.rank} stops too: {outcome[1]}")
        self.checkpoint_path = outcome[1]

    def _check_replicas(self, step: int) -> None:
        """Several ranks: stop (ReplicaMismatch) unless every rank holds the same weights; once per step."""
        if self.cfg.train.replica_check_every and self._checked_at != step:
            self.dist.check_replicas(self.model, step)
            self._checked_at = step


def train(cfg: Config, progress: bool = True) -> dict:
    trainer = Trainer(cfg, progress)
    try:
        trainer.setup()
        return trainer.fit()
    finally:
        trainer.dist.close()
