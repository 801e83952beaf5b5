"""Ctrl-C and SIGTERM during training: the first finishes the step under way, saves and ends the run; a
second stops at once without saving.

The first signal is noted (the loop checks it after each step) and said at once, since a 7B step takes
minutes. The second raises `Interrupted` wherever the run is: a step under way is abandoned (its state is
dirty and never saved) and a checkpoint being written is removed from its temp folder, so the last complete
checkpoint on disk is what `--resume auto` continues from. The command exits 128 + the signal's number
(130 for SIGINT, 143 for SIGTERM), as shells report a process ended by that signal.
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Callable

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A second Ctrl-C / SIGTERM: the run stopped at once and saved nothing (its message says what is kept)."""

    def __init__(self, signum: int, msg: str = ""):
        super().__init__(msg or f"stopped at once by a second {signal_name(signum)}")
        self.signum = signum

    def naming(self, kept: str | None) -> Interrupted:
        """This stop, its message naming the checkpoint `--resume auto` continues from (None: none saved)."""
        kept = (f"the last saved step is {os.path.basename(kept).rpartition('-')[2]} ({kept}), where --resume "
                f"auto continues" if kept else "no checkpoint of this run was saved")
        return Interrupted(self.signum, f"stopped at once by a second {signal_name(self.signum)}, without saving; "
                                        f"{kept}")


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def exit_code(signum: int) -> int:
    """What a shell reports for a process ended by `signum` (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + int(signum)


def _write(line: str) -> None:
    # os.write, not print: a handler that interrupts a print to the same stream would raise "reentrant call"
    try:
        os.write(sys.stderr.fileno(), ("\n" + line + "\n").encode())
    except (OSError, ValueError, AttributeError):  # a replaced stderr (pytest's capture) has no file number
        print(line, file=sys.stderr, flush=True)


class StopSignals:
    """SIGINT/SIGTERM handlers for the training loop, installed by `install` and put back by `restore`.

    `first(signum)` is called on the first signal and returns what the run will do ("stopping after step 7,
    then saving"); it is printed when `say` (rank 0) is true.
    """

    def __init__(self, first: Callable[[int], str], say: bool = True):
        self.first, self.say = first, say
        self.signum: int | None = None
        self._previous: dict = {}

    def install(self) -> None:
        for s in SIGNALS:
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not in the main thread (e.g. called from a test thread): no handlers
                pass

    def restore(self) -> None:
        """Put back the handlers found at install (a notebook's Ctrl-C works as before after the run)."""
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise Interrupted(signum)
        self.signum = signum
        what = self.first(signum)
        if self.say:
            again = "Ctrl-C again" if signum == signal.SIGINT else "a second SIGTERM"
            _write(f"qapollo: {signal_name(signum)}: {what} ({again} stops at once without saving)")
