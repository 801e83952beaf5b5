"""HF export: loads with transformers offline, weights are the dequantized checkpoint in bf16, logits
match the training model within bf16 tolerance; sharding, --force and broken input."""
import json
import os

import pytest
import torch
from safetensors import safe_open

from qapollo import quant
from qapollo.cli import main
from qapollo.model import int8_modules
from tests.helpers import make_cfg, run



pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# lean: model.lean_head, the embedding and lm_head int8 too (exported dequantized like the projections)
@pytest.fixture(scope="module", params=[dict(model__weight_quant=True), dict(model__weight_quant=False),
                                        dict(model__lean_head=True)], ids=["int8", "float", "lean"])
def trained(request, corpus, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("exp")
    tr = run(make_cfg(corpus, out, "r", train__max_steps=3, **request.param))
    return tr, os.path.join(out, "r")


def expected_weights(model) -> dict:
    """What the export must contain: HF names, int8 projections dequantized, everything in bf16."""
    out = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items() if "weight_" not in k}
    for name, m in int8_modules(model):
        out[name + ".weight"] = quant.dequantize(m.weight_codes, m.weight_scale, m.weight_zero, m.group_size,
                                                 torch.bfloat16)
    return out


def read_export(out) -> tuple[dict, list]:
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    tensors = {}
    for f in files:
        with safe_open(os.path.join(out, f), "pt") as st:
            assert st.metadata() == {"format": "pt"}
            tensors.update({k: st.get_tensor(k).clone() for k in st.keys()})
    return tensors, files


def test_export_loads_and_logits_match(trained, tmp_path, capsys):
    from transformers import AutoTokenizer, LlamaForCausalLM
    tr, run_dir = trained
    out = str(tmp_path / "hf")
    assert main(["export", run_dir, out, "--max-shard-size", "300KB"]) == 0
    assert "exported" in capsys.readouterr().out
    # sharded, with an index that names every tensor
    tensors, files = read_export(out)
    assert len(files) > 1 and files[0] == "model-00001-of-%05d.safetensors" % len(files)
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert set(index["weight_map"]) == set(tensors) and set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in tensors.values())
    want = expected_weights(tr.model)
    assert set(tensors) == set(want)
    for k in want:
        assert tensors[k].dtype == torch.bfloat16 and torch.equal(tensors[k], want[k]), k
    conf = json.load(open(os.path.join(out, "config.json")))
    assert conf["architectures"] == ["LlamaForCausalLM"] and conf["model_type"] == "llama"
    assert conf["torch_dtype"] == "bfloat16" and conf["tie_word_embeddings"] is False
    assert (conf["bos_token_id"], conf["eos_token_id"], conf["pad_token_id"]) == (1, 2, None)
    assert os.path.exists(os.path.join(out, "generation_config.json"))

    tok = AutoTokenizer.from_pretrained(out)
    assert (tok.bos_token_id, tok.eos_token_id) == (conf["bos_token_id"], conf["eos_token_id"])
    text = "To be, or not to be, that is the question"
    ids = tok(text, return_tensors="pt").input_ids
    assert ids[0, 0].item() == tok.bos_token_id
    assert ids[0, 1:].tolist() == tr.data.tokenizer.encode(text)  # same pieces as training saw

    hf = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tr.model.eval()
    with torch.no_grad():
        ref = tr.model(input_ids=ids).logits
        got = hf(input_ids=ids).logits
    assert (got - ref).abs().max() < 0.01 * ref.abs().max()  # bf16 weights: ~3 significant digits (seen: 0.2%)
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    hf_bf16 = LlamaForCausalLM.from_pretrained(out)
    assert hf_bf16.dtype == torch.bfloat16


def test_single_file_force_and_errors(trained, tmp_path, capsys):
    _, run_dir = trained
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["export", run_dir, str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "--force" in err and err.count("\n") == 1
    assert os.listdir(out) == ["notes.txt"]
    ckpt = os.path.join(run_dir, "checkpoint-3")
    assert main(["export", ckpt, str(out), "--force"]) == 0
    files = sorted(os.listdir(out))
    assert "model.safetensors" in files and "notes.txt" not in files and "model.safetensors.index.json" not in files
    assert not [f for f in os.listdir(tmp_path) if ".tmp-export" in f]
    # a broken checkpoint is named, in one line, and nothing is written
    broken = tmp_path / "broken"
    os.makedirs(broken / "checkpoint-3")
    for f in os.listdir(ckpt):
        if f != "tokenizer":
            (broken / "checkpoint-3" / f).write_bytes(open(os.path.join(ckpt, f), "rb").read())
    os.truncate(broken / "checkpoint-3" / "model.safetensors", 1000)
    capsys.readouterr()
    assert main(["export", str(broken), str(tmp_path / "hf2")]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "expected" in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "hf2")
