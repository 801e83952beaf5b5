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
‖ΣG‖²/Σ‖G_i‖² (noise-dominated micro-batches: ≈ 1, parallel ones: K), an estimate of (ΣG)²: each row's own
alignment, measured in a sketch of the row (row_scale), the columns' the whole matrix's, measured in a
sketch of the matrix. The row clip is the window's, shared by its micro-batches (window_clip): a row in
one micro-batch may take all of it, a row in every one its share as far as their updates add up. A window
before any commit applies nothing until its last micro-batch, which carries the window's step (G_K scaled
to the window's ‖ΣG‖), as in APOLLO's lagged mode (optim/apollo.py). No weight decay in either mode (the
embedding and lm_head never take it, as in the float path).
"""
from __future__ import annotations

import torch

from .apollo import SKETCH_ROWS, alignment, sketch_rows  # the lagged windows' sketch, as the matrices keep it

TINY = 1e-30
CLIP_RMS = 1.0


def init_state(shape: tuple[int, int], device, lagged: bool = False) -> dict:
    return {"step": 0, "row_sq": torch.zeros(shape[0], device=device), "col_sq": torch.zeros(shape[1], device=device),
            **_empty_window(shape, device, lagged)}


def _empty_window(shape: tuple[int, int], device, lagged: bool) -> dict:
    z = torch.zeros
    window = {"row_acc": z(shape[0], device=device), "col_acc": z(shape[1], device=device),
              "sk_micro": z(SKETCH_ROWS, shape[1], device=device), "sk_sum": z(SKETCH_ROWS, shape[1], device=device),
              "sk_sq": z((), device=device), "g_micro": z((), device=device), "g_sq": z((), device=device),
              "g_last": z((), device=device), "count": 0}
    if lagged:  # per row: its sketch's sum, Σ‖h_i‖, Σ‖h_i‖² (row_scale); the update RMS applied (window_clip)
        window["rk_sum"] = z(shape[0], SKETCH_ROWS, device=device)
        for k in ("rk_norm", "rk_sq", "rms_sum", "rms_sq"):
            window[k] = z(shape[0], device=device)
    return window


def sketch_matrix(shape: tuple[int, int], seed: int, step: int, device) -> torch.Tensor:
    """The window's Gaussian sketch (SKETCH_ROWS × V), the same for all its micro-batches."""
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + step) & ((1 << 63) - 1))
    return torch.randn(SKETCH_ROWS, shape[0], generator=gen, device=device)


def row_sketch_matrix(shape: tuple[int, int], seed: int, step: int, device) -> torch.Tensor:
    """The window's Gaussian sketch of each row (h × SKETCH_ROWS), the same for all its micro-batches."""
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_033 + step + 1) & ((1 << 63) - 1))
    return torch.randn(shape[1], SKETCH_ROWS, generator=gen, device=device)


