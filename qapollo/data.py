"""Data: text sources -> token cache -> packed, shuffled, resumable LongTensor batches.

Sources (data config):
  path     local files: .txt, .jsonl/.json (one JSON object a line, `text_field`), .parquet; optionally
           .gz/.xz/.bz2; globs; several separated by commas (or a list).
  dataset  anything `datasets.load_dataset(dataset, config, split=split, streaming=streaming)` takes:
           a hub name (e.g. `allenai/c4`, config `en`, streaming=True, max_tokens=N for online users),
           a local folder of jsonl/parquet/txt files, or a folder written by `save_to_disk`.
  neither  the shipped public-domain corpus (qapollo/assets/corpus): *.train.txt.xz for training,
           *.validation.txt.xz (whole held-out works) for validation.

Documents: a .txt file gives one document per blank-line-separated paragraph (one paragraph is the
unit every text file has; the packing below keeps neighbouring paragraphs together anyway); a jsonl
line, parquet row or dataset row gives one document (local files are read by textfiles.py).

Token stream: each document is `<s> tokens </s>`, as LLaMA was trained and as the exported HF
tokenizer (add_bos_token) encodes prompts, so EOS always sits between two documents. The stream is
tokenized once into a cache folder `<cache_dir>/<key>/` (`train.bin`, `validation.bin`: flat uint16
or uint32 arrays, memory-mapped; `meta.json`), built in a temp folder and renamed into place, so a
crash never leaves half a cache. The key hashes the source (paths + sizes + mtimes, or dataset
name/config/split), the tokenizer file and the settings; the next run with the same key starts at once.

Tokenizing uses data.num_proc threads (default: one per core) with a progress bar in tokens/s, and
gives the same cache for any num_proc (pretokenize.py). A list of {path, weight} mappings in data.path is
a weighted mixture of sources, each with its own cache (mixture.py).

Packing: the train stream is cut into seq_len blocks, no padding (the tail shorter than one block is
dropped). Block order is shuffled with numpy's Generator seeded by (seed, epoch), a new permutation
each epoch. Validation: the first ceil(eval_tokens / seq_len) blocks of the validation stream, never
shuffled. A source without a validation split holds out the last eval_tokens (whole blocks) of its
train stream instead.
"""

import glob
import hashlib
import json
import logging
import os
import shutil
import time
from types import SimpleNamespace
from typing import Iterator

import numpy as np
import torch

from qapollo.mixture import MixtureLoader, apportion, mixture_entries, mixture_validation
from qapollo.pretokenize import default_num_proc, write_tokens
from qapollo.textfiles import DataError, iter_file_documents, resolve_paths
from qapollo.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

CORPUS_DIR = os.path.join(os.path.dirname(__file__), "assets", "corpus")
CACHE_VERSION = 1  # bump when the cache layout or document rules change
VAL_CAP = 1 << 20  # validation tokens cached (or eval_tokens if larger): enough for any usual eval budget
REPEAT_NOTE = 4  # the trainer says so when a run would pass over its train tokens more often than this


# ---------------------------------------------------------------------------------------------------
# sources: what to read for each split, and the cache-key description of it


def _file_stamp(paths: list[str]) -> list:
    return [[os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns] for p in paths]


def _is_saved_dataset(d: str) -> bool:
    return os.path.isdir(d) and any(os.path.exists(os.path.join(d, f)) for f in ("dataset_dict.json", "state.json"))


