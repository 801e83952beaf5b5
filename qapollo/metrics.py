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


class MetricsLog:
    """Appends JSON lines; the file survives resumes (a resumed run continues the same file)."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after `step` (a resumed run re-logs the steps after its checkpoint)."""
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            keep = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= step]
        with open(self.path, "w") as f:
            f.writelines(keep)


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(ln) for ln in f if ln.strip()]
