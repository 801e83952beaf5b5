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
    from qapollo.engine import build, micro_batch
    from qapollo.meter import LiveTensorCounter, resident_tensor_bytes
    from qapollo.model import int8_modules
    t = cfg.train
    model, opt = build(cfg, "cpu")
    hf_loss = None if chunked else (lambda model, x: model(input_ids=x, labels=x).loss)
    gen = torch.Generator().manual_seed(0)
    peaks = []
    for _ in range(steps):
        base = resident_tensor_bytes(model, opt.resident_tensors())
        gc.collect()
        c = LiveTensorCounter()
        with c:
            for micro in range(t.grad_accum_steps):
                x = torch.randint(0, cfg.model.vocab_size, (t.batch_size, t.seq_len), generator=gen)
                micro_batch(model, opt, x, last=micro == t.grad_accum_steps - 1, accum=t.grad_accum_steps,
                            loss_fn=hf_loss)
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
