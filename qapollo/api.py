"""The Python API: qapollo in your own training loop (and, through hf_trainer.py, in transformers' Trainer).

The same code the app runs, called directly: a run config for your model (`config_for`), your
LlamaForCausalLM made int8 with the in-backward APOLLO optimizer attached (`prepare`: model.quantize_ +
engine.attach), the app's step bookkeeping (`opt.begin_step` / `opt.after_backward` / `opt.end_step`, or
engine.micro_batch), and qapollo checkpoints (`save` / `load`: checkpoint/, the format `qapollo eval`,
`qapollo export` and `qapollo train --resume` read).

    cfg = qapollo.config_for(model, lr=3e-3, max_steps=1000, grad_accum_steps=4)
    opt = qapollo.prepare(model, cfg)
    for step in range(cfg.train.max_steps):
        for micro in range(4):
            opt.begin_step(last_micro=micro == 3)  # the weights update inside the backward below
            loss = model(input_ids=x, labels=x).loss
            (loss / 4).backward()
            opt.after_backward()
        opt.end_step()  # the lr schedule advances once per optimizer step
    qapollo.save("runs/mine", model, opt, cfg, tokenizer)
"""
from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import fields

from . import checkpoint
from .config import ConfigError, config_from_dict
from .config.sections import SECTIONS
from .engine import attach
from .hf_import import SHAPE_KEYS, shape_from_config
from .layerwise import LayerwiseOptimizer
from .model import quantize_
from .tokenizer import HFTokenizer, Tokenizer


def config_for(model, **settings):
    """A run config for `model` (a transformers LlamaForCausalLM): its shape from model.config, any key of
    the model, optim or train sections by its name (lr=3e-3, max_steps=1000, grad_accum_steps=4,
    accum_mode="lagged", name="apollo", rank=256, group_size=128, ...), every other key at its default."""
    where = {k: s for s in ("model", "optim", "train") for k in (f.name for f in fields(SECTIONS[s]))}
    unknown = sorted(set(settings) - set(where))
    if unknown:
        raise ConfigError(f"qapollo.config_for: unknown setting {unknown[0]!r}; use a key of the model, optim or "
                          f"train section (docs: README, 'Configuration')")
    shape = shape_from_config(model.config.to_dict(), "the model's config")
    for k in set(settings) & set(SHAPE_KEYS):
        if settings[k] != shape[k]:
            raise ConfigError(f"qapollo.config_for: {k}={settings[k]!r} but the model has {k}={shape[k]!r}; the "
                              f"model's config sets its shape")
    sections: dict = {"model": dict(shape)}
    for k, v in settings.items():
        sections.setdefault(where[k], {})[k] = v
    train = sections.setdefault("train", {})  # the default sequence length, when the model's context is shorter
    train.setdefault("seq_len", min(SECTIONS["train"]().seq_len, shape["max_position_embeddings"]))
    return config_from_dict(sections)


def prepare(model, cfg) -> LayerwiseOptimizer:
    """Make `model` int8 in place (cfg.model.weight_quant; projections rounded to nearest) and attach the
    in-backward optimizer of cfg.optim with its lr schedule over cfg.train.max_steps: from now on each
    backward updates the weights, between `opt.begin_step` and `opt.after_backward`."""
    if cfg.model.lean_head:
        raise ConfigError("qapollo.prepare: model.lean_head is for models qapollo builds (qapollo.build); a "
                          "transformers model keeps its float embedding and lm_head")
    if cfg.model.weight_quant:
        quantize_(model, cfg.model)
    return attach(model, cfg)


def tokens_per_step(cfg) -> int:
    t = cfg.train
    return t.batch_size * t.seq_len * t.grad_accum_steps


def save(run_dir: str, model, opt: LayerwiseOptimizer, cfg, tokenizer=None, keep: int = 0, **record) -> str:
    """A qapollo checkpoint of the current step under run_dir (checkpoint-<step>, `latest`; `keep` > 0 keeps
    that many); `record`: more JSON-able fields for trainer_state.json (tokens_seen, data_cursor, ...).

    `tokenizer` (qapollo's, or a transformers tokenizer) is saved in the checkpoint's tokenizer/ and named in
    its config.yaml (data.tokenizer), so that `qapollo eval`, `generate`, `export` and `train --resume` use it;
    without one, trainer_state.json records that none was given (`"tokenizer": null`) and those commands
    refuse a tokenizer that does not fit the model."""
    step = opt.step_count
    state = {"max_steps": cfg.train.max_steps, "tokens_seen": 0, "data_cursor": {}, "seed": cfg.train.seed,
             "metrics": None, "last_eval": None, "spike_guard": None,
             "accumulation": opt.accumulation(tokens_per_step(cfg)), **record}
    states = {"model": model.state_dict(), "optimizer": opt.state_dict(), "trainer": state}
    with tempfile.TemporaryDirectory() as tmp:
        tok = _as_tokenizer(tokenizer, tmp)
        if tok is not None and cfg.data.tokenizer is None:
            cfg = copy.deepcopy(cfg)
            cfg.data.tokenizer = str(tok.name_or_path)
        return checkpoint.save(run_dir, step, states, config=cfg, tokenizer=tok, keep=keep)


def _as_tokenizer(tokenizer, tmp: str) -> Tokenizer | None:
    """qapollo's Tokenizer of what save() was given: a transformers tokenizer is written to `tmp` and read
    back as qapollo reads a tokenizer folder (its name stays the one it was loaded from)."""
    if tokenizer is None or isinstance(tokenizer, Tokenizer):
        return tokenizer
    if not hasattr(tokenizer, "save_pretrained"):
        raise ConfigError(f"qapollo.save: tokenizer must be a qapollo or transformers tokenizer, got "
                          f"{type(tokenizer).__name__}")
    tokenizer.save_pretrained(tmp)
    tok = HFTokenizer(tmp)
    tok.name_or_path = getattr(tokenizer, "name_or_path", None) or tmp
    return tok


def load(path: str, model, opt: LayerwiseOptimizer, cfg) -> dict:
    """Continue from a qapollo checkpoint (a checkpoint-<step> folder, or a run dir: its newest intact one):
    the model's tensors, the optimizer's states and step, the RNG states; returns its trainer_state.json."""
    ckpt = checkpoint.find_checkpoint(os.path.expanduser(path))
    _, record = checkpoint.first_valid([ckpt], cfg, model.state_dict(), opt.state_spec())
    opt.load_state_dict(*checkpoint.load(ckpt, model))
    opt.adopt_accumulation(checkpoint.saved_accumulation(ckpt, record), opt.accumulation(tokens_per_step(cfg)))
    opt.step_count = record["global_step"]
    return record