class _Source:
    """description (for the cache key and logs) + a document iterator per split; None = no such split."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.field = getattr(cfg, "text_field", None) or "text"
        path, dataset = getattr(cfg, "path", None), getattr(cfg, "dataset", None)
        if path and dataset:
            raise DataError("set data.path or data.dataset, not both")
        if dataset:
            self.kind = "dataset"
            name, conf, split = dataset, getattr(cfg, "config", None), getattr(cfg, "split", None) or "train"
            self.streaming = bool(getattr(cfg, "streaming", False))
            local = os.path.exists(os.path.expanduser(name))
            stamp = _file_stamp(resolve_paths(os.path.join(os.path.expanduser(name), "**", "*"))) if local else None
            self.key = {"dataset": name, "config": conf, "split": split, "streaming": self.streaming, "files": stamp}
            self.desc = f"dataset {name}" + (f" ({conf})" if conf else "") + f" split {split}"
            self.name, self.conf, self.split = os.path.expanduser(name) if local else name, conf, split
        else:
            self.kind = "files"
            self.streaming = False
            default = not path
            train = resolve_paths(path) if path else sorted(glob.glob(os.path.join(CORPUS_DIR, "*.train.txt*")))
            val = sorted(glob.glob(os.path.join(CORPUS_DIR, "*.validation.txt*"))) if default else []
            if default and not (train and val):
                raise DataError(f"the shipped corpus is missing from {CORPUS_DIR}; reinstall qapollo or set data.path")
            self.files = {"train": train, "validation": val}
            self.key = {"files": _file_stamp(train), "val_files": _file_stamp(val)}
            self.desc = "default corpus (qapollo/assets/corpus)" if default else f"files {path}"

    def documents(self, split: str) -> Iterator[str] | None:
        if self.kind == "files":
            files = self.files[split]
            return iter_file_documents(files, self.field) if files else None
        ds = self._load(self.split if split == "train" else "validation")
        if ds is None:
            return None
        cols = ds.column_names
        if cols is not None and self.field not in cols:
            raise DataError(f"{self.desc}: no {self.field!r} column (found {cols}); set data.text_field")
        return (t for batch in ds.iter(batch_size=1000) for t in batch[self.field] if t and t.strip())

    def _load(self, split: str):
        import datasets

        if _is_saved_dataset(self.name):  # written by save_to_disk: load_dataset cannot read it
            d = datasets.load_from_disk(self.name)
            if isinstance(d, datasets.DatasetDict):
                if split not in d:
                    if split == self.split:
                        raise DataError(f"{self.desc}: no split {split!r} (has {list(d)}); set data.split")
                    return None
                d = d[split]
            elif split != self.split:
                return None
            return d.to_iterable_dataset() if self.streaming else d
        try:
            return datasets.load_dataset(self.name, self.conf, split=split, streaming=self.streaming)
        except ValueError as e:  # datasets raises ValueError for an unknown split
            if split != self.split and "split" in str(e).lower():
                return None
            raise DataError(f"{self.desc}: {e}") from None
        except FileNotFoundError as e:
            raise DataError(f"data.dataset {self.name!r} not found ({e}); give a local folder or a hub name (online)") from None
        except ConnectionError as e:  # offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE, or no network)
            when = "each time it is streamed" if self.streaming else "once (then datasets caches it)"
            raise DataError(f"{self.desc}: {e}: a hub data set needs the network {when}; go online, or save it "
                            f"with Dataset.save_to_disk and set data.dataset to that folder") from None


# ---------------------------------------------------------------------------------------------------
# the token cache


def default_cache_dir() -> str:
    return os.environ.get("QAPOLLO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qapollo", "tokens")


def _tokenizer_stamp(tok: Tokenizer) -> str:
    """Hash of the tokenizer's files, so a retrained tokenizer at the same path gets a new cache."""
    h = hashlib.sha256()
    f = getattr(tok, "model_file", None)
    if f is None and os.path.isdir(str(tok.name_or_path)):
        f = os.path.join(tok.name_or_path, "tokenizer.json")
    if f and os.path.isfile(f):
        h.update(open(f, "rb").read())
    else:  # hub tokenizer: name + vocabulary
        h.update(f"{tok.name_or_path}:{tok.vocab_size}".encode())
    h.update(f"{tok.bos_id}:{tok.eos_id}".encode())
    return h.hexdigest()


