"""Documents -> one flat token file, `<s> ids </s>` per document in document order, on every core.

The main process reads the documents (local files or a `datasets` source) and cuts the stream into
chunks of about CHUNK_CHARS characters; `num_proc` worker processes encode the chunks; the main process
writes each chunk's tokens to the file in chunk order. Chunks depend only on the documents and every
document is encoded on its own, so the file is the same byte for byte for any num_proc (tests/test_data.py).

Memory does not grow with the corpus: at most 2·num_proc chunks are in flight (a few MB of text and
tokens), and tokens go to disk as soon as their chunk is done. `Pool.imap` would not do: it reads its
input as fast as it can, so a corpus faster to read than to encode would pile up in memory.

This module imports neither torch nor the rest of qapollo's training code, so a worker starts fast under
any multiprocessing start method (forkserver on Linux, spawn on macOS and Windows).
"""
from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
from collections import deque
from typing import Iterable, Iterator

import numpy as np

CHUNK_CHARS = 1 << 20  # characters of text per work item: ~250K tokens, large enough to hide the hand-off


def default_num_proc() -> int:
    """data.num_proc's default: one process per core this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


class _Encoder:
    """One chunk of documents -> their `<s> ids </s>` tokens as one array (single-threaded)."""

    def __init__(self, tok, dtype):
        self.tok, self.dtype = tok, np.dtype(dtype)
        self.bos = [tok.bos_id] if tok.bos_id is not None and tok.bos_id >= 0 else []

    def __call__(self, docs: list[str]) -> np.ndarray:
        flat = []
        for ids in self.tok.encode_batch(docs, num_threads=1):
            flat += self.bos
            flat += ids
            flat.append(self.tok.eos_id)
        return np.asarray(flat, dtype=self.dtype)


_worker: _Encoder | None = None  # the encoder of a worker process, built once by its initializer


def _init_worker(tok, dtype) -> None:
    global _worker
    # a forked worker inherits the parent's Python signal handlers (a trainer's SIGTERM handler only sets a
    # flag): then Pool.terminate() could not end a worker blocked writing its result, and the build would
    # hang. SIGTERM ends a worker; Ctrl-C is for the main process, which then terminates the pool.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: the pool is the parallelism
    _worker = _Encoder(tok, dtype)


def _encode_chunk(docs: list[str]) -> np.ndarray:
    return _worker(docs)


def _pool_context():
    """forkserver where there is one (Linux): workers fork from a clean server process, not from a process
    that holds torch's threads and locks (forked from the test suite's process after a few hundred tests,
    the first result took about 60 s instead of 1 s: tests/test_data.py); elsewhere the platform's default."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else None)


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


def encoded_chunks(docs: Iterable[str], tok, dtype, num_proc: int) -> Iterator[np.ndarray]:
    """The token arrays of consecutive chunks, in order; workers only when there is more than one chunk."""
    work = chunks(docs, CHUNK_CHARS)
    head = list(itertools.islice(work, 2))
    work = itertools.chain(head, work)
    if num_proc <= 1 or len(head) < 2:  # one process, or too little text to be worth starting a pool
        enc = _Encoder(tok, dtype)
        for c in work:
            yield enc(c)
        return
    # the pool's __exit__ terminates the workers, also when the caller stops early (max_tokens reached)
    with _pool_context().Pool(num_proc, _init_worker, (tok, dtype)) as pool:
        pending = deque()
        for c in work:
            pending.append(pool.apply_async(_encode_chunk, (c,)))
            if len(pending) >= 2 * num_proc:  # bounded read-ahead: see the module docstring
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def write_tokens(docs: Iterable[str], tok, path: str, dtype, cap: int | None, bar, num_proc: int = 1) -> int:
    """Tokenize documents as <s> ids </s> into the file `path` (dtype per token); stop at cap tokens.
    Returns the number of tokens written; `bar` (tqdm) counts them, so it shows tokens/s."""
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
        gen.close()  # stops the workers now, not when the generator is collected
    return n
