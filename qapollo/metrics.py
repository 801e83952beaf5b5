"""Metrics: one JSON line per logged step in metrics.jsonl, and peak-memory readings."""
from __future__ import annotations

import json
import os
import resource
import sys

import torch


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


class MetricsError(RuntimeError):
    """A metrics sink that cannot be used; the message says how to fix it."""


def require_tensorboard():
    """torch's SummaryWriter class; a one-line error when the optional tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise MetricsError("train.tensorboard=true needs the tensorboard package: pip install tensorboard "
                           "(or pip install -e '.[tensorboard]'), or set train.tensorboard=false") from None
    return SummaryWriter


class MetricsLog:
    """Appends JSON lines; the file survives resumes (a resumed run continues the same file).

    With `tensorboard_dir`, every numeric field of each record also goes to TensorBoard as a scalar at
    global step `step`; a resume hides the events logged after its checkpoint (purge_step), as it
    truncates the JSON lines.
    """

    def __init__(self, path: str, tensorboard_dir: str | None = None):
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.tensorboard_dir = tensorboard_dir
        self._writer_cls = require_tensorboard() if tensorboard_dir else None
        self._writer = None
        self._purge_step = None

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._writer_cls is not None:
            self._tensorboard(record)

    def _tensorboard(self, record: dict) -> None:
        if self._writer is None:  # created lazily: purge_step is known only after resume
            self._writer = self._writer_cls(self.tensorboard_dir, purge_step=self._purge_step)
        step = record.get("step")
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                self._writer.add_scalar(k, v, global_step=step)
        self._writer.flush()  # one flush per logged step: the event file is complete for readers

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

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