def _build_cache(src: _Source, tok: Tokenizer, final: str, max_tokens: int | None, val_cap: int,
                 num_proc: int) -> dict:
    from tqdm.auto import tqdm

    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    tmp = f"{final}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    t0 = time.time()
    try:
        meta = {"version": CACHE_VERSION, "dtype": np.dtype(dtype).name, "source": src.desc, "key": src.key,
                "tokenizer": tok.name_or_path, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id}
        for split, cap in (("train", max_tokens), ("validation", val_cap)):
            docs = src.documents(split)
            if docs is None:
                continue
            total = cap if split == "train" else None  # the validation cap is rarely reached
            with tqdm(total=total, unit="tok", unit_scale=True, desc=f"tokenizing {split}", mininterval=1.0) as bar:
                meta[f"n_{split}"] = write_tokens(docs, tok, os.path.join(tmp, f"{split}.bin"), dtype, cap, bar,
                                                  num_proc)
        if meta.get("n_train", 0) == 0:
            raise DataError(f"{src.desc} gave no text; check data.path / data.dataset and data.text_field")
        meta["build_s"] = round(time.time() - t0, 2)
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        try:
            os.replace(tmp, final)  # atomic: the cache folder exists only when complete
        except OSError:  # another process finished the same cache first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _memmap(path: str, dtype: str, n: int) -> np.ndarray:
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype=dtype)


# ---------------------------------------------------------------------------------------------------
# packing and loading


