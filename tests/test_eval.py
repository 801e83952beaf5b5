"""`qapollo eval` (training's tokenization and packing, one JSON line, one-line errors) and the round trip
export → init_from → export, which must stay within the int8 rounding."""
import json
import lzma
import os

import pytest
import torch
from transformers import LlamaForCausalLM

from qapollo.cli import main
from qapollo.config import load_config
from qapollo.evaluate import evaluate
from qapollo.export import export
from qapollo.model import int8_modules
from qapollo.train import Trainer
from tests.test_checkpoint import ROOT, corpus, make_cfg, one_thread, run  # noqa: F401 (fixtures)
from tests.test_export import read_export

SEQ = 16


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def val_text(tmp_path_factory):
    """Held-out text the models never trained on (Shakespeare's validation works, 60 kB)."""
    path = tmp_path_factory.mktemp("val") / "val.txt"
    with lzma.open(os.path.join(ROOT, "qapollo/assets/corpus/shakespeare.validation.txt.xz"), "rt") as f:
        path.write_text(f.read(60_000))
    return str(path)


def ev(model, val_text, **kw):
    return evaluate(str(model), [val_text], seq_len=SEQ, batch_size=8, progress=False, **kw)


# Round-trip bounds, derived from measurements (2-core CPU, torch 2.13; 40- and 100-step tiny runs, MHA and GQA,
# tied and untied): the re-import's eval loss differed from the export's by 1.1e-5 to 3.1e-5 nats, its second
# export's logits from the first's by 1.7e-4 to 5.8e-4 relative (Frobenius).
# - loss: 2e-4 nats, a 6x margin over the largest measurement;
# - logits: 2e-3 relative, 3.4x the largest measurement and half of bf16's unit roundoff (2^-8): the round trip
#   costs less than one bf16 rounding of the logits, i.e. less than the export format's own precision (the
#   export's own bf16 rounding moved the logits by 7e-4 to 1.2e-3 on the same models).
LOSS_BOUND = 2e-4
LOGITS_BOUND = 2e-3


