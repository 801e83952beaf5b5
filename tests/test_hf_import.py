"""model.init_from: tiny random LlamaForCausalLMs (MHA and GQA, tied and untied, rope scaling, sharded or not)
saved with save_pretrained train through init_from and resume without the folder's weights; bad folders give
one `error:` line and exit 2 before anything is written; the planner reads the folder's shape."""
import copy
import glob
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from qapollo import quant
from qapollo.cli import main
from qapollo.config import load_config
from qapollo.export import export
from qapollo.optim.updaters import ApolloUpdater
from qapollo.planner import predict_peak
from qapollo.metrics import read_metrics
from qapollo.model import int8_modules
from qapollo.tokenizer import load_tokenizer
from qapollo.train import Trainer

# (num_key_value_heads, tied, rope_scaling, sharded)

pytestmark = pytest.mark.usefixtures("one_thread")

VARIANTS = {
    "mha-untied": (4, False, None, False),
    "gqa-tied": (2, True, None, True),
    "gqa-untied-rope-scaled": (2, False, {"rope_type": "linear", "factor": 4.0}, False),
    "mha-tied": (4, True, None, False),
}


def save_hf(path, corpus, kv=4, tied=False, rope_scaling=None, sharded=False, seed=0):  # noqa: F811
    """A random HF LLaMA (init std 0.1: attention matters to the logits) + the corpus tokenizer, as users get them."""
    torch.manual_seed(seed)
    conf = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=kv, max_position_embeddings=64, rope_theta=500.0,
                       rope_scaling=dict(rope_scaling) if rope_scaling else None,  # transformers edits it
                       tie_word_embeddings=tied, initializer_range=0.1)
    model = LlamaForCausalLM(conf).eval()
    model.save_pretrained(path, max_shard_size="200KB" if sharded else "5GB")
    load_tokenizer(corpus["data.tokenizer"]).save(str(path))
    return model


def overrides(corpus, folder, out, run="ft", *more):  # noqa: F811
    """What a user types: init_from, data and training keys only, no model shape."""
    return [f"model.init_from={folder}", f"data.path={corpus['data.path']}",
            f"data.cache_dir={corpus['data.cache_dir']}", f"train.output_dir={out}", f"train.run_name={run}",
            "train.batch_size=2", "train.seq_len=16", "train.max_steps=3", "train.log_every=1",
            "optim.float_optim=adamw", "optim.lr=0.003", "optim.warmup_steps=2", "eval.tokens=256", *more]


def trainer(corpus, folder, out, *more, resume=None):  # noqa: F811
    cfg = load_config(None, overrides(corpus, folder, out, "ft", *more))
    cfg.resume = resume
    tr = Trainer(cfg, progress=False)
    tr.setup()
    return tr


