"""Loader throughput alone (no model): tokens/s of next(data.train), and the token cache build time.

    python benchmarks/data_loader.py [--seq-len 256] [--batch-size 8] [--batches 2000] [--fresh]

Compare tokens/s with the trainer's: the loader must be far faster so it is never the bottleneck.
--fresh builds the cache in a temporary folder to time tokenization of the default corpus.
"""

import argparse
import json
import sys
import tempfile
import time
from types import SimpleNamespace

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])

from qapollo.data import build_data  # noqa: E402


def loader_tokens_per_s(loader, n_batches: int) -> float:
    next(loader)  # first touch of the memory map
    t0 = time.perf_counter()
    n = sum(next(loader).numel() for _ in range(n_batches))
    return n / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--batches", type=int, default=2000)
    ap.add_argument("--path", default=None, help="data.path (default: the shipped corpus)")
    ap.add_argument("--fresh", action="store_true", help="build the cache from scratch in a temp dir")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = SimpleNamespace(path=args.path, cache_dir=tmp if args.fresh else None)
        t0 = time.perf_counter()
        data = build_data(cfg, seq_len=args.seq_len, batch_size=args.batch_size, seed=0)
        setup_s = time.perf_counter() - t0
        tps = loader_tokens_per_s(data.train, args.batches)
    info = data.info
    print(json.dumps({"source": info["source"], "n_train_tokens": info["n_train_tokens"],
                      "n_val_tokens": info["n_val_tokens"], "cache_hit": info["cache_hit"],
                      "cache_build_s": info["cache_build_s"], "setup_s": round(setup_s, 2),
                      "seq_len": args.seq_len, "batch_size": args.batch_size,
                      "loader_tokens_per_s": round(tps)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
