"""Factored second moments for model.lean_head's embedding and lm_head (qapollo/optim/factored.py): the
update is Adafactor's rank-1 estimate of Adam's per-element step, the same from rows, slices or a whole
gradient, every row normalized on its own (what APOLLO-Mini's one tensor-wise scale did not do), and the
lagged windows apply the large batch's step."""
import pytest
import torch

from qapollo.config import Config
from qapollo.optim import factored
from qapollo.optim.factored import FactoredUpdater

V, H = 96, 32


class FloatTarget:
    """Stands in for an int8 module: applies the updater's deltas to a float matrix, no rounding."""

    def __init__(self):
        self.w = torch.zeros(V, H, dtype=torch.float64)
        self.shape, self.device = (V, H), torch.device("cpu")

    def add_rows_(self, rows, values, coef, *, keep=None, **kw) -> int:
        self.w[rows] += (values.double() * coef.double()) * (0 if keep else 1)
        return 1

    def add_slice_(self, sl, grad, coef, *, keep=None, **kw) -> int:
        self.w[sl] += (grad.double() * coef.double()) * (0 if keep else 1)
        return 1


class Slices:
    """loss.HeadGradSlices' protocol for a gradient given whole: each(fn) calls fn(row slice, G[rows])."""

    def __init__(self, g, step=20):
        self.g, self.step = g, step

    def each(self, fn):
        for v0 in range(0, V, self.step):
            fn(slice(v0, min(V, v0 + self.step)), self.g[v0:v0 + self.step])


def updater(lagged=False, window=1):
    return FactoredUpdater("t", FloatTarget(), Config().optim, 1, 2, False, lagged, window)


def dense_reference(grads, beta2=0.999, lr=1.0):
    """Adafactor without momentum, written out on whole matrices: the expected total update."""
    r, c, w = torch.zeros(V, dtype=torch.float64), torch.zeros(H, dtype=torch.float64), torch.zeros(V, H, dtype=torch.float64)
    for t, g in enumerate(grads, 1):
        g = g.double()
        r = beta2 * r + (1 - beta2) * g.square().mean(1)
        c = beta2 * c + (1 - beta2) * g.square().mean(0)
        rh, ch = r / (1 - beta2 ** t), c / (1 - beta2 ** t)
        u = g / torch.sqrt(rh[:, None] * ch[None, :] / rh.mean())
        rms = u.square().mean(1, keepdim=True).sqrt()
        w -= lr * u / torch.clamp(rms, min=1.0)
    return w


def test_the_update_is_adafactors_from_rows_slices_or_whole():
    torch.manual_seed(0)
    grads = [torch.randn(V, H) * torch.logspace(-3, 0, V)[:, None] for _ in range(4)]
    want = dense_reference(grads)
    for how in ("rows", "slices", "whole"):
        u = updater()
        for g in grads:
            if how == "rows":
                u.step_rows(torch.arange(V), g, 1.0, False)
            elif how == "slices":
                u.step_slices(Slices(g), 1.0, False)
            else:
                u.step(g, 1.0, False)
        assert torch.allclose(u.target.w, want, rtol=1e-4, atol=1e-7), how


def test_every_row_moves_by_its_own_normalized_step():
    """Rows whose gradients differ 1000× in scale (a frequent and a rare token) move by comparable steps; one
    tensor-wise scale (APOLLO-Mini) would move the rare one 1000× less."""
    torch.manual_seed(1)
    scale = torch.logspace(-3, 0, V)[:, None]
    u = updater()
    for _ in range(5):
        u.step_rows(torch.arange(V), torch.randn(V, H) * scale, 1e-2, False)
    moved = u.target.w.norm(dim=1)
    assert moved.max() / moved.min() < 3, (moved.min().item(), moved.max().item())


def test_rows_absent_from_the_batch_keep_their_weights_and_first_seen_rows_are_clipped():
    torch.manual_seed(2)
    u = updater()
    u.step_rows(torch.arange(0, 48), torch.randn(48, H), 1.0, False)
    assert torch.equal(u.target.w[48:], torch.zeros(V - 48, H, dtype=torch.float64))
    u.step_rows(torch.arange(48, 96), torch.randn(48, H) * 1e-3, 1.0, False)  # their r is still tiny: clipped
    rms = u.target.w[48:].square().mean(1).sqrt()
    assert (rms <= 1.0 + 1e-6).all() and (rms > 0.5).all()


@pytest.mark.parametrize("K", [2, 4])
def test_lagged_windows_of_equal_micro_batches_apply_the_exact_step(K):
    """K equal micro-batches (G/K each) per window: from the second window on, lagged applies ΣG·a·b with the
    factors of the window before; its states equal the exact mode's after the same windows (the sketch measures
    an alignment of K, so the window's mean squares count as (ΣG)²). The first window applies nothing before
    its last micro-batch, which carries the whole step."""
    torch.manual_seed(3)
    grads = [torch.randn(V, H) * torch.logspace(-2, 0, V)[:, None] for _ in range(4)]
    lag, exact = updater(True, K), updater()
    for t, g in enumerate(grads):
        before = lag.target.w.clone()
        for i in range(K):
            changed = lag.step_slices(Slices(g / K), 1.0, False, last=i == K - 1)
            assert (changed == 0) == (t == 0 and i < K - 1)
        lag.commit()
        if t > 0:  # applied with the factors of the windows before: the exact step of the previous state
            a, b = factored.factors(prev_state, 0.999)
            gb, mult = factored.row_update(g, a, b)
            assert torch.allclose(lag.target.w - before, -(gb * mult).double(), rtol=1e-4, atol=1e-7)
        exact.step(g, 1.0, False)
        for k in ("row_sq", "col_sq"):
            assert torch.allclose(lag.state[k], exact.state[k], rtol=1e-4), (t, k)
        prev_state = {k: v.clone() if torch.is_tensor(v) else v for k, v in exact.state.items()}
    first = updater(True, K)
    for i in range(K):
        first.step_slices(Slices(grads[0] / K), 1.0, False, last=i == K - 1)
    one = updater()
    one.step(grads[0], 1.0, False)
    assert torch.allclose(first.target.w, one.target.w, rtol=1e-4, atol=1e-7)  # the first window: one step


def test_state_round_trip_and_spec():
    torch.manual_seed(4)
    u = updater()
    u.step(torch.randn(V, H), 1.0, False)
    tensors, scalars = u.state_dict()
    shapes, required = u.state_spec()
    assert set(tensors) == set(required) and all(tuple(tensors[k].shape) == shapes[k] for k in tensors)
    v = updater()
    v.load_state_dict(tensors, scalars)
    g = torch.randn(V, H)
    before = u.target.w.clone()
    u.step(g, 1.0, False)
    v.step(g, 1.0, False)  # v's weights start at zero: its update is its whole matrix
    assert torch.equal(u.target.w - before, v.target.w)
    assert torch.equal(u.state["row_sq"], v.state["row_sq"]) and u.state["step"] == v.state["step"] == 2
