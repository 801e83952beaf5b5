"""train.wandb: the metrics go to Weights & Biases (offline mode here: no account, no network); without the
wandb package the run stops in one line before anything is written."""
import glob
import json
import os
import sys

import pytest

from qapollo.cli import main
from qapollo.metrics import read_metrics
from tests.helpers import make_cfg, run

pytestmark = pytest.mark.usefixtures("one_thread")


def test_wandb_offline_run_holds_the_metrics(corpus, tmp_path, monkeypatch):  # noqa: F811
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = make_cfg(corpus, tmp_path, "r", train__max_steps=3, train__wandb=True)
    cfg.eval.every, cfg.eval.sample_prompts, cfg.eval.sample_tokens = 3, ["The king"], 4
    run(cfg)
    wandb = pytest.importorskip("wandb")
    wandb.teardown()  # waits for W&B's writer process, as the end of a `qapollo train` process does
    run_dir = tmp_path / "r"
    run_id = (run_dir / "wandb_id").read_text().strip()
    (offline,) = glob.glob(str(run_dir / "wandb" / f"offline-run-*-{run_id}"))
    (events,) = glob.glob(os.path.join(offline, f"run-{run_id}.wandb"))  # the log `wandb sync` uploads
    data = open(events, "rb").read()
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:  # every logged value reached W&B (its records hold each value as JSON text)
        for k in ("loss", "lr", "tokens", "eval_loss", "eval_ppl"):
            if k in r:
                assert k.encode() in data and json.dumps(r[k]).encode() in data, (r["step"], k)
    assert glob.glob(os.path.join(offline, "files", "media", "table", "samples_*.table.json"))  # eval samples
    # a resumed run continues the same W&B run
    cfg.train.max_steps = 4
    run(cfg, resume="auto")
    assert (run_dir / "wandb_id").read_text().strip() == run_id
    assert len(glob.glob(str(run_dir / "wandb" / f"offline-run-*-{run_id}"))) >= 1
    assert not [d for d in glob.glob(str(run_dir / "wandb" / "offline-run-*")) if not d.endswith(run_id)]

def test_missing_wandb_is_one_line(corpus, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if the package were not installed
    args = [f"{k}={v}" for k, v in corpus.items()] + [
        "model.hidden_size=128", "model.intermediate_size=256", "model.num_hidden_layers=2", "model.vocab_size=512",
        "train.batch_size=2", "train.seq_len=16", "train.max_steps=1", f"train.output_dir={tmp_path}",
        "train.wandb=true"]
    assert main(["train", "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "pip install wandb" in lines[0], err
    assert not os.listdir(tmp_path)
