"""Checkpoints written by an earlier qapollo (tests/data/legacy, made by its make.py) still resume bit-exactly:
steps 4-5 after resuming checkpoint-3 give the losses and the final tensors of the uninterrupted run."""
import json
import os
import shutil

import pytest

from qapollo.data import build_data
from qapollo.metrics import read_metrics
from tests.data.legacy.make import HERE, RUNS, tensors_hash, tiny
from tests.helpers import run

pytestmark = pytest.mark.usefixtures("one_thread")
EXPECTED = json.load(open(os.path.join(HERE, "expected.json")))


@pytest.mark.parametrize("name", sorted(RUNS))
def test_legacy_checkpoint_resumes_bit_exactly(tmp_path, name):
    cfg = tiny(HERE, str(tmp_path / "cache"), str(tmp_path / "out"), name, RUNS[name])
    run_dir = tmp_path / "out" / name
    shutil.copytree(os.path.join(HERE, name, "checkpoint-3"), run_dir / "checkpoint-3")
    # the data cursor names the token cache by the corpus file's path and mtime: the same text, cached here
    t = cfg.train
    key = build_data(cfg.data, seq_len=t.seq_len, batch_size=t.batch_size, seed=t.seed,
                     eval_tokens=cfg.eval.tokens).train.key
    state_file = run_dir / "checkpoint-3" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["data_cursor"]["cache_key"] = key
    state_file.write_text(json.dumps(state, indent=1) + "\n")

    run(cfg, resume="auto")
    losses = [r["loss"] for r in read_metrics(str(run_dir / "metrics.jsonl")) if r["step"] > 3]
    assert losses == EXPECTED[name]["losses"]
    assert tensors_hash(str(run_dir / "checkpoint-5")) == EXPECTED[name]["final_hash"]
