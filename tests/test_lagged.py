"""Lagged accumulation moves the weights as far as the exact large batch: the first window, a resume into
lagged mode, a window with skipped micro-batches, and the limiter over a run (benchmarks/accumulation.py
measures the same at the 20M width on the shipped corpus)."""
import json
import os

import pytest
import torch

from qapollo.layerwise import LayerwiseOptimizer
from qapollo.loss import causal_lm_loss
from qapollo.model import build_model, matrix_names
from qapollo.optim import apollo
from tests.helpers import make_cfg, run, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")
K = 8


# ---- a window with skipped micro-batches -----------------------------------------------------------------
@pytest.mark.parametrize("scale_type,rank", [("tensor", 1), ("channel", 4)])
@pytest.mark.parametrize("limiter", [0.0, 1.01])
@pytest.mark.parametrize("used", [1, 3])
def test_window_with_skips_commits_the_whole_windows_state(scale_type, rank, limiter, used):
    """The loss is divided by K whatever the guard skips: a window of `used` equal micro-batches must commit
    what the whole window of them commits (moments, step size, limiter reference), so the next window steps
    alike; committing (used/K)·ΣR made the next step K/used times too large (7.4× for 1 of 8)."""
    torch.manual_seed(0)
    shape = (40, 24)
    hp = dict(rank=rank, scale_type=scale_type, update_proj_gap=100, norm_growth_limit=limiter)
    states = [apollo.init_state(shape, rank, 5, "cpu") for _ in range(2)]
    for window in range(4):
        g = torch.randn(shape, dtype=torch.float64) * (1.5 ** window)
        for st, n in zip(states, (K, used if window == 2 else K)):
            for i in range(n):
                apollo.lagged_multiplier(g / K, st, window=K, last=i == K - 1, **hp)
            apollo.lagged_commit(st, shape=shape, scale_type=scale_type, window=K, norm_growth_limit=limiter)
        whole, skipped = states
        for k in ("exp_avg", "exp_avg_sq", "prev_norm", "lag_step"):
            assert torch.allclose(skipped[k].double(), whole[k].double(), rtol=1e-5, atol=0), (window, k)


