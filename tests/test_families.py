"""Mistral, Qwen2 and Qwen3 beside LLaMA (qapollo/families.py): tiny random models of each family, made with
transformers' own config classes and save_pretrained, go through model.init_from (their biases and q/k norms
exactly, the matrices int8), train (in-backward, exact or lagged accumulation, lean_head), resume bit-exactly,
export as their own class and evaluate there at the run's loss; the Python API prepares them; the planner
counts what they add; anything else is refused in one line before anything is written."""
import json
import os

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from qapollo import config_for, prepare, trainer_kwargs
from qapollo.cli import main
from qapollo.config import load_config
from qapollo.evaluate import evaluate
from qapollo.export import export
from qapollo.model import Int8Linear, int8_modules
from qapollo.planner import predict_peak
from qapollo.tokenizer import load_tokenizer
from qapollo.train import Trainer
from tests.helpers import measured_peak, tiny_config
from tests.test_checkpoint import assert_same_checkpoint
from tests.test_eval import SEQ, val_text  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rope_theta=10000.0, tie_word_embeddings=False,
             initializer_range=0.1)
FAMILIES = {  # name: (class, its config's extra keys, how the test trains it)
    # Mistral v0.1's window, larger than every sequence here: full attention, carried into the export
    "mistral": ("MistralForCausalLM", {"sliding_window": 32}, ["train.grad_accum_steps=2"]),
    "qwen2": ("Qwen2ForCausalLM", {}, ["train.grad_accum_steps=2", "train.accum_mode=lagged", "model.lean_head=true"]),
    # head_dim 32 while hidden / heads = 16: q and o projections are 128 wide
    "qwen3": ("Qwen3ForCausalLM", {"head_dim": 32}, ["model.lean_head=true"]),
}
SUPPORTED = "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"


def family_model(name, **more):
    arch, extra, _ = FAMILIES[name]
    conf_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    torch.manual_seed(0)
    model = getattr(transformers, arch)(conf_cls(**{**SHAPE, **extra, **more})).eval()
    with torch.no_grad():  # biases and norms away from their init (0, 1): a test sees whether they arrive
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.normal_(0.0, 0.5)
            elif "norm" in n:
                p.normal_(1.0, 0.2)
    return model


def save_family(path, corpus, name, **more):
    model = family_model(name, **more)
    model.save_pretrained(path)
    load_tokenizer(corpus["data.tokenizer"]).save(str(path))
    return model


def overrides(corpus, folder, out, run_name, *more):
    return [f"model.init_from={folder}", f"data.path={corpus['data.path']}", f"data.cache_dir={corpus['data.cache_dir']}",
            f"train.output_dir={out}", f"train.run_name={run_name}", "train.batch_size=2", f"train.seq_len={SEQ}",
            "train.max_steps=4", "train.log_every=1", "model.group_size=32", "optim.float_optim=adamw",
            "optim.lr=0.003", "optim.warmup_steps=2", "eval.tokens=256", *more]


def trainer(corpus, folder, out, run_name, *more, resume=None):
    cfg = load_config(None, overrides(corpus, folder, out, run_name, *more))
    cfg.resume = resume
    tr = Trainer(cfg, progress=False)
    tr.setup()
    return tr


def loss_of(spec, val):
    return evaluate(str(spec), [val], seq_len=SEQ, batch_size=8, progress=False)["loss"]


