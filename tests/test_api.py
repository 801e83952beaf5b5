"""The Python API: a transformers LlamaForCausalLM made int8 with the in-backward optimizer, trained in a
plain loop, saved and loaded as a qapollo checkpoint; and transformers' Trainer through the API."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import qapollo
from qapollo.config import ConfigError
from qapollo.layerwise import LayerwiseOptimizer
from qapollo.model import Int8Linear, int8_modules
from tests.helpers import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")


def hf_model(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=64))


def batches(n, k=2):
    """The same k micro-batches every step: a loss that can fall in a few steps."""
    g = torch.Generator().manual_seed(1)
    fixed = [torch.randint(0, 256, (2, 16), generator=g) for _ in range(k)]
    return [fixed for _ in range(n)]


def train(model, opt, steps, k=2):
    """The README's plain loop: the bookkeeping around an ordinary forward and loss.backward()."""
    losses = []
    for micro_batches in steps:
        total = 0.0
        for micro, x in enumerate(micro_batches):
            opt.begin_step(last_micro=micro == k - 1)
            loss = model(input_ids=x, labels=x).loss
            (loss / k).backward()
            opt.after_backward()
            total += loss.item()
        opt.end_step()
        losses.append(total / k)
    return losses


def test_prepare_trains_a_transformers_model_in_a_plain_loop_and_resumes_exactly(tmp_path):
    model = hf_model()
    w = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    cfg = qapollo.config_for(model, lr=1e-2, warmup_steps=2, max_steps=10, grad_accum_steps=2, group_size=64,
                             float_optim="adamw")
    assert (cfg.model.hidden_size, cfg.model.vocab_size, cfg.train.grad_accum_steps) == (64, 256, 2)
    opt = qapollo.prepare(model, cfg)
    assert isinstance(opt, LayerwiseOptimizer) and len(int8_modules(model)) == 14
    up = model.model.layers[0].mlp.up_proj
    assert isinstance(up, Int8Linear)  # rounded to nearest: within half a quantization step of the float weight
    assert (up.dequantized(torch.float32) - w).abs().max() <= 0.5 * up.weight_scale.max() * (1 + 1e-5)
    data = batches(6)
    first = train(model, opt, data[:3])
    assert opt.step_count == 3
    ckpt = qapollo.save(str(tmp_path / "run"), model, opt, cfg)
    rest = train(model, opt, data[3:])
    assert rest[-1] < first[0]  # it learns

    # a fresh model from the checkpoint's own config (qapollo's build), loaded and continued: the same numbers
    saved = qapollo.read_config(ckpt)
    model2, opt2 = qapollo.build(saved, "cpu", init=False)
    record = qapollo.load(str(tmp_path / "run"), model2, opt2, saved)
    assert record["global_step"] == 3 and opt2.step_count == 3
    assert train(model2, opt2, data[3:]) == rest
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))


def test_config_for_refuses_unknown_settings_and_prepare_the_lean_head():
    model = hf_model()
    with pytest.raises(ConfigError, match="unknown setting 'learning_rate'"):
        qapollo.config_for(model, learning_rate=1e-3)
    with pytest.raises(ConfigError, match="lean_head"):
        qapollo.prepare(model, qapollo.config_for(model, lean_head=True, group_size=64))
    assert isinstance(qapollo.QapolloError("x"), Exception) and issubclass(ConfigError, qapollo.QapolloError)


def test_hf_trainer_example_trains_and_resumes_bit_exactly(tmp_path):
    """examples/hf_trainer.py: transformers.Trainer drives the in-backward optimizer; the loss falls; a
    resume from Trainer's checkpoint-10 (+ qapollo's) gives the uninterrupted run's losses."""
    pytest.importorskip("accelerate")
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}

    def example(out, *extra):
        cmd = [sys.executable, os.path.join(ROOT, "examples", "hf_trainer.py"), "--tiny", "--max-steps", "20",
               "--out", str(out), *extra]
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert p.returncode == 0, p.stderr[-2000:]
        return json.loads(p.stdout.strip().splitlines()[-1])
    r = example(tmp_path / "a")
    assert r["steps"] == 20 and r["last_loss"] < r["first_loss"] - 2.0, r
    assert sorted(os.listdir(tmp_path / "a" / "qapollo")) == ["checkpoint-10", "checkpoint-20", "latest"]

    (tmp_path / "b" / "qapollo").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoint-10", tmp_path / "b" / "checkpoint-10")
    shutil.copytree(tmp_path / "a" / "qapollo" / "checkpoint-10", tmp_path / "b" / "qapollo" / "checkpoint-10")
    assert example(tmp_path / "b", "--resume") == r

    def losses(run):
        state = json.load(open(tmp_path / run / "checkpoint-20" / "trainer_state.json"))
        return [h["loss"] for h in state["log_history"] if "loss" in h]
    assert losses("b") == losses("a")


