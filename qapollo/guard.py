"""Spike guard: decide from a micro-batch's forward loss, before its backward, whether to train on it.

With optimizer steps inside backward an update cannot be undone once backward has started, but the loss
is known before that: a micro-batch whose loss is non-finite, or far above the running level, is skipped
(no backward, no update, its tokens are not counted) and the next one is drawn. Like OLMo-core's
skip-step rule, "far above" is a z-score against a window of recently accepted losses: skip when

    loss > mean + sigma · max(std, 0.02 · mean)

over the last `window` accepted micro-batch losses, once at least MIN_SAMPLES are known. The floor on the
std keeps a flat, quiet curve from flagging ordinary noise (a 6σ limit is then at least 12 % above the
mean). Many skips in a row mean the run itself has diverged, not one bad batch: the trainer stops.
"""
from __future__ import annotations

import math
from collections import deque

MIN_SAMPLES = 8
STD_FLOOR = 0.02


class SpikeGuard:
    def __init__(self, enabled: bool = True, sigma: float = 6.0, window: int = 128, max_in_row: int = 20):
        self.enabled, self.sigma, self.max_in_row = enabled, sigma, max_in_row
        self.losses: deque[float] = deque(maxlen=window)
        self.skips = 0  # micro-batches skipped in the whole run
        self.in_row = 0

    def limit(self) -> float | None:
        """The loss above which a micro-batch is skipped (None: not enough history yet)."""
        if not self.enabled or len(self.losses) < MIN_SAMPLES:
            return None
        n = len(self.losses)
        mean = sum(self.losses) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in self.losses) / (n - 1))
        return mean + self.sigma * max(std, STD_FLOOR * abs(mean))

    def reason_to_skip(self, loss: float) -> str | None:
        if not math.isfinite(loss):
            return f"loss is {loss}"
        lim = self.limit()
        if lim is not None and loss > lim:
            return (f"loss {loss:.4f} is above {lim:.4f} (mean + {self.sigma:g}σ of the last "
                    f"{len(self.losses)} accepted micro-batches)")
        return None

    def accept(self, loss: float) -> None:
        self.losses.append(loss)
        self.in_row = 0

    def skip(self) -> bool:
        """Count a skip; True when there were too many in a row (the run should stop)."""
        self.skips += 1
        self.in_row += 1
        return self.in_row >= self.max_in_row

    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "skips": self.skips, "in_row": self.in_row}

    def load_state_dict(self, d: dict) -> None:
        self.losses.clear()
        self.losses.extend(float(x) for x in d.get("losses", []))
        self.skips, self.in_row = int(d.get("skips", 0)), int(d.get("in_row", 0))
