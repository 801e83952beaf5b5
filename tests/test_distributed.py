"""Data parallel on torch.distributed (gloo, 2 CPU processes started by torchrun, tiny models).

One torchrun session (tests/dist_worker.py) runs every 2-rank scenario; the 1-process references run here.
What must hold:
  * 2 ranks × batch B  ==  1 process × batch 2B (the same sequences: rank r takes rows r·B… of the global
    batch), losses to float tolerance, int8 codes equal except where a float tie flips a rounding;
  * 2 ranks × batch B  ==  1 process × batch B × 2 exact accumulation steps, bit for bit (the same
    forward per micro-batch, and (g0 + g1)/2 is exact for two ranks);
  * replicas bit-identical; a perturbed rank stops the run naming the tensor;
  * a checkpoint written by 2 ranks resumes in 1 and one written by 1 resumes in 2 (bit for bit again).
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import torch.distributed as dist

from qapollo.data import BlockLoader
from qapollo.distributed import DistributedError, GradAverager, init, tensor_checksum
from qapollo.layerwise import LayerwiseOptimizer
from qapollo.loss import causal_lm_loss
from qapollo.planner import predict_peak
from qapollo.metrics import read_metrics
from qapollo.model import build_model, matrix_names
from tests.helpers import ROOT, make_cfg, run, tiny_config
from tests.test_checkpoint import read_tensors

B = 2  # sequences per rank and micro-batch
PERTURBED = "model.layers.1.mlp.up_proj"  # dist_worker.PERTURBED


pytestmark = pytest.mark.usefixtures("one_thread")


def cfg_for(corpus, out, run, steps, batch=B, accum=1, mode="exact", **train):
    cfg = make_cfg(corpus, out, run)
    t = cfg.train
    t.max_steps, t.batch_size, t.grad_accum_steps, t.accum_mode = steps, batch, accum, mode
    t.save_every, t.keep_checkpoints, t.replica_check_every = 1, 0, 1  # keep every step's checkpoint
    cfg.eval.every, cfg.eval.batch_size = steps, 8  # eval.tokens 256 = 16 blocks: one batch per rank
    for k, v in train.items():
        setattr(t, k, v)
    return cfg


def qwen2(cfg):
    """The same run as a Qwen2ForCausalLM: q/k/v biases, float tensors inside the int8 projections."""
    cfg.model.architecture = "Qwen2ForCausalLM"
    return cfg


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """References in this process, then one torchrun session of 2 ranks, then a 2→1 resume."""
    out = tmp_path_factory.mktemp("dp")
    run(cfg_for(corpus, out, "ref_2b", 4, batch=2 * B))
    run(cfg_for(corpus, out, "ref_k2", 4, accum=2))
    run(cfg_for(corpus, out, "ref_lagged", 3, batch=2 * B, accum=2, mode="lagged"))
    run(qwen2(cfg_for(corpus, out, "ref_qwen2_k2", 3, accum=2)))

    cli_cfg = cfg_for(corpus, out, "dp", 4)
    cli_yaml = out / "dp.yaml"
    cli_yaml.write_text(cli_cfg.to_yaml())
    resume_cfg = cfg_for(corpus, out, "dp_from_1", 4)
    resume_cfg.resume = str(out / "ref_k2" / "checkpoint-2")
    scenarios = [
        {"kind": "cli", "config_path": str(cli_yaml), "out": str(out / "dp_rc")},
        {"kind": "train", "config": cfg_for(corpus, out, "dp_lagged", 3, accum=2, mode="lagged").to_dict(),
         "out": str(out / "dp_lagged")},
        {"kind": "train", "config": resume_cfg.to_dict(), "out": str(out / "dp_from_1")},
        {"kind": "perturb", "config": cfg_for(corpus, out, "dp_perturbed", 3).to_dict(),
         "out": str(out / "dp_perturbed")},
        {"kind": "train", "config": qwen2(cfg_for(corpus, out, "dp_qwen2", 3)).to_dict(), "out": str(out / "dp_qwen2")},
        {"kind": "other_seed", "config": cfg_for(corpus, out, "dp_seeds", 3).to_dict(), "out": str(out / "dp_seeds")},
        {"kind": "save_fails", "config": cfg_for(corpus, out, "dp_save_fails", 3).to_dict(),
         "out": str(out / "dp_save_fails")},
    ]
    spec = out / "spec.json"
    spec.write_text(json.dumps({"small_bytes": 100_000, "bucket_bytes": 150_000, "scenarios": scenarios}))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "tests", "dist_worker.py"), str(spec)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    run(cfg_for(corpus, out, "one_from_dp", 4, accum=2), resume=str(out / "dp" / "checkpoint-2"))
    return {"out": out, "stdout": proc.stdout, "stderr": proc.stderr}


def model_of(path, step=None):
    """Weights of checkpoint-<step> of a run dir, or of a safetensors file a rank wrote."""
    path = os.path.join(path, f"checkpoint-{step}", "model.safetensors") if step else path
    return read_tensors(path)[0]


def losses(run_dir):
    return [r["loss"] for r in read_metrics(os.path.join(run_dir, "metrics.jsonl"))]


def drift(a_dir, b_dir, steps: int) -> list[tuple[int, int, float]]:
    """Per step: (int8 codes that differ, codes in all, largest ‖a − b‖/‖a‖ of a float tensor)."""
    out = []
    for step in range(1, steps + 1):
        a, b = model_of(a_dir, step), model_of(b_dir, step)
        codes = [k for k in a if k.endswith("weight_codes")]
        floats = [k for k in a if a[k].is_floating_point()]
        out.append((sum(int((a[k] != b[k]).sum()) for k in codes), sum(a[k].numel() for k in codes),
                    max(float((a[k] - b[k]).norm() / a[k].norm()) for k in floats)))
    print("".join(f"\n  step {i}: {f} of {n} int8 codes differ, float tensors within {r:.1e}"
                  for i, (f, n, r) in enumerate(out, 1)))
    return out


def assert_matches_combined_batch(dp, ref, steps: int, updates_per_step: int = 1) -> None:
    """Same losses to float tolerance; after the first update the weights differ only where a float tie
    flipped a stochastic rounding (the 2B-row matmul sums in another order than two B-row ones). A
    flipped code moves its weight by one quantization step, which the next updates' gradients see: the
    later counts are that cascade, bounded loosely (lagged mode: step 1 already holds 2 updates)."""
    assert len(losses(dp)) == steps and np.allclose(losses(dp), losses(ref), rtol=1e-4, atol=0)
    per_step = drift(dp, ref, steps)
    flips, n, rel = per_step[0]
    if updates_per_step == 1:
        assert flips <= max(4, n // 10_000) and rel < 1e-6, per_step[0]
    else:
        assert flips <= n // 100 and rel < 1e-2, per_step[0]
    flips, n, rel = per_step[-1]
    assert flips <= n // 10 and rel < 1e-2, per_step[-1]


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---- 2 ranks against 1 process -------------------------------------------------------------------------
def test_two_ranks_match_one_process_on_the_combined_batch(runs):
    out = runs["out"]
    print(f"\n2 ranks x batch {B} vs 1 process x batch {2 * B}, exact:", end="")
    assert_matches_combined_batch(out / "dp", out / "ref_2b", 4)
    e_dp, e_ref = (read_metrics(out / r / "metrics.jsonl")[-1]["eval_loss"] for r in ("dp", "ref_2b"))
    assert e_dp == pytest.approx(e_ref, rel=1e-4)


def test_two_ranks_lagged_match_one_process_on_the_combined_batch(runs):
    out = runs["out"]
    print(f"\n2 ranks x batch {B} vs 1 process x batch {2 * B}, lagged, 2 micro-batches per step:", end="")
    assert_matches_combined_batch(out / "dp_lagged", out / "ref_lagged", 3, updates_per_step=2)


def test_two_ranks_equal_exact_accumulation_bit_for_bit(runs):
    """Each rank's forward is the 1-process run's micro-batch, and (g0/2 + g1/2) is exactly its sum."""
    out = runs["out"]
    assert losses(out / "dp") == losses(out / "ref_k2")
    e_dp, e_ref = (read_metrics(out / r / "metrics.jsonl")[-1]["eval_loss"] for r in ("dp", "ref_k2"))
    assert e_dp == e_ref  # the eval batches split over the ranks, then summed
    assert_bit_identical(model_of(out / "dp", 4), model_of(out / "ref_k2", 4))
    opt = [read_tensors(os.path.join(out, r, "checkpoint-4", "optimizer.safetensors"))[0] for r in ("dp", "ref_k2")]
    assert_bit_identical(*opt)


def test_a_qwen2_on_two_ranks_equals_its_exact_accumulation_bit_for_bit(runs):
    """The family's own float tensors (Qwen2's q/k/v biases) are all-reduced like the norms: the same identity."""
    out = runs["out"]
    assert losses(out / "dp_qwen2") == losses(out / "ref_qwen2_k2")
    dp, ref = model_of(out / "dp_qwen2", 3), model_of(out / "ref_qwen2_k2", 3)
    assert any(k.endswith("q_proj.bias") for k in ref)
    assert_bit_identical(dp, ref)


def test_replicas_stay_identical(runs):
    for run in ("dp_lagged", "dp_from_1"):
        d = runs["out"] / run
        assert_bit_identical(model_of(d / "rank0.safetensors"), model_of(d / "rank1.safetensors"))


def test_replica_check_stops_a_perturbed_rank(runs):
    d = runs["out"] / "dp_perturbed"
    for r in (0, 1):
        err = (d / f"rank{r}.err").read_text()
        assert f"{PERTURBED}.weight_codes on rank 1 differs from rank 0" in err and "step 1" in err, err
    assert not (d / "rank0.safetensors").exists()


def test_ranks_with_different_seeds_refuse_to_start(runs):
    d = runs["out"] / "dp_seeds"
    for r in (0, 1):
        assert (d / f"rank{r}.err").read_text().startswith("rank 1 started with train.seed=1 but rank 0 with 0")
    assert sorted(os.listdir(d)) == ["rank0.err", "rank1.err"]  # the run wrote nothing


def test_a_failed_save_on_rank_0_stops_every_rank(runs):
    """Rank 0's save fails (a full disk): it stops with its own message and rank 1 with the same one, instead
    of waiting for rank 0 in a broadcast until the job's timeout."""
    d = runs["out"] / "dp_save_fails"
    assert (d / "rank0.err").read_text() == "the disk filled up while writing checkpoint-1 (simulated)"
    assert (d / "rank1.err").read_text() == ("rank 0 could not save the checkpoint, so rank 1 stops too: the disk "
                                            "filled up while writing checkpoint-1 (simulated)")


