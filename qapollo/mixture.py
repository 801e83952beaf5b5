"""Weighted mixtures of data sources: `data.path` as a list of `{path: ..., weight: ...}` mappings.

    data:
      path:
        - {path: /data/fineweb-edu/sample/10BT/*.parquet, weight: 0.7}
        - {path: /data/books/*.txt.xz, weight: 0.2}
        - {dataset: /data/code_saved, split: train, weight: 0.1}   # any data.dataset source

Weights are relative (0.7/0.3 or 7/3) and count tokens (every block is seq_len tokens). Each entry is
tokenized into its own cache (adding a source to a mixture re-tokenizes nothing else) and keeps its own
shuffled block order (data.BlockLoader). Which source gives the next block is decided slot by slot, with no
random draw: the source furthest behind its share (weight × blocks drawn so far − blocks it gave), ties to
the first listed, as Megatron-LM's blended datasets do. So after any number of blocks every source has
given its share to within one block, the order is the same on every machine, and the state is a count per
source: the checkpoint's data cursor holds those counts and each source's cursor, so a resumed run draws
exactly the batches the uninterrupted one would (tests/test_mixture.py).

Validation is the mixture too: ceil(eval.tokens / seq_len) blocks, split among the sources by weight
(largest remainder), each source's share taken from its validation split or held-out tail, in entry order.
"""
from __future__ import annotations

import hashlib
import json
import math
from types import SimpleNamespace

import numpy as np
import torch

from .textfiles import DataError

# Keys of one entry: its source (path or dataset, with the data keys that describe a source) and its weight.
# The other data keys (tokenizer, cache_dir, num_proc) are shared by every entry.
ENTRY_KEYS = ("path", "dataset", "config", "split", "streaming", "text_field", "max_tokens", "weight")
EXAMPLE = "data.path: [{path: 'web/*.parquet', weight: 0.7}, {path: 'books/*.txt', weight: 0.3}]"


def mixture_entries(cfg) -> tuple[list[SimpleNamespace], list[float]] | None:
    """(one data config per entry, normalized weights) of a mixture; None when data.path is not one."""
    path = getattr(cfg, "path", None)
    if not isinstance(path, list) or not any(isinstance(e, dict) for e in path):
        return None
    if not all(isinstance(e, dict) for e in path):
        raise DataError(f"data.path mixes file names and mappings: write every entry as {{path: ..., weight: ...}} "
                        f"({EXAMPLE})")
    if getattr(cfg, "dataset", None):
        raise DataError("data.dataset cannot be combined with a data.path mixture: make the dataset an entry "
                        "({dataset: NAME, weight: W})")
    out, weights = [], []
    for i, e in enumerate(path):
        where = f"data.path entry {i + 1} ({e})"
        bad = sorted(set(e) - set(ENTRY_KEYS))
        if bad:
            raise DataError(f"{where} has unknown key(s) {bad}; an entry takes {', '.join(ENTRY_KEYS)}")
        if ("path" in e) == ("dataset" in e) or not e.get("path", e.get("dataset")):
            raise DataError(f"{where} needs exactly one of path or dataset ({EXAMPLE})")
        w = e.get("weight")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not (w > 0 and math.isfinite(w)):
            raise DataError(f"{where} needs a weight > 0 (weights are relative: 0.7 and 0.3, or 7 and 3; {EXAMPLE})")
        shared = {k: getattr(cfg, k, None) for k in ("tokenizer", "cache_dir", "num_proc", "text_field", "split",
                                                        "streaming", "max_tokens", "config")}
        src = {**shared, "path": None, "dataset": None, **{k: v for k, v in e.items() if k != "weight"}}
        if src["dataset"] is None:  # the dataset-only keys do not describe files
            src.update(config=None, split="train", streaming=False)
        out.append(SimpleNamespace(**src))
        weights.append(float(w))
    total = sum(weights)
    return out, [w / total for w in weights]


def apportion(n: int, weights: list[float]) -> list[int]:
    """n split by weight into integers summing to n (largest remainder; ties to the first)."""
    quota = [w * n for w in weights]
    out = [math.floor(q) for q in quota]
    by_rest = sorted(range(len(weights)), key=lambda i: (-(quota[i] - out[i]), i))
    for i in by_rest[: n - sum(out)]:
        out[i] += 1
    return out


def mixture_validation(vals: list[np.ndarray], weights: list[float], seq_len: int, eval_tokens: int) -> np.ndarray:
    """Each source's share of the eval blocks, from the start of its held-out tokens, in entry order."""
    shares = apportion(-(-int(eval_tokens) // seq_len), weights)
    return np.concatenate([v[: k * seq_len] for v, k in zip(vals, shares)])


class MixtureLoader:
    """Infinite iterator over [batch_size, seq_len] blocks drawn from several BlockLoaders by weight.

    Like BlockLoader it draws world_size·batch_size blocks per batch (the global batch, in slot order) and
    keeps rank r's rows, so its cursor is global and resumes with any number of ranks.
    """

    def __init__(self, sources: list, weights: list[float], seq_len: int, batch_size: int,
                 rank: int = 0, world_size: int = 1):
        self.sources, self.weights = sources, list(weights)
        self.seq_len, self.batch_size, self.rank, self.world_size = seq_len, batch_size, rank, world_size
        self.counts = [0] * len(sources)
        desc = json.dumps([[s.key for s in sources], self.weights])
        self.key = "mix-" + hashlib.sha256(desc.encode()).hexdigest()[:20]

    def schedule(self, n: int) -> list[int]:
        """The sources of the next n slots (advances the counts)."""
        out = []
        for _ in range(n):
            drawn = sum(self.counts) + 1
            behind = [w * drawn - c for w, c in zip(self.weights, self.counts)]
            i = behind.index(max(behind))
            self.counts[i] += 1
            out.append(i)
        return out

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        src = np.asarray(self.schedule(self.batch_size * self.world_size))
        rows = np.empty((len(src), self.seq_len), dtype=np.int64)
        for i, s in enumerate(self.sources):
            slots = np.flatnonzero(src == i)
            if len(slots):  # every rank draws every slot, so the sources' cursors stay global
                rows[slots] = s.take(len(slots))
        return torch.from_numpy(rows[self.rank * self.batch_size:(self.rank + 1) * self.batch_size])

    def state_dict(self) -> dict:
        return {"mixture": True, "cache_key": self.key, "weights": self.weights, "counts": list(self.counts),
                "sources": [s.state_dict() for s in self.sources]}

    def load_state_dict(self, d: dict) -> None:
        if not d.get("mixture") or d.get("cache_key") != self.key:
            saved = f"a mixture with weights {d.get('weights')}" if d.get("mixture") else "a single source"
            raise DataError(f"data cursor was saved for {saved} but this run has a mixture with weights "
                            f"{[round(w, 6) for w in self.weights]} (or other data, tokenizer or seq_len): resume "
                            f"with the same data.path entries and weights, or start a new run")
        for s, sd in zip(self.sources, d["sources"]):
            s.load_state_dict(sd)
        self.counts = [int(c) for c in d["counts"]]
