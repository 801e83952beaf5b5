"""train.tensorboard: every numeric metrics.jsonl field is a TensorBoard scalar in <run>/tb/, a resume hides
the events after its checkpoint; without the tensorboard package the run stops in one line."""
import glob
import os
import sys

import pytest

from qapollo.cli import main
from qapollo.metrics import read_metrics
from tests.test_checkpoint import corpus, make_cfg, one_thread, run  # noqa: F401 (fixtures)


def scalars(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(tb_dir)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_holds_the_metrics(corpus, tmp_path):  # noqa: F811
    pytest.importorskip("tensorboard")
    over = dict(train__max_steps=4, train__save_every=2, train__tensorboard=True)
    cfg = make_cfg(corpus, tmp_path, "r", **over)
    cfg.eval.every = 2
    run(cfg)
    run_dir = tmp_path / "r"
    assert glob.glob(str(run_dir / "tb" / "events.out.tfevents.*"))
    rows = read_metrics(run_dir / "metrics.jsonl")
    got = scalars(str(run_dir / "tb"))
    numeric = {k for r in rows for k, v in r.items() if k != "step" and isinstance(v, (int, float))}
    assert numeric >= {"loss", "lr", "tokens", "tokens_per_s", "peak_mem_bytes", "eval_loss", "eval_ppl"}
    assert set(got) == numeric
    for key in numeric:  # same steps, same values (TensorBoard stores float32)
        want = [(r["step"], r[key]) for r in rows if key in r]
        assert [s for s, _ in got[key]] == [s for s, _ in want], key
        assert all(abs(v - w) <= 1e-6 * max(1.0, abs(w)) for (_, v), (_, w) in zip(got[key], want)), key
    assert [s for s, _ in got["eval_loss"]] == [2, 4]

    # resuming step 2 re-logs steps 3 and 4: TensorBoard shows them once, with the resumed values
    first = dict(got["loss"])
    run(make_cfg(corpus, tmp_path, "r", **over), resume=str(run_dir / "checkpoint-2"))
    loss = scalars(str(run_dir / "tb"))["loss"]
    assert [s for s, _ in loss] == [1, 2, 3, 4]
    assert all(abs(v - first[s]) <= 1e-6 * abs(first[s]) for s, v in loss)  # bit-exact resume, same losses


def test_missing_tensorboard_is_one_line(corpus, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were not installed
    args = [f"{k}={v}" for k, v in corpus.items()] + [
        "model.hidden_size=128", "model.intermediate_size=256", "model.num_hidden_layers=2", "model.vocab_size=512",
        "train.batch_size=2", "train.seq_len=16", "train.max_steps=1", f"train.output_dir={tmp_path}",
        "train.tensorboard=true"]
    assert main(["train", "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "pip install tensorboard" in lines[0], err
    assert not os.listdir(tmp_path)
