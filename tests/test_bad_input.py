"""The bad-input catalogue: each case is one line `error: ...` naming what is wrong and the fix, exit status
2, no traceback, and no user file touched (nothing created, changed or removed outside the token cache).

The cases call qapollo.cli.main in-process: an uncaught exception would fail the test, so "no traceback"
is checked as faithfully as in a subprocess at a fraction of the startup cost; tests/test_cli.py runs a
few of the same through a real process for the exit status, and --debug.
"""
import json
import lzma
import os
from types import SimpleNamespace

import pytest
import torch
import yaml

from qapollo.cli import main
from qapollo.config import load_config
from tests.helpers import ROOT, make_cfg, run



pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def shared(corpus, tmp_path_factory):  # noqa: F811
    """A finished 1-step run (checkpoint-1), another 512-piece tokenizer, a dataset with a small validation split."""
    import datasets
    import sentencepiece as spm
    d = tmp_path_factory.mktemp("shared")
    run(make_cfg(corpus, d / "out", "r", train__max_steps=1))
    with lzma.open(os.path.join(ROOT, "qapollo/assets/corpus/austen.train.txt.xz"), "rt") as f:
        (d / "austen.txt").write_text(f.read(120_000))
    spm.SentencePieceTrainer.train(
        input=str(d / "austen.txt"), model_prefix=str(d / "other"), model_type="bpe", vocab_size=512,
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    paras = [p for p in open(corpus["data.path"]).read().split("\n\n") if p.strip()]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": paras[:400]}),
                          "validation": datasets.Dataset.from_dict({"text": paras[400:405]})}).save_to_disk(str(d / "dd"))
    return SimpleNamespace(dir=d, out=d / "out", run_dir=str(d / "out" / "r"), other_tok=str(d / "other.model"),
                           dataset=str(d / "dd"))


def _write(path, text):
    path.write_text(text)
    return str(path)


def _unwritable(c):
    if os.geteuid() == 0:  # root writes through mode bits: use a file system that refuses folders
        return "/sys/qapollo-bad-input-test"
    d = c.tmp / "readonly"
    d.mkdir()
    d.chmod(0o555)
    return str(d / "out")


def _tok_folder(c):
    d = c.tmp / "tokdir"
    d.mkdir()
    (d / "special_tokens_map.json").write_text('{"eos_token": "</s>"}')
    return str(d)


def _bad_jsonl(c):
    rows = [json.dumps({"text": "A first document."}), json.dumps({"text": "A second one."}), '{"text": "cut off']
    return _write(c.tmp / "bad.jsonl", "\n".join(rows) + "\n")


def _nonempty(c):
    (c.tmp / "hf").mkdir()
    (c.tmp / "hf" / "notes.txt").write_text("mine")
    return str(c.tmp / "hf")


def _hf_shape(c):
    """An HF LLaMA folder with only its config.json (context 32): enough for the shape and tokenizer checks."""
    from transformers import LlamaConfig
    d = c.tmp / "hf32"
    d.mkdir()
    LlamaConfig(architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, vocab_size=512, max_position_embeddings=32).to_json_file(str(d / "config.json"))
    return str(d)


# the tiny config's shape keys unset (model.KEY=null), so that model.init_from's config.json sets them
UNSET = ["model.hidden_size=null", "model.intermediate_size=null", "model.num_hidden_layers=null",
         "model.num_attention_heads=null", "model.vocab_size=null", "model.max_position_embeddings=null"]


def T(c, *over, resume=None):
    return ["train", "--config", c.yml, "--no-progress"] + (["--resume", resume] if resume else []) + list(over)