@pytest.mark.parametrize("name", FAMILIES)
def test_init_from_is_the_folders_model_in_int8(corpus, val_text, tmp_path, name):  # noqa: F811
    """Every float tensor (biases, q/k norms included) is the folder's exactly, every matrix its weight rounded to
    nearest, and the model is the family's class on those weights: its logits are transformers' with the
    dequantized matrices; the step-0 eval of the int8 model is the float folder's within 0.02 nats."""
    folder = tmp_path / "hf"
    hf = save_family(folder, corpus, name)
    tr = trainer(corpus, folder, tmp_path, "step0")
    model, arch = tr.model, FAMILIES[name][0]
    assert type(model).__name__ == arch and tr.cfg.model.architecture == arch
    ref = hf.state_dict()
    floats = dict(model.named_parameters())
    assert any(n.endswith(".bias") for n in floats) == (name == "qwen2")
    assert any("q_norm" in n for n in floats) == (name == "qwen3")
    for n, p in floats.items():
        assert torch.equal(p, ref[n]), n
    for n, mod in int8_modules(model):
        w = ref[n + ".weight"]
        step = mod.weight_scale.repeat_interleave(mod.group_size).view(w.shape)
        assert ((mod.dequantized(torch.float32) - w).abs() <= (0.5 + 1e-4) * step).all(), n
    with torch.no_grad():
        for n, mod in int8_modules(model):
            hf.get_submodule(n).weight.copy_(mod.dequantized(torch.float32))
        x = torch.randint(0, 512, (2, SEQ), generator=torch.Generator().manual_seed(0))
        model.eval()
        z, z_hf = model(input_ids=x).logits, hf(input_ids=x).logits
    assert (z - z_hf).abs().max() <= 1e-5 * z_hf.abs().max()
    tr.save()  # checkpoint-0: the folder in int8, untrained
    int8, flt = loss_of(tmp_path / "step0", val_text), loss_of(folder, val_text)
    print(f"\n{name}: step-0 eval int8 {int8:.5f} float {flt:.5f} delta {int8 - flt:+.5f}")
    assert abs(int8 - flt) < 0.02, (int8, flt)


