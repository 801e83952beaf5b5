"""Measuring memory on the CPU, for the tests and the benchmarks (the trainer does not use it).

`LiveTensorCounter` is the CPU's analogue of CUDA's max_memory_allocated: what planner.predict_peak
predicts on the CPU. `resident_tensor_bytes` counts what a model and its optimizer states hold.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._pytree import tree_flatten
from torch.utils._python_dispatch import TorchDispatchMode, _pop_mode, _push_mode


class LiveTensorCounter(TorchDispatchMode):
    """Peak bytes of live tensor storages allocated while active (minus CUDA's block rounding). Counts
    each fresh output storage once (ops whose outputs alias an input — views, in-place, out= — allocate
    nothing) and forgets it when the storage dies. Ops implemented in Python outside aten (bitsandbytes'
    CPU optimizer) are re-dispatched with the meter active, so their internal temporaries are counted too.
    """

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.cur = 0
        self.peak = 0

    def reset_peak(self) -> None:
        self.peak = self.cur

    def _free(self, key: int) -> None:
        self.cur -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace not in ("aten", "prims", "profiler"):
            dev = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
            if dev.type == "cpu":
                _push_mode(self)
                try:
                    out = func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
                finally:
                    _pop_mode()
                self._count(out)
                return out
        out = func(*args, **kwargs)
        if not any(r.alias_info is not None for r in func._schema.returns):
            self._count(out)
        return out

    def _count(self, out) -> None:
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                key, n = st.data_ptr(), st.nbytes()
                if n and key not in self.live:
                    self.live[key] = n
                    self.cur += n
                    weakref.finalize(st, self._free, key)
                    if self.cur > self.peak:
                        self.peak = self.cur


def resident_tensor_bytes(*objs) -> int:
    """Bytes of the distinct storages of the tensors in modules / optimizer states / tensors given."""
    seen: dict[int, int] = {}

    def add(t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            st = t.untyped_storage()
            seen.setdefault(st.data_ptr(), st.nbytes())
        elif isinstance(t, dict):
            for v in t.values():
                add(v)
        elif isinstance(t, (list, tuple)):
            for v in t:
                add(v)

    for o in objs:
        if isinstance(o, torch.nn.Module):
            for t in list(o.parameters()) + list(o.buffers()):
                add(t)
        else:
            add(o)
    seen.pop(0, None)
    return sum(seen.values())