class BlockLoader:
    """Infinite iterator over [batch_size, seq_len] blocks of a flat token array, in a seeded order.

    Position counts blocks into the current epoch's permutation, so a batch that crosses an epoch
    end takes the rest of this epoch and the start of the next: no block is skipped or repeated.

    With `world_size` ranks, each draw takes the next world_size·batch_size blocks (the global batch) and
    rank r keeps rows r·batch_size … (r+1)·batch_size: disjoint shards whose union is exactly what one
    process with batch world_size·batch_size reads. The cursor is global (the same on every rank), so a
    checkpoint resumes with any number of ranks: the block order stays the same, only its grouping into
    steps changes.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, key: str,
                 rank: int = 0, world_size: int = 1):
        self.seq_len, self.batch_size, self.seed, self.key = seq_len, batch_size, seed, key
        self.rank, self.world_size = rank, world_size
        self.n_blocks = len(tokens) // seq_len
        self.blocks = tokens[: self.n_blocks * seq_len].reshape(self.n_blocks, seq_len)
        self.tokens_per_epoch = self.n_blocks * seq_len
        self.epoch, self.position = 0, 0
        self._perm, self._perm_epoch = None, -1

    def _order(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n_blocks)
            self._perm_epoch = self.epoch
        return self._perm

    def __iter__(self):
        return self

    def take(self, want: int) -> np.ndarray:
        """The next `want` blocks of the global order, [want, seq_len] int64 (advances the cursor)."""
        parts, n = [], 0
        while n < want:
            if self.position == self.n_blocks:
                self.epoch, self.position = self.epoch + 1, 0
            take = min(want - n, self.n_blocks - self.position)
            parts.append(self._order()[self.position : self.position + take])
            self.position += take
            n += take
        idx = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return self.blocks[idx].astype(np.int64)

    def __next__(self) -> torch.Tensor:
        rows = self.take(self.batch_size * self.world_size)
        return torch.from_numpy(rows[self.rank * self.batch_size : (self.rank + 1) * self.batch_size])  # this rank's

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "seq_len": self.seq_len,
                "n_blocks": self.n_blocks, "cache_key": self.key}

    def load_state_dict(self, d: dict) -> None:
        mine = self.state_dict()
        for k in ("cache_key", "seq_len", "n_blocks"):
            if d.get(k) != mine[k]:
                raise DataError(
                    f"data cursor was saved for {k}={d.get(k)!r} but this run has {k}={mine[k]!r}: the checkpoint was "
                    "made with other data, tokenizer or seq_len; resume with the same data settings or start a new run")
        if not 0 <= int(d["position"]) <= self.n_blocks:
            raise DataError(f"data cursor position {d['position']} is outside 0..{self.n_blocks}")
        self.seed, self.epoch, self.position = int(d["seed"]), int(d["epoch"]), int(d["position"])


class Data:
    """What build_data returns: tokenizer, train loader, fixed validation batches and a summary."""

    def __init__(self, tokenizer, train, val_tokens, seq_len, eval_tokens, info):
        self.tokenizer, self.train, self.info = tokenizer, train, info
        self._val, self.seq_len, self.eval_tokens = val_tokens, seq_len, eval_tokens

    def check_eval_tokens(self) -> None:
        """eval.tokens must fit the held-out tokens: a smaller eval would be reported under a budget it never had."""
        need = -(-self.eval_tokens // self.seq_len) * self.seq_len  # whole blocks
        if need > len(self._val):
            fit = len(self._val) // self.seq_len * self.seq_len
            raise DataError(f"eval.tokens={self.eval_tokens} needs {need} held-out tokens but the held-out data "
                            f"({self.info['validation']}) has {len(self._val)}: set "
                            f"eval.tokens={fit} or less (whole blocks of train.seq_len {self.seq_len}), or add "
                            f"validation data")

    def val_batches(self, batch_size: int) -> list[torch.Tensor]:
        """The first ceil(eval_tokens / seq_len) validation blocks, in order: the same every call."""
        n = min(-(-self.eval_tokens // self.seq_len), len(self._val) // self.seq_len)
        blocks = torch.from_numpy(self._val[: n * self.seq_len].astype(np.int64)).view(n, self.seq_len)
        return list(blocks.split(batch_size))


def _load_source(cfg, tok: Tokenizer, seq_len: int, eval_tokens: int, hold_blocks: int) -> SimpleNamespace:
    """One source's token cache (tokenized first if missing): its train and held-out tokens, memory-mapped.

    A source without a validation split holds out the last `hold_blocks` blocks of its train stream."""
    src = _Source(cfg)
    max_tokens = getattr(cfg, "max_tokens", None)
    if src.streaming and not max_tokens:
        raise DataError(f"{src.desc} is streamed: set data.max_tokens (e.g. 100_000_000) to bound how much is tokenized")
    val_cap = max(VAL_CAP, int(eval_tokens))
    key_src = {"v": CACHE_VERSION, "src": src.key, "tok": _tokenizer_stamp(tok), "field": src.field,
               "max_tokens": max_tokens, "val_cap": val_cap}
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:20]
    root = os.path.expanduser(getattr(cfg, "cache_dir", None) or default_cache_dir())
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, key)
    t0 = time.time()
    if os.path.exists(os.path.join(final, "meta.json")):
        meta, hit = json.load(open(os.path.join(final, "meta.json"))), True
        log.info("token cache hit: %s", final)
    else:
        num_proc = getattr(cfg, "num_proc", None) or default_num_proc()
        log.info("tokenizing %s with %s into %s (%d threads)", src.desc, tok.name_or_path, final, num_proc)
        meta, hit = _build_cache(src, tok, final, max_tokens, val_cap, num_proc), False
    build_s = 0.0 if hit else time.time() - t0
    train = _memmap(os.path.join(final, "train.bin"), meta["dtype"], meta["n_train"])
    if "n_validation" in meta:
        val = _memmap(os.path.join(final, "validation.bin"), meta["dtype"], meta["n_validation"])
        held_out = "validation split"
    else:  # no validation split: hold out the tail of the train stream, whole blocks
        n_hold = hold_blocks * seq_len
        if n_hold >= len(train):
            raise DataError(f"{src.desc} has {len(train)} tokens, too few to hold out eval.tokens={eval_tokens} for "
                            f"validation; add data or lower eval.tokens well below {len(train)}")
        train, val = train[: len(train) - n_hold], train[len(train) - n_hold :]
        held_out = f"last {n_hold} train tokens"
    return SimpleNamespace(train=train, val=val, key=key, desc=src.desc, held_out=held_out, cache_dir=final,
                           hit=hit, build_s=build_s)


def build_data(cfg, seq_len: int, batch_size: int, seed: int = 0, eval_tokens: int = 65536,
               tokenizer: Tokenizer | None = None, rank: int = 0, world_size: int = 1) -> Data:
    """Tokenize (or find in the cache) the configured source(s) and return loaders over them (rank's shard).

    `tokenizer`: one already loaded from cfg.tokenizer (the trainer checks it before anything is tokenized).
    """
    if seq_len < 1 or batch_size < 1:
        raise DataError(f"seq_len ({seq_len}) and batch_size ({batch_size}) must be positive")
    mix = mixture_entries(cfg)  # checked before anything is tokenized
    tok = tokenizer or load_tokenizer(getattr(cfg, "tokenizer", None))
    entries, weights = mix if mix else ([cfg], [1.0])
    holds = apportion(-(-int(eval_tokens) // seq_len), weights)  # eval blocks per source
    parts = [_load_source(e, tok, seq_len, eval_tokens, h) for e, h in zip(entries, holds)]
    if mix is None:
        p = parts[0]
        loader, val, desc, held_out = BlockLoader(p.train, seq_len, batch_size, seed, p.key, rank, world_size), \
            p.val, p.desc, p.held_out
        if loader.n_blocks < batch_size * world_size:
            what = f"{batch_size}" if world_size == 1 else f"{world_size} ranks × {batch_size}"
            raise DataError(f"{desc} has {len(p.train)} train tokens = {loader.n_blocks} blocks of seq_len {seq_len}, "
                            f"fewer than one batch of {what}; add data or lower train.batch_size / train.seq_len")
        blocks = loader.n_blocks
    else:
        sources = [BlockLoader(p.train, seq_len, 1, seed, p.key) for p in parts]
        for p, b in zip(parts, sources):
            if b.n_blocks == 0:
                raise DataError(f"{p.desc} has {len(p.train)} train tokens, less than one block of seq_len {seq_len}: "
                                f"add data to it or remove it from the data.path mixture")
        loader = MixtureLoader(sources, weights, seq_len, batch_size, rank, world_size)
        val = mixture_validation([p.val for p in parts], weights, seq_len, eval_tokens)
        desc = f"mixture of {len(parts)} sources"
        held_out = "each source's share of its " + " / ".join(p.held_out for p in parts)
        blocks = sum(b.n_blocks for b in sources)
    info = {"source": desc, "tokenizer": tok.name_or_path, "vocab_size": tok.vocab_size,
            "n_train_tokens": int(sum(len(p.train) for p in parts)), "n_val_tokens": int(len(val)),
            "validation": held_out, "train_blocks": blocks,
            "cache_dir": parts[0].cache_dir if mix is None else [p.cache_dir for p in parts],
            "cache_hit": all(p.hit for p in parts), "cache_build_s": round(sum(p.build_s for p in parts), 2),
            "sources": [{"source": p.desc, "weight": w, "n_train_tokens": int(len(p.train))}
                        for p, w in zip(parts, weights)]}
    log.info("data: %s", info)
    return Data(tok, loader, val, seq_len, int(eval_tokens), info)


def repeat_note(info: dict, tokens_per_step: int, max_steps: int) -> str | None:
    """A line for the trainer when the run would pass over its train tokens (of the most-repeated source of
    a mixture) more than REPEAT_NOTE times; None otherwise. Repeating a small corpus that often teaches a
    model to recite it, and the validation loss stops meaning much."""
    total = tokens_per_step * max_steps
    src = max(info["sources"], key=lambda s: s["weight"] / max(1, s["n_train_tokens"]))
    passes = total * src["weight"] / max(1, src["n_train_tokens"])
    if passes <= REPEAT_NOTE:
        return None
    of = f" (weight {src['weight']:.3g} of the mixture)" if len(info["sources"]) > 1 else ""
    return (f"qapollo: note: {max_steps:,} steps × {tokens_per_step:,} tokens = {_count(total)} tokens pass over the "
            f"{_count(src['n_train_tokens'])} train tokens of {src['source']}{of} about {passes:,.0f} times: the "
            f"model will learn to recite them. Point data.path at your own files (.txt/.jsonl/.parquet, globs, or "
            f"a weighted list) or data.dataset at a datasets name or folder (README: 'Pre-train on real data')")


def _count(n: int) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)
