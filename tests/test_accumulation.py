"""Gradient accumulation (lagged-scale mode), the spike guard and the non-finite gradient guard."""
import pytest
import torch

from qapollo.config import load_config
from qapollo.guard import SpikeGuard
from qapollo.layerwise import LayerwiseOptimizer, NonFiniteGradient
from qapollo.loss import causal_lm_loss
from qapollo.planner import predict_peak
from qapollo.model import build_model
from qapollo.optim import apollo
from tests.helpers import make_cfg, measured_peak, tiny_config


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the lagged rule against the exact rule on summed gradients --------------------------------------
@pytest.mark.parametrize("shape", [(48, 32), (32, 48)])
@pytest.mark.parametrize("scale_type,rank", [("tensor", 1), ("channel", 4)])
@pytest.mark.parametrize("limiter", [0.0, 1.01])
def test_lagged_window_is_the_exact_step(shape, scale_type, rank, limiter):
    """K equal micro-batches per window (where a window's ‖ΣG‖ is known from its first one): the moments and
    the limiter's reference equal the exact mode's after a step on ΣG; the first window applies the exact
    step; every later window applies the previous exact step's size (per channel) along its own ΣG. The
    gradients grow 3× per window, so the limiter binds (limiter=1.01) and a lagged c·ΣG would overshoot."""
    torch.manual_seed(0)
    K = 4
    hp = dict(rank=rank, scale_type=scale_type, update_proj_gap=3, norm_growth_limit=limiter)
    lag = apollo.init_state(shape, rank, 7, "cpu")
    exact = apollo.init_state(shape, rank, 7, "cpu")
    dim = None if scale_type == "tensor" else (1 if shape[0] >= shape[1] else 0)
    norm = (lambda x: x.norm()) if dim is None else (lambda x: x.norm(dim=dim, keepdim=True))
    prev_u = None
    for window in range(5):
        total = torch.randn(shape, dtype=torch.float64) * 3.0 ** window
        applied = torch.zeros_like(total)
        for i in range(K):
            c, _ = apollo.lagged_multiplier(total / K, lag, window=K, last=i == K - 1, **hp)
            if c is not None:
                applied += c * (total / K)
        apollo.lagged_commit(lag, shape=shape, scale_type=scale_type, window=K, norm_growth_limit=limiter)
        u = apollo.apollo_multiplier(total, exact, **hp)[0] * total
        want = u if prev_u is None else norm(prev_u) / norm(total) * total
        assert torch.allclose(applied, want, rtol=1e-5, atol=0), window  # fp32 sketch and step size
        assert lag["step"] == exact["step"] == window + 1
        assert torch.equal(lag["proj"], exact["proj"])
        for k in ("exp_avg", "exp_avg_sq", "prev_norm"):
            assert torch.allclose(lag[k].double(), exact[k].double(), rtol=1e-6, atol=1e-300), k
        prev_u = u


def test_first_window_applies_nothing_before_its_last_micro_batch():
    """No step size yet: micro-batches 1..K-1 only add to the window's sums (nothing committed); the last
    commits and returns the multiplier that carries the window's step in its own gradient's direction."""
    torch.manual_seed(0)
    st = apollo.init_state((16, 8), 1, 3, "cpu")
    hp = dict(rank=1, scale_type="tensor", update_proj_gap=10, window=3)
    grads = [torch.randn(16, 8, dtype=torch.float64) for _ in range(3)]
    assert apollo.lagged_multiplier(grads[0], st, last=False, **hp)[0] is None
    assert apollo.lagged_multiplier(grads[1], st, last=False, **hp)[0] is None
    assert st["step"] == 0 and torch.equal(st["exp_avg"], torch.zeros_like(st["exp_avg"]))
    c, finite = apollo.lagged_multiplier(grads[2], st, last=True, **hp)
    assert bool(finite)
    assert st["step"] == 1 and st["r_count"] == 0 and st["lag_step"] is not None
    assert torch.allclose(c * grads[2].norm(), st["lag_step"].double())  # the window's step, on G_K


# ---- memory: no full gradient between micro-batches -------------------------------------------------
def test_lagged_accumulation_holds_no_matrix_gradient():
    over = ["train.batch_size=2", "train.seq_len=64", "train.check_updates=false"]
    k1 = measured_peak(load_config("configs/llama_20m.yaml", over))
    cfg_lag = load_config("configs/llama_20m.yaml", over + ["train.grad_accum_steps=4", "train.accum_mode=lagged"])
    held_lag, held_ex = [], []
    lag = measured_peak(cfg_lag, held=held_lag)
    cfg_ex = load_config("configs/llama_20m.yaml", over + ["train.grad_accum_steps=4"])
    ex = measured_peak(cfg_ex, held=held_ex)
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


def _trainer(corpus, tmp_path, **over):
    from qapollo.train import Trainer
    cfg = make_cfg(corpus, tmp_path / "out", **over)
    cfg.train.save_every = 0
    tr = Trainer(cfg, progress=False)
    tr.setup()
    return tr


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("accum", [1, 2])
def test_spike_is_skipped_before_backward(corpus, tmp_path, monkeypatch, accum):
    import qapollo.engine as train_mod  # the one step's default loss
    tr = _trainer(corpus, tmp_path, train__max_steps=20, train__grad_accum_steps=accum, train__accum_mode="lagged")
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


def test_too_many_skips_in_a_row_stop_without_saving(corpus, tmp_path, monkeypatch):
    import qapollo.engine as train_mod
    from qapollo.train import TrainError
    tr = _trainer(corpus, tmp_path, train__max_steps=40, train__max_skips_in_row=3)
    for _ in range(9):
        tr.train_step()
    monkeypatch.setattr(train_mod, "causal_lm_loss", lambda model, x: torch.tensor(float("nan")))
    with pytest.raises(TrainError, match=r"3 micro-batches in a row skipped.*loss is nan.*nothing was saved"):
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
    opt = LayerwiseOptimizer(model, cfg.optim, 10, seed=0, accum_mode=accum_mode, grad_accum_steps=2)
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
