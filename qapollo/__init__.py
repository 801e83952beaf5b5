"""qapollo: pre-train LLaMA with int8 weights, stochastic rounding and APOLLO / APOLLO-Mini updates inside backward.

The Python API (README, 'Python API'; docs/architecture.md): `config_for`, `prepare`, `save`, `load` (api.py),
`build`, `attach`, `micro_batch`, `optimizer_step` (engine.py), `trainer_kwargs` for transformers' Trainer
(hf_trainer.py), `load_config`, `read_config`, `QapolloError`. Names are imported on first use, so that
`qapollo` on the command line starts without loading torch and transformers.
"""
import importlib

_EXPORTS = {"config_for": "api", "prepare": "api", "save": "api", "load": "api",
            "build": "engine", "attach": "engine", "micro_batch": "engine", "optimizer_step": "engine",
            "trainer_kwargs": "hf_trainer", "InBackwardOptimizer": "hf_trainer",
            "load_config": "config", "Config": "config", "read_config": "checkpoint", "QapolloError": "errors"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'qapollo' has no attribute {name!r}")
    return getattr(importlib.import_module(f"qapollo.{_EXPORTS[name]}"), name)
