"""Crashes, half-applied steps and full disks never cost more than the last checkpoint interval.

* kill -9 of a real training process at five points (QAPOLLO_TEST_HOOK, qapollo/testhook.py): every
  checkpoint-N under its final name loads and equals the uninterrupted run's, `--resume auto` continues
  from the newest complete one, and the chain of resumed runs ends bit-identical to the uninterrupted run;
* an exception inside backward (out of memory, a non-finite gradient, a bug) leaves the in-memory state
  half-updated: nothing of it is ever saved, and the run says why it stopped and where it will resume;
* a disk without room for the next checkpoint stops the run before anything is written.
"""
import collections
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import yaml

from qapollo import checkpoint as ck
from qapollo import failures
from qapollo.cli import main
from qapollo.optim.updaters import ApolloUpdater
from qapollo.train import StepFailed, TrainError, Trainer
from tests.helpers import ROOT, make_cfg, run
from tests.test_checkpoint import assert_same_checkpoint, losses

STEPS, EVERY = 10, 2



pytestmark = pytest.mark.usefixtures("one_thread")

def tiny_yaml(corpus, out, run_name):  # noqa: F811
    """The tests' tiny model with two micro-batches per step, a projection refresh every 2 steps."""
    return {"model": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                      "vocab_size": 512, "max_position_embeddings": 64},
            "optim": {"warmup_steps": 2, "float_optim": "adamw", "update_proj_gap": 2},
            "train": {"batch_size": 2, "seq_len": 16, "grad_accum_steps": 2, "max_steps": STEPS, "save_every": EVERY,
                      "keep_checkpoints": 2, "log_every": 1, "output_dir": str(out), "run_name": run_name},
            "data": {"path": corpus["data.path"], "tokenizer": corpus["data.tokenizer"],
                     "cache_dir": corpus["data.cache_dir"]},
            "eval": {"tokens": 256}}


def reference(corpus, out):  # noqa: F811
    """The uninterrupted run, every checkpoint kept."""
    from qapollo.config import config_from_dict
    conf = tiny_yaml(corpus, out, "ref")
    conf["train"]["keep_checkpoints"] = 0
    run(config_from_dict(conf))
    return os.path.join(out, "ref")


# (hook, checkpoints on disk after the kill, the step `--resume auto` then continues from)
KILLS = [
    ("step@3", [2], 2),            # between the two micro-batches of step 3: gradients accumulated
    ("save:model@4", [2], 2),      # model.safetensors of checkpoint-4 written, optimizer.safetensors not
    ("save:latest@4", [2], 2),     # `latest` names checkpoint-4, still a temp folder
    ("backward@5", [4, 2], 4),     # half of step 5's tensors updated in backward
    ("save:rotate@8", [8, 6, 4], 8),  # checkpoint-8 in place, checkpoint-4 not yet rotated away
]


def check_loads_and_matches(corpus, out, path, ref_dir):  # noqa: F811
    """Resume a probe run from `path` (validation + load of every tensor) and compare it with the reference."""
    cfg = make_cfg(corpus, out, "probe")
    cfg.train.grad_accum_steps = 2
    cfg.resume = path
    Trainer(cfg, progress=False).setup()
    assert_same_checkpoint(os.path.join(ref_dir, os.path.basename(path)), path)


