"""Documents -> one flat token file, `<s> ids </s>` per document in document order, on every core.

The caller's thread reads the documents (local files or a `datasets` source) and cuts the stream into
chunks of about CHUNK_CHARS characters; the tokenizer library encodes each chunk on its own native
threads (sentencepiece: `num_threads`; an HF fast tokenizer: its own pool, sized by RAYON_NUM_THREADS, not
by num_threads). One helper thread encodes a chunk while the caller reads the next one and writes the one
before.
Chunks depend only on the documents and every document is encoded on its own, so the file is the same
byte for byte for any thread count (tests/test_data.py).

No worker process: a process pool re-imports the caller's `__main__` (forkserver, spawn), which hangs a
build started from `python -`, `python -c` or a notebook and re-runs a script without a main guard, and
forked from a process holding torch's threads it could stall for a minute.

Memory does not grow with the corpus: at most two chunks are in flight (a few MB of text and tokens), and
tokens go to disk as soon as their chunk is done.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator

import numpy as np

CHUNK_CHARS = 1 << 20  # characters of text per work item: ~250K tokens, large enough to hide the hand-off


def default_num_proc() -> int:
    """data.num_proc's default: one tokenizing thread per core this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


class _Encoder:
    """One chunk of documents -> their `<s> ids </s>` tokens as one array."""

    def __init__(self, tok, dtype, num_threads: int):
        self.tok, self.dtype, self.num_threads = tok, np.dtype(dtype), num_threads
        self.bos = [tok.bos_id] if tok.bos_id is not None and tok.bos_id >= 0 else []

    def __call__(self, docs: list[str]) -> np.ndarray:
        flat = []
        for ids in self.tok.encode_batch(docs, num_threads=self.num_threads):
            flat += self.bos
            flat += ids
            flat.append(self.tok.eos_id)
        return np.asarray(flat, dtype=self.dtype)


def chunks(docs: Iterable[str], chars: int) -> Iterator[list[str]]:
    """Consecutive runs of documents holding at least `chars` characters (the last one may hold fewer)."""
    batch, n = [], 0
    for doc in docs:
        batch.append(doc)
        n += len(doc)
        if n >= chars:
            yield batch
            batch, n = [], 0
    if batch:
        yield batch


def encoded_chunks(docs: Iterable[str], tok, dtype, num_threads: int) -> Iterator[np.ndarray]:
    """The token arrays of consecutive chunks, in order: chunk i is encoded while chunk i+1 is read."""
    enc = _Encoder(tok, dtype, max(1, num_threads))
    pool = ThreadPoolExecutor(1, thread_name_prefix="qapollo-tokenize")
    try:
        pending = None
        for c in chunks(docs, CHUNK_CHARS):
            nxt = pool.submit(enc, c)
            if pending is not None:
                yield pending.result()
            pending = nxt
        if pending is not None:
            yield pending.result()
    finally:  # also when the caller stops early (max_tokens reached) or on Ctrl-C: at most one chunk to finish
        pool.shutdown(wait=True, cancel_futures=True)


def write_tokens(docs: Iterable[str], tok, path: str, dtype, cap: int | None, bar, num_proc: int = 1) -> int:
    """Tokenize documents as <s> ids </s> into the file `path` (dtype per token) on num_proc threads; stop at
    cap tokens. Returns the number of tokens written; `bar` (tqdm) counts them, so it shows tokens/s."""
    n = 0
    gen = encoded_chunks(docs, tok, dtype, num_proc)
    try:
        with open(path, "wb") as f:
            for arr in gen:
                if cap is not None and n + len(arr) > cap:
                    arr = arr[: cap - n]
                f.write(arr.tobytes())
                n += len(arr)
                bar.update(len(arr))
                if cap is not None and n >= cap:
                    break
    finally:
        gen.close()  # ends the helper thread now, not when the generator is collected
    return n