@pytest.mark.parametrize("name", FAMILIES)
def test_train_resume_and_export_as_its_own_class(corpus, val_text, tmp_path, name, capsys):  # noqa: F811
    """4 steps in one go == 2, a checkpoint, a resume and 2 more (bit for bit); the export loads with
    AutoModelForCausalLM as the family's class with its config, carries the trained biases / q/k norms, and its
    eval is the run's within 1e-4 nats; `qapollo generate` runs on both."""
    folder = tmp_path / "hf"
    save_family(folder, corpus, name)
    arch, extra, mode = FAMILIES[name]
    full = trainer(corpus, folder, tmp_path, "full", "train.save_every=2", *mode)
    full.fit()
    trainer(corpus, folder, tmp_path, "resumed", *mode, resume=str(tmp_path / "full" / "checkpoint-2")).fit()
    assert_same_checkpoint(tmp_path / "full" / "checkpoint-4", tmp_path / "resumed" / "checkpoint-4")

    # float32: the dequantized weights exactly, so the loss is the run's to float rounding (the default bf16
    # export rounds every weight once more: its loss moves by ~1e-4, measured in BENCHMARKS.md)
    assert main(["export", str(tmp_path / "full"), str(tmp_path / "out"), "--dtype", "float32"]) == 0
    assert main(["export", str(tmp_path / "full"), str(tmp_path / "bf16")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert type(hf).__name__ == arch and json.load(open(tmp_path / "out" / "config.json"))["architectures"] == [arch]
    for k, v in extra.items():
        assert getattr(hf.config, k) == v, k
    before = save_family(tmp_path / "again", corpus, name).state_dict()  # the folder's float tensors
    trained = dict(full.model.named_parameters())
    for n in (n for n in trained if n.endswith(".bias") or "q_norm" in n):
        assert not torch.equal(trained[n], before[n]), f"{n} was not trained"
        assert torch.equal(hf.state_dict()[n], trained[n]), n
    ours, theirs = loss_of(tmp_path / "full", val_text), loss_of(tmp_path / "out", val_text)
    bf16 = loss_of(tmp_path / "bf16", val_text)
    print(f"\n{name}: run eval {ours:.6f} export eval {theirs:.6f} delta {theirs - ours:+.2e} "
          f"(bf16 export {bf16 - ours:+.2e})")
    assert abs(theirs - ours) < 1e-4, (ours, theirs)
    assert abs(bf16 - ours) < 2e-3, (ours, bf16)
    for spec in (tmp_path / "full", tmp_path / "out"):
        capsys.readouterr()
        assert main(["generate", str(spec), "--prompt", "To be", "--max-new-tokens", "4", "--json"]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["prompt"] == "To be"


def test_lm_eval_tasks_on_a_qwen2_run_and_folder(corpus, tmp_path, capsys, monkeypatch):
    """`qapollo eval --tasks` (lm-evaluation-harness, a local task) scores a Qwen2 checkpoint (int8, biases fp32)
    and the Qwen2 folder it came from (its own class, float) alike: the same few answers, close scores."""
    pytest.importorskip("lm_eval")
    from tests.test_harness import TASKS, ROOT
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(k, "1")
    save_family(tmp_path / "hf", corpus, "qwen2")
    trainer(corpus, tmp_path / "hf", tmp_path, "q2").save()
    monkeypatch.chdir(ROOT)
    scores = []
    for spec in (tmp_path / "q2", tmp_path / "hf"):
        capsys.readouterr()
        assert main(["eval", str(spec), "--tasks", "qapollo_tiny_mc", "--include-path", TASKS, "--batch-size", "5"]) == 0
        out = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
        scores.append(json.loads(out[-1])["tasks"]["qapollo_tiny_mc"]["acc"])
    assert abs(scores[0] - scores[1]) <= 0.2, scores  # step 0: the int8 rounding may flip an answer or two


def _moe(path, corpus, kind):
    arch, experts = {"qwen2moe": ("Qwen2MoeForCausalLM", {"num_experts": 4, "moe_intermediate_size": 32}),
                     "mixtral": ("MixtralForCausalLM", {"num_local_experts": 4})}[kind]
    conf = getattr(transformers, arch.replace("ForCausalLM", "Config"))(**SHAPE, **experts, num_experts_per_tok=2)
    model = getattr(transformers, arch)(conf)
    model.save_pretrained(path)
    load_tokenizer(corpus["data.tokenizer"]).save(str(path))
    return arch


REFUSED = {  # what the folder is: (make it, the train overrides, what the line names)
    "qwen2-moe": (lambda p, c: _moe(p, c, "qwen2moe"), [], "Qwen2MoeForCausalLM is not supported (mixture of experts)"),
    "mixtral": (lambda p, c: _moe(p, c, "mixtral"), [], "MixtralForCausalLM is not supported (mixture of experts)"),
    "mistral-window": (lambda p, c: save_family(p, c, "mistral", sliding_window=8), [],
                       "MistralForCausalLM with sliding_window 8 < train.seq_len 16"),
    "qwen2-window": (lambda p, c: save_family(p, c, "qwen2", use_sliding_window=True, sliding_window=8), [],
                     "Qwen2ForCausalLM with use_sliding_window=True"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_other_architectures_are_refused_in_one_line_before_anything_is_written(corpus, tmp_path, capsys, case):
    make, more, needle = REFUSED[case]
    make(tmp_path / "hf", corpus)
    capsys.readouterr()
    assert main(["train", "--no-progress", *overrides(corpus, tmp_path / "hf", tmp_path / "out", "bad", *more)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err
    assert "mistral-window" == case or SUPPORTED in err[0], err
    assert not (tmp_path / "out").exists()
    assert main(["plan", f"model.init_from={tmp_path / 'hf'}", f"train.seq_len={SEQ}"]) == 2  # the planner too
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.parametrize("name", ["qwen2", "qwen3"])
def test_prepare_trains_a_transformers_model_of_the_family(name):
    """The Python API on a transformers Qwen2/Qwen3 model: its class in the config, the matrices int8 with the
    biases beside them as fp32 parameters, and a plain loop steps biases and q/k norms inside backward."""
    model = family_model(name).train()
    cfg = config_for(model, lr=3e-3, max_steps=3, warmup_steps=1, group_size=32, float_optim="adamw", seq_len=16)
    assert cfg.model.architecture == FAMILIES[name][0] and cfg.model.head_dim == FAMILIES[name][1].get("head_dim")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(".bias") or "q_norm" in n}
    opt = prepare(model, cfg)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, Int8Linear) and (q.bias is not None) == (name == "qwen2")
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n.endswith(".bias"))
    x = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(3):
        opt.begin_step()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.after_backward()
        opt.end_step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    after = dict(model.named_parameters())
    assert before and all(not torch.equal(after[n], v) for n, v in before.items())


def test_transformers_trainer_trains_a_qwen3_and_its_checkpoint_exports_as_one(corpus, tmp_path):
    """transformers' Trainer on a Qwen3ForCausalLM (qapollo.trainer_kwargs): its q/k norms step inside backward,
    and the qapollo checkpoint it writes exports as a Qwen3ForCausalLM again."""
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    class Blocks(torch.utils.data.Dataset):
        ids = torch.randint(0, 512, (16, 16), generator=torch.Generator().manual_seed(0))

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "labels": self.ids[i]}
    model = family_model("qwen3").train()
    norm = model.model.layers[0].self_attn.q_norm.weight.detach().clone()
    cfg = config_for(model, lr=3e-3, max_steps=4, warmup_steps=1, group_size=32, float_optim="adamw", seq_len=16,
                     batch_size=4)
    args = TrainingArguments(output_dir=str(tmp_path / "t"), max_steps=4, per_device_train_batch_size=4,
                             max_grad_norm=0, save_steps=4, report_to=[], use_cpu=True, dataloader_num_workers=0,
                             disable_tqdm=True, logging_steps=1)
    tok = load_tokenizer(corpus["data.tokenizer"])  # the test corpus's 512-token BPE: the model's vocabulary
    Trainer(model=model, args=args, train_dataset=Blocks(), **trainer_kwargs(model, cfg, tokenizer=tok)).train()
    assert not torch.equal(model.model.layers[0].self_attn.q_norm.weight, norm)
    export(str(tmp_path / "t" / "qapollo"), str(tmp_path / "out"))
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "out")).__name__ == "Qwen3ForCausalLM"


def test_planner_counts_biases_q_k_norms_and_head_dim():
    """What a Qwen3 with head_dim 2 × hidden / heads adds to LLaMA's peak of the same width (q and o matrices
    twice as wide, their activations, the q/k norms' saved tensors) is planned within 15% of what the live-tensor
    meter measures (LLaMA's arithmetic would plan no growth); Qwen2's float parameters are LLaMA's plus its
    q/k/v biases, exactly."""
    over = dict(model__hidden_size=128, model__intermediate_size=512, model__num_attention_heads=4,
                model__num_key_value_heads=2, model__vocab_size=512, model__group_size=32, train__batch_size=4,
                train__seq_len=64, train__check_updates=False)
    llama = tiny_config(**over)
    qwen3 = tiny_config(model__architecture="Qwen3ForCausalLM", model__head_dim=64, **over)
    planned = predict_peak(qwen3, "cpu")["peak_bytes"] - predict_peak(llama, "cpu")["peak_bytes"]
    measured = measured_peak(qwen3) - measured_peak(llama)
    print(f"\nqwen3 head_dim 64 over llama: planned +{planned} B, measured +{measured} B ({planned / measured - 1:+.1%})")
    assert abs(planned - measured) <= 0.15 * measured, (planned, measured)
    qwen2 = tiny_config(model__architecture="Qwen2ForCausalLM", **over)
    extra = predict_peak(qwen2, "cpu")["components"]["float_params"] - predict_peak(llama, "cpu")["components"]["float_params"]
    assert extra == 4 * 2 * (128 + 64 + 64)  # fp32 on the CPU, 2 layers: q (4 heads · 32), k and v (2 · 32)


def test_a_mistral_config_without_sliding_window_gets_transformers_default():
    """config.json without the key: MistralForCausalLM.from_pretrained uses MistralConfig's default window, so
    init_from must too (else a run and its export would attend differently past it)."""
    from qapollo.hf_import import shape_from_config
    raw = {**SHAPE, "architectures": ["MistralForCausalLM"], "model_type": "mistral"}
    assert shape_from_config(raw, "x")["sliding_window"] == transformers.MistralConfig().sliding_window == 4096
    assert shape_from_config({**raw, "sliding_window": None}, "x")["sliding_window"] is None
