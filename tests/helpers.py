"""Tiny configs and the live-memory measurement shared by the tests."""
import gc
import os

import torch

from qapollo.config import Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**over) -> Config:
    cfg = Config()
    m = cfg.model
    m.hidden_size, m.intermediate_size, m.num_hidden_layers, m.num_attention_heads = 128, 256, 2, 4
    m.vocab_size, m.max_position_embeddings = 512, 64
    cfg.optim.warmup_steps = 2
    cfg.optim.float_optim = "adamw"
    cfg.train.batch_size, cfg.train.seq_len, cfg.train.max_steps = 2, 16, 10
    for k, v in over.items():
        sec, key = k.split("__")
        setattr(getattr(cfg, sec), key, v)
    return cfg


def measured_peak(cfg, chunked: bool = True, steps: int = 2, held: list | None = None) -> int:
    """max over steps of (resident model + optimizer states) + peak live bytes during the step, with the
    config's micro-batches (train.grad_accum_steps, accum_mode). `held` collects, per step, whether any int8
    matrix held a gradient after the first micro-batch."""
    from qapollo.layerwise import LayerwiseOptimizer
    from qapollo.loss import causal_lm_loss
    from qapollo.memory import LiveTensorCounter, resident_tensor_bytes
    from qapollo.model import build_model, enable_activation_checkpointing, int8_modules
    t = cfg.train
    model = build_model(cfg.model, "cpu", seed=0)
    model.train()
    if cfg.model.activation_checkpointing:
        enable_activation_checkpointing(model)
    opt = LayerwiseOptimizer(model, cfg.optim, 10, seed=0, stochastic_round=True, accum_mode=t.accum_mode,
                             grad_accum_steps=t.grad_accum_steps)
    gen = torch.Generator().manual_seed(0)
    peaks = []
    for _ in range(steps):
        states = [getattr(u, "state", None) for u in opt.updaters.values()]
        states += [list(u.state_dict()[0].values()) for u in opt.updaters.values() if hasattr(u, "chunks")]
        base = resident_tensor_bytes(model, states)
        gc.collect()
        c = LiveTensorCounter()
        with c:
            for micro in range(t.grad_accum_steps):
                x = torch.randint(0, cfg.model.vocab_size, (t.batch_size, t.seq_len), generator=gen)
                opt.begin_step(last_micro=micro == t.grad_accum_steps - 1, check=False)
                loss = causal_lm_loss(model, x) if chunked else model(input_ids=x, labels=x).loss
                (loss / t.grad_accum_steps).backward()
                del loss
                opt.after_backward()
                if micro == 0 and held is not None:
                    held.append(any(m.weight_grad is not None for _, m in int8_modules(model)))
            opt.end_step()
        peaks.append(base + c.peak)
    return max(peaks)


def make_cfg(corpus, out, run="run", **over):
    cfg = tiny_config(**over)
    cfg.data.path, cfg.data.tokenizer = corpus["data.path"], corpus["data.tokenizer"]
    cfg.data.cache_dir, cfg.eval.tokens = corpus["data.cache_dir"], corpus["eval.tokens"]
    cfg.train.output_dir, cfg.train.run_name, cfg.train.log_every = str(out), run, 1
    return cfg


def run(cfg, resume=None):
    from qapollo.train import Trainer
    cfg.resume = resume
    tr = Trainer(cfg, progress=False)
    tr.setup()
    tr.fit()
    return tr
