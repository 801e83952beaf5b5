"""Local text files -> documents: path/glob resolution and the per-format readers (.txt, .jsonl, .parquet,
optionally .gz/.xz/.bz2). Shared by data.py (the token cache) and tokenizer.py (tokenizer training).

A .txt file gives one document per blank-line-separated paragraph; a jsonl line or parquet row gives one
document (its `text_field`). A malformed jsonl line is an error naming the file and line, never skipped:
it usually means a truncated or mis-concatenated file, and skipping would silently train on less (or
other) data than the user gave, under a cache key that claims the whole file.
"""

import bz2
import glob
import gzip
import io
import json
import lzma
import os
from typing import Iterable, Iterator

from .errors import QapolloError


class DataError(QapolloError, ValueError):
    """Bad data config or input: the message says what is wrong and how to fix it."""


def resolve_paths(path, what: str = "data.path") -> list[str]:
    """Comma-separated string or list of files/globs -> sorted, existing files (`what` names them in errors)."""
    specs = [s.strip() for s in path.split(",")] if isinstance(path, str) else [str(s) for s in path]
    out = []
    for spec in filter(None, specs):
        spec = os.path.expanduser(spec)
        hits = sorted(glob.glob(spec, recursive=True)) if glob.has_magic(spec) else [spec] if os.path.exists(spec) else []
        files = [h for h in hits if os.path.isfile(h)]
        for h in hits:  # a folder means every file in it
            if os.path.isdir(h):
                files += sorted(f for f in glob.glob(os.path.join(h, "**", "*"), recursive=True) if os.path.isfile(f))
        if not files:
            raise DataError(f"{what} {spec!r} matches no file: check the path or glob (relative to {os.getcwd()})")
        out += files
    if not out:
        raise DataError(f"{what} is empty: give files such as corpus/*.txt")
    return out


def _open_text(path: str) -> io.TextIOBase:
    opener = open
    for ext, fn in ((".gz", gzip.open), (".xz", lzma.open), (".bz2", bz2.open)):
        if path.endswith(ext):
            opener = fn
    # strict UTF-8 so that binary input fails loudly instead of training on garbage
    return opener(path, "rt", encoding="utf-8-sig", errors="strict", newline=None)


def _kind(path: str) -> str:
    base = path
    for ext in (".gz", ".xz", ".bz2"):
        base = base[: -len(ext)] if base.endswith(ext) else base
    if base.endswith(".parquet"):
        return "parquet"
    return "jsonl" if base.endswith((".jsonl", ".json", ".ndjson")) else "txt"


def _txt_documents(path: str) -> Iterator[str]:
    """One document per paragraph (blank-line separated), read line by line so big files stream."""
    para = []
    with _open_text(path) as f:
        for line in f:
            if "\x00" in line:
                raise DataError(f"{path} contains NUL bytes: it looks like a binary file, not text; remove it from data.path")
            if line.strip():
                para.append(line)
            elif para:
                yield "".join(para).strip("\n")
                para = []
    if para:
        yield "".join(para).strip("\n")


def _jsonl_documents(path: str, field: str, field_key: str) -> Iterator[str]:
    with _open_text(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:  # never skipped: see the module docstring
                raise DataError(f"{path}:{i}: not a JSON line ({e.msg}: column {e.colno}): fix or delete that line "
                                f"(.jsonl files need one JSON object per line)") from None
            if not isinstance(row, dict) or field not in row:
                keys = list(row) if isinstance(row, dict) else type(row).__name__
                raise DataError(f"{path}:{i}: no {field!r} field (found {keys}); set {field_key}")
            yield row[field]


def _parquet_documents(path: str, field: str, field_key: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a non-parquet file
        raise DataError(f"{path} is not a readable parquet file ({e})") from None
    if field not in pf.schema_arrow.names:
        raise DataError(f"{path}: no {field!r} column (found {pf.schema_arrow.names}); set {field_key}")
    for batch in pf.iter_batches(columns=[field], batch_size=1024):
        yield from batch.column(0).to_pylist()


def _file_documents(path: str, field: str = "text", field_key: str = "data.text_field",
                    files_key: str = "data.path") -> Iterator[str]:
    kind = _kind(path)
    docs = (_txt_documents(path) if kind == "txt" else _jsonl_documents(path, field, field_key) if kind == "jsonl"
            else _parquet_documents(path, field, field_key))
    n = 0
    try:
        for doc in docs:
            if doc and doc.strip():
                n += 1
                yield doc
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason}); is it a binary file? Convert it to UTF-8 or remove it") from None
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise DataError(f"{path} cannot be read ({e}); check that the file and its compression are intact") from None
    if n == 0:
        raise DataError(f"{path} has no text (empty file or only blank lines/empty {field!r} values); remove it from {files_key}")


def iter_file_documents(paths: Iterable[str], text_field: str = "text", field_key: str = "data.text_field",
                        files_key: str = "data.path") -> Iterator[str]:
    """The documents of local files; errors name the options that set the field and the files (`qapollo eval`:
    --text-field and --data)."""
    for p in paths:
        yield from _file_documents(p, text_field, field_key, files_key)