# ---- a tiny model trained for real -----------------------------------------------------------------------
def _stream(corpus):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=corpus["data.tokenizer"])
    ids = torch.tensor(sp.encode(open(corpus["data.path"]).read()))

    def batch(i: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(i)
        starts = torch.randint(0, len(ids) - 33, (2,), generator=g)
        return torch.stack([ids[s:s + 32] for s in starts])
    return batch


def _build(mode: str, limiter: float = 1.01, steps: int = 30, **optim):
    cfg = tiny_config(model__weight_quant=False, model__max_position_embeddings=64, optim__lr=3e-3,
                      optim__warmup_steps=10, optim__norm_growth_limit=limiter,
                      **{f"optim__{k}": v for k, v in optim.items()})
    model = build_model(cfg.model, "cpu", seed=0)
    model.train()
    return model, LayerwiseOptimizer(model, cfg.optim, steps, seed=0, accum_mode=mode, grad_accum_steps=K)


def _matrices(model):
    names = matrix_names(model)
    return {n: p.detach().clone() for n, p in model.named_parameters() if n in names}


def _step_norm(model, opt, batch, s: int) -> float:
    """One optimizer step of K micro-batches; the norm of all projection matrices' update."""
    before = _matrices(model)
    for i in range(K):
        opt.begin_step(last_micro=i == K - 1)
        (causal_lm_loss(model, batch(s * K + i)) / K).backward()
        opt.after_backward()
    opt.end_step()
    return sum((w - before[n]).square().sum() for n, w in _matrices(model).items()).sqrt().item()


def test_first_window_is_one_step(corpus):
    """A fresh lagged run's first window moves the matrices as far as the exact step on the same K
    micro-batches (its scale could only be known at its end; before, each micro-batch applied a full step)."""
    batch = _stream(corpus)
    exact = _step_norm(*_build("exact"), batch, 0)
    lagged = _step_norm(*_build("lagged"), batch, 0)
    assert abs(lagged / exact - 1) < 0.10, (lagged, exact)


def test_lagged_keeps_the_exact_step_size(corpus):
    """30 steps of each mode on the same tokens, the limiter on: after the warmup the lagged windows move the
    matrices as far as the exact steps on average (applying the previous window's c to this window's ΣG,
    with the limiter cutting per micro-batch, moved them about twice as far)."""
    batch = _stream(corpus)
    norms = {}
    for mode in ("exact", "lagged"):
        model, opt = _build(mode)
        norms[mode] = [_step_norm(model, opt, batch, s) for s in range(30)][10:]
    ratio = sum(norms["lagged"]) / sum(norms["exact"])
    assert 0.8 <= ratio <= 1.25, (ratio, norms)


def test_resume_into_lagged_mode_is_one_step(corpus, tmp_path, capsys):
    """A checkpoint records its accumulation; resumed in lagged mode (no lagged step size saved), the next
    step moves the matrices as far as the exact mode's next step from the same checkpoint, and says why."""
    over = dict(model__weight_quant=False, train__grad_accum_steps=K, train__max_steps=3, train__save_every=3,
                optim__warmup_steps=2)
    run(make_cfg(corpus, tmp_path, "ex", **over))
    ckpt = os.path.join(tmp_path, "ex", "checkpoint-3")
    rec = json.load(open(os.path.join(ckpt, "trainer_state.json")))["accumulation"]
    assert rec == {"accum_mode": "exact", "grad_accum_steps": K, "tokens_per_step": 2 * 16 * K}
    moved = {}
    for mode in ("exact", "lagged"):
        cfg = make_cfg(corpus, tmp_path, f"to_{mode}", **{**over, "train__max_steps": 4, "train__accum_mode": mode})
        capsys.readouterr()
        tr = run(cfg, resume=ckpt)
        assert tr.opt.step_count == 4
        before = dict(_weights_of(ckpt))
        moved[mode] = sum((p.detach() - before[n]).square().sum() for n, p in tr.model.named_parameters()
                          if n in matrix_names(tr.model)).sqrt().item()
        err = capsys.readouterr().err
        assert ("train.accum_mode=exact" in err and "measures its own lagged step size" in err) == (mode == "lagged")
    assert abs(moved["lagged"] / moved["exact"] - 1) < 0.10, moved


def _weights_of(ckpt):
    from safetensors import safe_open
    with safe_open(os.path.join(ckpt, "model.safetensors"), "pt") as f:
        for k in f.keys():
            yield k, f.get_tensor(k)


class _SkipAfter:
    """A spike guard stub: at the step it is armed for, it skips every micro-batch after the first `used`."""

    def __init__(self, used: int):
        self.used, self.armed, self.seen = used, False, 0

    def reason_to_skip(self, loss):
        self.seen += 1
        return "stub spike" if self.armed and self.seen > self.used else None

    def accept(self, loss):
        pass


def _guarded_step_norm(model, opt, batch, s: int, guard=None) -> float:
    """One optimizer step as the trainer takes it (engine.optimizer_step, the guard deciding before each
    backward); the norm of all projection matrices' update."""
    from qapollo.engine import optimizer_step
    before = _matrices(model)
    if guard is not None:
        guard.seen = 0
    optimizer_step(model, opt, [batch(s * K + i) for i in range(K)], guard=guard)
    return sum((w - before[n]).square().sum() for n, w in _matrices(model).items()).sqrt().item()


@pytest.mark.parametrize("used", [1, 3])
def test_window_with_skips_applies_a_whole_step(corpus, used):
    """Step 13 skips its micro-batches after the first `used` (the guard decides after those were applied):
    each mode's step then, against the same step of a run without the skip (identical until then). Exact mode
    steps on the mean of those used, at about its usual size; lagged mode must too. Before, it applied only
    the used micro-batches' shares of a whole window: 0.36 of exact's share for 1 of 8 here, 0.61 for 3 of 8
    (0.58 of a step at the 20M width)."""
    batch = _stream(corpus)
    share = {}
    for mode in ("exact", "lagged"):
        norms = []
        for skipping in (False, True):
            model, opt = _build(mode)
            guard = _SkipAfter(used)
            for s in range(12):
                _guarded_step_norm(model, opt, batch, s, guard)
            guard.armed = skipping
            norms.append(_guarded_step_norm(model, opt, batch, 12, guard))
        share[mode] = norms[1] / norms[0]
    assert 0.9 <= share["lagged"] / share["exact"] <= 1.1, share


@pytest.mark.parametrize("resumed", [False, True])
def test_first_window_applies_weight_decay(resumed):
    """A window without a step size (a fresh run, or a resume that changed the accumulation) applies its whole
    step at its last micro-batch, which commits the window first: it must still decay the weight once, as
    every other window does (before, it skipped the decay). Same gradients with and without weight decay:
    the weights differ by exactly the factor 1 - lr·wd."""
    from qapollo.config import Config
    from qapollo.optim.updaters import ApolloUpdater
    torch.manual_seed(0)
    shape, lr, wd = (24, 16), 0.01, 0.1
    grads = [torch.randn(shape, dtype=torch.float64) for _ in range(2 * K)]
    weights = []
    for decay in (0.0, wd):
        ocfg = Config().optim
        ocfg.weight_decay = decay
        w = torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
        upd = ApolloUpdater("w", w, ocfg, 5, 6, False, lagged=True, window=K)
        windows = [grads[:K], grads[K:2 * K]] if resumed else [grads[:K]]
        for n, window in enumerate(windows):
            if resumed and n == 1:
                upd.forget_accumulation(reference=True)
                start = w.detach().clone()
            for i, g in enumerate(window):
                upd.step(g.clone(), lr, False, last=i == K - 1)
            upd.commit()
        weights.append((w.detach().clone(), start if resumed else None))
    (plain, plain_start), (decayed, decayed_start) = weights
    factor = float(torch.tensor(1 - lr * wd))  # the updater's decay factor is an fp32 tensor
    if resumed:  # the resumed window alone: from each run's own weights
        plain, decayed = plain - plain_start, decayed - decayed_start * factor
    assert torch.allclose(decayed, plain * factor, rtol=1e-9, atol=0)
