"""`qapollo eval RUN --tasks`: lm-evaluation-harness on a tiny int8 checkpoint, a local task, no network."""
import json
import os
import sys

import pytest
import torch

from qapollo.cli import main
from qapollo.inference import load_for_eval
from tests.helpers import ROOT, make_cfg, run

pytestmark = pytest.mark.usefixtures("one_thread")

TASKS = os.path.join("tests", "data", "lm_eval_tasks")  # relative: the task's data_files are, to the repo root


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(k, "1")
    monkeypatch.chdir(ROOT)


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("lmeval")
    run(make_cfg(corpus, out, "r", train__max_steps=3))
    return str(out / "r")


def logprob(model, tok, context, continuation):
    """log p(continuation | <s> context) from one full forward, with no batching, padding or slicing."""
    ctx = [tok.bos_id] + tok.encode(context)
    whole = [tok.bos_id] + tok.encode(context + continuation)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].float(), -1)
    return sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))


def test_local_multiple_choice_task_scores_as_computed_directly(trained, capsys):
    pytest.importorskip("lm_eval")
    capsys.readouterr()
    assert main(["eval", trained, "--tasks", "qapollo_tiny_mc", "--include-path", TASKS, "--batch-size", "5"]) == 0
    out = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    r = json.loads(out[-1])
    assert r["checkpoint"].endswith("checkpoint-3")
    got = r["tasks"]["qapollo_tiny_mc"]
    model, tok, _, _ = load_for_eval(trained, "cpu", progress=False)  # the int8 checkpoint, as trained
    docs = [json.loads(ln) for ln in open(os.path.join(TASKS, "tiny_mc.jsonl"))]
    acc = acc_norm = 0
    for d in docs:
        lps = [logprob(model, tok, d["question"], " " + c) for c in d["choices"]]
        acc += max(range(len(lps)), key=lps.__getitem__) == d["answer"]
        norm = [lp / len(" " + c) for lp, c in zip(lps, d["choices"])]  # lm-eval: per character
        acc_norm += max(range(len(norm)), key=norm.__getitem__) == d["answer"]
    assert got["acc"] == pytest.approx(acc / len(docs)) and got["acc_norm"] == pytest.approx(acc_norm / len(docs))
    assert "acc_stderr" in got and r["n_samples"]["qapollo_tiny_mc"]["effective"] == len(docs)


def test_rolling_loglikelihood_and_generate_until(trained):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from qapollo.decode import generate
    from qapollo.harness import make_lm
    model, tok, _, _ = load_for_eval(trained, "cpu", progress=False)
    text = "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar."
    lm = make_lm(model, tok, max_length=64, batch_size=2)
    ask = lambda kind, args: [Instance(kind, {}, args, 0)]  # noqa: E731
    (rolling,) = lm.loglikelihood_rolling(ask("loglikelihood_rolling", (text,)))
    assert rolling == pytest.approx(logprob(model, tok, "", text), abs=1e-3)  # one window: the whole text
    short = make_lm(model, tok, max_length=8, batch_size=2)  # several windows, each token scored once
    (windowed,) = short.loglikelihood_rolling(ask("loglikelihood_rolling", (text,)))
    assert windowed < 0 and windowed != pytest.approx(rolling, abs=1e-3)
    free = generate(model, tok, "The king", 12)["completion"]
    stop = free[2:4] if free[2:4].strip() else "\n"
    (cut,) = lm.generate_until(ask("generate_until", ("The king", {"until": [stop], "max_gen_toks": 12})))
    assert stop not in cut and free.startswith(cut)


def test_unknown_task_and_missing_lm_eval_are_one_line(trained, capsys, monkeypatch):
    import importlib.util
    if importlib.util.find_spec("lm_eval"):  # (the missing-package case below runs either way)
        assert main(["eval", trained, "--tasks", "qapollo_tiny_mc,no_such_task", "--include-path", TASKS]) == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
        assert len(err) == 1 and "unknown lm-eval task(s) no_such_task" in err[0]
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm-evaluation-harness were not installed
    assert main(["eval", trained, "--tasks", "hellaswag"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "pip install lm_eval" in err[0]


def test_task_data_that_cannot_be_read_is_one_line_before_the_model_loads(trained, tmp_path, capsys, monkeypatch):
    """A relative --include-path from another folder (the task's data_files are relative to the repository
    root), and a task whose data set is on the Hub while offline: one error line each, no traceback."""
    pytest.importorskip("lm_eval")
    import datasets
    import huggingface_hub
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 before the import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    loaded = []
    monkeypatch.setattr("qapollo.evaluate.load_for_eval", lambda *a, **k: loaded.append(a))
    monkeypatch.chdir(tmp_path)
    rel = os.path.relpath(os.path.join(ROOT, TASKS), tmp_path)
    assert main(["eval", trained, "--tasks", "qapollo_tiny_mc", "--include-path", rel]) == 2
    err = capsys.readouterr().err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert "could not load task qapollo_tiny_mc: FileNotFoundError" in line and "tiny_mc.jsonl" in line, err
    assert f"data_files are read relative to the folder the command runs in ({tmp_path})" in line
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "t.yaml").write_text(
        "task: qapollo_hub_task\ndataset_path: qapollo-test/no-such-set\noutput_type: multiple_choice\n"
        "test_split: test\ndoc_to_text: '{{q}}'\ndoc_to_target: 0\ndoc_to_choice: ['a', 'b']\n")
    assert main(["eval", trained, "--tasks", "qapollo_hub_task", "--include-path", "hub"]) == 2
    err = capsys.readouterr().err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert "could not load task qapollo_hub_task: ConnectionError" in line and "needs the network" in line, err
    assert "Traceback" not in err and loaded == []  # refused before the model was loaded


def test_a_continuation_longer_than_the_context_is_scored_in_windows(trained):
    """Each continuation token is scored once, with as much text before it as fits in max_length (the context
    is cut from the left); the pieces' log-probs add up. Before: a RuntimeError from a negative slice."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from qapollo.harness import make_lm
    model, tok, _, _ = load_for_eval(trained, "cpu", progress=False)
    context, cont = "Friends, Romans, countrymen,", " lend me your ears; I come to bury Caesar, not to praise him."
    lm = make_lm(model, tok, max_length=8, batch_size=3)
    ctx_ids, cont_ids = lm._encode_pair(context, cont)
    assert len(cont_ids) > 2 * 8  # three pieces of at most 8 tokens
    ((got, greedy),) = lm.loglikelihood([Instance("loglikelihood", {}, (context, cont), 0)])
    whole, want = ctx_ids + cont_ids, 0.0
    with torch.no_grad():
        for i in range(len(ctx_ids), len(whole)):
            piece_end = len(ctx_ids) + ((i - len(ctx_ids)) // 8 + 1) * 8  # the end of the piece token i is in
            start = max(0, min(piece_end, len(whole)) - 1 - 8)  # its window: the 8 inputs before the piece's end
            logits = model(input_ids=torch.tensor([whole[start:i]])).logits[0, -1].float()
            want += float(torch.log_softmax(logits, -1)[whole[i]])
    assert got == pytest.approx(want, abs=1e-3) and greedy is False
    wide = make_lm(model, tok, max_length=64, batch_size=3)  # all of it fits: one forward, as computed directly
    ((full, _),) = wide.loglikelihood([Instance("loglikelihood", {}, (context, cont), 0)])
    assert full == pytest.approx(logprob(model, tok, context, cont), abs=1e-3)