# ---- resuming with another number of ranks --------------------------------------------------------------
def test_checkpoint_of_two_ranks_resumes_in_one(runs):
    out = runs["out"]
    assert losses(out / "one_from_dp") == losses(out / "ref_k2")[2:]
    assert_bit_identical(model_of(out / "one_from_dp", 4), model_of(out / "ref_k2", 4))


def test_checkpoint_of_one_process_resumes_in_two(runs):
    out = runs["out"]
    assert losses(out / "dp_from_1") == losses(out / "ref_k2")[2:]
    assert_bit_identical(model_of(out / "dp_from_1", 4), model_of(out / "ref_k2", 4))


def test_one_writer(runs):
    out = runs["out"]
    assert [r["step"] for r in read_metrics(out / "dp" / "metrics.jsonl")] == [1, 2, 3, 4]
    assert sorted(os.listdir(out / "dp")) == [f"checkpoint-{i}" for i in range(1, 5)] + ["latest", "metrics.jsonl"]
    assert runs["stdout"].count("done: step 4") == 1
    assert runs["stderr"].count("saved ") == 4 + 3 + 2 + 3  # dp: steps 1-4; dp_lagged: 1-3; dp_from_1: 3-4; dp_qwen2: 1-3
    assert [(out / "dp_rc" / f"rank{r}.rc").read_text() for r in (0, 1)] == ["0", "0"]


