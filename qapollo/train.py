"""The training loop: data → model → in-backward optimizer → metrics, eval and checkpoints.

The Trainer wires the components and owns the run's counters; each component owns its state (the model
its tensors, the optimizer its updaters' states, the data loader its cursor, the spike guard its window,
the metrics log its file). A checkpoint is the mapping of those states (`states`), written and read by
checkpoint/ without knowing any of them.
"""
from __future__ import annotations

import math
import os
import time

import torch
from tqdm import tqdm

from . import checkpoint, distributed, testhook
from .config import Config, explicit_keys, flat_dict
from .data import build_data, repeat_note
from .decode import generate
from .device import pick_device, set_up_allocator
from .engine import build, optimizer_step
from .failures import StepFailed, TrainError, on_step_failure  # noqa: F401 (StepFailed: callers import it from here)
from .guard import SpikeGuard
from .hf_import import check_resumed_tokenizer, load_weights, resolve_init_from, resumed_config
from .loss import causal_lm_loss
from .metrics import MetricsLog, NullMetrics, WandbSink, peak_mem_bytes, require_tensorboard, require_wandb, rss_bytes
from .model import count_params
from .optim.schedule import lr_at, lr_notes
from .planner import advice, fmt, one_line, predict_peak
from .stops import Interrupted, StopSignals
from .tokenizer import check_vocab, load_tokenizer


