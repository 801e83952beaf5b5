"""Tokenizing a large local corpus into the token cache: tokens/s per core and peak RSS at several sizes.

    python benchmarks/tokenizing.py [--sizes 256MB,1GB] [--num-proc 1,2] [--dir /tmp/qapollo-tokbench] [--keep]

The corpus is generated (not committed): the shipped training text (14.7M characters), its paragraphs
shuffled with a new seed for every 64 MB file, as many files as the largest size needs; a size S uses
the first S / 64 MB files. Each (size, num_proc) builds a fresh cache with qapollo.data.build_data in its
own process, so that ru_maxrss is that build's peak: the main process (reads the files, writes the cache)
and, separately, the largest worker (encodes chunks). One JSON line per build, then a summary line.
"""
import os
import sys

import argparse
import glob
import json
import lzma
import resource
import shutil
import subprocess
import time

ROOT = __file__.rsplit("/benchmarks/", 1)[0]
sys.path.insert(0, ROOT)
FILE_BYTES = 64 << 20


def parse_size(s: str) -> int:
    s = s.strip().upper()
    for unit, mult in (("GB", 1 << 30), ("MB", 1 << 20)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def make_corpus(folder: str, total: int) -> list[str]:
    """Files of FILE_BYTES of shuffled shipped paragraphs, enough for `total` bytes (reused if present)."""
    import numpy as np
    os.makedirs(folder, exist_ok=True)
    n_files = -(-total // FILE_BYTES)
    paths = [os.path.join(folder, f"part{i:03d}.txt") for i in range(n_files)]
    if all(os.path.exists(p) and os.path.getsize(p) >= FILE_BYTES for p in paths):
        return paths
    text = "".join(lzma.open(f, "rt").read() for f in sorted(glob.glob(f"{ROOT}/qapollo/assets/corpus/*.train.txt.xz")))
    paras = [p.strip("\n") for p in text.split("\n\n") if p.strip()]
    for i, p in enumerate(paths):
        order = np.random.default_rng(i).permutation(len(paras))
        with open(p, "w") as f:
            n, k = 0, 0
            while n < FILE_BYTES:
                para = paras[order[k % len(paras)]] + "\n\n"
                f.write(para)
                n += len(para.encode())
                k += 1
    return paths


def one_build(files: list[str], num_proc: int, cache: str) -> dict:
    """Runs in its own process: build the cache, report time, tokens and peak RSS."""
    from types import SimpleNamespace

    from qapollo.data import build_data
    from qapollo.metrics import rss_bytes
    base = rss_bytes()  # after imports (torch, transformers' tokenizer code): the floor of any build
    cfg = SimpleNamespace(path=files, cache_dir=cache, num_proc=num_proc, tokenizer=None)
    t0 = time.perf_counter()
    d = build_data(cfg, seq_len=256, batch_size=1, eval_tokens=65536)
    wall = time.perf_counter() - t0
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    tokens = d.info["n_train_tokens"] + d.info["n_val_tokens"]
    cpu = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
    return {"bytes": sum(os.path.getsize(f) for f in files), "files": len(files), "num_proc": num_proc,
            "tokens": tokens, "wall_s": round(wall, 1), "tokens_per_s": round(tokens / wall),
            "tokens_per_s_per_core": round(tokens / wall / num_proc),
            # on a shared machine the wall clock counts cores taken by others; CPU seconds do not
            "tokens_per_cpu_s": round(tokens / cpu), "cores_busy": round(cpu / wall, 2),
            "main_cpu_s": round(me.ru_utime + me.ru_stime, 1), "workers_cpu_s": round(kids.ru_utime + kids.ru_stime, 1),
            "rss_after_imports_mib": round(base / 2**20, 1), "peak_rss_main_mib": round(me.ru_maxrss / 1024, 1),
            "peak_rss_worker_mib": round(kids.ru_maxrss / 1024, 1),
            "cache_mib": round(sum(os.path.getsize(f) for f in glob.glob(f"{d.info['cache_dir']}/*.bin")) / 2**20, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="256MB,1GB", help="corpus sizes (default %(default)s)")
    ap.add_argument("--num-proc", default="1,2", help="data.num_proc values (default %(default)s)")
    ap.add_argument("--dir", default="/tmp/qapollo-tokbench", help="where the generated text and caches go")
    ap.add_argument("--keep", action="store_true", help="keep the generated text (reused by the next run)")
    ap.add_argument("--one", nargs=3, metavar=("FILES_JSON", "NUM_PROC", "CACHE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:  # the child process of one build
        print(json.dumps(one_build(json.loads(args.one[0]), int(args.one[1]), args.one[2])))
        return 0
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    procs = [int(n) for n in args.num_proc.split(",")]
    files = make_corpus(os.path.join(args.dir, "text"), max(sizes))
    runs = []
    try:
        for size in sizes:
            for n in procs:
                cache = os.path.join(args.dir, "cache")
                shutil.rmtree(cache, ignore_errors=True)
                use = files[: -(-size // FILE_BYTES)]
                out = subprocess.run([sys.executable, __file__, "--one", json.dumps(use), str(n), cache],
                                     capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
                if out.returncode:
                    sys.exit(f"build of {size} bytes with num_proc {n} failed:\n{out.stderr[-3000:]}")
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(json.dumps(runs[-1]), flush=True)
    finally:
        shutil.rmtree(os.path.join(args.dir, "cache"), ignore_errors=True)
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    print(json.dumps({"summary": [{k: r[k] for k in ("bytes", "num_proc", "tokens_per_s_per_core", "tokens_per_cpu_s",
                                                      "peak_rss_main_mib", "peak_rss_worker_mib")} for r in runs],
                      "cpus": os.cpu_count(), "python": sys.version.split()[0]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
