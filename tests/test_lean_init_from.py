"""model.lean_head from a Hugging Face folder (model.init_from): the folder's embedding and lm_head are streamed
into the int8 form like the projections; a tied folder trains one int8 tensor as both and exports tied; a
Llama-3-shaped folder (GQA, vocab much larger than hidden, llama3 rope scaling) goes through init_from +
lean_head + export + eval."""
import json
import os

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from qapollo.cli import main
from qapollo.config import load_config
from qapollo.evaluate import evaluate
from qapollo.export import export
from qapollo.model import Int8Embedding, int8_modules
from qapollo.planner import predict_peak
from qapollo.tokenizer import load_tokenizer
from qapollo.train import Trainer
from tests.helpers import make_cfg, run
from tests.test_eval import SEQ, val_text  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def lean_from(folder, corpus, out, run_name="lean", *more):
    cfg = load_config(None, [f"model.init_from={folder}", "model.lean_head=true", f"data.path={corpus['data.path']}",
                             f"data.cache_dir={corpus['data.cache_dir']}", f"train.output_dir={out}",
                             f"train.run_name={run_name}", "train.batch_size=2", f"train.seq_len={SEQ}",
                             "train.max_steps=3", "optim.float_optim=adamw", "optim.warmup_steps=2", *more])
    tr = Trainer(cfg, progress=False)
    tr.setup()
    return tr


def test_lean_head_starts_from_an_export_at_its_loss(corpus, val_text, tmp_path):  # noqa: F811
    """A trained run (float embedding and lm_head) exported, then started from with model.lean_head=true: the
    embedding and lm_head arrive int8 (rounded to nearest) and the step-0 eval loss is the float export's,
    `qapollo eval`, within 0.02 nats."""
    run(make_cfg(corpus, tmp_path, "src", train__max_steps=40))
    export(os.path.join(tmp_path, "src"), str(tmp_path / "hf"))
    tr = lean_from(tmp_path / "hf", corpus, tmp_path)
    assert isinstance(tr.model.model.embed_tokens, Int8Embedding) and "lm_head" in dict(int8_modules(tr.model))
    tr.save()  # checkpoint-0: the imported model, untrained
    lean = evaluate(os.path.join(tmp_path, "lean"), [val_text], seq_len=SEQ, batch_size=8, progress=False)
    flt = evaluate(str(tmp_path / "hf"), [val_text], seq_len=SEQ, batch_size=8, progress=False)
    assert abs(lean["loss"] - flt["loss"]) < 0.02, (lean["loss"], flt["loss"])
    assert flt["loss"] < 5.6  # trained: far below ln(512)
    tr.fit()  # and it trains (the startup guard: every tensor changed in the first update)


def test_a_tied_folder_trains_lean_and_exports_tied(corpus, val_text, tmp_path, capsys):  # noqa: F811
    """A tied folder (tie_word_embeddings: true) with model.lean_head: one int8 tensor is both embedding and
    lm_head (one updater, counted once by the planner); it trains 3 steps, and its export is tied again (no
    lm_head tensor) and evaluates, `qapollo eval`, as the run's own eval of the int8 model."""
    torch.manual_seed(0)
    conf = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                       num_attention_heads=4, max_position_embeddings=64, tie_word_embeddings=True,
                       initializer_range=0.05)
    LlamaForCausalLM(conf).save_pretrained(tmp_path / "tied")
    load_tokenizer(corpus["data.tokenizer"]).save(str(tmp_path / "tied"))
    tr = lean_from(tmp_path / "tied", corpus, tmp_path, "tiedrun")
    model = tr.model
    assert tr.cfg.model.tie_word_embeddings and model.lm_head is model.model.embed_tokens
    assert [n for n, _ in int8_modules(model) if "embed" in n or "head" in n] == ["model.embed_tokens"]
    assert sorted(n for n in tr.opt.updaters if "embed" in n or "head" in n) == ["model.embed_tokens"]
    untied = load_config(None, [f"model.vocab_size={conf.vocab_size}", "model.hidden_size=128", "model.lean_head=true",
                                "model.intermediate_size=256", "model.num_hidden_layers=1",
                                "model.num_attention_heads=4"])
    tied_plan, untied_plan = predict_peak(tr.cfg, "cpu"), predict_peak(untied, "cpu")
    one, other = tied_plan["components"], untied_plan["components"]
    assert other["int8_codes"] - one["int8_codes"] == conf.vocab_size * conf.hidden_size
    assert other["apollo_states"] - one["apollo_states"] == 4 * 2 * (conf.vocab_size + conf.hidden_size)  # factored
    tr.fit()
    assert main(["export", os.path.join(tmp_path, "tiedrun"), str(tmp_path / "out")]) == 0
    saved = json.load(open(tmp_path / "out" / "config.json"))
    assert saved["tie_word_embeddings"] is True
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()
    reloaded = LlamaForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    ours = evaluate(os.path.join(tmp_path, "tiedrun"), [val_text], seq_len=SEQ, batch_size=8, progress=False)
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "out"), "--data", val_text, "--seq-len", str(SEQ), "--batch-size", "8",
                 "--no-progress"]) == 0
    theirs = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert abs(theirs["loss"] - ours["loss"]) < 1e-4, (theirs, ours)


def test_a_llama3_shaped_folder_through_lean_head_export_and_eval(corpus, val_text, tmp_path, capsys):  # noqa: F811
    """Llama-3's layout in small: 4 query heads sharing 1 key/value head, a vocabulary 8× the width, llama3 rope
    scaling. init_from + lean_head trains 3 steps; the export loads in transformers with the same config; its
    `qapollo eval` equals the run's own eval of the int8 model up to the export's bf16 rounding."""
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16}
    torch.manual_seed(0)
    conf = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128, rope_theta=500000.0,
                       rope_scaling=dict(rope), tie_word_embeddings=False, initializer_range=0.05)
    LlamaForCausalLM(conf).save_pretrained(tmp_path / "l3")
    load_tokenizer(corpus["data.tokenizer"]).save(str(tmp_path / "l3"))
    tr = lean_from(tmp_path / "l3", corpus, tmp_path, "l3run", "model.group_size=32")
    m = tr.cfg.model
    assert (m.num_key_value_heads, m.vocab_size, m.hidden_size, m.rope_scaling["rope_type"]) == (1, 512, 64, "llama3")
    tr.fit()
    assert main(["export", os.path.join(tmp_path, "l3run"), str(tmp_path / "out")]) == 0
    saved = json.load(open(tmp_path / "out" / "config.json"))
    rope_saved = saved.get("rope_parameters") or saved.get("rope_scaling")  # the key's name depends on transformers
    assert saved["num_key_value_heads"] == 1 and rope_saved["rope_type"] == "llama3"
    assert not saved["tie_word_embeddings"]
    ours = evaluate(os.path.join(tmp_path, "l3run"), [val_text], seq_len=SEQ, batch_size=8, progress=False)
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "out"), "--data", val_text, "--seq-len", str(SEQ), "--batch-size", "8",
                 "--no-progress"]) == 0
    theirs = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert abs(theirs["loss"] - ours["loss"]) < 0.02, (theirs, ours)
