"""Open a trained model for inference: a run dir (its newest intact checkpoint), a checkpoint-<step> dir,
or a Hugging Face folder of a family qapollo trains (families.py) — what `qapollo eval`, `qapollo generate`
and the lm-eval harness read.

A checkpoint is opened exactly as trained (int8 weights, its tokenizer, its seq_len); an HF folder with its
own class (LlamaForCausalLM, Qwen3ForCausalLM, ...) in float, or with `--int8` quantized the way
model.init_from does.
"""
from __future__ import annotations

import os

import torch

from .device import pick_device
from .errors import EvalError
from .tokenizer import load_tokenizer


def load_checkpoint_model(spec: str, device: torch.device, dtype: str | None):
    """(model, tokenizer, seq_len, checkpoint path) of a run dir or checkpoint-<step> dir."""
    from .checkpoint import find_checkpoint, load_model_tensors, read_config
    from .hf_import import checkpoint_tokenizer
    from .model import build_model
    ckpt = find_checkpoint(spec)
    cfg = read_config(ckpt)
    tok = checkpoint_tokenizer(ckpt, cfg)  # before the model is built: one line for a tokenizer that does not fit
    if dtype:
        cfg.model.dtype = dtype
    model = build_model(cfg.model, device, init=False)
    load_model_tensors(model, os.path.join(ckpt, "model.safetensors"))
    return model, tok, cfg.train.seq_len, ckpt


def load_hf_model(path: str, device: torch.device, dtype: str | None, int8: bool, group_size: int,
                  progress: bool):
    """(model, tokenizer spec, seq_len) of an HF LLaMA folder: float via transformers, or int8 as init_from."""
    from .config import Config
    from .hf_import import apply_shape, check_tensors, check_tokenizer, load_weights, read_shape, scan_tensors
    from .model import build_model, resolve_dtype
    cfg = Config()
    m = cfg.model
    m.init_from, m.dtype, m.weight_quant, m.group_size = path, dtype or "auto", int8, group_size
    cfg.train.seq_len = 2  # evaluate() checks its seq_len against the model's context
    apply_shape(cfg, read_shape(path), f"{path}/config.json")
    # the folder's tokenizer, with the model's vocabulary (eval and generate take no other)
    check_tokenizer(cfg, path, other=" (the tokenizer the model was trained with; `qapollo export` writes it)")
    seq_len = min(cfg.model.max_position_embeddings, 2048)
    if int8:
        found = scan_tensors(path)
        check_tensors(path, found, cfg.model)
        model = build_model(cfg.model, device, init=False)
        load_weights(model, found, progress)
        return model, path, seq_len
    from .families import model_class
    model = model_class(cfg.model.architecture).from_pretrained(path, dtype=resolve_dtype(cfg.model.dtype, device))
    model = model.to(device)
    return model, path, seq_len


def load_for_eval(spec: str, device: str = "auto", dtype: str | None = None, int8: bool = False,
                  group_size: int = 128, progress: bool = True):
    """(model in eval mode, tokenizer, default seq_len, checkpoint path or None) of a run dir, a
    checkpoint-<step> dir or an HF LLaMA folder: what `qapollo eval` and `qapollo generate` read."""
    dev = pick_device(device)
    ckpt = None
    if os.path.isdir(spec) and os.path.isfile(os.path.join(spec, "config.json")):
        model, tok_spec, default_len = load_hf_model(spec, dev, dtype, int8, group_size, progress)
        tok = load_tokenizer(tok_spec)
    elif os.path.isdir(spec):
        if int8:
            raise EvalError("--int8 is for Hugging Face folders: a checkpoint is evaluated as it was trained")
        model, tok, default_len, ckpt = load_checkpoint_model(spec, dev, dtype)
    else:
        raise EvalError(f"{spec}: no such run dir, checkpoint-<step> dir or Hugging Face model folder")
    model.eval()
    return model, tok, default_len, ckpt


