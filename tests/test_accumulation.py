"""Gradient accumulation (lagged-scale mode), the spike guard and the non-finite gradient guard."""
import gc
import math

import pytest
import torch

from qapollo.config import load_config
from qapollo.guard import SpikeGuard
from qapollo.layerwise import LayerwiseOptimizer, NonFiniteGradient
from qapollo.loss import causal_lm_loss
from qapollo.memory import LiveTensorCounter, predict_peak, resident_tensor_bytes
from qapollo.model import build_model, int8_modules
from qapollo.optim import apollo
from tests.helpers import tiny_config


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- the lagged rule against the exact rule on summed gradients --------------------------------------
@pytest.mark.parametrize("shape", [(48, 32), (32, 48)])
@pytest.mark.parametrize("scale_type,rank", [("tensor", 1), ("channel", 4)])
def test_lagged_equals_exact_on_the_summed_gradient(shape, scale_type, rank):
    """Per window: moments == exact mode's after a step on ΣG_i; the window applies c_{t-1} ⊙ ΣG_i,
    c_{t-1} being the exact mode's (limiter-free) multiplier of the previous step."""
    torch.manual_seed(0)
    hp = dict(rank=rank, scale_type=scale_type, update_proj_gap=3, norm_growth_limit=0.0)
    lag = apollo.init_state(shape, rank, 7, "cpu")
    exact = apollo.init_state(shape, rank, 7, "cpu")
    prev_c = None
    for window in range(5):
        grads = [torch.randn(shape, dtype=torch.float64) * (1 + window) for _ in range(3)]
        applied = sum(apollo.lagged_multiplier(g, lag, **hp) * g for g in grads)
        total = sum(grads)
        if prev_c is not None:  # window 0 peeks per micro-batch: no previous scale exists
            assert torch.allclose(applied, prev_c * total, rtol=1e-10, atol=0)
        apollo.lagged_commit(lag, shape=shape, scale_type=scale_type)
        prev_c = apollo.apollo_multiplier(total, exact, **hp)
        assert lag["step"] == exact["step"] == window + 1
        assert torch.equal(lag["proj"], exact["proj"])
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(lag[k], exact[k], rtol=1e-10, atol=1e-300), k
        assert torch.allclose(lag["lag_scale"].double(), prev_c, rtol=1e-6)


def test_first_window_uses_each_micro_batch_own_scale():
    g = torch.randn(16, 8, dtype=torch.float64)
    st = apollo.init_state((16, 8), 1, 3, "cpu")
    c_lag = apollo.lagged_multiplier(g, st, rank=1, scale_type="tensor", update_proj_gap=10)
    c_exact = apollo.apollo_multiplier(g, apollo.init_state((16, 8), 1, 3, "cpu"), rank=1, scale_type="tensor",
                                       update_proj_gap=10)
    assert torch.allclose(c_lag, c_exact) and st["step"] == 0  # a peek: moments not committed
    assert torch.equal(st["exp_avg"], torch.zeros_like(st["exp_avg"]))


# ---- memory: no full gradient between micro-batches -------------------------------------------------
def accumulated_peak(cfg, steps: int = 2) -> tuple[int, list]:
    """(peak live bytes over steps incl. resident model + states, weight_grad presence after micro 1)."""
    t = cfg.train
    model = build_model(cfg.model, "cpu", seed=0)
    model.train()
    opt = LayerwiseOptimizer(model, cfg.optim, 10, seed=0, accum_mode=t.accum_mode)
    gen = torch.Generator().manual_seed(0)
    peaks, held = [], []
    for _ in range(steps):
        states = [getattr(u, "state", None) for u in opt.updaters.values()]
        states += [list(u.state_dict()[0].values()) for u in opt.updaters.values() if hasattr(u, "chunks")]
        base = resident_tensor_bytes(model, states)
        gc.collect()
        c = LiveTensorCounter()
        with c:
            for micro in range(t.grad_accum_steps):
                x = torch.randint(0, cfg.model.vocab_size, (t.batch_size, t.seq_len), generator=gen)
                opt.begin_step(last_micro=micro == t.grad_accum_steps - 1)
                (causal_lm_loss(model, x) / t.grad_accum_steps).backward()
                opt.after_backward()
                if micro == 0:
                    held.append(any(m.weight_grad is not None for _, m in int8_modules(model)))
            opt.end_step()
        peaks.append(base + c.peak)
    return max(peaks), held