def add_rows(state: dict, rows, g: torch.Tensor, sketch: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Add gradient rows g (k, h) at row indices `rows` (a slice or distinct indices): their mean squares and,
    with the sketch matrices (A, B) of a lagged window, A[:, rows]·g and each row's g·B."""
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
        state["sk_micro"] += sketch_rows(g, sketch[0][:, rows])
        h = g @ sketch[1]  # a micro-batch gives each row once: its sketch joins the row's sums at once
        state["rk_sum"][rows] += h
        state["rk_norm"][rows] += h.norm(dim=1)
        state["rk_sq"][rows] += h.square().sum(dim=1)


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


def row_scale(state: dict, window: int) -> torch.Tensor:
    """Each row's (ΣG)² / Σ_i G_i² of a lagged window as if whole (V,): its own alignment, from its sketch,
    × (K/used)². A row's micro-batches may be far more or less aligned than the whole matrix's (a rare
    token's row is in one micro-batch: 1; a frequent one's from 1 to K): the matrix's alignment for every
    row misjudged their mean squares by up to 2-3× (BENCHMARKS.md, issue 27)."""
    k = window / max(1, state["count"])
    sq = state["rk_sq"]
    return torch.where(sq > 0, state["rk_sum"].square().sum(dim=1) / torch.where(sq > 0, sq, 1.0), 1.0) * (k * k)


def commit(state: dict, beta2: float, scale: float | torch.Tensor = 1.0, rows: torch.Tensor | None = None) -> None:
    """The step's gradient is complete: fold its mean squares (× scale; the rows' × `rows` when given) into the
    EMAs; empty the window."""
    n_rows, shape = state["row_sq"].shape[0], (state["row_sq"].shape[0], state["col_sq"].shape[0])
    state["row_sq"].mul_(beta2).add_(state["row_acc"] * (scale if rows is None else rows), alpha=1 - beta2)
    state["col_sq"].mul_(beta2).add_(state["col_acc"] * (scale / n_rows), alpha=1 - beta2)
    state.update(_empty_window(shape, state["row_sq"].device, "rms_sum" in state))
    state["step"] += 1


def factors(state: dict, beta2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(a (V,), b (h,)): U = G · a_i · b_j."""
    corr = 1 - beta2 ** state["step"]
    r, c = state["row_sq"] / corr, state["col_sq"] / corr
    return torch.rsqrt(r + TINY), torch.sqrt(r.mean() / (c + TINY))


def row_update(g: torch.Tensor, a_rows: torch.Tensor, b: torch.Tensor, stretch=1.0,
               clip: float | torch.Tensor = CLIP_RMS) -> tuple[torch.Tensor, torch.Tensor]:
    """(G·b (k, h) fp32, the per-row multiplier (k, 1)) of rows with factors a_rows: U = (G·b)·mult, with
    `stretch` (a first lagged window) included and each row's RMS clipped to `clip` (a number, or one per
    row: a lagged micro-batch's remaining share of the window's clip, window_clip)."""
    gb = g.float() * b
    scaled = a_rows * stretch
    rms = scaled * gb.square().mean(dim=1).sqrt()
    return gb, (scaled * torch.where(rms > clip, clip / rms, torch.ones_like(rms)))[:, None]


def window_clip(state: dict, rows) -> torch.Tensor:
    """Lagged windows: each row's remaining share of the window's clip, so that the window's row update,
    the sum of its micro-batches' updates u_i, has RMS ≤ CLIP_RMS as the exact step's. Its RMS² is
    estimated from the RMS applied so far (s1 = Σ‖u_i‖, s2 = Σ‖u_i‖², per row) and the row's micro-batches'
    mean correlation γ, from its sketch: ‖Σh_i‖² = Σ‖h_i‖² + γ·Σ_{i≠j}‖h_i‖‖h_j‖. So ‖Σu‖² ≈ (1-γ)·s2 + γ·s1²,
    and the next micro-batch may add x with (1-γ)(s2 + x²) + γ(s1 + x)² ≤ CLIP_RMS². A row in one
    micro-batch of the window gets the whole clip, as in the exact step; a row in every one ≈ CLIP_RMS/√K
    each when they are noise (γ ≈ 0), CLIP_RMS/K when they are parallel (γ = 1). A fixed CLIP_RMS/K per
    micro-batch cut almost every row: a micro-batch's noisy update has a row RMS near 1/√K of the window's
    (BENCHMARKS.md, issue 27)."""
    n1, n2 = state["rk_norm"][rows], state["rk_sq"][rows]
    cross = n1 * n1 - n2
    gamma = (state["rk_sum"][rows].square().sum(dim=1) - n2) / torch.where(cross > 0, cross, 1.0)
    gamma = torch.where(cross > 0, gamma, 0.0).clamp(0.0, 1.0)
    s1, s2 = state["rms_sum"][rows], state["rms_sq"][rows]
    room = CLIP_RMS ** 2 - (1 - gamma) * s2 - gamma * (1 - gamma) * s1 * s1
    return (room.clamp(min=0).sqrt() - gamma * s1).clamp(min=0)


def spend(state: dict, rows, gb: torch.Tensor, mult: torch.Tensor) -> None:
    """A lagged micro-batch's row updates (G·b)·mult were applied: their RMS joins the window's sums."""
    x = mult[:, 0].abs() * gb.square().mean(dim=1).sqrt()
    state["rms_sum"][rows] += x
    state["rms_sq"][rows] += x * x


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
        self.state = init_state(self.shape, target.device, lagged)
        self.sketch_seed, self.sr_seed = sketch_seed, sr_seed
        self.finite = None

    def _sketch(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.lagged:
            return None
        args = (self.shape, self.sketch_seed, self.state["step"], self.target.device)
        return sketch_matrix(*args), row_sketch_matrix(*args)

    def _noise(self) -> tuple[int, str]:
        st = self.state
        return self.sr_seed, (f"{st['step']}:{st['count']}" if self.lagged else str(st["step"]))

    def _plan(self, last: bool):
        """(a, b, stretch, shared) to apply this micro-batch's gradient with, or None. Exact: the step's
        gradient is complete, so commit first. Lagged: the factors of the last commit, each row clipped to
        what remains of the window's clip (shared=True, window_clip); a window before any commit waits for
        its last micro-batch, which commits and carries the whole window's step."""
        st, b2 = self.state, self.o.beta2
        if not self.lagged:
            commit(st, b2)
            return (*factors(st, b2), 1.0, False)
        if st["step"] > 0:
            return (*factors(st, b2), 1.0, True)
        if not last:
            return None
        scale = window_scale(st, self.window)
        stretch = torch.sqrt(st["g_sq"] * scale / st["g_last"].clamp(min=TINY))
        commit(st, b2, scale, row_scale(st, self.window))
        return (*factors(st, b2), stretch, False)

    def _update(self, rows, g: torch.Tensor, plan) -> tuple[torch.Tensor, torch.Tensor]:
        """(G·b, the per-row multiplier) of these rows under `plan` (see _plan)."""
        a, b, stretch, shared = plan
        gb, mult = row_update(g, a[rows], b, stretch, window_clip(self.state, rows) if shared else CLIP_RMS)
        if shared:
            spend(self.state, rows, gb, mult)
        return gb, mult

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
        gb, mult = self._update(rows, g, plan)
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

        def apply(sl, g):
            gb, mult = self._update(sl, g, plan)
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
            st, k = self.state, self.window
            commit(st, self.o.beta2, window_scale(st, k), row_scale(st, k))

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
