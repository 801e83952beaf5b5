"""The large-model presets plan within their cards (qapollo plan is arithmetic from a config: no GPU needed):
Llama-3-8B, Qwen3-8B, Qwen2.5-7B and Mistral-7B continued pre-training on 12 GB from a folder holding only the
model's config.json (the published values), LLaMA-13B from scratch on 16 GB; and `qapollo plan --budget 12GiB` on
a Llama-3-8B folder suggests model.lean_head and names the presets."""
import pytest
import json

from qapollo.config import load_config
from qapollo.plan import plan_main
from qapollo.planner import predict_peak

GiB = 1 << 30
LLAMA3_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
             "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
             "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
             "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192, "rope_type": "llama3"},
             "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


# config.json of Qwen/Qwen3-8B, Qwen/Qwen2.5-7B and mistralai/Mistral-7B-v0.3 as published (the keys the shape needs)
FAMILY_PRESETS = {
    "configs/qwen3_8b_12gb.yaml": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False, "head_dim": 128,
        "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 12288, "max_position_embeddings": 40960,
        "max_window_layers": 36, "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_sliding_window": False, "vocab_size": 151936},
    "configs/qwen2.5_7b_12gb.yaml": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu", "hidden_size": 3584,
        "intermediate_size": 18944, "max_position_embeddings": 131072, "max_window_layers": 28,
        "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "use_mrope": False, "use_sliding_window": False, "vocab_size": 152064},
    "configs/mistral_7b_12gb.yaml": {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "head_dim": 128, "hidden_act": "silu",
        "hidden_size": 4096, "intermediate_size": 14336, "max_position_embeddings": 32768, "num_attention_heads": 32,
        "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 32768},
}


def llama3_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    return str(tmp_path)


def test_llama3_8b_preset_plans_within_11_gib(tmp_path, capsys):
    folder = llama3_folder(tmp_path)
    assert plan_main(["--config", "configs/llama3_8b_12gb.yaml", f"model.init_from={folder}", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["peak_bytes"] + plan["context_bytes"] <= 11.0 * GiB, plan["peak_bytes"] / GiB
    t = load_config("configs/llama3_8b_12gb.yaml").train
    assert t.batch_size * t.seq_len >= 2048 and t.accum_mode == "lagged"


@pytest.mark.parametrize("preset", FAMILY_PRESETS)
def test_family_presets_plan_within_11_gib(tmp_path, capsys, preset):
    """Each family's preset on its model's config.json: ≤ 11.0 GiB with the CUDA context at ≥ 2048 tokens per
    micro-batch, the plan counting the family's own shape (class, head_dim, biases or q/k norms)."""
    (tmp_path / "config.json").write_text(json.dumps(FAMILY_PRESETS[preset]))
    assert plan_main(["--config", preset, f"model.init_from={tmp_path}", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    print(f"\n{preset}: {plan['peak_bytes'] / GiB:.2f} GiB + {plan['context_bytes'] / GiB:.2f} GiB context")
    assert plan["peak_bytes"] + plan["context_bytes"] <= 11.0 * GiB, plan["peak_bytes"] / GiB
    cfg = load_config(preset, [f"model.init_from={tmp_path}"])
    t = cfg.train
    assert t.batch_size * t.seq_len >= 2048 and t.accum_mode == "lagged" and cfg.model.lean_head
    # the folder's shape, not the preset's defaults: every matrix and the int8 embedding and lm_head
    c = FAMILY_PRESETS[preset]
    h, hd = c["hidden_size"], c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    layer = 2 * q * h + 2 * kv * h + 3 * h * c["intermediate_size"]
    assert plan["components"]["int8_codes"] == c["num_hidden_layers"] * layer + 2 * c["vocab_size"] * h


def test_llama_13b_preset_plans_within_15_gib():
    cfg = load_config("configs/llama_13b_16gb.yaml")
    assert (cfg.model.hidden_size, cfg.model.num_hidden_layers) == (5120, 40)
    plan = predict_peak(cfg, "cuda")
    assert plan["peak_bytes"] + plan["context_bytes"] <= 15.0 * GiB, plan["peak_bytes"] / GiB


def test_budget_on_a_llama3_folder_suggests_lean_head(tmp_path, capsys):
    folder = llama3_folder(tmp_path)
    assert plan_main(["--config", "configs/llama_7b_continue.yaml", f"model.init_from={folder}",
                      "--budget", "12GiB"]) == 1  # without lean_head it does not fit
    err = capsys.readouterr().err
    assert "with model.lean_head=true" in err and "it fits" in err and "configs/llama3_8b_12gb.yaml" in err, err
    assert all(p in err for p in FAMILY_PRESETS), err
