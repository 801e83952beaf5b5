"""The device a run trains on, and how its memory allocator is set up before anything is allocated."""
from __future__ import annotations

import os

import torch

from .config import ConfigError

MiB = 1 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def pick_device(name: str) -> torch.device:
    """train.device (auto | cpu | cuda | cuda:N) as a torch device; CUDA asked for but absent is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but CUDA is not available; use train.device=cpu or auto")
    return torch.device(name)


def set_up_allocator(device: torch.device) -> None:
    """CUDA: expandable segments (before CUDA is initialised: fewer fragmentation out-of-memory errors).
    CPU: tune_cpu_allocator."""
    if device.type == "cuda":
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    else:
        tune_cpu_allocator()


def tune_cpu_allocator(mmap_threshold: int = 1 * MiB) -> bool:
    """glibc: serve every allocation ≥ `mmap_threshold` by its own mmap, returned to the OS on free.

    glibc's default threshold grows (up to 32 MiB) after each large free, after which the step's large
    transients (dequantized matrices, the float optimizer's fp32 copies) come from the heap and stay in
    the RSS. A fixed threshold keeps the peak RSS near the peak of live tensors; 1 MiB rather than 4 lets
    the 2 MiB activations of a 7B layer at seq 256 bypass the heap too (BENCHMARKS.md, 'Measurement
    notes moved from code comments'). No-op off glibc.
    """
    try:
        import ctypes
        import ctypes.util
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
        libc.mallopt(_M_TRIM_THRESHOLD, int(2 * mmap_threshold))
        return ok
    except (OSError, AttributeError):
        return False
