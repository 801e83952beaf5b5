"""What is live at the CUDA memory peak: replay a torch.cuda.memory snapshot's allocation trace.

benchmarks/memory.py --snapshot FILE records the allocator's history (torch.cuda.memory.
_record_memory_history, Python stacks) over the measured steps and writes `breakdown(...)` as JSON: the
peak of allocated bytes, the step it fell in, and the blocks allocated since recording began that are
still live at that moment, grouped by where they were allocated (innermost frame of qapollo,
bitsandbytes or transformers, and the innermost qapollo frame). Memory allocated before recording
(`base`: the model) is one number. This is what the planner (qapollo.memory) is checked against.
"""
from __future__ import annotations

from collections import defaultdict

OURS = ("qapollo/", "bitsandbytes/", "transformers/")


def innermost_first(frames: list[dict]) -> list[dict]:
    """Frames with the allocating call first (the script's '<module>' frame last), whatever the order given."""
    return frames[::-1] if frames and frames[0].get("name") == "<module>" else frames


def _short(filename: str) -> str:
    for mark in ("site-packages/", "dist-packages/"):
        if mark in filename:
            return filename.split(mark, 1)[1]
    for mark in OURS + ("benchmarks/",):
        if mark in filename:
            return mark + filename.split(mark, 1)[1]
    return filename.rsplit("/", 1)[-1]


def frame_key(frames: list[dict]) -> str:
    """'innermost library frame < innermost qapollo frame'."""
    frames = innermost_first(frames)
    lib = next((f for f in frames if any(m in f.get("filename", "") for m in OURS)), None)
    ours = next((f for f in frames if "qapollo/" in f.get("filename", "")), None)
    fmt = lambda f: f"{_short(f['filename'])}:{f.get('line', '?')}:{f.get('name', '?')}"
    if lib is None:
        return fmt(frames[0]) if frames else "?"
    return fmt(lib) if ours is None or ours is lib else f"{fmt(lib)} < {fmt(ours)}"


def _replay(trace: list[dict], base: int, stop: int | None = None):
    """(peak, peak index, live blocks at `stop`) of allocated bytes along the trace."""
    cur, peak, peak_i, live = base, base, -1, {}
    for i, e in enumerate(trace):
        if stop is not None and i > stop:
            break
        a = e.get("action")
        if a == "alloc":
            cur += e["size"]
            live[e["addr"]] = e
            if cur > peak:
                peak, peak_i = cur, i
        elif a == "free_requested":
            cur -= e["size"]
            live.pop(e["addr"], None)
    return peak, peak_i, live


def breakdown(trace: list[dict], base: int, step_starts_us: list[float] | None = None, top: int = 25) -> dict:
    """The peak of `base` + trace allocations, and what the trace had live then, by allocation site."""
    peak, peak_i, _ = _replay(trace, base)
    _, _, live = _replay(trace, base, stop=peak_i)
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for e in live.values():
        g = groups[frame_key(e.get("frames") or [])]
        g[0] += e["size"]
        g[1] += 1
    rows = sorted(groups.items(), key=lambda kv: -kv[1][0])
    out = {"base_bytes": base, "peak_bytes": peak, "peak_index": peak_i, "trace_len": len(trace),
           "live_from_trace_bytes": sum(e["size"] for e in live.values()),
           "groups": [{"where": k, "bytes": v[0], "count": v[1]} for k, v in rows[:top]],
           "largest_blocks": [{"bytes": e["size"], "stack": [f"{_short(f['filename'])}:{f.get('line')}:{f.get('name')}"
                                                             for f in innermost_first(e.get("frames") or [])[:8]]}
                              for e in sorted(live.values(), key=lambda e: -e["size"])[:10]]}
    if step_starts_us and peak_i >= 0 and "time_us" in trace[peak_i]:
        t = trace[peak_i]["time_us"]
        out["peak_step"] = sum(1 for s in step_starts_us if s <= t)  # 1-based
    return out
