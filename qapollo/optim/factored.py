"""Factored second moments for the int8 embedding and lm_head (model.lean_head): per-element step sizes
from a row and a column mean square (Adafactor's factorization, no first moment), so that every token's
row moves by its own normalized step, as Adam's would. Pure tensor math.

For a (V, h) matrix with gradient G (given whole, by rows or by row slices):
    r_i = EMA_β2(mean_j G_ij²)   (V)          c_j = EMA_β2(mean_i G_ij²)   (h)
    V̂_ij = r̂_i ĉ_j / mean(r̂)                 (bias-corrected; Adafactor's rank-1 estimate of Adam's V)
    U_ij = G_ij / √V̂_ij = G_ij · a_i · b_j,    a = 1/√r̂,  b = √(mean r̂ / ĉ)
    each row's U clipped to RMS ≤ 1 (a row seen for the first time has a tiny r̂: Adafactor's update clip)
    W ← W − lr·U
U separates into a row and a column factor, so it is applied slice by slice (the gradient times b, with a
per-row multiplier), and the state is V + h floats per matrix. APOLLO-Mini's one tensor-wise scale moves
every row in proportion to its gradient, so rare tokens' rows hardly learn (BENCHMARKS.md, "model.lean_head
without its quality cost").

Lagged accumulation (K micro-batches per step, each applied at once): a micro-batch applies G_i·a·b with
the factors of the last commit, so a window applies ΣG_i·a·b, the large batch's direction. At the
window's end the EMAs take the window's mean squares Σ_i G_i² times the micro-batches' alignment
‖ΣG‖²/Σ‖G_i‖², measured in a sketch (noise-dominated micro-batches: ≈ 1, parallel ones: K): an estimate
of (ΣG)². A window before any commit applies nothing until its last micro-batch, which carries the
window's step (G_K scaled to the window's ‖ΣG‖), as in APOLLO's lagged mode (optim/apollo.py).
"""
from __future__ import annotations

import torch

from .apollo import SKETCH_ROWS, alignment, sketch_rows  # the lagged windows' sketch, as the matrices keep it

TINY = 1e-30
CLIP_RMS = 1.0


def init_state(shape: tuple[int, int], device) -> dict:
    return {"step": 0, "row_sq": torch.zeros(shape[0], device=device), "col_sq": torch.zeros(shape[1], device=device),
            **_empty_window(shape, device)}


def _empty_window(shape: tuple[int, int], device) -> dict:
    z = torch.zeros
    return {"row_acc": z(shape[0], device=device), "col_acc": z(shape[1], device=device),
            "sk_micro": z(SKETCH_ROWS, shape[1], device=device), "sk_sum": z(SKETCH_ROWS, shape[1], device=device),
            "sk_sq": z((), device=device), "g_micro": z((), device=device), "g_sq": z((), device=device),
            "g_last": z((), device=device), "count": 0}


def sketch_matrix(shape: tuple[int, int], seed: int, step: int, device) -> torch.Tensor:
    """The window's Gaussian sketch (SKETCH_ROWS × V), the same for all its micro-batches."""
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + step) & ((1 << 63) - 1))
    return torch.randn(SKETCH_ROWS, shape[0], generator=gen, device=device)


def add_rows(state: dict, rows, g: torch.Tensor, sketch: torch.Tensor | None = None) -> None:
    """Add gradient rows g (k, h) at row indices `rows` (a slice or an index tensor): their mean squares and,
    with a sketch matrix (lagged windows), A[:, rows]·g."""
    g = g.float()
    sq = g.square()
    if isinstance(rows, slice):
        state["row_acc"][rows] += sq.mean(dim=1)
    else:
        state["row_acc"].index_add_(0, rows, sq.mean(dim=1))
    col = sq.sum(dim=0)
    state["col_acc"] += col
    state["g_micro"] += col.sum()
    if sketch is not None:
        state["sk_micro"] += sketch_rows(g, sketch[:, rows])