def test_trainer_arguments_the_in_backward_optimizer_cannot_honour_are_refused(tmp_path):
    pytest.importorskip("accelerate")
    from transformers import TrainingArguments
    from qapollo.hf_trainer import TrainerError, check_arguments
    cfg = qapollo.config_for(hf_model(), grad_accum_steps=2, group_size=64)
    ok = dict(output_dir=str(tmp_path), gradient_accumulation_steps=2, max_grad_norm=0, use_cpu=True, report_to=[])
    check_arguments(TrainingArguments(**ok), cfg)
    for bad, match in (({"max_grad_norm": 1.0}, "no whole gradient exists to clip"),
                       ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps=4 but")):
        with pytest.raises(TrainerError, match=match):
            check_arguments(TrainingArguments(**{**ok, **bad}), cfg)


# ---- an API checkpoint in the command line's hands ---------------------------------------------------------
def _api_checkpoint(run_dir, vocab_size, tokenizer=None, steps=3):
    """A transformers model trained a few steps through the API and saved with qapollo.save."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64))
    cfg = qapollo.config_for(model, lr=1e-2, warmup_steps=2, max_steps=10, grad_accum_steps=2, group_size=64,
                             float_optim="adamw", batch_size=2, seq_len=16)
    opt = qapollo.prepare(model, cfg)
    g = torch.Generator().manual_seed(1)
    train(model, opt, [[torch.randint(0, vocab_size, (2, 16), generator=g) for _ in range(2)] for _ in range(steps)])
    return qapollo.save(str(run_dir), model, opt, cfg, tokenizer)


def _cli(capsys, *argv):
    from qapollo.cli import main
    capsys.readouterr()
    rc = main(list(argv))
    return rc, capsys.readouterr().err


def test_api_checkpoint_resumes_with_qapollo_train_alone(corpus, tmp_path, monkeypatch, capsys):
    """`qapollo train --resume DIR` on a checkpoint qapollo.save wrote: the config (shape, tokenizer, run dir)
    comes from the checkpoint, the data the API never tracked starts afresh with a note, and the run goes on in
    DIR. Before, the default config's shape was refused (and with --config, the empty data cursor)."""
    from qapollo.tokenizer import load_tokenizer
    run_dir = tmp_path / "api_run"
    _api_checkpoint(run_dir, 512, load_tokenizer(corpus["data.tokenizer"]))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    rc, err = _cli(capsys, "train", "--resume", str(run_dir), "--no-progress", f"data.path={corpus['data.path']}",
                   f"data.cache_dir={corpus['data.cache_dir']}", "train.max_steps=5")
    assert rc == 0, err
    assert "holds no data position" in err and "resumed from" in err
    assert sorted(os.listdir(run_dir)) == ["checkpoint-3", "checkpoint-5", "latest", "metrics.jsonl"]
    assert os.listdir(cwd) == []  # nothing written where the command ran


def test_a_refused_resume_leaves_no_folder_behind(corpus, tmp_path, monkeypatch, capsys):
    """A resume refused after the run's folder would have been created (here: another corpus, so the data
    cursor does not match) leaves nothing behind (before: an empty checkpoints/<run_name>/)."""
    from qapollo.tokenizer import load_tokenizer
    run_dir = tmp_path / "api_run"
    _api_checkpoint(run_dir, 512, load_tokenizer(corpus["data.tokenizer"]))
    monkeypatch.chdir(tmp_path)
    common = [f"data.cache_dir={corpus['data.cache_dir']}", "train.max_steps=5", "eval.tokens=256"]
    rc, err = _cli(capsys, "train", "--no-progress", "--resume", str(run_dir), f"data.path={corpus['data.path']}", *common)
    assert rc == 0, err
    other = tmp_path / "other.txt"
    other.write_text(open(corpus["data.path"]).read()[:50_000])
    rc, err = _cli(capsys, "train", "--no-progress", "--resume", str(run_dir), "--config",
                   str(run_dir / "checkpoint-5" / "config.yaml"), f"data.path={other}", "train.output_dir=elsewhere",
                   "train.run_name=b", *common)
    assert rc == 2 and "data cursor" in err.strip().splitlines()[-1], err
    assert not os.path.exists(tmp_path / "elsewhere")


def test_a_tokenizer_larger_than_the_vocabulary_is_one_error_line(tmp_path, capsys):
    """A checkpoint saved without a tokenizer: eval, generate, export and train --resume each refuse the
    shipped 32k tokenizer for a 256-token model in one `error:` line, and export writes nothing (before: an
    IndexError traceback from eval and generate, and an export with the 32k tokenizer beside vocab_size 256).
    save records that no tokenizer was given, and the one it is given (a transformers tokenizer too)."""
    from qapollo.checkpoint import read_state
    ckpt = _api_checkpoint(tmp_path / "run", 256)
    assert read_state(ckpt)["tokenizer"] is None and not os.path.exists(os.path.join(ckpt, "tokenizer"))
    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be, that is the question. " * 40)
    for argv in (["eval", ckpt, "--data", str(text), "--device", "cpu"],
                 ["generate", ckpt, "--prompt", "To be", "--max-new-tokens", "4", "--device", "cpu"],
                 ["export", ckpt, str(tmp_path / "hf")],
                 ["train", "--resume", ckpt, "--no-progress"]):
        rc, err = _cli(capsys, *argv)
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert rc == 2 and len(errors) == 1 and "Traceback" not in err, (argv, err)
        assert "32000 tokens" in errors[0] and "256" in errors[0] and "without" in errors[0], errors
    assert not os.path.exists(tmp_path / "hf")

    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(253)]
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)},
                                                                                 unk_token="<unk>")),
                                     unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    ckpt = _api_checkpoint(tmp_path / "run_hf", 256, hf_tok)
    assert read_state(ckpt)["tokenizer"]["vocab_size"] == 256
    assert _cli(capsys, "export", ckpt, str(tmp_path / "hf"))[0] == 0
    assert json.load(open(tmp_path / "hf" / "config.json"))["vocab_size"] == 256
    assert os.path.isfile(tmp_path / "hf" / "tokenizer.json")