def test_kill_9_at_every_point_then_resume_auto_matches_uninterrupted(corpus, tmp_path):  # noqa: F811
    ref_dir = reference(corpus, tmp_path / "out")
    yml = tmp_path / "tiny.yaml"
    yml.write_text(yaml.safe_dump(tiny_yaml(corpus, tmp_path / "out", "k")))
    run_dir = str(tmp_path / "out" / "k")
    cmd = [sys.executable, os.path.join(ROOT, "run_7b.py"), "--config", str(yml), "--no-progress"]
    for i, (hook, on_disk, resume_step) in enumerate(KILLS):
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=ROOT, QAPOLLO_TEST_HOOK=hook)
        r = subprocess.run(cmd + (["--resume", "auto"] if i else []), cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == -9, (hook, r.returncode, r.stderr[-2000:])  # the hook point was reached
        assert f"SIGKILL at {hook}" in r.stderr
        if i:  # this process resumed from what the previous kill said
            assert f"resumed from {os.path.join(run_dir, f'checkpoint-{KILLS[i - 1][2]}')}" in r.stderr, r.stderr
        assert [s for s, _ in ck.list_checkpoints(run_dir)] == on_disk, hook
        tmp = [d for d in os.listdir(run_dir) if d.startswith(".tmp-checkpoint-")]
        assert bool(tmp) == hook.startswith(("save:model", "save:latest")), (hook, tmp)  # never a checkpoint
        for _, path in ck.list_checkpoints(run_dir):
            check_loads_and_matches(corpus, tmp_path / "out", path, ref_dir)
        assert ck.resume_target(run_dir) == os.path.join(run_dir, f"checkpoint-{resume_step}"), hook
    cfg = make_cfg(corpus, tmp_path / "out", "k")
    cfg.train.grad_accum_steps, cfg.train.save_every, cfg.train.keep_checkpoints = 2, EVERY, 2
    cfg.train.max_steps, cfg.optim.update_proj_gap = STEPS, 2
    tr = run(cfg, resume="auto")
    assert tr.opt.step_count == STEPS
    assert_same_checkpoint(os.path.join(ref_dir, f"checkpoint-{STEPS}"), os.path.join(run_dir, f"checkpoint-{STEPS}"))
    assert losses(run_dir) == losses(ref_dir)  # metrics re-logged from each resume point, same values
    assert not [d for d in os.listdir(run_dir) if d.startswith(".")]  # the next save cleaned the leftovers
    assert [s for s, _ in ck.list_checkpoints(run_dir)] == [10, 8]


# ---- a step that fails half-way ---------------------------------------------------------------------
def fail_in_backward(monkeypatch, tr, exc, at_step):
    """Raise `exc` from the third APOLLO update of step `at_step`, after other tensors were updated."""
    seen = collections.Counter()
    real = ApolloUpdater.step

    def step(self, *a, **k):
        if tr.opt.step_count + 1 == at_step:
            seen["apollo"] += 1
            if seen["apollo"] == 3:
                seen["fired_before"] = len(tr.opt._fired)
                tr.stop_requested = True  # a SIGINT/SIGTERM arriving now must not save this state either
                raise exc
        return real(self, *a, **k)
    monkeypatch.setattr(ApolloUpdater, "step", step)
    return seen


def frozen(run_dir):
    return {os.path.join(d, f): (os.path.getsize(os.path.join(d, f)), os.stat(os.path.join(d, f)).st_mtime_ns)
            for d, _, fs in os.walk(run_dir) for f in fs if f != "metrics.jsonl"}


@pytest.mark.parametrize("kind", ["oom", "nonfinite", "bug"])
def test_step_failing_in_backward_is_never_saved(corpus, tmp_path, monkeypatch, capsys, kind):  # noqa: F811
    exc = {"oom": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                         "capacity of 11.5 GiB\nof which 1.2 GiB is free."),
           "nonfinite": TrainError("gradient of model.layers.0.self_attn.q_proj is not finite"),
           "bug": KeyError("a bug in a hook")}[kind]
    cfg = make_cfg(corpus, tmp_path, "r", train__max_steps=6, train__save_every=2)
    tr = Trainer(cfg, progress=False)
    tr.setup()
    seen = fail_in_backward(monkeypatch, tr, exc, at_step=3)
    with pytest.raises({"oom": StepFailed, "nonfinite": TrainError, "bug": KeyError}[kind]) as e:
        tr.fit()
    run_dir = tr.run_dir
    ckpt2 = os.path.join(run_dir, "checkpoint-2")
    assert 0 < seen["fired_before"] < len(tr.opt.updaters)  # really half-way: some tensors stepped, not all
    assert tr.dirty_step == 3 and tr.opt.step_count == 2
    msg = str(e.value) if kind != "bug" else capsys.readouterr().err
    assert "step 3 did not complete" in msg and "nothing was saved" in msg
    assert f"--resume auto will continue from {ckpt2}" in msg
    if kind == "oom":
        assert "out of memory (tried to allocate 2.00 GiB)" in msg and "\n" not in msg
        assert "the memory plan predicted a" in msg and "lower train.batch_size (now 2) or train.seq_len (now 16)" in msg
        assert "model.activation_checkpointing=true" in msg
        assert ("configs/llama_7b_8gb.yaml" in msg) == os.path.exists(failures.PRESET_8GB)
    elif kind == "nonfinite":  # the trainer's own error keeps its type, with the resume point added
        assert e.value is exc and "\n" not in msg
        assert msg.startswith("step 3 did not complete (gradient of model.layers.0.self_attn.q_proj is not finite)")
    else:
        assert e.value is exc and "KeyError: 'a bug in a hook'" in msg and "traceback follows" in msg
    # nothing of step 3 reached the disk, and no save path accepts the dirty state now
    assert [s for s, _ in ck.list_checkpoints(run_dir)] == [2]
    assert open(os.path.join(run_dir, "latest")).read().strip() == "checkpoint-2"
    before = frozen(run_dir)
    direct = lambda: ck.save(tr.run_dir, tr.opt.step_count, tr.states(), config=tr.cfg,  # noqa: E731
                             incomplete_step=tr.dirty_step)
    for save in (tr.save, direct):
        with pytest.raises(ck.CheckpointError, match="refusing to save checkpoint-2: step 3 did not complete"):
            save()
    assert frozen(run_dir) == before and not [d for d in os.listdir(run_dir) if d.startswith(".")]
    ck.check_files(ckpt2, ck.read_state(ckpt2))  # intact, checksums included
    if kind == "oom":  # continuing gives exactly the uninterrupted run
        monkeypatch.undo()
        run(make_cfg(corpus, tmp_path, "r", train__max_steps=4, train__save_every=2), resume="auto")
        run(make_cfg(corpus, tmp_path, "ref", train__max_steps=4, train__save_every=2))
        assert_same_checkpoint(os.path.join(tmp_path, "ref", "checkpoint-4"), os.path.join(run_dir, "checkpoint-4"))


