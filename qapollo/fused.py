"""Compiled (fused) int8 kernels: quant.py's update and dequantize, a whole matrix per call.

quant.update_groups (dequantize → add coef·G → per-group min/max → stochastic rounding → uint8) and
quant.dequantize are pure torch. Here they go through torch.compile (Inductor: Triton on CUDA, C++ on
CPU), which turns each call into a few kernels over the whole matrix instead of a dozen elementwise
passes per row chunk, with no fp32 copy of the matrix. The eager functions stay the CPU default and the
reference these kernels are tested against (tests/test_fused.py): same source, same noise, same codes.

What keeps them compiled once and equal to the reference:
- `dynamic=False`: one graph per matrix shape (3 at 7B); the recompile limit is raised so a process
  holding several models (tests, benchmarks) does not silently fall back to eager.
- Per-step values (coef = -lr·√scale·c, the weight-decay factor, the rounding key) arrive as 0-d device
  tensors: a Python float would be guarded by value and recompile every step.
- No torch.Generator (it would force an eager RNG fallback): the noise is quant.sr_bits, an integer
  hash of (key, element index), which Inductor fuses into the kernel.
- Eager-equal numerics: no FMA contraction, IEEE division and no flush of denormals in Triton
  (`emulate_precision_casts`, `eager_numerics.*`); Inductor's C++ backend already compiles with
  -ffp-contract=off.
- Called under no_grad only (Int8Linear's forward/backward, the optimizer hooks), so one graph per shape
  serves the forward, the checkpoint recomputation and the backward, on any thread.
"""
from __future__ import annotations

import functools
import shutil
import sys
import warnings

import torch

from . import quant
from .errors import QapolloError

# Inductor options: eager-equal numerics (see above), and recompute the dequantized weight in each
# consumer (the min/max reduction, the rounding) from codes and gradient rather than storing it: by
# default a value with more than 4 inputs or 30 ops is stored, which costs a 4-byte/weight fp32 buffer
# (180 MB for a 7B MLP matrix) and 8 bytes/weight of extra traffic. With these thresholds the update
# allocates nothing the size of the matrix (tests/test_fused.py checks the generated code).
# Inductor rejects unknown options, and their names move between releases (division rounding:
# `emulate_divison_rounding` in 2.10, `eager_numerics.division_rounding` from 2.11): only those this
# torch has are passed.
_WANTED = {"emulate_precision_casts": True, "emulate_divison_rounding": True,
           "eager_numerics.division_rounding": True, "eager_numerics.disable_ftz": True,
           "realize_reads_threshold": 16, "realize_opcount_threshold": 100}


def _inductor_options() -> dict:
    from torch._inductor import config

    def has(name: str) -> bool:
        obj = config
        for part in name.split("."):
            if not hasattr(obj, part):
                return False
            obj = getattr(obj, part)
        return True
    return {k: v for k, v in _WANTED.items() if has(k)}


_RECOMPILE_LIMIT = 64


class FusedUnavailable(QapolloError, RuntimeError):
    """model.fused_update=true on a device where torch.compile cannot build kernels."""


