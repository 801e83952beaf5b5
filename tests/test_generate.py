"""`qapollo generate` (greedy, top-p, int8 checkpoints as trained) and eval.sample_prompts at eval steps."""
import json

import pytest
import torch

from qapollo.cli import main
from qapollo.inference import load_for_eval
from qapollo.decode import generate
from qapollo.metrics import read_metrics
from tests.helpers import make_cfg, run

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["The king", "To be or not"]


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):  # noqa: F811
    """4 steps with an eval (and samples) at steps 2 and 4, TensorBoard on."""
    out = tmp_path_factory.mktemp("gen")
    cfg = make_cfg(corpus, out, "r", train__max_steps=4, train__tensorboard=True)
    cfg.eval.every, cfg.eval.sample_prompts, cfg.eval.sample_tokens = 2, PROMPTS, 12
    run(cfg)
    return out / "r"


def gen_cli(capsys, *args):
    capsys.readouterr()
    assert main(["generate", *map(str, args), "--json"]) == 0
    return [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]


def test_samples_at_eval_steps_are_what_generate_writes(trained, capsys):
    rows = [r for r in read_metrics(trained / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in rows] == [2, 4]
    assert all([s["prompt"] for s in r["samples"]] == PROMPTS for r in rows)
    assert all(isinstance(s["completion"], str) for r in rows for s in r["samples"])
    # the last eval's samples are the final checkpoint's greedy continuations: int8 weights as trained
    got = gen_cli(capsys, trained, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--max-new-tokens", 12)
    assert [g["completion"] for g in got] == [s["completion"] for s in rows[-1]["samples"]]
    assert all(g["tokens"] >= 1 for g in got)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(trained / "tb"))
    acc.Reload()
    assert "samples/text_summary" in acc.Tags()["tensors"]
    assert [e.step for e in acc.Tensors("samples/text_summary")] == [2, 4]


def test_greedy_with_the_cache_is_the_argmax_of_full_forwards(trained):
    model, tok, _, ckpt = load_for_eval(str(trained), "cpu", progress=False)
    assert ckpt.endswith("checkpoint-4")
    ids = [tok.bos_id] + tok.encode(PROMPTS[0])
    want = []
    with torch.no_grad():
        for _ in range(10):  # no cache: the whole sequence each time
            t = int(model(input_ids=torch.tensor([ids + want])).logits[0, -1].argmax())
            if t == tok.eos_id:
                break
            want.append(t)
    r = generate(model, tok, PROMPTS[0], max_new_tokens=10)
    assert r["tokens"] == len(want)
    assert r["completion"] == tok.decode(ids[1:] + want)[len(tok.decode(ids[1:])):]


def test_top_p_sampling_is_seeded(trained, capsys):
    base = [trained, "--prompt", PROMPTS[0], "--max-new-tokens", 16]
    a = gen_cli(capsys, *base, "--temperature", 1.0, "--top-p", 0.9, "--seed", 1)
    assert a == gen_cli(capsys, *base, "--temperature", 1.0, "--top-p", 0.9, "--seed", 1)
    assert a != gen_cli(capsys, *base, "--temperature", 1.0, "--top-p", 0.9, "--seed", 2)
    greedy = gen_cli(capsys, *base)
    assert greedy == gen_cli(capsys, *base, "--top-p", 1e-9, "--seed", 3)  # a nucleus of one token: the argmax
    stop = greedy[0]["completion"][3:5]
    if stop.strip():  # a stop string cuts the text before it
        cut = gen_cli(capsys, *base, "--stop", stop)[0]["completion"]
        assert stop not in cut and greedy[0]["completion"].startswith(cut)