# id -> (argv builder, expected text of the error line, tokenizes (may write the token cache))
CASES = {
    "group_size does not divide a matrix": (lambda c: T(c, "model.group_size=48"),
                                            "model.group_size 48 must divide the size of every projection matrix", 0),
    "heads do not divide hidden": (lambda c: T(c, "model.num_attention_heads=3"),
                                   "model.hidden_size 128 is not divisible by model.num_attention_heads 3", 0),
    "kv heads do not divide heads": (lambda c: T(c, "model.num_key_value_heads=3"),
                                     "model.num_attention_heads 4 is not a multiple of model.num_key_value_heads 3", 0),
    "seq_len above max_position_embeddings": (lambda c: T(c, "train.seq_len=128"),
                                              "train.seq_len 128 exceeds model.max_position_embeddings 64", 0),
    "rank larger than the matrix": (lambda c: T(c, "optim.rank=200"),
                                    "optim.rank 200 is larger than the smallest side of a projection matrix (128)", 0),
    "float_lr 0": (lambda c: T(c, "optim.float_lr=0"), "optim.float_lr must be > 0 (null: optim.lr)", 0),
    "batch_size 0": (lambda c: T(c, "train.batch_size=0"), "train.batch_size must be >= 1 (got 0)", 0),
    "log_every 0": (lambda c: T(c, "train.log_every=0"), "train.log_every must be >= 1 (got 0)", 0),
    "keep_checkpoints negative": (lambda c: T(c, "train.keep_checkpoints=-1"), "train.keep_checkpoints must be >= 0", 0),
    "eval.tokens above the held-out tail": (lambda c: T(c, "eval.tokens=100000000"),
                                            "too few to hold out eval.tokens=100000000", 1),
    "eval.tokens above the validation split": (
        lambda c: T(c, "data.path=null", f"data.dataset={c.shared.dataset}", "eval.every=5", "eval.tokens=100000"),
        "eval.tokens=100000 needs 100000 held-out tokens but the held-out data (validation split) has", 1),
    "output dir not writable": (lambda c: T(c, f"train.output_dir={_unwritable(c)}"), "train.output_dir: cannot write in", 0),
    "output dir is a file": (lambda c: T(c, f"train.output_dir={_write(c.tmp / 'f.txt', 'x')}/runs"),
                             "is a file, not a folder", 0),
    "disk without room for one checkpoint": (lambda c: T(c), "not enough disk space for the first checkpoint", 0),
    "data glob matching nothing": (lambda c: T(c, f"data.path={c.tmp}/nothing/*.txt"), "matches no file", 0),
    "jsonl with a malformed line": (lambda c: T(c, f"data.path={_bad_jsonl(c)}"),
                                    "bad.jsonl:3: not a JSON line (Unterminated string", 1),
    "binary file as text": (lambda c: T(c, f"data.path={_write(c.tmp / 'b.txt', 'ELF' + chr(0) * 8)}"),
                            "contains NUL bytes", 1),
    "data.path and data.dataset": (lambda c: T(c, "data.dataset=c4"), "set data.path or data.dataset, not both", 0),
    "corpus smaller than one batch": (lambda c: T(c, "train.batch_size=100000"), "fewer than one batch of 100000", 1),
    "tokenizer folder without its model file": (lambda c: T(c, f"data.tokenizer={_tok_folder(c)}"),
                                                "has no tokenizer.model (sentencepiece) and no tokenizer.json", 0),
    "tokenizer file missing": (lambda c: T(c, f"data.tokenizer={c.tmp}/missing.model"), "missing.model' not found", 0),
    "vocab mismatch": (lambda c: T(c, "model.vocab_size=1000"), "has vocab_size 512 but model.vocab_size is 1000", 0),
    "resume with another tokenizer": (
        lambda c: T(c, f"train.output_dir={c.shared.out}", "train.run_name=r", f"data.tokenizer={c.shared.other_tok}",
                    resume="auto"), "it was trained with tokenizer", 0),
    "resume with another model shape": (
        lambda c: T(c, f"train.output_dir={c.shared.out}", "train.run_name=r", "model.hidden_size=64", resume="auto"),
        "it was trained with model.hidden_size=128 but the config has model.hidden_size=64", 0),
    "fresh run over checkpoints": (lambda c: T(c, f"train.output_dir={c.shared.out}", "train.run_name=r"),
                                   "already holds checkpoints", 0),
    "resume of a missing folder": (lambda c: T(c, resume=f"{c.tmp}/nope"), "no such checkpoint or run directory", 0),
    "device cuda without CUDA": (lambda c: T(c, "train.device=cuda"), "CUDA is not available", 0),
    "yaml file that is a list": (lambda c: ["train", "--config", _write(c.tmp / "l.yaml", "- model\n- train\n")],
                                 "holds a list, not a mapping of sections", 0),
    "yaml syntax error": (lambda c: ["train", "--config", _write(c.tmp / "s.yaml", "model: [1, 2\n")],
                          "is not valid YAML: expected ',' or ']', but got '<stream end>' at line 2, column 1", 0),
    "unknown section": (lambda c: ["train", "--config", _write(c.tmp / "u.yaml", "trainer:\n  max_steps: 3\n")],
                        "unknown config section 'trainer'", 0),
    "section that is not a mapping": (lambda c: ["train", "--config", _write(c.tmp / "m.yaml", "model: 5\n")],
                                      "config section 'model' in", 0),
    "config file missing": (lambda c: ["train", "--config", f"{c.tmp}/nope.yaml"], "nope.yaml' not found", 0),
    "override without =": (lambda c: T(c, "train.max_steps"),
                           "override 'train.max_steps' must look like section.key=value", 0),
    "unknown key": (lambda c: T(c, "optim.lrr=0.1"), "unknown config key 'optim.lrr'", 0),
    "wrongly typed value": (lambda c: T(c, "train.max_steps=abc"), "'train.max_steps' must be int, got 'abc'", 0),
    "export into a non-empty folder": (lambda c: ["export", c.shared.run_dir, _nonempty(c)],
                                       "exists and is not empty: choose another folder or pass --force", 0),
    "export of a folder without checkpoints": (lambda c: ["export", str(c.tmp), str(c.tmp / "hf2")],
                                               "holds no checkpoint-<step> folder", 0),
    "export with a bad shard size": (lambda c: ["export", c.shared.run_dir, str(c.tmp / "hf3"), "--max-shard-size", "huge"],
                                     "--max-shard-size 'huge'", 0),
    "plan with a bad budget": (lambda c: ["plan", "--config", c.yml, "--budget", "lots"],
                               "--budget: cannot read a size from 'lots'", 0),
    "mixture entry without a weight": (lambda c: T(c, "data.path=[{path: a.txt}, {path: b.txt, weight: 1}]"),
                                       "data.path entry 1 ({'path': 'a.txt'}) needs a weight > 0", 0),
    "mixture of names and mappings": (lambda c: T(c, "data.path=[a.txt, {path: b.txt, weight: 1}]"),
                                      "data.path mixes file names and mappings", 0),
    "num_proc 0": (lambda c: T(c, "data.num_proc=0"), "data.num_proc must be >= 1 or null", 0),
    "sample prompts that are not text": (lambda c: T(c, "eval.sample_prompts=[1, 2]"),
                                         "eval.sample_prompts must be a list of non-empty strings", 0),
    "generate with top-p 0": (lambda c: ["generate", c.shared.run_dir, "--prompt", "Hi", "--top-p", "0"],
                              "--top-p in (0, 1]", 0),
    "generate an empty prompt": (lambda c: ["generate", c.shared.run_dir, "--prompt", " "], "--prompt is empty", 0),
    "generate past the model's positions": (
        lambda c: ["generate", c.shared.run_dir, "--prompt", "Hi", "--max-new-tokens", "64"],
        "--max-new-tokens 64 leaves no room for the prompt: the model has 64 positions", 0),
    "generate from a missing folder": (lambda c: ["generate", f"{c.tmp}/nope", "--prompt", "Hi"],
                                       "nope: no such run dir", 0),
    "eval with neither --data nor --tasks": (lambda c: ["eval", c.shared.run_dir], "give --data FILE...", 0),
    "eval tasks with a missing include path": (
        lambda c: ["eval", c.shared.run_dir, "--tasks", "mine", "--include-path", f"{c.tmp}/tasks"],
        "--include-path", 0),
    "plot of a missing folder": (lambda c: ["plot", f"{c.tmp}/nope", "-o", str(c.tmp / "loss.png")],
                                 "nope: no such folder; pass run directories (holding metrics.jsonl)", 0),
    "streamed hub data set offline": (
        lambda c: T(c, "data.path=null", "data.dataset=qapollo-test/no-such-set", "data.streaming=true",
                    "data.max_tokens=1000"),
        "Couldn't reach 'qapollo-test/no-such-set' on the Hub (OfflineModeIsEnabled): a hub data set needs the "
        "network each time it is streamed", 1),
    "wandb without a login": (lambda c: T(c, "train.wandb=true"), "train.wandb=true: W&B has no login", 0),
    "eval of a jsonl without the text field": (
        lambda c: ["eval", c.shared.run_dir, "--data", _write(c.tmp / "b.jsonl", '{"body": "Some text."}\n')],
        "b.jsonl:1: no 'text' field (found ['body']); set --text-field", 0),
    "eval of an HF folder without a tokenizer": (
        lambda c: ["eval", _hf_shape(c), "--data", c.shared.dataset],
        "has no tokenizer (tokenizer.json or tokenizer.model): copy the model's tokenizer files into it (the "
        "tokenizer the model was trained with; `qapollo export` writes it)", 0),
    "init_from with a seq_len beyond its context": (
        lambda c: T(c, f"model.init_from={_hf_shape(c)}", *UNSET, "train.seq_len=48"),
        "train.seq_len 48 exceeds model.max_position_embeddings 32: lower train.seq_len to 32 or less "
        "(model.init_from's config.json sets", 0),
    "tokenizer training into a non-empty folder": (
        lambda c: ["tokenizer", "train", c.shared.dataset + "/../austen.txt", "--vocab", "400", _nonempty(c)],
        "hf exists and is not empty: choose another folder or pass --force", 0),
    "tokenizer training without a corpus": (
        lambda c: ["tokenizer", "train", f"{c.tmp}/none/*.txt", "--vocab", "100", str(c.tmp / "tok")],
        "corpus '" , 0),
}


