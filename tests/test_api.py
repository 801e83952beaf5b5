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