def logits(model, x):
    model.eval()
    with torch.no_grad():
        out = model(input_ids=x).logits.float()
    model.train()
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_init_from_trains_and_resumes_without_the_weights(corpus, tmp_path, variant):  # noqa: F811
    kv, tied, rope, sharded = VARIANTS[variant]
    folder = tmp_path / "hf"
    hf = save_hf(folder, corpus, kv, tied, rope, sharded)
    assert (len(glob.glob(str(folder / "*.safetensors"))) > 1) == sharded
    tr = trainer(corpus, folder, tmp_path)
    m, model = tr.cfg.model, tr.model
    assert (m.hidden_size, m.num_key_value_heads, m.tie_word_embeddings, m.rope_theta) == (128, kv, tied, 500.0)
    assert m.rope_scaling == rope and tr.cfg.data.tokenizer == str(folder)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    # the float tensors are the folder's, exactly; every matrix is its HF weight rounded to nearest
    ref = hf.state_dict()
    for name, p in model.named_parameters():
        assert torch.equal(p, ref[name]), name
    for name, mod in int8_modules(model):
        w = ref[name + ".weight"]
        step = mod.weight_scale.repeat_interleave(mod.group_size).view(w.shape)
        assert ((mod.dequantized(torch.float32) - w).abs() <= (0.5 + 1e-4) * step).all(), name  # fp32 slack
    # and it is HF's LlamaForCausalLM on those weights: the same logits up to fp32 rounding, so the shape,
    # GQA, rope theta and scaling, rms eps and the tie were all taken over
    hf_q = copy.deepcopy(hf)
    with torch.no_grad():
        for name, mod in int8_modules(model):
            hf_q.get_submodule(name).weight.copy_(mod.dequantized(torch.float32))
    x = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    z, z_q = logits(model, x), logits(hf_q, x)
    assert (z - z_q).abs().max() <= 1e-5 * z_q.abs().max()
    if rope:  # the comparison sees rope scaling: without it the same weights give other logits
        plain = LlamaForCausalLM(LlamaConfig(**{**hf.config.to_dict(), "rope_scaling": None,
                                                "rope_parameters": {"rope_type": "default", "rope_theta": 500.0}}))
        plain.load_state_dict(hf_q.state_dict())
        assert (logits(plain, x) - z_q).abs().max() > 1e-2 * z_q.abs().max()

    tr.fit()  # 3 steps; the startup guard checks that every trainable tensor changed in the first
    rows = read_metrics(os.path.join(tmp_path, "ft", "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["loss"] == r["loss"] for r in rows)
    assert {u.state["step"] for u in tr.opt.updaters.values() if isinstance(u, ApolloUpdater)} == {3}  # fresh states
    # its export is the same architecture again (kv heads, rope scaling, tie)
    export(os.path.join(tmp_path, "ft"), str(tmp_path / "exp"))
    again = LlamaForCausalLM.from_pretrained(tmp_path / "exp").config
    assert (again.num_key_value_heads, again.tie_word_embeddings) == (kv, tied)
    assert again.rope_parameters == hf.config.rope_parameters

    # a resume loads the checkpoint: the folder's weights are gone, its shape comes from the saved config
    for f in glob.glob(str(folder / "*.safetensors*")):
        os.remove(f)
    tr2 = trainer(corpus, folder, tmp_path, "train.max_steps=5", resume="auto")
    for (k, a), (_, b) in zip(tr.model.state_dict().items(), tr2.model.state_dict().items()):
        assert torch.equal(a, b), k
    assert tr2.opt.step_count == 3 and tr2.cfg.model.num_key_value_heads == kv
    tr2.fit()
    assert tr2.opt.step_count == 5


@pytest.fixture(scope="module")
def base_folder(corpus, tmp_path_factory):  # noqa: F811
    d = tmp_path_factory.mktemp("base") / "hf"
    save_hf(d, corpus)
    return d


def _edit_config(folder, **changes):
    conf = json.load(open(folder / "config.json"))
    conf.update(changes)
    json.dump(conf, open(folder / "config.json", "w"))


def _drop_tensor(folder, name):
    tensors = load_file(folder / "model.safetensors")
    del tensors[name]
    save_file(tensors, folder / "model.safetensors", {"format": "pt"})


def _to_bin(folder):
    os.rename(folder / "model.safetensors", folder / "pytorch_model.bin")


BAD = {  # case: (how to break the folder, extra overrides, what the error line must say)
    "no-folder": (lambda f: shutil.rmtree(f), [], "no such folder"),
    "no-config": (lambda f: os.remove(f / "config.json"), [], "no config.json"),
    "architecture": (lambda f: _edit_config(f, model_type="mixtral", architectures=["MixtralForCausalLM"]), [],
                     "MixtralForCausalLM is not supported: qapollo trains LlamaForCausalLM, MistralForCausalLM"),
    "bias": (lambda f: _edit_config(f, attention_bias=True), [], "bias terms are not supported"),
    "missing-tensor": (lambda f: _drop_tensor(f, "model.layers.1.mlp.up_proj.weight"), [],
                       "'model.layers.1.mlp.up_proj.weight' is missing"),
    "vocab": (lambda f: None, ["data.tokenizer=default"], "vocab_size 512 but tokenizer 'default' has 32000"),
    "conflicting-shape": (lambda f: None, ["model.hidden_size=256"], "model.hidden_size=256 conflicts"),
    "pickle-only": (_to_bin, [], "never unpickles"),
    "no-tokenizer": (lambda f: [os.remove(p) for p in glob.glob(str(f / "tokenizer*"))], [], "has no tokenizer"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_init_from_is_one_line_and_writes_nothing(corpus, base_folder, tmp_path, capsys, case):  # noqa: F811
    folder = tmp_path / "hf"
    shutil.copytree(base_folder, folder)
    breaker, more, needle = BAD[case]
    breaker(folder)
    assert main(["train", "--no-progress", *overrides(corpus, folder, tmp_path / "out", "bad", *more)]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err
    assert not os.path.exists(tmp_path / "out")


def _shape_folder(path, **shape):
    os.makedirs(path)
    LlamaConfig(architectures=["LlamaForCausalLM"], **shape).to_json_file(os.path.join(path, "config.json"))


def test_plan_reads_the_folder_shape(tmp_path, capsys):
    """`qapollo plan` of the continued-pre-training config takes the shape of config.json alone (no weights)."""
    l3 = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
              num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0)
    _shape_folder(tmp_path / "l3", **l3)
    assert main(["plan", "--config", "configs/llama_7b_continue.yaml", f"model.init_from={tmp_path / 'l3'}",
                 "train.batch_size=1", "train.seq_len=256", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    h, i, v, layers = 4096, 14336, 128256, 32
    mats = layers * (2 * h * h + 2 * 1024 * h + 3 * i * h)  # GQA: k and v are 1024 × 4096
    assert plan["components"]["int8_codes"] == mats
    assert plan["components"]["float_params"] == 2 * (2 * v * h + (2 * layers + 1) * h)  # bf16 embed + lm_head
    # the same config with a 32k vocabulary and MHA: 4× less embedding/lm_head and state
    _shape_folder(tmp_path / "l2", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                  num_hidden_layers=32, num_attention_heads=32, max_position_embeddings=4096)
    cfg = load_config("configs/llama_7b_continue.yaml", [f"model.init_from={tmp_path / 'l2'}"])
    from qapollo.hf_import import plan_shape
    plan_shape(cfg)
    p2 = predict_peak(cfg, "cuda")
    assert p2["components"]["float_params"] == 2 * (2 * 32000 * h + (2 * layers + 1) * h)
    assert plan["components"]["float_optim_states"] > 3.9 * p2["components"]["float_optim_states"]
    # the placeholder path is refused in one line
    assert main(["plan", "--config", "configs/llama_7b_continue.yaml"]) == 2
    assert "model.init_from path/to/Llama-2-7b-hf: no such folder" in capsys.readouterr().err


def test_tied_plan_matches_measurement():
    """Tied embeddings: one V·h tensor and state, its gradient held through the backward (planner ±10 %)."""
    from tests.helpers import tiny_config
    from tests.test_memory import measured_peak
    for tied in (False, True):
        cfg = tiny_config(model__vocab_size=8192, model__tie_word_embeddings=tied, train__batch_size=4,
                          train__seq_len=64, model__max_position_embeddings=64, train__check_updates=False)
        plan, meas = predict_peak(cfg, "cpu", chunked_loss=True)["peak_bytes"], measured_peak(cfg, True)
        assert abs(plan - meas) <= 0.10 * meas, (tied, plan, meas)


def test_quantize_from_matches_quantize():
    """Int8Linear.quantize_from_ (init_from's path) equals quant.quantize of the whole matrix, chunk or not."""
    from qapollo.model import Int8Linear
    w = torch.randn(2048 + 64, 2112) * 0.05  # several row chunks, groups running across rows
    lin = Int8Linear(2112, 2048 + 64, 64, "cpu")
    lin.quantize_from_(lambda rows: w[rows].to(torch.bfloat16))
    codes, scale, zero = quant.quantize(w.to(torch.bfloat16), 64)
    assert torch.equal(lin.weight_codes, codes) and torch.equal(lin.weight_scale, scale)
    assert torch.equal(lin.weight_zero, zero)
