"""TEST-ONLY crash injection: `QAPOLLO_TEST_HOOK=<point>@<step>` SIGKILLs this process at that point.

`[<SIGNAL>/]<point>@<step>[,...]` sends another signal instead (`SIGINT/step@3,SIGINT/save:model@3`: a
Ctrl-C between the micro-batches of step 3, a second one while checkpoint-3 is being written), so that
tests/test_reliability.py lands interrupts at exact points instead of after a sleep.

Never set it outside tests. tests/test_reliability.py uses it to land a `kill -9` exactly where a crash is
most dangerous and checks that every checkpoint under its final name still loads and that
`--resume auto` continues from the newest complete one. The points:

    step          between two micro-batches of step <step> (gradients accumulated, nothing updated)
    backward      inside step <step>'s backward, after half of the tensors were updated in-backward
    save:model    checkpoint-<step>: model.safetensors written, optimizer.safetensors not yet
    save:latest   checkpoint-<step> complete in its temp folder and named in `latest`, not yet renamed
    save:rotate   checkpoint-<step> renamed into place, older checkpoints not yet rotated away

The variable is read here, once, at import; with it unset every call below is a no-op.
"""
from __future__ import annotations

import os
import signal
import sys

SPEC = os.environ.get("QAPOLLO_TEST_HOOK", "")
# (signal name, "<point>@<step>") for each comma-separated entry
_HOOKS = [(sig or "SIGKILL", where) for sig, _, where in (s.rpartition("/") for s in SPEC.split(",") if s)]


def hit(point: str, step: int) -> None:
    """Signal the process if the hook names this point and step (SIGKILL: no cleanup runs, as with kill -9)."""
    for sig, where in _HOOKS:
        if where == f"{point}@{step}":
            print(f"qapollo test hook: {sig} at {where}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), getattr(signal, sig))


def install(opt) -> None:
    """Wrap the optimizer's bookkeeping (layerwise.LayerwiseOptimizer) so that the `step` and `backward`
    points fire (only when set)."""
    if not any(where.startswith(("step@", "backward@")) for _, where in _HOOKS):
        return
    begin, calls = opt.begin_step, {}

    def begin_step(*args, **kwargs):
        step = opt.step_count + 1
        calls[step] = calls.get(step, 0) + 1
        if calls[step] == 2:  # the second micro-batch starts: the first one's backward is done
            hit("step", step)
        return begin(*args, **kwargs)
    opt.begin_step = begin_step

    half, done = len(opt.updaters) // 2, {}

    def counted(update):
        def update_fn(*args, **kwargs):
            out = update(*args, **kwargs)
            step = opt.step_count + 1
            done[step] = done.get(step, 0) + 1
            if done[step] == half:
                hit("backward", step)
            return out
        return update_fn
    for upd in opt.updaters.values():  # every update of a tensor: whole, or by rows (the int8 embedding)
        upd.step = counted(upd.step)
        if hasattr(upd, "step_rows"):
            upd.step_rows = counted(upd.step_rows)