def test_lagged_accumulation_holds_no_matrix_gradient():
    over = ["train.batch_size=2", "train.seq_len=64", "train.check_updates=false"]
    k1, _ = accumulated_peak(load_config("configs/llama_20m.yaml", over))
    cfg_lag = load_config("configs/llama_20m.yaml", over + ["train.grad_accum_steps=4", "train.accum_mode=lagged"])
    lag, held_lag = accumulated_peak(cfg_lag)
    cfg_ex = load_config("configs/llama_20m.yaml", over + ["train.grad_accum_steps=4"])
    ex, held_ex = accumulated_peak(cfg_ex)
    m = cfg_lag.model
    float_grads = 4 * (2 * m.vocab_size * m.hidden_size + (2 * m.num_hidden_layers + 1) * m.hidden_size)
    matrix_grads = 4 * m.num_hidden_layers * (4 * m.hidden_size ** 2 + 3 * m.hidden_size * m.intermediate_size)
    assert held_ex == [True, True] and held_lag == [False, False]
    # lagged costs the float tensors' gradients over K = 1 (and a little), exact the matrices' too
    assert lag - k1 <= 1.1 * float_grads, (lag, k1, float_grads)
    assert ex - lag >= 0.9 * matrix_grads, (ex, lag, matrix_grads)
    plan = predict_peak(cfg_lag, "cpu")
    assert abs(plan["peak_bytes"] - lag) <= 0.10 * lag, (plan["phase"], plan["peak_bytes"], lag)


# ---- the spike guard -------------------------------------------------------------------------------
def test_spike_guard_rule():
    g = SpikeGuard(sigma=6.0, window=16, max_in_row=3)
    assert g.reason_to_skip(float("nan")) and g.reason_to_skip(float("inf"))
    for x in [5.0, 5.1, 4.9, 5.05, 4.95, 5.0, 5.1]:
        assert g.reason_to_skip(x) is None  # fewer than 8 samples: only non-finite is skipped
        g.accept(x)
    g.accept(5.0)
    assert g.reason_to_skip(5.5) is None  # std floor: 6 * 2 % of 5 = 0.6 above the mean
    assert "above" in g.reason_to_skip(5.7)
    assert not g.skip() and not g.skip() and g.skip()  # the third in a row says stop
    g.accept(5.0)
    assert g.in_row == 0 and g.skips == 3
    h = SpikeGuard()
    h.load_state_dict(g.state_dict())
    assert list(h.losses) == list(g.losses) and h.skips == 3


def _trainer(tmp_path, **over):
    from qapollo.train import Trainer
    cfg = tiny_config(**over)
    cfg.data.path = _corpus(tmp_path)
    cfg.data.tokenizer = _tokenizer(tmp_path)
    cfg.model.vocab_size = 512
    cfg.data.cache_dir = str(tmp_path / "cache")
    cfg.eval.tokens = 256
    cfg.train.output_dir, cfg.train.log_every, cfg.train.save_every = str(tmp_path / "out"), 1, 0
    tr = Trainer(cfg, progress=False)
    tr.setup()
    return tr


def _corpus(tmp_path) -> str:
    import lzma
    import os
    path = tmp_path / "corpus.txt"
    if not path.exists():
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        with lzma.open(os.path.join(root, "qapollo/assets/corpus/shakespeare.train.txt.xz"), "rt") as f:
            path.write_text(f.read(100_000))
    return str(path)


