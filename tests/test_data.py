"""Data and tokenizer: default corpus, packing, determinism, resume, input formats, errors. Offline."""

import gzip
import json
import lzma
import os
import re
from types import SimpleNamespace

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from qapollo.data import CORPUS_DIR, DataError, build_data  # noqa: E402
from qapollo.textfiles import _txt_documents  # noqa: E402
from qapollo.tokenizer import check_vocab, load_tokenizer, tokenizer_main, train_tokenizer  # noqa: E402
from tests.helpers import ROOT  # noqa: E402

PARAS = [f"Paragraph number {i} says something about {w}." for i, w in enumerate(["cats", "dogs", "ships", "kings"] * 40)]


def cfg(tmp_path, **kw):
    base = dict(path=None, dataset=None, config=None, split="train", streaming=False, tokenizer=None,
                cache_dir=str(tmp_path / "cache"), max_tokens=None, text_field="text")
    return SimpleNamespace(**{**base, **kw})


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture
def txt(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text("\n\n".join(PARAS) + "\n")
    return p


def batches(loader, n):
    return [next(loader) for _ in range(n)]


def test_default_tokenizer_round_trip(tok):
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (32000, 1, 2)
    text = next(_txt_documents(os.path.join(CORPUS_DIR, "austen.validation.txt.xz")))
    for doc in [text, "It is a truth universally acknowledged — naïve café, 1811!  Two  spaces.\nNew line."]:
        ids = tok.encode(doc)
        assert ids and 1 not in ids and 2 not in ids  # encode adds no BOS/EOS
        assert tok.decode(ids) == doc
    assert tok.encode_batch(["a b", "c"]) == [tok.encode("a b"), tok.encode("c")]


def test_shipped_tokenizer_dir_loads_in_transformers(tmp_path, tok):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(CORPUS_DIR), "tokenizer"))
    assert len(hf) == 32000 and hf("Hello world")["input_ids"] == [1] + tok.encode("Hello world")
    tok.save(tmp_path / "export")
    hf2 = AutoTokenizer.from_pretrained(tmp_path / "export")
    assert hf2("Hello world")["input_ids"] == [1] + tok.encode("Hello world")
    hf2.save_pretrained(tmp_path / "hfdir")  # tokenizer.json: loaded through AutoTokenizer
    t = load_tokenizer(str(tmp_path / "hfdir"))
    assert type(t).__name__ == "HFTokenizer" and (t.vocab_size, t.bos_id, t.eos_id) == (32000, 1, 2)
    assert t.encode_batch(["Hello world", "A cat."]) == [tok.encode("Hello world"), tok.encode("A cat.")]
    t.save(tmp_path / "hfdir2")
    assert AutoTokenizer.from_pretrained(tmp_path / "hfdir2")("Hi")["input_ids"][0] == 1


def test_default_corpus_builds_and_caches(tmp_path):
    # a truncated train stream keeps the test fast; the validation split (held-out works) is complete
    c = cfg(tmp_path, max_tokens=60_000)
    d = build_data(c, seq_len=128, batch_size=4, seed=0, eval_tokens=4096)
    assert d.info["n_train_tokens"] == 60_000 and not d.info["cache_hit"]
    assert d.info["n_val_tokens"] > 150_000  # Persuasion + Hamlet
    x = next(d.train)
    assert x.dtype == torch.long and x.shape == (4, 128) and int(x.max()) < 32000
    val = d.val_batches(3)
    assert sum(b.shape[0] for b in val) == 32 and all(b.shape[1] == 128 for b in val)
    assert "Persuasion" in d.tokenizer.decode(val[0][0].tolist()).title()
    d2 = build_data(c, seq_len=128, batch_size=4, seed=0, eval_tokens=4096)
    assert d2.info["cache_hit"] and d2.info["cache_dir"] == d.info["cache_dir"]
    assert all(torch.equal(a, b) for a, b in zip(val, d2.val_batches(3)))  # same eval blocks every time
    assert not [f for f in os.listdir(c.cache_dir) if ".tmp" in f]


