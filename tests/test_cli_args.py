"""What the command line accepts and says: overrides after flags, the tokenizer's argument order and text
field, `qapollo train` without --config, `qapollo plan --budget` wording and JSON, the README's figures, and
no bitsandbytes kernel warning on every run."""
import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from qapollo.cli import main
from tests.helpers import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_yaml(corpus, tmp_path):  # noqa: F811
    conf = {"model": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                      "vocab_size": 512, "max_position_embeddings": 64},
            "optim": {"warmup_steps": 2, "float_optim": "adamw"},
            "train": {"batch_size": 2, "seq_len": 16, "max_steps": 2, "output_dir": str(tmp_path / "out")},
            "data": {"path": corpus["data.path"], "tokenizer": corpus["data.tokenizer"],
                     "cache_dir": corpus["data.cache_dir"]},
            "eval": {"tokens": 256}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(conf))
    return str(tmp_path / "tiny.yaml")


def test_overrides_after_flags_are_read(corpus, tmp_path, capsys):  # noqa: F811
    yml = tiny_yaml(corpus, tmp_path)
    assert main(["train", "--config", yml, "train.run_name=a", "--no-progress", "train.max_steps=1"]) == 0
    assert main(["train", "--config", yml, "train.run_name=a", "--resume", "auto", "train.max_steps=2",
                 "--no-progress"]) == 0
    out = capsys.readouterr()
    assert "resumed from" in out.err and "done: step 2" in out.out
    assert sorted(os.listdir(tmp_path / "out" / "a")) == ["checkpoint-1", "checkpoint-2", "latest", "metrics.jsonl"]
    assert main(["plan", "--config", yml, "train.batch_size=1", "--json", "train.seq_len=32", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == 32


def test_train_without_config_says_it_is_not_the_7b_recipe(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    stop = f"train.output_dir={tmp_path / 'f'}"  # refused before anything is built: only the messages matter
    assert main(["train", stop]) == 2
    err = capsys.readouterr().err
    assert "no --config: training qapollo's built-in defaults (a 512-wide, 8-layer model), not the 7B recipe" in err
    assert main(["train", "--config", os.path.join(ROOT, "configs", "llama_20m.yaml"), stop]) == 2
    assert "no --config" not in capsys.readouterr().err


def test_tokenizer_train_in_the_order_the_help_shows_with_a_text_field(tmp_path, capsys):
    docs = [{"body": f"Line {i} tells of ships and kings, of cabbages and {w}."} for i, w in
            enumerate(["sealing-wax", "whether pigs have wings", "why the sea is boiling hot"] * 60)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", str(tmp_path / "c.jsonl"), "--vocab", "300", "--text-field", "body",
                 str(out)]) == 0
    from qapollo.tokenizer import load_tokenizer
    tok = load_tokenizer(str(out))
    assert tok.vocab_size == 300 and tok.decode(tok.encode("of ships and kings")) == "of ships and kings"
    assert main(["tokenizer", "train", str(tmp_path / "c.jsonl"), "--vocab", "300", str(out)]) == 2  # not empty
    assert "set --text-field" not in capsys.readouterr().err
    assert main(["tokenizer", "train", str(tmp_path / "c.jsonl"), "--vocab", "300", str(tmp_path / "t2")]) == 2
    err = capsys.readouterr().err
    assert "c.jsonl:1: no 'text' field (found ['body']); set --text-field" in err
    assert not os.path.exists(tmp_path / "t2")  # a failed run leaves no folder


def test_plan_budget_reads_gib_says_how_much_over_and_reports_fits_in_json(capsys):
    """The 7B recipe (the default config) plans ~10.6 GiB on CUDA with activation checkpointing on."""
    assert main(["plan", "--budget", "12"]) == 0  # a bare number is GiB (it was 12 bytes)
    out = capsys.readouterr().out
    assert re.search(r"budget 12\.00 GiB: fits \([\d.]+ GiB incl\. context, [\d.]+ GiB left\)", out), out
    assert main(["plan", "--budget", "8"]) == 1
    got = capsys.readouterr()
    assert re.search(r"budget 8\.00 GiB: DOES NOT FIT \([\d.]+ GiB incl\. context, [\d.]+ GiB over\)", got.out)
    advice = [ln for ln in got.err.splitlines() if ln.startswith("to fit:")]
    assert advice and "activation_checkpointing" not in advice[0]  # already on in the recipe
    assert main(["plan", "--budget", "8GiB", "--json"]) == 1
    plan = json.loads(capsys.readouterr().out)
    assert plan["fits"] is False and plan["budget_bytes"] == 8 << 30
    assert plan["peak_bytes"] + plan["context_bytes"] > 8 << 30
    assert main(["plan", "--json"]) == 0 and "fits" not in json.loads(capsys.readouterr().out)


def test_readme_data_parallel_figure_is_what_plan_prints():
    from qapollo.config import DEFAULT_CONFIG, load_config
    from qapollo.planner import fmt, predict_peak
    text = " ".join(open(os.path.join(ROOT, "README.md")).read().split())
    m = re.search(r"`qapollo plan --nproc 8` gives ([\d.]+ GiB) per GPU for the 7B recipe \(([\d.]+ GiB) alone\)", text)
    assert m, "the README's data-parallel memory sentence moved"
    cfg = load_config(DEFAULT_CONFIG)
    assert (m.group(1), m.group(2)) == (fmt(predict_peak(cfg, "cuda", world_size=8)["peak_bytes"]),
                                        fmt(predict_peak(cfg, "cuda")["peak_bytes"]))


@pytest.mark.parametrize("offline", ["0", "1"])  # without the network the kernels package says another line
def test_no_bitsandbytes_kernel_warning_when_the_8bit_optimizer_is_built(offline):
    pytest.importorskip("bitsandbytes")
    code = ("from tests.helpers import tiny_config\nfrom qapollo.engine import build\n"
            "cfg = tiny_config(optim__float_optim='adam8bit')\nbuild(cfg, 'cpu')\nprint('built')")
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", HF_HUB_OFFLINE=offline)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "built" in r.stdout, r.stderr[-2000:]
    assert "gemm_4bit_forward" not in r.stderr and "trust_remote_code" not in r.stderr, r.stderr
    assert "kernels-community" not in r.stderr, r.stderr
