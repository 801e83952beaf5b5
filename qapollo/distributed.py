"""Data-parallel training on torch.distributed: N replicas started by `torchrun`, updates inside backward.

Every rank holds the whole int8 model and its optimizer states and reads its own slice of each global
batch (data.py). There is no DDP wrapper: DDP's buckets hand the averaged gradient back only after
backward, when the in-backward updates have already run on local gradients. Instead each tensor's
gradient is averaged here the moment its hook fires (layerwise.py hands it to `GradAverager`), and only
then does the updater see it. The update is a deterministic function of (averaged gradient, optimizer
state, seed, tensor name, step) — APOLLO's projection and the stochastic-rounding noise are seeded per
tensor and step, the same on every rank — so the replicas stay bit-identical without any broadcast.
`check_replicas` verifies that cheaply from time to time.

Backends: NCCL on CUDA (each rank on cuda:LOCAL_RANK), gloo on the CPU. `init` reads torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); without it everything here is a no-op.
"""
from __future__ import annotations

import contextlib
import json
import os

import torch
import torch.distributed as dist

from .errors import QapolloError


class DistributedError(QapolloError, RuntimeError):
    """A multi-process run that cannot start or continue; the message says why and what to do."""


class ReplicaMismatch(DistributedError):
    """The ranks' weights are no longer identical."""


def env_rank_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) in a plain process."""
    get = lambda k, d: int(os.environ.get(k, d))  # noqa: E731
    return get("RANK", 0), get("WORLD_SIZE", 1), get("LOCAL_RANK", 0)


def is_main() -> bool:
    """True on the one process that writes (rank 0, or a plain process), also after teardown."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return env_rank_world()[0] == 0


def init(device: torch.device) -> "Dist":
    """Join the process group torchrun set up (creating it unless it exists); a no-op Dist without torchrun.

    Returns the Dist with the device this rank trains on (cuda:LOCAL_RANK for a CUDA run)."""
    rank, world, local = env_rank_world()
    if world <= 1:
        return Dist(device=device)
    if device.type == "cuda":
        if device.index is not None:
            raise DistributedError(f"train.device={device} under torchrun: each rank trains on cuda:LOCAL_RANK; "
                                   f"set train.device=cuda (or auto), and pick GPUs with CUDA_VISIBLE_DEVICES")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise DistributedError(f"train.device={device.type}: torch.distributed training runs on cuda (NCCL) "
                               f"or cpu (gloo)")
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
    if dist.get_world_size() != world or dist.get_rank() != rank:
        raise DistributedError(f"the process group has rank {dist.get_rank()} of {dist.get_world_size()} but "
                               f"torchrun's environment says {rank} of {world}")
    return Dist(rank, world, device, owns)


class Dist:
    """Rank, world size and the few collectives the trainer needs; every method is cheap and a no-op
    (or the identity) when world == 1."""

    def __init__(self, rank: int = 0, world: int = 1, device: torch.device | str = "cpu", owns: bool = False):
        self.rank, self.world, self.device, self._owns = rank, world, torch.device(device), owns

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def close(self) -> None:
        if self._owns and dist.is_initialized():
            dist.destroy_process_group()
        self._owns = False

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    @contextlib.contextmanager
    def rank_zero_first(self):
        """Rank 0 runs the block first (e.g. builds the token cache), the others after it (cache hit)."""
        if self.enabled and not self.is_main:
            dist.barrier()
        yield
        if self.enabled and self.is_main:
            dist.barrier()

    def mean(self, x: torch.Tensor) -> float:
        """The mean of a scalar over ranks, as a Python float (one device sync, as `.item()` is). Summed in
        fp64, as the trainer sums micro-batch losses: 2 ranks report what 2 micro-batches do, bit for bit."""
        if not self.enabled:
            return x.item()
        t = x.detach().double().reshape(1)
        dist.all_reduce(t)
        return t.item() / self.world

    def sum(self, *values: float) -> list[float]:
        """Element-wise sums over ranks of a few Python numbers (eval totals)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on any (a stop request seen by one rank stops all together)."""
        if not self.enabled:
            return flag
        t = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def broadcast_object(self, obj):
        """Rank 0's `obj` on every rank (a collective: the others wait for rank 0 to get here)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def check_same(self, facts: dict) -> None:
        """Every rank must have started with the same config and data: name the first fact that differs."""
        if not self.enabled:
            return
        every = [None] * self.world
        dist.all_gather_object(every, json.loads(json.dumps(facts, sort_keys=True, default=str)))
        for r, other in enumerate(every[1:], 1):
            for k in sorted(set(every[0]) | set(other)):
                if every[0].get(k) != other.get(k):
                    raise DistributedError(
                        f"rank {r} started with {k}={other.get(k)!r} but rank 0 with {every[0].get(k)!r}: every "
                        f"rank must get the same config, data and tokenizer files (and on several nodes the "
                        f"same paths)")

    def grad_averager(self) -> "GradAverager | None":
        return GradAverager(self.world) if self.enabled else None

    def check_replicas(self, model: torch.nn.Module, step: int) -> None:
        """Compare a checksum of every weight tensor with rank 0's; raise ReplicaMismatch naming the first
        tensor (in model order) that differs. All ranks raise together, so none is left waiting."""
        if not self.enabled:
            return
        names, sums = replica_checksums(model)
        every = [torch.empty_like(sums) for _ in range(self.world)]
        dist.all_gather(every, sums)
        for r in range(1, self.world):
            bad = (every[r] != every[0]).any(dim=1).nonzero().flatten().tolist()
            if bad:
                raise ReplicaMismatch(
                    f"replica check at step {step}: {names[bad[0]]} on rank {r} differs from rank 0"
                    f"{f' ({len(bad)} tensors differ)' if len(bad) > 1 else ''}: the ranks no longer train "
                    f"the same model (non-deterministic kernels, different software on a node, or a hardware "
                    f"fault). Resume from the last checkpoint (every save is checked first)")


# ---- the replica checksum ---------------------------------------------------------------------------
CHECK_CHUNK = 1 << 22  # bytes per reduction: two int64 transients of 32 MiB


def tensor_checksum(t: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(Σ bytes, Σ bytes·position) of a tensor's raw bytes, position restarting at 1 in every chunk.

    Exact integer arithmetic (each chunk's weighted sum < 2^52, no overflow below ~2^11 chunks·2^52), so
    identical tensors give identical sums on any device and any change of a byte, or a swap of two
    bytes within a chunk, changes them. Float reductions could not promise that."""
    b = t.detach().contiguous().reshape(-1).view(torch.uint8)
    out = torch.zeros(2, dtype=torch.int64, device=b.device)
    for i in range(0, b.numel(), CHECK_CHUNK):
        x = b[i:i + CHECK_CHUNK].to(torch.int64)
        out[0] += x.sum()
        out[1] += (x * weights[:x.numel()]).sum()
    return out