def end_micro(state: dict) -> None:
    """A micro-batch's rows are all in: its sketch and norm join the window's sums."""
    state["sk_sum"] += state["sk_micro"]
    state["sk_sq"] += state["sk_micro"].square().sum()
    state["sk_micro"].zero_()
    state["g_sq"] += state["g_micro"]
    state["g_last"] = state["g_micro"].clone()
    state["g_micro"].zero_()
    state["count"] += 1


def window_scale(state: dict, window: int) -> torch.Tensor:
    """(ΣG)² / Σ_i G_i² of a lagged window as if whole: the sketch's alignment × (K/used)² (a window with
    skipped micro-batches stands for the mean of those used, as in exact mode)."""
    k = window / max(1, state["count"])
    return alignment(state) * k * k


def commit(state: dict, beta2: float, scale: float | torch.Tensor = 1.0) -> None:
    """The step's gradient is complete: fold its mean squares (× scale) into the EMAs; empty the window."""
    n_rows, shape = state["row_sq"].shape[0], (state["row_sq"].shape[0], state["col_sq"].shape[0])
    state["row_sq"].mul_(beta2).add_(state["row_acc"] * scale, alpha=1 - beta2)
    state["col_sq"].mul_(beta2).add_(state["col_acc"] * (scale / n_rows), alpha=1 - beta2)
    state.update(_empty_window(shape, state["row_sq"].device))
    state["step"] += 1


