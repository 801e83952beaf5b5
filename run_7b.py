#!/usr/bin/env python3
"""Pre-train LLaMA-7B with Q-APOLLO-Mini on one GPU (or, slowly, on the CPU).

    python run_7b.py                                   # the 7B recipe, configs/llama_7b.yaml
    python run_7b.py --config configs/llama_20m.yaml train.max_steps=100
    python run_7b.py --resume auto                     # continue the latest valid checkpoint

Same entry point as `qapollo train`.
"""
import sys

from qapollo.cli import DEFAULT_CONFIG, main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]], default_config=DEFAULT_CONFIG))
