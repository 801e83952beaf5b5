"""Weighted mixtures of data sources (data.path as {path, weight} entries): shares, determinism, exact resume."""
import json
import os
from types import SimpleNamespace

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from qapollo.data import DataError, build_data  # noqa: E402
from qapollo.mixture import apportion  # noqa: E402
from tests.helpers import make_cfg, run  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def cfg(tmp_path, path):
    return SimpleNamespace(path=path, dataset=None, config=None, split="train", streaming=False, tokenizer=None,
                           cache_dir=str(tmp_path / "cache"), max_tokens=None, text_field="text", num_proc=1)


@pytest.fixture
def sources(tmp_path):
    """Three files whose paragraphs share no words, so each block tells its source."""
    out = {}
    for name, words in (("a", "cats purr softly"), ("b", "ships sail north"), ("c", "kings rule wisely")):
        paras = [f"{words} {name}{i}." for i in range(120 if name != "c" else 60)]
        (tmp_path / f"{name}.txt").write_text("\n\n".join(paras) + "\n")
        out[name] = str(tmp_path / f"{name}.txt")
    return out


def mix(sources, wa=3, wb=1):
    return [{"path": sources["a"], "weight": wa}, {"path": sources["b"], "weight": wb}]


def block_sets(tmp_path, sources, names=("a", "b")):
    """{name: set of that source's blocks} from single-source builds of the same files."""
    return {n: {tuple(b) for b in build_data(cfg(tmp_path, sources[n]), seq_len=8, batch_size=1,
                                             eval_tokens=8).train.blocks.tolist()} for n in names}


def test_mixture_draws_each_source_by_weight_deterministically(tmp_path, sources):
    d = build_data(cfg(tmp_path, mix(sources)), seq_len=8, batch_size=4, seed=3, eval_tokens=64)
    sets = block_sets(tmp_path, sources)
    assert not sets["a"] & sets["b"]
    n = {"a": 0, "b": 0}
    for step in range(1, 61):  # 240 blocks: several epochs of b
        for row in next(d.train).tolist():
            (src,) = [k for k, s in sets.items() if tuple(row) in s]  # exactly one source
            n[src] += 1
        assert abs(n["a"] - 0.75 * 4 * step) <= 1  # within one block of the share at every step
    again = build_data(cfg(tmp_path, mix(sources)), seq_len=8, batch_size=4, seed=3, eval_tokens=64).train
    ref = build_data(cfg(tmp_path, mix(sources)), seq_len=8, batch_size=4, seed=3, eval_tokens=64).train
    assert all(torch.equal(next(again), next(ref)) for _ in range(30))
    other = build_data(cfg(tmp_path, mix(sources)), seq_len=8, batch_size=4, seed=4, eval_tokens=64).train
    assert not all(torch.equal(next(other), next(ref)) for _ in range(10))


def test_mixture_cursor_resumes_exactly_and_shards_over_ranks(tmp_path, sources):
    entries = mix(sources, 0.5, 0.2) + [{"path": sources["c"], "weight": 0.3}]
    mk = lambda b=3, rank=0, world=1: build_data(cfg(tmp_path, entries), seq_len=8, batch_size=b, seed=1,  # noqa: E731
                                                 eval_tokens=64, rank=rank, world_size=world).train
    first = mk()
    ref = [next(first) for _ in range(50)]
    for k in (1, 13, 29):
        a = mk()
        for _ in range(k):
            next(a)
        state = json.loads(json.dumps(a.state_dict()))  # what trainer_state.json stores
        b = mk()
        b.load_state_dict(state)
        assert all(torch.equal(next(b), r) for r in ref[k:])
    r0, r1, whole = mk(2, 0, 2), mk(2, 1, 2), mk(4)  # two ranks of 2 read what one process of 4 reads
    assert all(torch.equal(torch.cat([next(r0), next(r1)]), next(whole)) for _ in range(20))
    with pytest.raises(DataError, match="weights"):  # other weights: refused, not silently re-mixed
        build_data(cfg(tmp_path, mix(sources, 1, 1)), seq_len=8, batch_size=3, seed=1,
                   eval_tokens=64).train.load_state_dict(state)
    with pytest.raises(DataError, match="a single source"):
        mk().load_state_dict(build_data(cfg(tmp_path, sources["a"]), seq_len=8, batch_size=3,
                                        eval_tokens=64).train.state_dict())


def _stream(path, tok):
    paras = [p for p in open(path).read().split("\n\n") if p.strip()]
    return np.array([t for p in paras for t in [tok.bos_id, *tok.encode(p.strip()), tok.eos_id]], np.int64)