# ---- transformers' Trainer ---------------------------------------------------------------------------------
class _Blocks(torch.utils.data.Dataset):
    def __init__(self, n):
        g = torch.Generator().manual_seed(2)
        self.x = torch.randint(0, 256, (n, 16), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


@pytest.mark.parametrize("sized_by", ["max_steps", "epochs"])
def test_trainer_step_count_sets_the_lr_schedule(tmp_path, capsys, sized_by):
    """Trainer's own step count (max_steps=6, or one epoch of 10 blocks in windows of 3 × 2: 2 steps) lays out
    the lr schedule, with a note, where the config says 1000 steps (before: lr 0.005, 0.01, 0.01, ... of a
    1000-step schedule)."""
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from qapollo.optim.schedule import lr_at
    model = hf_model()
    k = 1 if sized_by == "max_steps" else 3
    cfg = qapollo.config_for(model, lr=1e-2, warmup_steps=1, max_steps=1000, grad_accum_steps=k, group_size=64,
                             float_optim="adamw")
    kw = qapollo.trainer_kwargs(model, cfg)
    opt, lrs = kw["optimizers"][0].opt, []

    class Lr(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            lrs.append(opt.current_lr())
    size = {"max_steps": 6} if sized_by == "max_steps" else {"num_train_epochs": 1}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=k,
                             max_grad_norm=0, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
                             disable_tqdm=True, **size)
    trainer = Trainer(model=model, args=args, train_dataset=_Blocks(12 if sized_by == "max_steps" else 10), **kw)
    trainer.add_callback(Lr())
    trainer.train()
    steps = 6 if sized_by == "max_steps" else 2
    assert opt.max_steps == cfg.train.max_steps == steps and opt.step_count == steps
    assert lrs == [lr_at(s, 1e-2, 1, steps, cfg.optim.min_lr_ratio) for s in range(steps)], lrs
    assert f"Trainer runs {steps} optimizer steps" in capsys.readouterr().err


def test_a_shorter_last_window_is_not_rescaled_again():
    """Trainer divides the loss of an epoch's last, shorter window among its own micro-batches (here 2 of 3),
    so their summed gradient already is their mean: the tensors must step on the same gradient as a window of 2
    of 2 (before: 1.5× that, K/used applied a second time)."""
    from qapollo.hf_trainer import InBackwardOptimizer
    from qapollo.optim.updaters import TorchAdamUpdater
    seen = {}
    real = TorchAdamUpdater.step

    def spy(self, grad, *a, **kw):
        seen[self.name] = grad.norm().item()
        return real(self, grad, *a, **kw)
    xs = batches(1, k=2)[0]
    norms = {}
    for k in (2, 3):
        model = hf_model()
        opt = qapollo.prepare(model, qapollo.config_for(model, lr=1e-2, grad_accum_steps=k, group_size=64,
                                                        float_optim="adamw"))
        face = InBackwardOptimizer(opt, k)
        seen.clear()
        TorchAdamUpdater.step = spy
        try:
            for x in xs:  # what Trainer does for a window of 2 micro-batches
                face.train()
                (model(input_ids=x, labels=x).loss / 2).backward()
            face.step()
        finally:
            TorchAdamUpdater.step = real
        norms[k] = dict(seen)
    assert norms[2] and norms[3] == pytest.approx(norms[2], rel=1e-6)