class Trainer:
    def __init__(self, cfg: Config, progress: bool = True):
        self.cfg = cfg
        self.progress = progress
        # torchrun: one data-parallel replica per process (distributed.py); a no-op in a plain process
        self.dist = distributed.init(pick_device(cfg.train.device))
        self.device = self.dist.device
        self.run_dir = os.path.join(cfg.train.output_dir, cfg.train.run_name)
        self.stop_requested = False  # set by the first SIGINT/SIGTERM (stop_signal: which one)
        self.stop_signal: int | None = None
        self.tokens_seen = 0
        self.last_eval = None
        self.plan = None
        self.checkpoint_path = None  # the checkpoint the state in memory was saved to or resumed from
        # the step under way, from its first batch until its update is complete: while set, the in-memory
        # state may be half-updated (in-backward updates) and every save refuses it (checkpoint.save)
        self.dirty_step: int | None = None
        self._checked_at = None  # step of the last replica check

    def _say(self, msg: str) -> None:
        if self.dist.is_main:  # one writer: rank 0 prints, logs and saves
            tqdm.write(msg)

    # ---- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        """Build the run (or refuse it); a refusal leaves no folder behind that the setup created."""
        new = []  # the run dir and those of its parents that do not exist yet, innermost first
        d = os.path.abspath(self.run_dir)
        while not os.path.exists(d) and os.path.dirname(d) != d:
            new.append(d)
            d = os.path.dirname(d)
        try:
            self._setup()
        except BaseException:
            for d in new:
                if os.path.isdir(d) and not os.listdir(d):
                    os.rmdir(d)
            raise

    def _setup(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        if t.tensorboard:
            require_tensorboard()  # fail before anything is built
        if t.wandb:
            require_wandb()
        init_from = resolve_init_from(cfg, self.run_dir)  # model shape from an HF folder (or its checkpoint)
        self._keep_lean_optim()
        self._plan_memory()
        self._note_lr()
        # before anything is built: refuse a fresh run over checkpoints, or a resume with another shape,
        # an output folder that cannot be written or lacks room for one checkpoint, another tokenizer
        resume_from = checkpoint.resume_candidates(cfg, self.run_dir)
        checkpoint.check_output_dir(self.run_dir, self.plan)
        tok = load_tokenizer(cfg.data.tokenizer)
        check_resumed_tokenizer(resume_from, tok, cfg.model.vocab_size)
        check_vocab(tok, cfg.model.vocab_size)
        torch.manual_seed(t.seed)
        self._build_data(tok)
        self.model, self.opt = build(cfg, self.device, reducer=self.dist.grad_averager(), init=init_from is None)
        if init_from is not None:
            load_weights(self.model, init_from, progress=self.progress and self.dist.is_main)
        self.guard = SpikeGuard(t.skip_spikes, t.spike_sigma, t.spike_window, t.max_skips_in_row)
        wandb = WandbSink(self.run_dir, t.wandb_project, t.run_name, cfg.to_dict()) if t.wandb else None
        self.metrics = MetricsLog(os.path.join(self.run_dir, "metrics.jsonl"),
                                  tensorboard_dir=os.path.join(self.run_dir, "tb") if t.tensorboard else None,
                                  wandb=wandb) if self.dist.is_main else NullMetrics()
        self._resume(resume_from)
        self._check_replicas(self.opt.step_count)  # same seed, same checkpoint: identical from the start

    def _keep_lean_optim(self) -> None:
        """A resume keeps how the lean embedding / lm_head were optimized (optim.lean_optim) unless the config
        sets it; a set value that differs is refused by the compatibility check."""
        cfg = self.cfg
        if cfg.model.lean_head and "optim.lean_optim" not in explicit_keys(cfg):
            saved = resumed_config(cfg, self.run_dir)
            if saved is not None:
                cfg.optim.lean_optim = saved.optim.lean_optim

    def _build_data(self, tok) -> None:
        cfg, t = self.cfg, self.cfg.train
        with self.dist.rank_zero_first():  # rank 0 tokenizes into the cache, the others then read it
            self.data = build_data(cfg.data, seq_len=t.seq_len, batch_size=t.batch_size, seed=t.seed,
                                   eval_tokens=cfg.eval.tokens, tokenizer=tok, rank=self.dist.rank,
                                   world_size=self.dist.world)
        if cfg.eval.every > 0:
            self.data.check_eval_tokens()
        note = repeat_note(self.data.info, self.tokens_per_step, t.max_steps)
        if note:
            self._say(note)
        self.dist.check_same({**flat_dict(cfg), "resume": cfg.resume, "data cache key": self.data.train.key,
                              "train tokens": self.data.info["n_train_tokens"], "torch": torch.__version__})

    @property
    def tokens_per_step(self) -> int:
        t = self.cfg.train
        return t.batch_size * t.seq_len * t.grad_accum_steps * self.dist.world

    def _plan_memory(self) -> None:
        """Print the planner's peak; refuse a CUDA run predicted not to fit the device (planner.py)."""
        self.plan = plan = predict_peak(self.cfg, self.device.type, world_size=self.dist.world)
        self._say(one_line(plan, str(self.device)))
        set_up_allocator(self.device)  # before CUDA is initialised
        if self.device.type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory
            if plan["peak_bytes"] + plan["context_bytes"] > total:
                raise TrainError(f"predicted peak {fmt(plan['peak_bytes'])} + {fmt(plan['context_bytes'])} CUDA "
                                 f"context exceeds {torch.cuda.get_device_name(self.device)}'s {fmt(total)}: "
                                 f"{advice(plan)} (see `qapollo plan`)")

    def _note_lr(self) -> None:
        """Say so when a peak lr is far from the rule for this width (from scratch: above it; continuing a
        trained model: above or below) or the warmup does not suit the run (schedule.lr_notes)."""
        m, o = self.cfg.model, self.cfg.optim
        if o.name != "adamw":
            for note in lr_notes(m.hidden_size, o.lr, o.float_lr,
                                 continued=m.init_from is not None, warmup_steps=o.warmup_steps, beta2=o.beta2,
                                 max_steps=self.cfg.train.max_steps):
                self._say(f"qapollo: note: {note}")

    # ---- state: what a checkpoint holds ------------------------------------------------------------
    def states(self) -> dict:
        """The named states of the run's components, as checkpoint.save takes them."""
        step, o, t = self.opt.step_count, self.cfg.optim, self.cfg.train
        record = {
            "max_steps": t.max_steps,
            "tokens_seen": self.tokens_seen,
            "lr_schedule": {"position": step, "next_lr": self.opt.current_lr(), "lr": o.lr,
                            "warmup_steps": o.warmup_steps, "max_steps": t.max_steps, "min_lr_ratio": o.min_lr_ratio},
            "data_cursor": self.data.train.state_dict(),
            "seed": t.seed,
            "metrics": {"file": "../metrics.jsonl", "last_step": step},
            "last_eval": self.last_eval,
            "spike_guard": self.guard.state_dict(),
            # what the lagged step size and the limiter's reference were measured on (_adopt_accumulation)
            "accumulation": self.opt.accumulation(self.tokens_per_step),
        }
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "trainer": record}

    def _resume(self, ckpts: list[str]) -> None:
        """Load the first valid checkpoint of `ckpts` into the built components ([]: a fresh run)."""
        found = checkpoint.first_valid(ckpts, self.cfg, self.model.state_dict(), self.opt.state_spec())
        if found is None:
            self.metrics.truncate_after(0)  # a run that crashed before its first checkpoint left lines
            return
        ckpt, record = found
        t0 = time.perf_counter()
        if record["data_cursor"]:
            self.data.train.load_state_dict(record["data_cursor"])  # first: raises on other data settings
        else:  # a checkpoint of the Python API (qapollo.save): its data was never qapollo's to track
            checkpoint.say(f"note: {ckpt} holds no data position (saved by qapollo.save): the data starts from its "
                           f"beginning")
        self.opt.load_state_dict(*checkpoint.load(ckpt, self.model))
        self._adopt_accumulation(ckpt, record)
        self.opt.step_count = record["global_step"]
        self.tokens_seen = record["tokens_seen"]
        self.last_eval = record.get("last_eval")
        if record.get("spike_guard"):
            self.guard.load_state_dict(record["spike_guard"])
        self.metrics.truncate_after(record["global_step"])
        self.checkpoint_path = ckpt
        checkpoint.say(f"resumed from {ckpt} at step {record['global_step']} ({record['tokens_seen']} tokens seen, "
                       f"loaded in {time.perf_counter() - t0:.2f}s)")
        lr_of = lambda c: lr_at(self.opt.step_count, c.optim.lr, c.optim.warmup_steps, c.train.max_steps,  # noqa: E731
                                c.optim.min_lr_ratio)
        for line in checkpoint.resume_notes(checkpoint.read_config(ckpt), self.cfg, self.opt.step_count, lr_of):
            checkpoint.say(line)  # one line per setting this resume changes

    def _adopt_accumulation(self, ckpt: str, record: dict) -> None:
        """Resuming with other accumulation settings than the checkpoint's (layerwise.adopt_accumulation)."""
        now, then = self.opt.accumulation(self.tokens_per_step), checkpoint.saved_accumulation(ckpt, record)
        if self.opt.adopt_accumulation(then, now):
            same_tokens = then["tokens_per_step"] == now["tokens_per_step"]
            checkpoint.say(
                f"note: {ckpt} was trained with train.accum_mode={then['accum_mode']}, train.grad_accum_steps="
                f"{then['grad_accum_steps']}, {then['tokens_per_step']} tokens per step; now {now['accum_mode']}, "
                f"{now['grad_accum_steps']}, {now['tokens_per_step']}: the next step measures its own lagged step "
                f"size{'' if same_tokens else ' and the norm limiter starts afresh'}")

    def save(self) -> None:
        """Write a checkpoint of the current step (checkpoint/saving.py; refused while dirty_step is set):
        replicas checked, rank 0 writes, the other ranks wait for it."""
        self._check_replicas(self.opt.step_count)
        outcome, failure = None, None
        if self.dist.is_main:
            try:
                path = checkpoint.save(self.run_dir, self.opt.step_count, self.states(), config=self.cfg,
                                       tokenizer=self.data.tokenizer, keep=self.cfg.train.keep_checkpoints,
                                       incomplete_step=self.dirty_step, last_saved=self.checkpoint_path)
                outcome = ("saved", path)
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

    # ---- one optimizer step --------------------------------------------------------------------
    def train_step(self) -> float | None:
        """One optimizer step over grad_accum_steps micro-batches (engine.optimizer_step); the mean loss of
        those trained on, or None when the spike guard skipped all of them (nothing changed, not counted)."""
        t = self.cfg.train
        skipped = []

        def batches():
            while True:
                yield next(self.data.train).to(self.device, non_blocking=True)

        def on_skip(reason: str, micro: int) -> None:
            skipped.append(micro)
            self._skip(reason, micro)
        # the guard decides before backward, on the mean loss over the ranks (a device sync per micro-batch),
        # so that every rank takes the same decision and keeps the same window
        loss = optimizer_step(self.model, self.opt, batches(), t.grad_accum_steps,
                              check=self.opt.step_count == 0 and t.check_updates, guard=self.guard,
                              value_of=self.dist.mean, on_skip=on_skip)
        self.tokens_seen += (t.grad_accum_steps - len(skipped)) * t.batch_size * t.seq_len * self.dist.world
        return loss

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

    def _guarded_step(self) -> float | None:
        """train_step with the state marked dirty until it completes: a half-applied step is never saved."""
        self.dirty_step = self.opt.step_count + 1
        try:
            loss = self.train_step()
        except BaseException as e:  # any exception between the first batch and the end of the update
            # says what happened and where a resume continues
            err = on_step_failure(e, self.dirty_step, self.run_dir, self.cfg, self.device, self.plan)
            if err is e:
                raise
            raise err from e
        self.dirty_step = None
        return loss

    # ---- eval ------------------------------------------------------------------------------------
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
        """Greedy continuations of eval.sample_prompts (decode.py): what the model writes at this step."""
        e = self.cfg.eval
        return [{k: r[k] for k in ("prompt", "completion")}
                for r in (generate(self.model, self.data.tokenizer, p, e.sample_tokens) for p in e.sample_prompts)]

    # ---- the loop ------------------------------------------------------------------------------
    def _on_stop_signal(self, signum: int) -> str:
        """The first SIGINT/SIGTERM (stops.py): finish the step under way, save, end; says which step."""
        self.stop_requested, self.stop_signal = True, signum
        return f"stopping after step {self.dirty_step or self.opt.step_count}, then saving"

    def fit(self) -> dict:
        """Train to train.max_steps, or until a SIGINT/SIGTERM; put the signal handlers found back after."""
        stops = StopSignals(self._on_stop_signal, say=self.dist.is_main)
        stops.install()
        try:
            return self._fit()
        except Interrupted as e:  # a second signal: nothing saved, the last complete checkpoint is kept
            raise e.naming(checkpoint.resume_target(self.run_dir)) from None
        finally:
            stops.restore()

    def _fit(self) -> dict:
        t = self.cfg.train
        testhook.install(self.opt)  # test-only crash points; a no-op unless QAPOLLO_TEST_HOOK is set
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
        self._last_log = (time.perf_counter(), self.tokens_seen)
        loss, record = float("nan"), {}
        while self.opt.step_count < t.max_steps and not self.dist.any(self.stop_requested):
            lr = self.opt.current_lr()
            step_loss = self._guarded_step()
            if step_loss is None:  # every micro-batch skipped: nothing changed, draw the next ones
                continue
            loss, step = step_loss, self.opt.step_count
            bar.update(1)
            if step % t.log_every == 0 or step == t.max_steps or step == start + 1 or self._eval_due(step):
                record = self._log(step, loss, lr, bar)
            if t.replica_check_every and (step % t.replica_check_every == 0 or step == start + 1):
                self._check_replicas(step)
            if self._save_due(step):
                self.save()
        bar.close()
        self.save()
        self.metrics.close()
        # the step saved, not the last one logged; `signal`: what stopped the run before train.max_steps
        stopped = self.stop_signal if self.opt.step_count < t.max_steps else None
        return {**record, "step": self.opt.step_count, "loss": loss, "tokens": self.tokens_seen,
                "checkpoint": self.checkpoint_path, "signal": stopped}

    def _log(self, step: int, loss: float, lr: float, bar) -> dict:
        """One metrics record (with eval and samples when due), to metrics.jsonl and the progress bar."""
        now, (t_last, tok_last) = time.perf_counter(), self._last_log
        tps = (self.tokens_seen - tok_last) / max(now - t_last, 1e-9)
        self._last_log = (now, self.tokens_seen)
        record = {"step": step, "loss": loss, "lr": lr, "tokens": self.tokens_seen, "tokens_per_s": tps,
                  "peak_mem_bytes": peak_mem_bytes(self.device), "rss_bytes": rss_bytes(), "skips": self.guard.skips}
        if self._eval_due(step):
            record.update(self.evaluate())
            if self.cfg.eval.sample_prompts and self.dist.is_main:
                record["samples"] = self.samples()
            self.last_eval = record
        self.metrics.write(record)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}",
                        mem=f"{record['peak_mem_bytes'] / 2**30:.2f}G")
        return record

    def _eval_due(self, step: int) -> bool:
        e = self.cfg.eval.every
        return e > 0 and (step % e == 0 or step == self.cfg.train.max_steps)

    def _save_due(self, step: int) -> bool:
        s = self.cfg.train.save_every
        return s > 0 and step % s == 0 and step < self.cfg.train.max_steps


def train(cfg: Config, progress: bool = True) -> dict:
    trainer = Trainer(cfg, progress)
    try:
        trainer.setup()
        return trainer.fit()
    finally:
        trainer.dist.close()