def unavailable_reason(device) -> str | None:
    """Why torch.compile cannot build kernels for `device` here, or None when it can."""
    dev = torch.device(device)
    if dev.type == "cuda":
        from torch.utils._triton import has_triton
        return None if has_triton() else "triton is not installed (pip install triton)"
    if dev.type == "cpu":
        return None if (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")) else \
            "no C++ compiler found (install g++)"
    return f"no compiled kernels for device type '{dev.type}'"


def wanted(setting, device_type: str) -> bool:
    """What model.fused_update (auto | true | false) asks for on a device type: auto = CUDA only (on the
    CPU the eager reference is the default: no compile time, and the 20M/60M step is dominated by
    matmuls; BENCHMARKS.md)."""
    return setting is True or (setting == "auto" and device_type == "cuda")


def resolve(setting, device) -> bool:
    """Use the compiled kernels on `device`? true where they cannot be built is an error; auto falls back
    to the eager reference with a warning."""
    dev = torch.device(device)
    if not wanted(setting, dev.type):
        return False
    reason = unavailable_reason(dev)
    if reason is None:
        return True
    if setting == "auto":
        warnings.warn(f"model.fused_update=auto: {reason}, so the int8 update runs as eager row chunks "
                      f"(much slower on {dev.type})")
        return False
    raise FusedUnavailable(f"model.fused_update=true but compiled kernels are unavailable on {dev}: "
                           f"{reason}; set model.fused_update=auto or false")


@functools.cache
def _compiled(fn):
    import torch._dynamo.config as dcfg
    name = "recompile_limit" if hasattr(dcfg, "recompile_limit") else "cache_size_limit"  # renamed in 2.6
    setattr(dcfg, name, max(getattr(dcfg, name), _RECOMPILE_LIMIT))
    return torch.compile(fn, dynamic=False, fullgraph=True, options=_inductor_options())


def _grid(codes, scale, zero, grad, coef, decay, group_size: int):
    return quant.regrid(quant.code_units(codes, scale, zero, grad, coef, decay, group_size), scale, zero)


def _round_inplace(codes, scale, zero, grad, coef, decay, ratio, new_zero, new_scale, start, group_size: int,
                   stochastic: bool, keep) -> None:
    u = quant.code_units(codes, scale, zero, grad, coef, decay, group_size)
    nc = quant.round_onto(u, ratio, new_zero, start, stochastic).reshape(codes.shape)
    nc, ns, nz = quant.keep_where(keep, (codes, scale, zero), (nc, new_scale, new_zero.to(torch.uint8)))
    codes.copy_(nc)
    scale.copy_(ns)
    zero.copy_(nz)


def _update_inplace(codes, scale, zero, grad, coef, decay, start, group_size: int, stochastic: bool, keep) -> None:
    """quant.update_groups as two kernels: the per-group grid (a reduction over the block), then the
    rounding pass. Both recompute the code-unit values from codes and gradient: nothing matrix-sized is
    stored, and the per-group arithmetic runs once per group, not once per weight."""
    ratio, new_zero, new_scale = _compiled(_grid)(codes, scale, zero, grad, coef, decay, group_size)
    _compiled(_round_inplace)(codes, scale, zero, grad, coef, decay, ratio, new_zero, new_scale, start, group_size,
                              stochastic, keep)


# ---- fail safe: the compiled path has never run on every GPU and torch version it may meet -----------
_given_up: list[str] = []  # why this process stopped compiling (at most one entry)
_proven: set = set()  # calls (kernel, shapes, dtypes) whose compiled code has already run once


def _signature(name: str, *args) -> tuple:
    return (name,) + tuple((tuple(a.shape), a.dtype, a.device.type) if torch.is_tensor(a) else a for a in args)


def _compiled_or_eager(key: tuple, compiled, eager):
    """compiled() unless compiling failed earlier in this process; if a call that never ran before (its
    compilation, or the first run of what it built) raises, say so once and continue with eager(), which
    computes the same numbers. A compiled call that already ran once raises as usual."""
    if not _given_up:
        try:
            out = compiled()
        except Exception as e:  # noqa: BLE001 (Inductor/Triton raise many kinds; any of them means: eager)
            if key in _proven:
                raise
            first = (str(e).strip().splitlines() or [""])[0][:200]
            _given_up.append(f"{type(e).__name__}: {first}")
            print(f"qapollo: the compiled int8 kernels failed ({_given_up[0]}); continuing with the eager update, "
                  f"which gives the same numbers, only slower (model.fused_update=false skips compiling)",
                  file=sys.stderr, flush=True)
        else:
            _proven.add(key)
            return out
    return eager()


@torch.no_grad()
def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
               dtype: torch.dtype) -> torch.Tensor:
    """quant.dequantize compiled: one kernel, the `dtype` output is the only full-size tensor."""
    return _compiled_or_eager(_signature("dequantize", codes, scale, dtype),
                              lambda: _compiled(quant.dequantize)(codes, scale, zero, group_size, dtype),
                              lambda: quant.dequantize_chunked(codes, scale, zero, group_size, dtype))


@torch.no_grad()
def update_quantized_(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                      grad: torch.Tensor, coef: torch.Tensor, decay: torch.Tensor | None = None, *,
                      stochastic: bool, seed: int = 0, count_changes: bool = False,
                      keep: torch.Tensor | None = None) -> int:
    """quant.update_quantized_ (same arguments and result) as one compiled call on the whole matrix.

    With count_changes (the startup guard, step 1) the old codes are copied first (1 byte/weight) and
    compared in 4M-element row chunks."""
    old = (codes.clone(), scale.clone(), zero.clone()) if count_changes else None
    start = torch.full((), quant.noise_key(seed), dtype=torch.int64, device=codes.device)  # no host sync
    # the grid kernel writes nothing: whichever of the two fails, the matrix is as it was for the eager update
    _compiled_or_eager(_signature("update", codes, grad, coef, decay, keep, stochastic),
                       lambda: _update_inplace(codes, scale, zero, grad, coef, decay, start, group_size, stochastic,
                                               keep),
                       lambda: quant.update_quantized_(codes, scale, zero, group_size, grad, coef, decay,
                                                       stochastic=stochastic, seed=seed, keep=keep))
    if old is None:
        return 0
    changed = torch.zeros((), dtype=torch.int64, device=codes.device)
    for rows, gs in quant.row_chunks(tuple(codes.shape), group_size):
        changed += quant.changes((old[0][rows], old[1][gs], old[2][gs]), (codes[rows], scale[gs], zero[gs]))
    return int(changed)
