"""Tiny configs shared by the tests."""
from qapollo.config import Config


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