@pytest.mark.parametrize("kv,tied", [(4, False), (2, True)], ids=["mha-untied", "gqa-tied"])
def test_round_trip_stays_within_int8_rounding(corpus, val_text, tmp_path, kv, tied):  # noqa: F811
    src = run(make_cfg(corpus, tmp_path, "src", train__max_steps=40, model__num_key_value_heads=kv,
                       model__tie_word_embeddings=tied))
    export(os.path.join(tmp_path, "src"), str(tmp_path / "A"))
    # init_from the export, untrained: checkpoint-0, then its own export
    cfg = load_config(None, [f"model.init_from={tmp_path / 'A'}", f"data.path={corpus['data.path']}",
                             f"data.cache_dir={corpus['data.cache_dir']}", f"train.output_dir={tmp_path}",
                             "train.run_name=re", "train.batch_size=2", f"train.seq_len={SEQ}",
                             "optim.float_optim=adamw"])
    re = Trainer(cfg, progress=False)
    re.setup()
    re.save()
    export(os.path.join(tmp_path, "re"), str(tmp_path / "A2"))

    # weights: each re-imported matrix is the exported bf16 matrix rounded to nearest (≤ half its step), so
    # within half a step plus the export's bf16 rounding (≤ 2^-8 relative) of the trained int8 weights
    exported, _ = read_export(tmp_path / "A")
    trained = dict(int8_modules(src.model))
    for name, mod in int8_modules(re.model):
        w = mod.dequantized(torch.float32)
        step = mod.weight_scale.repeat_interleave(mod.group_size).view(w.shape)
        assert ((w - exported[name + ".weight"].float()).abs() <= (0.5 + 1e-4) * step).all(), name
        w0 = trained[name].dequantized(torch.float32)
        assert ((w - w0).abs() <= (0.5 + 1e-4) * step + 2.0 ** -8 * w0.abs()).all(), name
    for name, p in re.model.named_parameters():
        assert torch.equal(p, exported[name].float()), name  # bf16 → fp32 is exact

    # eval loss: the re-import (int8) vs the export (bf16, through transformers)
    l_src, l_a, l_re = ev(tmp_path / "src", val_text), ev(tmp_path / "A", val_text), ev(tmp_path / "re", val_text)
    assert l_src["loss"] < 5.6  # trained: far below ln(512) = 6.24
    assert abs(l_re["loss"] - l_a["loss"]) <= LOSS_BOUND, (l_re["loss"], l_a["loss"])
    assert abs(l_a["loss"] - l_src["loss"]) <= LOSS_BOUND  # the export itself
    assert ev(tmp_path / "A", val_text, int8=True)["loss"] == l_re["loss"]  # --int8 is exactly init_from's model

    # a second export of the untrained re-import: logits within the same bound
    a = LlamaForCausalLM.from_pretrained(tmp_path / "A", dtype=torch.float32).eval()
    a2 = LlamaForCausalLM.from_pretrained(tmp_path / "A2", dtype=torch.float32).eval()
    x = torch.randint(0, 512, (4, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        za, za2 = a(input_ids=x).logits, a2(input_ids=x).logits
    assert (za2 - za).norm() / za.norm() <= LOGITS_BOUND
    assert json.load(open(tmp_path / "A2" / "config.json"))["tie_word_embeddings"] is tied


@pytest.fixture(scope="module")
def exported(corpus, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("ev")
    run(make_cfg(corpus, out, "r", train__max_steps=5))
    export(os.path.join(out, "r"), str(out / "hf"))
    return out


def _paragraph_tokens(path, tok):
    """The expected token stream, written independently of data.py: <s> ids </s> per blank-line paragraph."""
    paras, cur = [], []
    for line in open(path):
        if line.strip():
            cur.append(line)
        elif cur:
            paras.append("".join(cur).strip("\n"))
            cur = []
    if cur:
        paras.append("".join(cur).strip("\n"))
    ids = []
    for p in paras:
        ids += [tok.bos_id()] + tok.encode(p) + [tok.eos_id()]
    return ids


def test_eval_cli_on_an_export(corpus, exported, val_text, capsys):  # noqa: F811
    import sentencepiece as spm
    assert main(["eval", str(exported / "hf"), "--data", val_text, "--seq-len", str(SEQ), "--batch-size", "8",
                 "--max-tokens", "4000"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    r = json.loads(out[0])
    # independently: the same blocks through transformers' own loss
    ids = _paragraph_tokens(val_text, spm.SentencePieceProcessor(model_file=corpus["data.tokenizer"]))[:4000]
    n = len(ids) // SEQ
    blocks = torch.tensor(ids[: n * SEQ]).view(n, SEQ)
    model = LlamaForCausalLM.from_pretrained(exported / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        want = sum(model(input_ids=b, labels=b).loss.item() * len(b) for b in blocks.split(8)) / n
    assert (r["blocks"], r["tokens"], r["seq_len"]) == (n, n * (SEQ - 1), SEQ)
    assert abs(r["loss"] - want) < 1e-5 and abs(r["ppl"] - torch.tensor(want).exp().item()) < 1e-3
    # a run dir, its checkpoint dir: the same model, evaluated as trained (int8)
    a = ev(exported / "r", val_text, max_tokens=4000)
    assert a == {**ev(exported / "r" / "checkpoint-5", val_text, max_tokens=4000), "model": a["model"]}
    assert a["checkpoint"].endswith("checkpoint-5") and abs(a["loss"] - r["loss"]) < 1e-3


@pytest.mark.parametrize("args,needle", [
    (["nope", "--data", "VAL"], "nope: no such run dir"),
    (["RUN", "--data", "missing.txt"], "matches no file"),
    (["HF", "--data", "VAL", "--seq-len", "4096"], "exceeds the model's max_position_embeddings"),
    (["HF", "--data", "VAL", "--max-tokens", "10"], "fewer than one block"),
    (["RUN", "--data", "VAL", "--int8"], "--int8 is for Hugging Face folders"),
])
def test_eval_errors_are_one_line(exported, val_text, capsys, args, needle):
    paths = {"RUN": str(exported / "r"), "HF": str(exported / "hf"), "VAL": val_text}
    assert main(["eval", *[paths.get(a, a) for a in args], "--no-progress"]) == 2
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], captured.err
    assert captured.out == ""
