"""Metrics: one JSON line per logged step in metrics.jsonl, and peak-memory readings."""
from __future__ import annotations

import json
import os
import resource
import sys
import uuid

import torch

from .errors import QapolloError


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB, macOS bytes)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def rss_bytes() -> int | None:
    """Current resident set size (Linux /proc/self/statm: resident pages); None where unavailable."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def peak_mem_bytes(device: torch.device) -> int:
    """CUDA: max_memory_allocated (what the planner predicts); CPU: peak RSS of the process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return peak_rss_bytes()


class MetricsError(QapolloError, RuntimeError):
    """A metrics sink that cannot be used; the message says how to fix it."""


def require_tensorboard():
    """torch's SummaryWriter class; a one-line error when the optional tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise MetricsError("train.tensorboard=true needs the tensorboard package: pip install tensorboard "
                           "(or pip install -e '.[tensorboard]'), or set train.tensorboard=false") from None
    return SummaryWriter


def require_wandb():
    """The wandb module; a one-line error when the optional package is missing."""
    try:
        import wandb
    except ImportError:
        raise MetricsError("train.wandb=true needs the wandb package: pip install wandb (or pip install -e "
                           "'.[wandb]'), or set train.wandb=false") from None
    if os.environ.get("WANDB_MODE", "").lower() not in ("offline", "disabled", "dryrun") and \
            os.environ.get("WANDB_DISABLED", "").lower() not in ("true", "1"):
        try:  # before the run starts, not at its first record: a missing login must not cost a step
            wandb.login(verify=False)  # the environment's or ~/.netrc's key (a terminal is asked for one)
        except (wandb.errors.UsageError, wandb.errors.AuthenticationError) as e:
            raise MetricsError(f"train.wandb=true: W&B has no login ({e}); run `wandb login` or set WANDB_API_KEY, "
                               f"or log offline with WANDB_MODE=offline (then `wandb sync`), or set train.wandb=false"
                               ) from None
    return wandb


def _numbers(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class WandbSink:
    """Weights & Biases: the numeric fields of each record at its step, and eval samples as a table.

    Started at the first record (a run refused during setup leaves no W&B run). The run id is kept in
    <run dir>/wandb_id, so a resumed run continues the same W&B run; W&B ignores steps below the last one it
    has, so steps re-run after a crash show in metrics.jsonl and TensorBoard only. WANDB_MODE=offline
    writes the run under <run dir>/wandb/ for a later `wandb sync`.
    """

    def __init__(self, run_dir: str, project: str, name: str, config: dict):
        self.wandb = require_wandb()
        self.run_dir, self.project, self.name, self.config = run_dir, project, name, config
        self.run = None

    def log(self, record: dict) -> None:
        if self.run is None:
            id_file = os.path.join(self.run_dir, "wandb_id")
            run_id = open(id_file).read().strip() if os.path.exists(id_file) else uuid.uuid4().hex[:12]
            self.run = self.wandb.init(project=self.project, name=self.name, id=run_id, resume="allow",
                                       config=self.config, dir=self.run_dir)
            with open(id_file, "w") as f:
                f.write(run_id + "\n")
        data = _numbers(record)
        if record.get("samples"):
            rows = [[s["prompt"], s["completion"]] for s in record["samples"]]
            data["samples"] = self.wandb.Table(columns=["prompt", "completion"], data=rows)
        self.run.log(data, step=record.get("step"))

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class MetricsLog:
    """Appends JSON lines; the file survives resumes (a resumed run continues the same file).

    With `tensorboard_dir`, every numeric field of each record also goes to TensorBoard as a scalar at
    global step `step` (eval samples as text); a resume hides the events logged after its checkpoint
    (purge_step), as it truncates the JSON lines. With `wandb` (a WandbSink) the same goes to W&B.
    """

    def __init__(self, path: str, tensorboard_dir: str | None = None, wandb: WandbSink | None = None):
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.tensorboard_dir = tensorboard_dir
        self._writer_cls = require_tensorboard() if tensorboard_dir else None
        self._writer = None
        self._purge_step = None
        self.wandb = wandb

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._writer_cls is not None:
            self._tensorboard(record)
        if self.wandb is not None:
            self.wandb.log(record)

    def _tensorboard(self, record: dict) -> None:
        if self._writer is None:  # created lazily: purge_step is known only after resume
            self._writer = self._writer_cls(self.tensorboard_dir, purge_step=self._purge_step)
        step = record.get("step")
        for k, v in _numbers(record).items():
            self._writer.add_scalar(k, v, global_step=step)
        if record.get("samples"):  # markdown: the prompt in bold, then what the model wrote
            text = "\n\n".join(f"**{s['prompt']}**{s['completion']}" for s in record["samples"])
            self._writer.add_text("samples", text, global_step=step)
        self._writer.flush()  # one flush per logged step: the event file is complete for readers

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self.wandb is not None:
            self.wandb.close()

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after `step` (a resumed run re-logs the steps after its checkpoint)."""
        self._purge_step = step + 1
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            keep = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= step]
        with open(self.path, "w") as f:
            f.writelines(keep)


class NullMetrics:
    """The metrics sink of ranks other than 0: one writer per run, so they log nothing."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass

    def truncate_after(self, step: int) -> None:
        pass


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(ln) for ln in f if ln.strip()]