def replica_checksums(model: torch.nn.Module) -> tuple[list[str], torch.Tensor]:
    """Names and checksums (T, 2) of the model's state dict: int8 codes, scales, zeros and float tensors."""
    state = model.state_dict()
    names = list(state)
    device = next(iter(state.values())).device
    weights = torch.arange(1, CHECK_CHUNK + 1, dtype=torch.int64, device=device)
    return names, torch.stack([tensor_checksum(state[n], weights) for n in names])


# ---- gradient averaging inside backward --------------------------------------------------------------
class GradAverager:
    """Averages each gradient over the ranks before its update runs, overlapping the communication with
    the rest of backward.

    A large gradient gets its own in-place all-reduce, started asynchronously when its hook fires; its
    update runs when the next large gradient has been started (so the all-reduce overlaps the backward
    compute in between), or at `drain`. Gradients under SMALL_BYTES (norm weights, small matrices) are
    packed into one flat buffer per dtype and reduced together once BUCKET_BYTES have gathered: one
    all-reduce instead of 2·layers+1 tiny ones. Deferring an update within backward is safe: a tensor's
    hook fires after the last use of its weight in this backward (layerwise.py).

    Gradients are divided by the world size before the sum (as DDP does; it keeps bf16 sums in range), so
    every rank applies the same averaged gradient. Collectives are issued in hook order, which is the
    same on every rank: the same model, the same graph.
    Memory: one large gradient more than a single process (the one in flight), plus the bucket.
    """

    SMALL_BYTES = 1 << 20
    BUCKET_BYTES = 4 << 20

    def __init__(self, world: int, group=None):
        self.world, self.group = world, group
        self._inflight = []  # [(work, buffer, [(shape, apply)])] in issue order
        self._small: dict[torch.dtype, list] = {}  # dtype -> [(grad, apply)] not yet reduced
        self._small_bytes: dict[torch.dtype, int] = {}

    def submit(self, grad: torch.Tensor, apply) -> None:
        """Average `grad` over the ranks, then call apply(averaged gradient) — now or later in backward."""
        n = grad.numel() * grad.element_size()
        if n >= self.SMALL_BYTES:
            self._launch(grad, [(grad.shape, apply)])
            return
        self._small.setdefault(grad.dtype, []).append((grad, apply))
        self._small_bytes[grad.dtype] = self._small_bytes.get(grad.dtype, 0) + n
        if self._small_bytes[grad.dtype] >= self.BUCKET_BYTES:
            self._launch_bucket(grad.dtype)

    def drain(self) -> None:
        """Reduce what is still packed and apply every pending update (end of each backward)."""
        for dtype in list(self._small):
            self._launch_bucket(dtype)
        while self._inflight:
            self._complete()

    def _launch_bucket(self, dtype: torch.dtype) -> None:
        members = self._small.pop(dtype, [])
        self._small_bytes.pop(dtype, None)
        if members:
            flat = torch.cat([g.reshape(-1) for g, _ in members])  # the small gradients are freed here
            self._launch(flat, [(g.shape, apply) for g, apply in members])

    def _launch(self, buf: torch.Tensor, parts: list) -> None:
        buf.div_(self.world)
        work = dist.all_reduce(buf, group=self.group, async_op=True)
        self._inflight.append((work, buf, parts))
        while len(self._inflight) > 1:  # one reduction overlaps the backward until the next is started
            self._complete()

    def _complete(self) -> None:
        work, buf, parts = self._inflight.pop(0)
        work.wait()
        if len(parts) == 1 and parts[0][0] == buf.shape:
            parts[0][1](buf)
            return
        offset = 0
        for shape, apply in parts:
            n = shape.numel()
            apply(buf[offset:offset + n].view(shape))
            offset += n
