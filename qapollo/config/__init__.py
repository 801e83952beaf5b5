"""Run configuration: typed sections (sections.py), YAML files and dotted command-line overrides
(reading.py), validation (checks.py).

A config file has the sections `model`, `optim`, `train`, `data`, `eval`. This package imports nothing of
qapollo but the error base class (errors.py).
"""
from .checks import ConfigError, validate  # noqa: F401
from .reading import RENAMED, RETIRED, config_from_dict, explicit_keys, load_config, parse_override  # noqa: F401
from .sections import (ARCH_KEYS, DEFAULT_CONFIG, PRESET_8GB, SECTIONS, Config, DataConfig, EvalConfig,  # noqa: F401
                       ModelConfig, OptimConfig, TrainConfig, arch_dict, config_hash, flat_dict)
