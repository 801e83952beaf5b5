"""The checkpoint format on disk: safetensors written tensor by tensor, fsynced text, the folder names.

Nothing is pickled: tensors go to safetensors, the rest to JSON/YAML (see the package docstring).
"""
from __future__ import annotations

import json
import os
import re
import struct
import sys
import zlib

import numpy as np
import torch

from ..errors import QapolloError

SCHEMA = 1


CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}


TENSOR_FILES = ("model.safetensors", "optimizer.safetensors", "rng_state.safetensors")


class CheckpointError(QapolloError, RuntimeError):
    """A checkpoint that cannot be saved, found or loaded; the message names the file and the problem."""


class IncompatibleCheckpoint(CheckpointError):
    """The checkpoint is intact but made with another model shape or optimizer: no fallback helps."""


class DiskSpaceError(CheckpointError):
    """Not enough free disk space for a checkpoint; nothing was written and earlier checkpoints are kept."""


def say(msg: str) -> None:
    from ..distributed import is_main
    if is_main():  # every rank resumes, rank 0 alone reports it
        print(f"qapollo: {msg}", file=sys.stderr, flush=True)


# ---- safetensors, written tensor by tensor -------------------------------------------------------
def write_safetensors(path: str, items, metadata: dict[str, str]) -> dict:
    """Write `items` = [(name, shape, dtype, get_tensor)] to `path` in the safetensors format.

    The header needs only shapes and dtypes, so each tensor is produced (and dropped) one at a time:
    an export never holds the whole model, a save never builds a second in-memory copy. Returns the
    manifest entry {bytes, crc32}. The file is fsynced before returning.
    """
    header, offset = {}, 0
    for name, shape, dtype, _ in items:
        n = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = metadata
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    hbytes += b" " * (-len(hbytes) % 8)  # the format pads the header to 8 bytes
    crc = 0
    with open(path, "wb") as f:
        for chunk in (struct.pack("<Q", len(hbytes)), hbytes):
            f.write(chunk)
            crc = zlib.crc32(chunk, crc)
        for name, shape, dtype, get in items:
            t = get()
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise CheckpointError(f"{path}: tensor {name} changed shape/dtype while saving")
            buf = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
            f.write(buf.data)
            crc = zlib.crc32(buf.data, crc)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": os.path.getsize(path), "crc32": crc}


def tensor_items(tensors: dict[str, torch.Tensor]):
    return [(k, tuple(v.shape), v.dtype, (lambda v=v: v)) for k, v in tensors.items()]


def open_safetensors(path: str):
    from safetensors import safe_open
    try:
        return safe_open(path, framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error type for a bad header
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None


def file_crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every checkpoint-<step> folder, newest step first."""
    if not os.path.isdir(run_dir):
        return []
    out = [(int(m.group(1)), os.path.join(run_dir, d)) for d in os.listdir(run_dir)
           if (m := CKPT_RE.match(d)) and os.path.isdir(os.path.join(run_dir, d))]
    return sorted(out, reverse=True)