def _tokenizer(tmp_path) -> str:
    import sentencepiece as spm
    if not (tmp_path / "tok.model").exists():
        spm.SentencePieceTrainer.train(
            input=_corpus(tmp_path), model_prefix=str(tmp_path / "tok"), model_type="bpe", vocab_size=512,
            byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    return str(tmp_path / "tok.model")


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("accum", [1, 2])
def test_spike_is_skipped_before_backward(tmp_path, monkeypatch, accum):
    import qapollo.train as train_mod
    tr = _trainer(tmp_path, train__max_steps=20, train__grad_accum_steps=accum, train__accum_mode="lagged")
    for _ in range(10):  # history for the guard
        assert tr.train_step() is not None
    calls = {"n": 0}
    real = train_mod.causal_lm_loss

    def spiky(model, x):
        calls["n"] += 1
        loss = real(model, x)
        return loss * 10 if calls["n"] == 1 else loss  # the first micro-batch of the next step spikes
    monkeypatch.setattr(train_mod, "causal_lm_loss", spiky)
    before, step, tokens = _weights(tr.model), tr.opt.step_count, tr.tokens_seen
    fired = []
    monkeypatch.setattr(tr.opt, "_run", lambda name, g, _f=tr.opt._run: (fired.append(name), _f(name, g)))
    if accum == 1:
        assert tr.train_step() is None  # the whole step was skipped: nothing changed, not counted
        assert tr.opt.step_count == step and tr.tokens_seen == tokens and not fired
        after = _weights(tr.model)
        assert all(torch.equal(before[k], after[k]) for k in before)
    else:
        assert tr.train_step() is not None  # the second micro-batch trained
        assert tr.opt.step_count == step + 1 and tr.tokens_seen == tokens + 2 * 16
    assert tr.guard.skips == 1


def test_too_many_skips_in_a_row_stop_without_saving(tmp_path, monkeypatch):
    import qapollo.train as train_mod
    from qapollo.train import TrainError
    tr = _trainer(tmp_path, train__max_steps=40, train__max_skips_in_row=3)
    for _ in range(9):
        tr.train_step()
    monkeypatch.setattr(train_mod, "causal_lm_loss", lambda model, x: torch.tensor(float("nan")))
    with pytest.raises(TrainError, match=r"3 micro-batches in a row skipped.*loss is nan.*Nothing was saved"):
        tr.fit()
    assert not list((tmp_path / "out").glob("**/checkpoint-*"))


# ---- non-finite gradients never reach a weight ------------------------------------------------------
@pytest.mark.parametrize("accum_mode", ["exact", "lagged"])
@pytest.mark.parametrize("target", ["model.layers.1.mlp.down_proj", "model.layers.0.input_layernorm.weight",
                                    "lm_head.weight"])
def test_non_finite_gradient_is_named_and_not_written(target, accum_mode):
    cfg = tiny_config()
    model = build_model(cfg.model, "cpu", seed=0)
    model.train()
    opt = LayerwiseOptimizer(model, cfg.optim, 10, seed=0, accum_mode=accum_mode)
    x = torch.randint(0, cfg.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    opt.begin_step()
    causal_lm_loss(model, x).backward()
    opt.after_backward()
    opt.end_step()
    mods = dict(model.named_modules())
    if target in mods:  # int8 matrix: poison the gradient on its way into the hook
        mod = mods[target]
        real = mod.receive_grad
        mod.receive_grad = lambda g: real(torch.full_like(g, float("nan")))
    else:
        dict(model.named_parameters())[target].register_hook(lambda g: g * float("inf"))
    before = _weights(model)
    opt.begin_step()
    causal_lm_loss(model, x).backward()
    with pytest.raises(NonFiniteGradient) as e:
        opt.after_backward()
    assert e.value.names == [target] and f"in {target} at step 2" in str(e.value)
    after = _weights(model)
    for k in before:
        assert torch.isfinite(after[k].float()).all(), k
    poisoned = [k for k in before if k.startswith(target)]
    assert poisoned and all(torch.equal(before[k], after[k]) for k in poisoned)
    assert any(not torch.equal(before[k], after[k]) for k in before if not k.startswith(target))