def test_mixture_validation_is_in_proportion_and_held_out(tmp_path, sources):
    d = build_data(cfg(tmp_path, mix(sources, 2, 1)), seq_len=8, batch_size=2, eval_tokens=8 * 7)
    val = torch.cat(d.val_batches(7)).numpy()
    assert apportion(7, [2 / 3, 1 / 3]) == [5, 2] and len(val) == 7
    a, b = _stream(sources["a"], d.tokenizer), _stream(sources["b"], d.tokenizer)
    # no validation split: each source's share is the tail of its stream, a's first, then b's
    assert np.array_equal(val[:5].ravel(), a[-5 * 8:]) and np.array_equal(val[5:].ravel(), b[-2 * 8:])
    sa, sb = d.train.sources
    assert sa.blocks.size <= len(a) - 5 * 8 and sb.blocks.size <= len(b) - 2 * 8  # and never trained on
    assert np.array_equal(sa.blocks.ravel(), a[: sa.blocks.size])
    assert d.info["n_train_tokens"] == sum(s["n_train_tokens"] for s in d.info["sources"])


def test_a_mixture_entry_can_name_a_dataset(tmp_path, sources):
    folder = tmp_path / "ds"
    folder.mkdir()  # a local folder of jsonl files, read by datasets (an entry's `dataset`, with its own keys)
    (folder / "part0.jsonl").write_text("".join(json.dumps({"body": f"kings rule wisely {i}."}) + "\n" for i in range(80)))
    entries = [{"path": sources["a"], "weight": 1}, {"dataset": str(folder), "text_field": "body", "weight": 1}]
    d = build_data(cfg(tmp_path, entries), seq_len=8, batch_size=4, eval_tokens=16)
    assert [s["source"] for s in d.info["sources"]] == [f"files {sources['a']}", f"dataset {folder} split train"]
    text = " ".join(d.tokenizer.decode(r) for _ in range(5) for r in next(d.train).tolist())
    assert "kings" in text and "cats" in text


@pytest.mark.parametrize("entries, match", [
    ([{"path": "x.txt"}], "needs a weight > 0"),
    ([{"path": "x.txt", "weight": -1}], "needs a weight > 0"),
    ([{"path": "x.txt", "weight": 1, "dataset": "d"}], "exactly one of path or dataset"),
    ([{"path": "x.txt", "weight": 1, "wieght": 2}], "unknown key(s) ['wieght']"),
    (["x.txt", {"path": "y.txt", "weight": 1}], "mixes file names and mappings"),
])
def test_bad_mixtures_are_refused_before_tokenizing(tmp_path, entries, match):
    with pytest.raises(DataError, match=match.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        build_data(cfg(tmp_path, entries), seq_len=8, batch_size=1)
    assert not os.path.exists(tmp_path / "cache") or not os.listdir(tmp_path / "cache")


def _recorded(monkeypatch):
    """Every batch the trainer draws, in order."""
    from qapollo.mixture import MixtureLoader
    seen, nxt = [], MixtureLoader.__next__
    monkeypatch.setattr(MixtureLoader, "__next__", lambda self: seen.append(nxt(self)) or seen[-1])
    return seen


def test_resumed_mixture_run_draws_the_same_batches(corpus, sources, tmp_path, monkeypatch, capsys):  # noqa: F811
    entries = mix(sources, 0.6, 0.4)
    over = dict(train__save_every=2, eval__tokens=32)
    full = _recorded(monkeypatch)
    a = make_cfg(corpus, tmp_path / "a", **over)
    a.data.path, a.train.max_steps = entries, 4
    run(a)
    assert len(full) == 4
    monkeypatch.undo()
    part = _recorded(monkeypatch)
    b = make_cfg(corpus, tmp_path / "b", **over)
    b.data.path, b.train.max_steps = entries, 2
    run(b)
    b.train.max_steps = 4
    tr = run(b, resume="auto")
    assert len(part) == 4 and all(torch.equal(x, y) for x, y in zip(part, full))
    state = json.load(open(os.path.join(tr.checkpoint_path, "trainer_state.json")))
    assert state["data_cursor"]["mixture"] and sum(state["data_cursor"]["counts"]) == 4 * 2


def test_trainer_notes_a_run_that_repeats_its_data(corpus, sources, tmp_path, capsys):  # noqa: F811
    from qapollo.train import Trainer
    c = make_cfg(corpus, tmp_path, train__max_steps=1000, eval__tokens=32)
    c.data.path = sources["c"]
    tr = Trainer(c, progress=False)
    tr.setup()
    n = tr.data.info["n_train_tokens"]
    out = capsys.readouterr().out
    assert f"about {1000 * 2 * 16 / n:,.0f} times" in out and "Pre-train on real data" in out