def test_packing_keeps_every_token_with_eos_between_documents(tmp_path, txt, tok):
    d = build_data(cfg(tmp_path, path=str(txt)), seq_len=16, batch_size=1, seed=0, eval_tokens=32)
    expected = []
    for p in PARAS:
        expected += [tok.bos_id] + tok.encode(p) + [tok.eos_id]
    n_val = 32
    n_train = (len(expected) - n_val) // 16
    assert d.train.tokens_per_epoch == n_train * 16
    seen = torch.cat(batches(d.train, n_train))  # exactly one epoch
    # one epoch = a permutation of the blocks: nothing lost, nothing duplicated
    blocks = torch.tensor(expected[: n_train * 16]).view(n_train, 16)
    assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, blocks.tolist()))
    # held-out tail = last whole blocks, in order
    val = torch.cat(d.val_batches(8))
    assert val.flatten().tolist() == expected[len(expected) - n_val :]
    flat = expected
    for i, t in enumerate(flat[:-1]):
        if t == tok.eos_id:
            assert flat[i + 1] == tok.bos_id  # every document boundary is </s><s>
    assert flat.count(tok.eos_id) == len(PARAS)


def test_same_seed_same_batches_other_seed_other(tmp_path, txt):
    mk = lambda seed: build_data(cfg(tmp_path, path=str(txt)), seq_len=8, batch_size=4, seed=seed, eval_tokens=8).train  # noqa: E731
    a, b, c = batches(mk(1), 40), batches(mk(1), 40), batches(mk(2), 40)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    n = mk(1).n_blocks  # epochs are reshuffled: epoch 1 order differs from epoch 0
    ep0, ep1 = torch.cat(batches(mk(1), 2 * n // 4))[:n], torch.cat(batches(mk(1), 2 * n // 4))[n : 2 * n]
    assert not torch.equal(ep0, ep1)


def test_cursor_resumes_at_the_next_batch(tmp_path, txt):
    mk = lambda: build_data(cfg(tmp_path, path=str(txt)), seq_len=8, batch_size=3, seed=5, eval_tokens=8).train  # noqa: E731
    ref = batches(mk(), 60)  # crosses several epoch ends (batch 3 does not divide n_blocks)
    for k in (1, 17, 33):
        a = mk()
        batches(a, k)
        state = json.loads(json.dumps(a.state_dict()))  # what the checkpoint stores
        b = mk()
        b.load_state_dict(state)
        assert all(torch.equal(x, y) for x, y in zip(batches(b, 60 - k), ref[k:]))


def test_cursor_for_other_data_is_refused(tmp_path, txt):
    a = build_data(cfg(tmp_path, path=str(txt)), seq_len=8, batch_size=2, seed=0, eval_tokens=8).train
    other = tmp_path / "other.txt"
    other.write_text("Something entirely different.\n\n" * 200)
    b = build_data(cfg(tmp_path, path=str(other)), seq_len=8, batch_size=2, seed=0, eval_tokens=8).train
    with pytest.raises(DataError, match="cache_key"):
        b.load_state_dict(a.state_dict())


def _write_formats(tmp_path):
    rows = [{"text": p, "id": i} for i, p in enumerate(PARAS)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with lzma.open(tmp_path / "c.txt.xz", "wt") as f:
        f.write("\n\n".join(PARAS))
    with gzip.open(tmp_path / "d.txt.gz", "wt") as f:
        f.write("\n\n".join(PARAS))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": PARAS}), tmp_path / "e.parquet")


def test_jsonl_parquet_and_compressed_inputs(tmp_path, tok):
    _write_formats(tmp_path)
    n_tokens = sum(len(tok.encode(p)) + 2 for p in PARAS)
    for name in ["a.jsonl", "b.jsonl.gz", "c.txt.xz", "d.txt.gz", "e.parquet"]:
        d = build_data(cfg(tmp_path, path=str(tmp_path / name)), seq_len=16, batch_size=2, seed=0, eval_tokens=16)
        assert d.info["n_train_tokens"] + d.info["n_val_tokens"] == n_tokens, name
    both = build_data(cfg(tmp_path, path=f"{tmp_path}/a.jsonl, {tmp_path}/*.parquet"), seq_len=16, batch_size=2,
                      seed=0, eval_tokens=16)
    assert both.info["n_train_tokens"] + both.info["n_val_tokens"] == 2 * n_tokens


def test_local_datasets_directories(tmp_path, tok):
    import datasets

    n_tokens = sum(len(tok.encode(p)) + 2 for p in PARAS)
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": PARAS}),
                               "validation": datasets.Dataset.from_dict({"body": PARAS[:20]})})
    dd.save_to_disk(str(tmp_path / "saved"))
    d = build_data(cfg(tmp_path, dataset=str(tmp_path / "saved"), text_field="body"), seq_len=16, batch_size=2,
                   seed=0, eval_tokens=16)
    assert d.info["n_train_tokens"] == n_tokens and d.info["validation"] == "validation split"
    # a plain folder of jsonl files, streamed with a token cap (the path c4 takes online)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "part0.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in PARAS))
    d = build_data(cfg(tmp_path, dataset=str(tmp_path / "folder"), streaming=True, max_tokens=500), seq_len=16,
                   batch_size=2, seed=0, eval_tokens=16)
    assert d.info["n_train_tokens"] + d.info["n_val_tokens"] == 500
    with pytest.raises(DataError, match="max_tokens"):
        build_data(cfg(tmp_path, dataset=str(tmp_path / "folder"), streaming=True), seq_len=16, batch_size=2)


def test_vocab_mismatch_error(tok):
    with pytest.raises(DataError, match=r"vocab_size 32000 but model.vocab_size is 8000: set model.vocab_size=32000"):
        check_vocab(tok, 8000)
    with pytest.raises(DataError, match=r"vocab_size 32000 but model.vocab_size is 32768"):
        check_vocab(tok, 32768)  # a larger model vocab is refused too: those rows could never be used
    check_vocab(tok, 32000)


@pytest.mark.parametrize("content, match", [
    (b"", "has no text"),
    (b"\n\n  \n", "has no text"),
    (b"\x7fELF\x02\x01\x01\x00\x00\x00binary", "NUL bytes"),
    (b"caf\xe9 latin-1 \xff\xfe", "not UTF-8"),
])
def test_bad_files_give_clear_errors(tmp_path, content, match):
    p = tmp_path / "bad.txt"
    p.write_bytes(content)
    with pytest.raises(DataError, match=match):
        build_data(cfg(tmp_path, path=str(p)), seq_len=8, batch_size=1)


def test_missing_path_and_too_small_corpus(tmp_path, txt):
    with pytest.raises(DataError, match="matches no file"):
        build_data(cfg(tmp_path, path=str(tmp_path / "nope*.txt")), seq_len=8, batch_size=1)
    with pytest.raises(DataError, match="fewer than one batch"):
        build_data(cfg(tmp_path, path=str(txt)), seq_len=512, batch_size=64, eval_tokens=8)


def test_train_tokenizer_cli(tmp_path, txt):
    out = tmp_path / "tok"
    assert tokenizer_main(["train", str(txt), "--vocab", "320", str(out)]) == 0
    t = load_tokenizer(str(out))
    assert (t.vocab_size, t.bos_id, t.eos_id) == (320, 1, 2)
    assert t.decode(t.encode(PARAS[5])) == PARAS[5]
    t2 = train_tokenizer([str(txt)], 310, str(tmp_path / "tok2"))
    assert load_tokenizer(str(tmp_path / "tok2" / "tokenizer.model")).vocab_size == t2.vocab_size == 310
    d = build_data(cfg(tmp_path, path=str(txt), tokenizer=str(out)), seq_len=16, batch_size=2, eval_tokens=16)
    assert d.tokenizer.vocab_size == 320 and int(next(d.train).max()) < 320
    assert np.dtype(json.load(open(os.path.join(d.info["cache_dir"], "meta.json")))["dtype"]) == np.uint16


def test_cache_is_identical_for_any_num_proc(tmp_path, monkeypatch, tok):
    """Several threads encode chunks of documents; the file must not depend on how many (nor the cap's cut)."""
    import qapollo.pretokenize as pt
    monkeypatch.setattr(pt, "CHUNK_CHARS", 700)  # ~11 chunks of PARAS per file: chunks overlap
    _write_formats(tmp_path)
    path = f"{tmp_path}/a.jsonl,{tmp_path}/c.txt.xz"
    n_tokens = 2 * sum(len(tok.encode(p)) + 2 for p in PARAS)

    def cache(num_proc, max_tokens=None):
        c = cfg(tmp_path, path=path, num_proc=num_proc, max_tokens=max_tokens,
                cache_dir=str(tmp_path / f"cache{num_proc}-{max_tokens}"))
        d = build_data(c, seq_len=16, batch_size=2, seed=0, eval_tokens=16)
        meta = json.load(open(os.path.join(d.info["cache_dir"], "meta.json")))
        return open(os.path.join(d.info["cache_dir"], "train.bin"), "rb").read(), {k: v for k, v in meta.items()
                                                                                   if k != "build_s"}

    one, meta1 = cache(1)
    assert meta1["n_train"] == n_tokens
    for n in (2, 3):
        assert cache(n) == (one, meta1)
    cut, meta_cut = cache(3, max_tokens=n_tokens // 2 + 5)  # stops inside a chunk, the next one in flight
    assert meta_cut["n_train"] == n_tokens // 2 + 5 and cut == one[: len(cut)]
    with pytest.raises(Exception, match="num_proc"):
        from qapollo.config import load_config
        load_config(None, ["data.num_proc=0"])


def test_build_from_a_script_on_stdin_finishes(tmp_path):
    """A build started from `python -` (also `python -c`, a notebook: no main file) with several tokenizing
    threads finishes, and a capped build stops early. A process pool re-imported `<stdin>` in each worker
    and hung forever."""
    import subprocess
    import sys
    big = tmp_path / "big.txt"
    big.write_text(("\n\n".join(PARAS) + "\n\n") * 600)  # ~4 chunks of 1 MiB
    script = f"""
from types import SimpleNamespace
from qapollo.data import build_data
base = dict(dataset=None, config=None, split="train", streaming=False, tokenizer=None, text_field="text")
for cap in (None, 5000):
    c = SimpleNamespace(**base, path={str(big)!r}, num_proc=2, max_tokens=cap, cache_dir={str(tmp_path)!r} + f"/c{{cap}}")
    d = build_data(c, seq_len=16, batch_size=2, eval_tokens=16)
    print("built", d.info["n_train_tokens"] + d.info["n_val_tokens"])
"""
    out = subprocess.run([sys.executable, "-"], input=script, capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    built = [int(line.split()[1]) for line in out.stdout.splitlines() if line.startswith("built")]
    assert len(built) == 2 and built[0] > 100_000 and built[1] == 5000, out.stdout


def test_repeat_note_names_the_passes():
    from qapollo.data import repeat_note
    shipped = {"sources": [{"source": "default corpus", "weight": 1.0, "n_train_tokens": 4_183_000}]}
    note = repeat_note(shipped, 32_768, 150_000)  # the 7B recipe on the shipped corpus
    assert "150,000 steps × 32,768 tokens = 4.92B tokens" in note and "4.18M train tokens" in note
    assert "about 1,175 times" in note and "data.path" in note and "data.dataset" in note
    assert repeat_note(shipped, 32_768, 510) is None  # 4.0 passes: fine
    mix = {"sources": [{"source": "files big", "weight": 0.9, "n_train_tokens": 10**9},
                       {"source": "files small", "weight": 0.1, "n_train_tokens": 10**6}]}
    assert "files small (weight 0.1 of the mixture) about 492 times" in repeat_note(mix, 32_768, 150_000)


def test_ctrl_c_during_the_first_tokenization_is_one_line(tmp_path):
    """Ctrl-C while `qapollo train` builds its token cache: one `error:` line, exit 130, no cache left
    half-written (the next run builds it again from scratch)."""
    import signal
    import subprocess
    import sys
    big = tmp_path / "big.txt"
    big.write_text(("\n\n".join(PARAS) + "\n\n") * 6000)  # ~40 MB: several seconds to tokenize
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "qapollo.cli", "train", "--config", os.path.join(ROOT, "configs", "llama_20m.yaml"),
           f"data.path={big}", f"data.cache_dir={cache}", f"train.output_dir={tmp_path / 'runs'}", "data.num_proc=1"]
    # as from a terminal: a suite started in the background (CI, nohup) ignores SIGINT, and its children would
    # inherit that, so Python would install no KeyboardInterrupt handler
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, bufsize=0,
                         env={**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = ""
    # the build's progress bar (redrawn with \r, no newline) past its first draw: the build is under way
    while not re.search(r"tokenizing train: [0-9.]+[kM]tok", seen):
        chunk = os.read(p.stderr.fileno(), 4096).decode(errors="replace")
        assert chunk, f"qapollo train ended before tokenizing: {seen[-2000:]}"
        seen += chunk
    p.send_signal(signal.SIGINT)
    _, rest = p.communicate(timeout=120)
    err = seen + rest
    assert p.returncode == 130, err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: interrupted"), err[-2000:]
    assert not list(cache.glob("**/meta.json")) and not list(cache.glob("**/*.tmp-*")), list(cache.rglob("*"))