def test_oom_through_the_cli_is_one_line_exit_2(corpus, tmp_path, monkeypatch, capsys):  # noqa: F811
    yml = tmp_path / "tiny.yaml"
    yml.write_text(yaml.safe_dump(tiny_yaml(corpus, tmp_path / "out", "c")))
    real, calls = ApolloUpdater.step, collections.Counter()

    def step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3 * 14 + 5:  # 14 matrices: inside step 4's backward (two micro-batches, hooks fire once)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
        return real(self, *a, **k)
    monkeypatch.setattr(ApolloUpdater, "step", step)
    assert main(["train", "--config", str(yml), "--no-progress"]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "step 4 did not complete (out of memory (tried to allocate 20.00 MiB))" in lines[0]
    assert "continue from" in lines[0] and "checkpoint-2" in lines[0] and "Traceback" not in err
    assert [s for s, _ in ck.list_checkpoints(tmp_path / "out" / "c")] == [2]


def test_oom_advice_names_the_8gb_preset_only_when_it_exists(tmp_path, monkeypatch):
    from tests.helpers import tiny_config
    fake = (tiny_config(model__activation_checkpointing=True), torch.device("cpu"))
    monkeypatch.setattr(failures, "PRESET_8GB", str(tmp_path / "llama_7b_8gb.yaml"))
    assert "8 GB preset" not in failures.oom_advice(*fake)
    (tmp_path / "llama_7b_8gb.yaml").write_text("model: {}\n")
    advice = failures.oom_advice(*fake)
    assert advice.endswith("; to fit: lower train.batch_size (now 2) or train.seq_len (now 16), or start from the "
                           "8 GB preset configs/llama_7b_8gb.yaml (see `qapollo plan`)")
    assert "activation_checkpointing" not in advice  # already on: not suggested


# ---- disk space -------------------------------------------------------------------------------------
def fake_disk(monkeypatch, free_after: int, calls_ok: int):
    """shutil.disk_usage reports the real numbers `calls_ok` times, then only `free_after` bytes free."""
    real, n = shutil.disk_usage, collections.Counter()

    def usage(path):
        n["calls"] += 1
        u = real(path)
        return u if n["calls"] <= calls_ok else u._replace(free=free_after)
    monkeypatch.setattr(shutil, "disk_usage", usage)


def test_full_disk_stops_before_writing_and_keeps_checkpoints(corpus, tmp_path, monkeypatch):  # noqa: F811
    cfg = make_cfg(corpus, tmp_path, "d", train__max_steps=6, train__save_every=2)
    tr = Trainer(cfg, progress=False)
    fake_disk(monkeypatch, free_after=100 << 10, calls_ok=2)  # setup's check, checkpoint-2; then 100 KiB
    tr.setup()
    with pytest.raises(ck.DiskSpaceError) as e:
        tr.fit()
    run_dir = tr.run_dir
    ckpt2 = os.path.join(run_dir, "checkpoint-2")
    msg = str(e.value)
    assert msg.startswith(f"not enough disk space for checkpoint-4 in {run_dir}: it needs about ")
    assert "0.1 MiB are free; nothing was written" in msg and f"--resume auto continues from {ckpt2}" in msg
    assert "\n" not in msg
    assert tr.opt.step_count == 4 and tr.dirty_step is None  # the step itself completed; only the save failed
    assert sorted(os.listdir(run_dir)) == ["checkpoint-2", "latest", "metrics.jsonl"]
    ck.check_files(ckpt2, ck.read_state(ckpt2))
    # the size estimate covers the real checkpoint, with no more than the stated headroom to spare
    real = sum(f["bytes"] for f in ck.read_state(ckpt2)["files"].values())
    est = ck.checkpoint_bytes(tr.states())
    assert real <= est <= real + ck.saving.HEADROOM_BYTES


def test_disk_without_room_for_one_checkpoint_fails_before_anything_is_built(corpus, tmp_path, monkeypatch):  # noqa: F811
    fake_disk(monkeypatch, free_after=1 << 20, calls_ok=0)
    tr = Trainer(make_cfg(corpus, tmp_path / "out", "d"), progress=False)
    with pytest.raises(ck.DiskSpaceError, match=r"not enough disk space for the first checkpoint in .*: it needs "
                                                r"about .* MiB and 1\.0 MiB are free.*no checkpoint of this run"):
        tr.setup()
    assert not hasattr(tr, "model") and not hasattr(tr, "data") and not os.path.exists(tmp_path / "out")


# ---- Ctrl-C and SIGTERM ---------------------------------------------------------------------------
def train_with_signals(corpus, tmp_path, hook, run_name="s", log_every=1):  # noqa: F811
    """`qapollo train` on the tiny config (10 steps, a checkpoint every 2) with signals sent by the test hook;
    returns the exit code, the output (stdout and stderr in order) and the run dir."""
    yml = tmp_path / "tiny.yaml"
    conf = tiny_yaml(corpus, tmp_path / "out", run_name)
    conf["train"]["log_every"] = log_every
    yml.write_text(yaml.safe_dump(conf))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=ROOT, QAPOLLO_TEST_HOOK=hook)
    r = subprocess.run([sys.executable, "-m", "qapollo.cli", "train", "--config", str(yml), "--no-progress"],
                       cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=180)
    return r.returncode, r.stdout, str(tmp_path / "out" / run_name)