def snapshot(*roots, skip=()):
    """Every file (size, mtime) and folder under roots, outside `skip`."""
    out = {}
    for root in roots:
        for d, dirs, files in os.walk(root):
            dirs[:] = [x for x in dirs if os.path.join(d, x) not in skip]
            out[d] = "dir"
            for f in files:
                st = os.stat(os.path.join(d, f))
                out[os.path.join(d, f)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_and_touches_nothing(corpus, shared, tmp_path, capsys, monkeypatch,  # noqa: F811
                                                         request, case):
    if case == "device cuda without CUDA" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    argv_of, needle, tokenizes = CASES[case]
    conf = {"model": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                      "vocab_size": 512, "max_position_embeddings": 64},
            "optim": {"warmup_steps": 2, "float_optim": "adamw"},
            "train": {"batch_size": 2, "seq_len": 16, "max_steps": 2, "output_dir": str(tmp_path / "out"), "run_name": "t"},
            "data": {"path": corpus["data.path"], "tokenizer": corpus["data.tokenizer"], "cache_dir": corpus["data.cache_dir"]},
            "eval": {"tokens": 256}}
    c = SimpleNamespace(tmp=tmp_path, shared=shared, yml=_write(tmp_path / "tiny.yaml", yaml.safe_dump(conf)))
    argv = argv_of(c)
    if case == "disk without room for one checkpoint":
        import shutil
        real = shutil.disk_usage
        monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1 << 20))
    if case == "streamed hub data set offline":  # as HF_HUB_OFFLINE=1 does when set before datasets is imported
        import datasets
        import huggingface_hub
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    if case == "wandb without a login":  # no key in the environment or ~/.netrc, not offline
        wandb = pytest.importorskip("wandb")
        request.addfinalizer(wandb.teardown)  # W&B keeps the settings it read (mode online) for later runs
        for k in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DISABLED"):
            monkeypatch.delenv(k, raising=False)
        monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
        monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path.parent / "wandb-config"))
    cache = corpus["data.cache_dir"]
    before = snapshot(tmp_path, shared.dir, skip={cache})
    cache_before = sorted(os.listdir(cache)) if os.path.isdir(cache) else []
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2, err
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err
    if request.config.getoption("capture") == "no":  # the catalogue as the user sees it: pytest -s
        with capsys.disabled():
            print(f"\n{case}: {lines[0]}", end="")
    assert snapshot(tmp_path, shared.dir, skip={cache}) == before
    if not tokenizes:  # refused before anything was tokenized
        assert (sorted(os.listdir(cache)) if os.path.isdir(cache) else []) == cache_before
    assert not [f for f in os.listdir(cache) if ".tmp" in f]


def test_catalogue_is_large_enough():
    assert len(CASES) >= 25


def test_old_key_name_is_still_read(tmp_path, capsys):
    yml = tmp_path / "old.yaml"
    yml.write_text("train:\n  save_total_limit: 5\n")
    assert load_config(str(yml)).train.keep_checkpoints == 5
    assert "train.save_total_limit (in " in capsys.readouterr().err
    from qapollo.config import config_from_dict  # a config.yaml saved in an older checkpoint
    assert config_from_dict({"train": {"save_total_limit": 3}}).train.keep_checkpoints == 3
