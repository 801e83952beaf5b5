"""The large-model presets plan within their cards (qapollo plan is arithmetic from a config: no GPU needed):
Llama-3-8B continued pre-training on 12 GB from a folder holding only its config.json, LLaMA-13B from scratch on
16 GB; and `qapollo plan --budget 12GiB` on a Llama-3-8B folder suggests model.lean_head."""
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