@pytest.mark.parametrize("sig, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_finishes_the_step_saves_it_names_it_and_exits_128_plus_signal(corpus, tmp_path, sig, code):  # noqa: F811
    # between step 3's micro-batches; logged every 2 steps, so the last step logged (2) is not the one saved
    rc, out, run_dir = train_with_signals(corpus, tmp_path, f"{sig}/step@3", log_every=2)
    assert rc == code, out[-3000:]
    again = "Ctrl-C again" if sig == "SIGINT" else "a second SIGTERM"
    assert f"qapollo: {sig}: stopping after step 3, then saving ({again} stops at once without saving)" in out
    ckpt3 = os.path.join(run_dir, "checkpoint-3")
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"stopped by {sig}: saved step 3 in {ckpt3}, loss ") and "--resume auto" in last, last
    assert [s for s, _ in ck.list_checkpoints(run_dir)] == [3, 2]
    assert open(os.path.join(run_dir, "latest")).read().strip() == "checkpoint-3"
    cfg = make_cfg(corpus, tmp_path / "out", "s", train__max_steps=4, train__save_every=2)
    cfg.train.grad_accum_steps, cfg.optim.update_proj_gap = 2, 2
    tr = run(cfg, resume="auto")  # the checkpoint on disk resumes
    assert tr.checkpoint_path == os.path.join(run_dir, "checkpoint-4") and tr.opt.step_count == 4
    assert [r["step"] for r in map(yaml.safe_load, open(os.path.join(run_dir, "metrics.jsonl")))] == [1, 2, 4]


@pytest.mark.parametrize("second, code, where", [
    ("SIGINT/save:model@3", 130, "half-way through writing checkpoint-3"),
    ("SIGINT/save:latest@3", 130, "`latest` names checkpoint-3, not yet renamed into place"),
    ("SIGTERM/backward@3", 143, "in step 3's backward: the step is abandoned"),
])
def test_a_second_signal_stops_at_once_and_leaves_the_last_checkpoint_as_it_was(corpus, tmp_path, second, code,  # noqa: F811
                                                                                  where):
    rc, out, run_dir = train_with_signals(corpus, tmp_path, f"SIGINT/step@3,{second}")
    assert rc == code, (where, out[-3000:])
    assert "qapollo: SIGINT: stopping after step 3, then saving" in out
    ckpt2 = os.path.join(run_dir, "checkpoint-2")
    last = out.strip().splitlines()[-1]
    assert last == (f"qapollo: stopped at once by a second {second.split('/')[0]}, without saving; the last saved "
                    f"step is 2 ({ckpt2}), where --resume auto continues"), (where, last)
    assert "Traceback" not in out and "saved step 3" not in out
    # no half-written checkpoint, `latest` names the one before, which is intact
    assert sorted(os.listdir(run_dir)) == ["checkpoint-2", "latest", "metrics.jsonl"], where
    assert open(os.path.join(run_dir, "latest")).read().strip() == "checkpoint-2"
    ck.check_files(ckpt2, ck.read_state(ckpt2))
    assert ck.resume_target(run_dir) == ckpt2
