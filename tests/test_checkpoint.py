"""Checkpoints: every state tensor round-trips, resume is bit-exact (also after SIGTERM), broken
checkpoints give a one-line error naming the file and `resume=auto` falls back past them."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors import safe_open

from qapollo import checkpoint as ck
from qapollo.checkpoint import CheckpointError, IncompatibleCheckpoint
from qapollo.config import load_config
from qapollo.optim.updaters import ApolloUpdater
from qapollo.metrics import read_metrics
from qapollo.train import Trainer
from tests.helpers import ROOT, make_cfg, run  # noqa: F401



pytestmark = pytest.mark.usefixtures("one_thread")


def read_tensors(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k).clone() for k in f.keys()}, f.metadata()  # clone: unmap the file


def assert_same_checkpoint(a, b):
    for name in ("model.safetensors", "optimizer.safetensors"):
        ta, ma = read_tensors(os.path.join(a, name))
        tb, mb = read_tensors(os.path.join(b, name))
        assert ta.keys() == tb.keys(), name
        for k in ta:
            assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), f"{name}: {k} differs"
        assert ma == mb, name
    sa, sb = ck.read_state(a), ck.read_state(b)
    for k in ("global_step", "tokens_seen", "data_cursor"):
        assert sa[k] == sb[k], k


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(os.path.join(run_dir, "metrics.jsonl"))}


# ---- round trip and exact resume ---------------------------------------------------------------
def test_round_trip_every_state_tensor(corpus, tmp_path):
    over = dict(optim__name="apollo", optim__rank=2, optim__scale_type="channel", optim__float_optim="adam8bit",
                optim__update_proj_gap=2, train__max_steps=3)
    a = run(make_cfg(corpus, tmp_path, "a", **over))
    b = Trainer(make_cfg(corpus, tmp_path, "b", **over), progress=False)
    b.cfg.resume = os.path.join(tmp_path, "a", "checkpoint-3")
    b.setup()
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    kinds = set()
    for name, ua in a.opt.updaters.items():
        ub = b.opt.updaters[name]
        if isinstance(ua, ApolloUpdater):
            kinds.add("apollo")
            for k, v in ua.state.items():
                w = ub.state[k]
                assert (torch.equal(v, w) and v.dtype == w.dtype) if torch.is_tensor(v) else v == w, (name, k)
        else:
            (sa_, ca), (sb_, cb) = ua.state_dict(), ub.state_dict()
            kinds.add(ua.kind)
            assert sa_.keys() == sb_.keys() and ca == cb, name
            for k, v in sa_.items():
                w = sb_[k]
                assert (torch.equal(v, w) and v.dtype == w.dtype) if torch.is_tensor(v) else v == w, (name, k)
    assert kinds == {"apollo", "AdamW8bit"}
    assert (b.opt.step_count, b.tokens_seen) == (a.opt.step_count, a.tokens_seen)
    assert b.data.train.state_dict() == a.data.train.state_dict()
    meta = read_tensors(os.path.join(tmp_path, "a", "checkpoint-3", "model.safetensors"))[1]
    assert meta["format"] == "pt" and meta["qapollo_schema"] == str(ck.SCHEMA)


VARIANTS = {
    "int8-apollo_mini": dict(optim__update_proj_gap=2),
    "int8-apollo-rank2-bnb": dict(optim__name="apollo", optim__rank=2, optim__scale_type="channel",
                                  optim__float_optim="adam8bit", optim__update_proj_gap=2),
    "float-apollo_mini": dict(model__weight_quant=False, optim__update_proj_gap=2),
    "float-adamw": dict(model__weight_quant=False, optim__name="adamw"),
    # accumulation resumes too: exact (gradients held across micro-batches) and lagged (lagged scale state)
    "int8-exact-accum2": dict(train__grad_accum_steps=2, optim__update_proj_gap=2),
    "int8-lagged-accum2": dict(train__grad_accum_steps=2, train__accum_mode="lagged", optim__update_proj_gap=2),
    # model.lean_head: int8 embedding / lm_head with APOLLO-Mini states, alone and with lagged accumulation
    "int8-lean-head": dict(model__lean_head=True, optim__update_proj_gap=2),
    "int8-lean-head-lagged-accum2": dict(model__lean_head=True, train__grad_accum_steps=2, train__accum_mode="lagged",
                                         optim__update_proj_gap=2),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_resume_is_bit_exact(corpus, tmp_path, variant):
    """6 steps in one go == 3 steps, checkpoint, resume in a new trainer, 3 more (across a proj refresh)."""
    over = dict(VARIANTS[variant], train__max_steps=6)
    run(make_cfg(corpus, tmp_path, "full", train__save_every=3, **over))
    run(make_cfg(corpus, tmp_path, "resumed", **over), resume=os.path.join(tmp_path, "full", "checkpoint-3"))
    assert_same_checkpoint(os.path.join(tmp_path, "full", "checkpoint-6"),
                           os.path.join(tmp_path, "resumed", "checkpoint-6"))
    full, resumed = losses(os.path.join(tmp_path, "full")), losses(os.path.join(tmp_path, "resumed"))
    assert sorted(resumed) == [4, 5, 6]
    assert all(resumed[s] == full[s] for s in resumed)


def test_resume_in_place_rotation_and_fresh_run_guard(corpus, tmp_path):
    cfg = make_cfg(corpus, tmp_path, "r", train__max_steps=4, train__save_every=1, train__keep_checkpoints=2)
    run(cfg)
    run_dir = os.path.join(tmp_path, "r")
    assert [s for s, _ in ck.list_checkpoints(run_dir)] == [4, 3]  # rotation keeps the last 2
    assert open(os.path.join(run_dir, "latest")).read().strip() == "checkpoint-4"
    assert not [d for d in os.listdir(run_dir) if d.startswith(".")]
    ref = losses(run_dir)
    # a fresh run must not train over existing checkpoints
    with pytest.raises(CheckpointError, match=r"already holds checkpoints.*--resume"):
        run(make_cfg(corpus, tmp_path, "r", train__max_steps=4))
    assert [s for s, _ in ck.list_checkpoints(run_dir)] == [4, 3]
    # resuming step 3 drops the metrics lines after it, then re-logs step 4 identically
    tr = run(make_cfg(corpus, tmp_path, "r", train__max_steps=4, train__keep_checkpoints=2),
             resume=os.path.join(run_dir, "checkpoint-3"))
    rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert losses(run_dir) == ref
    assert tr.opt.step_count == 4
    # auto continues from latest with a larger max_steps (allowed change), logging settings too
    tr = run(make_cfg(corpus, tmp_path, "r", train__max_steps=6, train__log_every=2), resume="auto")
    assert tr.opt.step_count == 6 and [s for s, _ in ck.list_checkpoints(run_dir)][0] == 6


def test_auto_without_checkpoint_starts_fresh(corpus, tmp_path, capsys):
    tr = run(make_cfg(corpus, tmp_path, "new", train__max_steps=1), resume="auto")
    assert tr.opt.step_count == 1
    assert "no checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("key,value", [("model.hidden_size", 256), ("optim.name", "apollo"),
                                       ("optim.float_optim", "adam8bit")])
def test_incompatible_config_is_refused(corpus, tmp_path, key, value):
    run(make_cfg(corpus, tmp_path, "r", train__max_steps=1))
    cfg = make_cfg(corpus, tmp_path, "r", train__max_steps=2, **{key.replace(".", "__"): value})
    old = getattr(getattr(make_cfg(corpus, tmp_path), key.split(".")[0]), key.split(".")[1])
    with pytest.raises(IncompatibleCheckpoint) as e:
        run(cfg, resume="auto")
    msg = str(e.value)
    assert f"{key}={old!r}" in msg and f"{key}={value!r}" in msg and "\n" not in msg


def test_resume_names_each_setting_it_changes(corpus, tmp_path, capsys):
    """A resume says, one line per key, what each changed setting does: the lr schedule's with the lr at the
    resume step before and after (train.max_steps 4 -> 24: the cosine is stretched, the lr at step 4 jumps
    from the minimum to near the peak); the seed, the rounding and the dtype from here on. Before: silence."""
    from qapollo.optim.schedule import lr_at
    from qapollo.train import Trainer
    run(make_cfg(corpus, tmp_path, "r", train__max_steps=4, optim__warmup_steps=1))
    changed = dict(train__max_steps=24, optim__lr=0.002, train__seed=1, model__stochastic_round=False,
                   model__dtype="bfloat16")
    cfg = make_cfg(corpus, tmp_path, "r", optim__warmup_steps=1, **changed)
    cfg.resume = "auto"
    capsys.readouterr()
    Trainer(cfg, progress=False).setup()
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("qapollo: note:")]
    assert len(notes) == len(changed), notes
    line = {key: next(n for n in notes if f"note: {key.replace('__', '.')}=" in n) for key in changed}
    ratio = cfg.optim.min_lr_ratio
    before, after = lr_at(4, 0.01, 1, 4, ratio), lr_at(4, 0.002, 1, 24, ratio)
    assert f"stretched to 24 steps and the lr at step 4 changes from {before:.4g} to {after:.4g}" in \
        line["train__max_steps"]
    assert f"changes from {before:.4g} to {after:.4g}" in line["optim__lr"]
    assert "rounding noise" in line["train__seed"] and "rounded to nearest" in line["model__stochastic_round"]
    assert "bfloat16" in line["model__dtype"]


# ---- broken checkpoints ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_run(corpus, tmp_path_factory):
    """A run with checkpoint-2 and checkpoint-4 (`latest`), copied per test and then broken."""
    out = tmp_path_factory.mktemp("saved")
    run(make_cfg(corpus, out, "r", train__max_steps=4, train__save_every=2, train__keep_checkpoints=0))
    return os.path.join(out, "r")


def _rewrite_model(ckpt, edit):
    """Rewrite model.safetensors through `edit(tensors)` and fix the manifest: only the tensor checks see it."""
    path = os.path.join(ckpt, "model.safetensors")
    tensors, meta = read_tensors(path)
    edit(tensors)
    _fix_manifest(ckpt, "model.safetensors", ck.write_safetensors(path, ck.tensor_items(tensors), meta))


def _fix_manifest(ckpt, name, entry):
    path = os.path.join(ckpt, "trainer_state.json")
    state = json.load(open(path))
    state["files"][name] = entry
    json.dump(state, open(path, "w"))


def _truncate(ckpt):
    p = os.path.join(ckpt, "model.safetensors")
    os.truncate(p, os.path.getsize(p) // 2)


def _flip_byte(ckpt):
    p = os.path.join(ckpt, "optimizer.safetensors")
    with open(p, "r+b") as f:
        f.seek(os.path.getsize(p) - 100)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))


def _bad_header(ckpt):
    p = os.path.join(ckpt, "model.safetensors")
    with open(p, "r+b") as f:
        f.seek(8)
        f.write(b"{garbage")
    _fix_manifest(ckpt, "model.safetensors", {"bytes": os.path.getsize(p), "crc32": ck.file_crc32(p)})


BREAKERS = {
    "truncated": (_truncate, r"model\.safetensors: \d+ bytes, expected \d+"),
    "corrupted": (_flip_byte, r"optimizer\.safetensors: checksum mismatch"),
    "missing file": (lambda c: os.remove(os.path.join(c, "rng_state.safetensors")), r"rng_state\.safetensors: missing"),
    "no trainer_state": (lambda c: os.remove(os.path.join(c, "trainer_state.json")), r"trainer_state\.json: missing"),
    "bad json": (lambda c: open(os.path.join(c, "trainer_state.json"), "w").write('{"global_step": 4,'),
                 r"trainer_state\.json: not valid JSON"),
    "bad config": (lambda c: open(os.path.join(c, "config.yaml"), "w").write("model: [1, 2"),
                   r"config\.yaml: not a valid run config"),
    "bad header": (_bad_header, r"model\.safetensors: not a readable safetensors file"),
    "missing tensor": (lambda c: _rewrite_model(c, lambda t: t.pop("model.norm.weight")),
                       r"model\.safetensors: tensor 'model\.norm\.weight' missing"),
    "shape mismatch": (lambda c: _rewrite_model(c, lambda t: t.update({"lm_head.weight": t["lm_head.weight"][:-1]})),
                       r"model\.safetensors: tensor 'lm_head\.weight' has shape"),
}


@pytest.mark.parametrize("kind", BREAKERS)
def test_broken_checkpoint_is_named_and_auto_falls_back(corpus, saved_run, tmp_path, capsys, kind):
    out = tmp_path / "out"
    run_dir = os.path.join(out, "r")
    shutil.copytree(saved_run, run_dir)
    breaker, pattern = BREAKERS[kind]
    breaker(os.path.join(run_dir, "checkpoint-4"))
    cfg = make_cfg(corpus, out, "r", train__max_steps=4, train__keep_checkpoints=0)
    cfg.resume = os.path.join(run_dir, "checkpoint-4")
    with pytest.raises(CheckpointError) as e:
        Trainer(cfg, progress=False).setup()
    assert re.search(pattern, str(e.value)) and "\n" not in str(e.value), str(e.value)
    assert "checkpoint-4" in str(e.value)
    # auto: warns, falls back to checkpoint-2 and replaces the broken checkpoint-4 when it gets there
    capsys.readouterr()
    tr = run(make_cfg(corpus, out, "r", train__max_steps=4, train__keep_checkpoints=0), resume="auto")
    err = capsys.readouterr().err
    assert "falling back to" in err and "checkpoint-2" in err and re.search(pattern, err)
    assert tr.opt.step_count == 4
    assert_same_checkpoint(os.path.join(saved_run, "checkpoint-4"), os.path.join(run_dir, "checkpoint-4"))


def test_failed_save_keeps_previous_checkpoint(corpus, saved_run, tmp_path, monkeypatch):
    run_dir = os.path.join(tmp_path, "r")
    shutil.copytree(saved_run, run_dir)
    cfg = make_cfg(corpus, tmp_path, "r", train__max_steps=5, train__keep_checkpoints=1)
    cfg.resume = "auto"
    tr = Trainer(cfg, progress=False)
    tr.setup()
    tr.train_step()
    real = ck.write_safetensors

    def failing(path, items, meta):
        if path.endswith("optimizer.safetensors"):
            raise OSError(28, "No space left on device")
        return real(path, items, meta)
    monkeypatch.setattr(ck.saving, "write_safetensors", failing)
    with pytest.raises(ck.DiskSpaceError, match=r"disk filled up while writing checkpoint-5 .*No space left on "
                                                 r"device.*continues from .*checkpoint-4"):
        tr.save()
    assert sorted(os.listdir(run_dir)) == ["checkpoint-2", "checkpoint-4", "latest", "metrics.jsonl"]
    assert open(os.path.join(run_dir, "latest")).read().strip() == "checkpoint-4"
    assert_same_checkpoint(os.path.join(saved_run, "checkpoint-4"), os.path.join(run_dir, "checkpoint-4"))


# ---- SIGTERM in a real process, then resume ---------------------------------------------------------
def test_sigterm_saves_and_resume_matches_uninterrupted(corpus, tmp_path):
    # min_lr_ratio=1: the lr does not depend on max_steps, so the interrupted run can use a huge one
    conf = {"model": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                      "vocab_size": 512, "max_position_embeddings": 64},
            "optim": {"warmup_steps": 2, "min_lr_ratio": 1.0, "float_optim": "adamw", "update_proj_gap": 2},
            "train": {"batch_size": 2, "seq_len": 16, "log_every": 1, "output_dir": str(tmp_path / "out"),
                      "run_name": "sig", "keep_checkpoints": 0},
            "data": {"path": corpus["data.path"], "tokenizer": corpus["data.tokenizer"],
                     "cache_dir": corpus["data.cache_dir"]},
            "eval": {"tokens": 256}}
    yml = tmp_path / "tiny.yaml"
    yml.write_text(yaml.safe_dump(conf))
    run_dir = tmp_path / "out" / "sig"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, os.path.join(ROOT, "run_7b.py"), "--config", str(yml), "--no-progress"]
    p = subprocess.Popen(cmd + ["train.max_steps=100000"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run_dir / "metrics.jsonl").exists() or not (run_dir / "metrics.jsonl").read_text().strip():
        assert p.poll() is None and time.time() < deadline, p.communicate()
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 143, err  # 128 + SIGTERM, as shells report it
    (k, path), = ck.list_checkpoints(run_dir)
    assert out.strip().splitlines()[-1].startswith(f"stopped by SIGTERM: saved step {k} in {path}, loss ")
    assert 1 <= k < 100000 and ck.read_state(path)["global_step"] == k
    n = k + 3
    r = subprocess.run(cmd + ["--resume", str(run_dir), f"train.max_steps={n}"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"resumed from {path}" in r.stderr
    ref = load_config(str(yml), [f"train.max_steps={n}", "train.run_name=ref"])
    run(ref)
    assert_same_checkpoint(os.path.join(tmp_path, "out", "ref", f"checkpoint-{n}"), os.path.join(run_dir, f"checkpoint-{n}"))
    assert losses(run_dir) == losses(os.path.join(tmp_path, "out", "ref"))


def test_package_never_unpickles():
    pat = re.compile(r"torch\.load\(|torch\.save\(|^\s*(import|from)\s+(pickle|dill|cloudpickle)\b|pickle\.(load|dump)"
                     r"|weights_only\s*=\s*False", re.M)
    hits = []
    for dirpath, _, files in os.walk(os.path.join(ROOT, "qapollo")):
        for f in files:
            if f.endswith(".py"):
                p = os.path.join(dirpath, f)
                hits += [f"{p}: {m.group(0)}" for m in pat.finditer(open(p).read())]
    assert not hits


def test_model_load_in_batches_is_exact(tmp_path):
    """load_model_tensors reopens the file every batch_bytes (bounded RSS at 7B): same tensors, every one."""
    from safetensors.torch import save_file
    torch.manual_seed(0)
    src = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 16, bias=False), torch.nn.LayerNorm(16))
    path = str(tmp_path / "model.safetensors")
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, path)
    dst = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 16, bias=False), torch.nn.LayerNorm(16))
    opened = []
    real_open = ck.open_safetensors
    ck.loading.open_safetensors = lambda p: opened.append(p) or real_open(p)
    try:
        ck.load_model_tensors(dst, path, batch_bytes=1024)  # 8 KiB, 128 B + 2 KiB, 64 B + 64 B
    finally:
        ck.loading.open_safetensors = real_open
    assert len(opened) == 3
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_resume_at_max_steps_trains_nothing_and_writes_nothing(corpus, tmp_path, capsys):
    run(make_cfg(corpus, tmp_path, train__max_steps=2))
    run_dir = tmp_path / "run"
    before = {p: os.path.getmtime(p) for _, p in ck.list_checkpoints(run_dir)}
    capsys.readouterr()
    tr = run(make_cfg(corpus, tmp_path, train__max_steps=2), resume="auto")
    assert tr.opt.step_count == 2
    cap = capsys.readouterr()
    assert "nothing to train" in cap.out + cap.err
    assert {p: os.path.getmtime(p) for _, p in ck.list_checkpoints(run_dir)} == before
