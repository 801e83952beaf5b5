"""End to end through the command line: real text, falling loss, metrics fields, one-line errors."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, tmp_path, timeout=600, env=None):
    env = dict(os.environ, QAPOLLO_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               OMP_NUM_THREADS="2", **(env or {}))
    return subprocess.run([sys.executable, os.path.join(ROOT, "run_7b.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_20m_config_trains_on_the_shipped_corpus(tmp_path):
    """The 20M config on the default corpus and tokenizer, shrunk in batch and sequence to stay fast."""
    r = run(["--config", os.path.join(ROOT, "configs", "llama_20m.yaml"), "--no-progress",
             "train.max_steps=40", "train.batch_size=4", "train.seq_len=64", "train.log_every=2",
             "optim.warmup_steps=5", "eval.every=20", "eval.tokens=2048", "train.output_dir=out"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    recs = [json.loads(ln) for ln in open(tmp_path / "out" / "llama_20m" / "metrics.jsonl")]
    for key in ("step", "loss", "lr", "tokens", "tokens_per_s", "peak_mem_bytes"):
        assert all(key in rec for rec in recs), key
    evals = [rec for rec in recs if "eval_loss" in rec]
    assert [e["step"] for e in evals] == [20, 40] and all("eval_ppl" in e for e in evals)
    first = sum(rec["loss"] for rec in recs[:3]) / 3
    last = sum(rec["loss"] for rec in recs[-3:]) / 3
    assert last < first - 1.0, (first, last)  # from ~10.4 (ln 32000) well down on real English
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]
    assert recs[-1]["tokens"] == 40 * 4 * 64
    assert recs[0]["lr"] > 0  # the first update has a non-zero learning rate
    assert os.path.isdir(tmp_path / "out" / "llama_20m" / "checkpoint-40")


@pytest.mark.parametrize("args,needle", [
    (["optim.lrr=0.1"], "unknown config key 'optim.lrr'"),
    (["train.max_steps=abc"], "train.max_steps' must be int"),
    (["--config", "nope.yaml"], "config file 'nope.yaml' not found"),
    (["data.path=missing/*.txt"], "missing"),
    (["model.vocab_size=1000"], "vocab_size"),
    (["model.fused_update=maybe"], "model.fused_update must be auto, true or false"),
])
def test_bad_input_is_one_clear_line(tmp_path, args, needle):
    base = ["--config", os.path.join(ROOT, "configs", "llama_20m.yaml")]
    if args[0] == "--config":
        base = []
    assert_one_clear_line(run(base + args + ["train.output_dir=out"], tmp_path, timeout=300), needle, tmp_path)


def test_compiled_kernels_without_a_compiler_is_one_clear_line(tmp_path):
    """model.fused_update=true where torch.compile cannot build kernels (no C++ compiler on PATH)."""
    r = run(["--config", os.path.join(ROOT, "configs", "llama_20m.yaml"), "model.fused_update=true",
             "train.batch_size=1", "train.seq_len=32", "train.output_dir=out"], tmp_path, timeout=300, env={"PATH": ""})
    assert_one_clear_line(r, "model.fused_update=true but compiled kernels are unavailable on cpu: no C++ compiler "
                             "found (install g++); set model.fused_update=auto or false", tmp_path)


def assert_one_clear_line(r, needle, tmp_path):
    assert r.returncode == 2
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and needle in err[0], r.stderr[-1500:]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out" / "llama_20m" / "metrics.jsonl").exists()


def test_debug_shows_the_traceback(tmp_path):
    r = run(["--config", os.path.join(ROOT, "configs", "llama_20m.yaml"), "optim.lrr=0.1", "--debug"], tmp_path,
            timeout=300)
    assert r.returncode == 1
    assert "Traceback" in r.stderr and "ConfigError: unknown config key 'optim.lrr'" in r.stderr
    assert not [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
