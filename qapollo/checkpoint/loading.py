"""Loading: the first valid checkpoint of a list, then its tensors into a built model (exactly: model,
optimizer state, RNG); what the rest of the run needs comes back as the saved record."""
from __future__ import annotations

import json
import os
import random

import numpy as np
import torch

from .files import CheckpointError, IncompatibleCheckpoint, open_safetensors, say
from .validation import read_config, validate


def first_valid(ckpts: list[str], cfg, model_state: dict, optimizer_spec: dict) -> tuple[str, dict] | None:
    """(checkpoint, its trainer_state.json) of the first of `ckpts` that validates against the built
    model and optimizer (validation.validate), falling back past broken ones with a warning; None when
    `ckpts` is empty. An intact checkpoint of another shape is an error at once."""
    for i, ckpt in enumerate(ckpts):
        try:
            return ckpt, validate(ckpt, cfg, model_state, optimizer_spec)
        except IncompatibleCheckpoint:
            raise
        except CheckpointError as e:
            if i + 1 == len(ckpts):
                raise
            say(f"warning: {e}; falling back to {ckpts[i + 1]}")
    return None


LOAD_BATCH_BYTES = 512 << 20


@torch.no_grad()
def load_model_tensors(model, path: str, batch_bytes: int = LOAD_BATCH_BYTES) -> None:
    """Copy every tensor of `path` into the model, reopening the file every `batch_bytes`.

    safe_open memory-maps the file and the pages read stay in the process's RSS until it is closed: one
    open for a 7B checkpoint (6.9 GB) would add the whole file on top of the model. Closing it every
    512 MiB keeps that to one batch.
    """
    items = list(model.state_dict().items())
    i = 0
    while i < len(items):
        with open_safetensors(path) as f:
            done = 0
            while i < len(items) and done < batch_bytes:
                k, dst = items[i]
                dst.copy_(f.get_tensor(k))
                done += dst.numel() * dst.element_size()
                i += 1


@torch.no_grad()
def load(ckpt: str, model) -> tuple[dict[str, torch.Tensor], dict]:
    """A validated checkpoint into the process: the model's tensors (in place) and the RNG states. Returns
    the optimizer state (tensors keyed `<tensor name>.<key>`, the layout) for the optimizer to load."""
    load_model_tensors(model, os.path.join(ckpt, "model.safetensors"))
    optimizer_state = read_optimizer(os.path.join(ckpt, "optimizer.safetensors"))
    load_rng(os.path.join(ckpt, "rng_state.safetensors"))
    return optimizer_state


def saved_accumulation(ckpt: str, record: dict) -> dict:
    """The accumulation the checkpoint's optimizer state was measured with (its trainer_state.json record);
    for checkpoints written before the record was kept, from its config, with tokens_per_step None."""
    if record.get("accumulation") is not None:
        return record["accumulation"]
    saved = read_config(ckpt).train
    return {"accum_mode": saved.accum_mode, "grad_accum_steps": saved.grad_accum_steps, "tokens_per_step": None}


def read_optimizer(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    with open_safetensors(path) as f:
        layout = json.loads(f.metadata()["layout"])
        # copy=True: get_tensor may map the file, which must not stay mapped (rotation deletes it)
        tensors = {f"{name}.{k}": f.get_tensor(f"{name}.{k}").to(copy=True)
                   for name, entry in layout.items() for k in entry["tensors"]}
    return tensors, layout


def load_rng(path: str) -> None:
    with open_safetensors(path) as f:
        meta = f.metadata()
        keys = set(f.keys())
        torch.set_rng_state(f.get_tensor("torch_cpu"))
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                if f"torch_cuda_{i}" in keys:
                    torch.cuda.set_rng_state(f.get_tensor(f"torch_cuda_{i}"), i)
        kind, pos, has_gauss, gauss = json.loads(meta["numpy"])
        np.random.set_state((kind, f.get_tensor("numpy_keys").numpy().astype(np.uint32), pos, has_gauss, gauss))
        version, gauss_next = json.loads(meta["python"])
        random.setstate((version, tuple(int(x) for x in f.get_tensor("python_state").tolist()), gauss_next))