def factors(state: dict, beta2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(a (V,), b (h,)): U = G · a_i · b_j."""
    corr = 1 - beta2 ** state["step"]
    r, c = state["row_sq"] / corr, state["col_sq"] / corr
    return torch.rsqrt(r + TINY), torch.sqrt(r.mean() / (c + TINY))


def row_update(g: torch.Tensor, a_rows: torch.Tensor, b: torch.Tensor, stretch=1.0,
               clip: float = CLIP_RMS) -> tuple[torch.Tensor, torch.Tensor]:
    """(G·b (k, h) fp32, the per-row multiplier (k, 1)) of rows with factors a_rows: U = (G·b)·mult, with
    `stretch` (a first lagged window) included and each row's RMS clipped to `clip` (a lagged micro-batch:
    its share of the window's CLIP_RMS)."""
    gb = g.float() * b
    scaled = a_rows * stretch
    rms = scaled * gb.square().mean(dim=1).sqrt()
    return gb, (scaled / torch.clamp(rms / clip, min=1.0))[:, None]


def state_tensors(state: dict) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps (written at step boundaries, where the window is empty)."""
    return {"step": torch.tensor(state["step"], dtype=torch.int64), "row_sq": state["row_sq"],
            "col_sq": state["col_sq"]}


def load_state_tensors(state: dict, tensors: dict[str, torch.Tensor]) -> None:
    dev = state["row_sq"].device
    state["step"] = int(tensors["step"])
    # copies: the EMAs are updated in place, and the tensors given may be another updater's
    state["row_sq"], state["col_sq"] = (tensors[k].to(dev, copy=True) for k in ("row_sq", "col_sq"))


class FactoredUpdater:
    """The int8 embedding / lm_head of model.lean_head with factored second moments: per-element normalized
    steps from V + h floats of state; exact (one step per step) or lagged accumulation (above). The same
    interface as updaters.ApolloUpdater; `target` is an int8 module (add_rows_, add_slice_)."""

    kind = "factored"

    def __init__(self, name: str, target, ocfg, sketch_seed: int, sr_seed: int, stochastic: bool,
                 lagged: bool = False, window: int = 1):
        self.name, self.target, self.o, self.stochastic = name, target, ocfg, stochastic
        self.lagged, self.window = lagged, window
        self.shape = tuple(target.shape)
        self.state = init_state(self.shape, target.device)
        self.sketch_seed, self.sr_seed = sketch_seed, sr_seed
        self.finite = None

    def _sketch(self) -> torch.Tensor | None:
        st = self.state
        return sketch_matrix(self.shape, self.sketch_seed, st["step"], self.target.device) if self.lagged else None

    def _noise(self) -> tuple[int, str]:
        st = self.state
        return self.sr_seed, (f"{st['step']}:{st['count']}" if self.lagged else str(st["step"]))

    def _plan(self, last: bool):
        """(a, b, stretch, clip) to apply this micro-batch's gradient with, or None. Exact: the step's
        gradient is complete, so commit first. Lagged: the factors of the last commit, each micro-batch's
        rows clipped to its 1/K share; a window before any commit waits for its last micro-batch, which
        commits and carries the whole window's step."""
        st, b2 = self.state, self.o.beta2
        if not self.lagged:
            commit(st, b2)
            return (*factors(st, b2), 1.0, CLIP_RMS)
        if st["step"] > 0:
            return (*factors(st, b2), 1.0, CLIP_RMS / self.window)
        if not last:
            return None
        scale = window_scale(st, self.window)
        stretch = torch.sqrt(st["g_sq"] * scale / st["g_last"].clamp(min=TINY))
        commit(st, b2, scale)
        return (*factors(st, b2), stretch, CLIP_RMS)

    def step_rows(self, rows: torch.Tensor, g: torch.Tensor, lr: float, count_changes: bool, last: bool = True) -> int:
        """The batch's `rows` of the embedding's gradient (values `g`); rows not in the batch keep their codes."""
        self.finite = torch.isfinite(g).all()
        g = torch.where(self.finite, g, torch.zeros_like(g))
        add_rows(self.state, rows, g, self._sketch())
        noise = self._noise()
        end_micro(self.state)
        plan = self._plan(last)
        if plan is None:
            return 0
        a, b, stretch, clip = plan
        gb, mult = row_update(g, a[rows], b, stretch, clip)
        return self.target.add_rows_(rows, gb * (mult * -lr), torch.ones((), device=g.device),
                                     stochastic=self.stochastic, noise=noise, count_changes=count_changes,
                                     keep=~self.finite)

    def step_slices(self, src, lr: float, count_changes: bool, last: bool = True) -> int:
        """lm_head's gradient slice by slice (loss.HeadGradSlices), read twice: the mean squares, then each
        slice recomputed and applied to its rows."""
        ok, sk = [], self._sketch()

        def measure(sl, g):
            ok.append(torch.isfinite(g).all())
            add_rows(self.state, sl, torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0), sk)
        src.each(measure)
        self.finite = torch.stack(ok).all()
        noise, keep, changed = self._noise(), ~self.finite, [0]
        end_micro(self.state)
        plan = self._plan(last)
        if plan is None:
            return 0
        a, b, stretch, clip = plan

        def apply(sl, g):
            gb, mult = row_update(g, a[sl], b, stretch, clip)
            changed[0] += self.target.add_slice_(sl, gb, mult * -lr, stochastic=self.stochastic, noise=noise,
                                                 count_changes=count_changes, keep=keep)
        src.each(apply)
        return changed[0]

    def step(self, grad: torch.Tensor, lr: float, count_changes: bool, last: bool = True) -> int:
        """A whole gradient (a reference run without the slice hook): all rows at once."""
        return self.step_rows(torch.arange(self.shape[0], device=grad.device), grad, lr, count_changes, last)

    def finite_flag(self):
        return self.finite

    def commit(self) -> None:
        """Step boundary (lagged): the window's mean squares, as if whole, join the EMAs."""
        if self.lagged and self.state["count"]:
            commit(self.state, self.o.beta2, window_scale(self.state, self.window))

    def forget_accumulation(self, reference: bool) -> None:
        """Nothing to forget: the factors are long averages, valid whatever the accumulation."""

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        return state_tensors(self.state), {}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], scalars: dict) -> None:
        load_state_tensors(self.state, tensors)

    def state_spec(self) -> tuple[dict[str, tuple], tuple[str, ...]]:
        return {"step": (), "row_sq": (self.shape[0],), "col_sq": (self.shape[1],)}, ("step", "row_sq", "col_sq")

    def resident_tensors(self) -> list[torch.Tensor]:
        return [v for v in self.state.values() if torch.is_tensor(v)]