# ---- pieces, in one process ------------------------------------------------------------------------------
def test_loader_shards_are_the_combined_batch_across_epochs():
    tokens = np.arange(13 * 4, dtype=np.uint16)  # 13 blocks of 4: batches of 2×3 cross epoch ends
    one = BlockLoader(tokens, 4, 6, seed=1, key="k")
    ranks = [BlockLoader(tokens, 4, 3, seed=1, key="k", rank=r, world_size=2) for r in range(2)]
    for _ in range(7):
        assert torch.equal(next(one), torch.cat([next(r) for r in ranks]))
    assert ranks[0].state_dict() == ranks[1].state_dict() == one.state_dict()  # one global cursor
    again = BlockLoader(tokens, 4, 6, seed=1, key="k")  # resumed with 1 rank where 2 stopped
    again.load_state_dict(ranks[0].state_dict())
    assert torch.equal(next(again), next(one))


@pytest.mark.parametrize("mode", ["exact", "lagged"])
def test_accumulation_reduces_each_gradient_once_per_step(mode, monkeypatch):
    """Exact: nothing is reduced before the last micro-batch, then every trainable element once. Lagged:
    the matrices on every micro-batch (each applies at once), the float tensors once per step."""
    real, reduced = dist.all_reduce, []
    monkeypatch.setattr(dist, "all_reduce", lambda t, **kw: reduced.append(t.numel()) or real(t, **kw))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        cfg = tiny_config()
        model = build_model(cfg.model, "cpu", seed=0)
        opt = LayerwiseOptimizer(model, cfg.optim, 10, accum_mode=mode, reducer=GradAverager(1), grad_accum_steps=2)
        mats = matrix_names(model)
        n_mat = sum(m.weight_codes.numel() for n, m in model.named_modules() if n in mats)
        n_float = sum(p.numel() for p in model.parameters())
        per_micro = []
        for micro in range(2):
            opt.begin_step(last_micro=micro == 1)
            causal_lm_loss(model, torch.randint(0, 512, (2, 16))).backward()
            opt.after_backward()
            per_micro.append(sum(reduced))
            reduced.clear()
        opt.end_step()
    finally:
        dist.destroy_process_group()
    lagged = mode == "lagged"
    assert per_micro == [n_mat if lagged else 0, n_mat + n_float]


def test_checksum_sees_one_bit():
    w = torch.arange(1, 1 << 14, dtype=torch.int64)
    t = torch.randn(300, 7)
    base = tensor_checksum(t, w)
    u = t.clone()
    u.view(torch.int32)[123, 4] ^= 1
    assert not torch.equal(tensor_checksum(u, w), base)
    assert torch.equal(tensor_checksum(t.clone(), w), base)


def test_planner_counts_the_all_reduce_per_rank():
    cfg = tiny_config()
    one, two = predict_peak(cfg, "cuda"), predict_peak(cfg, "cuda", world_size=2)
    assert two["persistent_bytes"] == one["persistent_bytes"]  # replicas: no sharding
    assert two["peak_bytes"] > one["peak_bytes"] and two["tokens_per_step"] == 2 * one["tokens_per_step"]
    assert two["phases"]["layer"] - one["phases"]["layer"] == two["data_parallel_bytes"]["layer"]


def test_device_index_under_torchrun_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(DistributedError, match="train.device=cuda:1 under torchrun"):
        init(torch.device("cuda", 1))
