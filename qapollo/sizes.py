"""Chunk and slice sizes of the kernels: the one place the memory planner (planner.py) takes them from.

The loss's sizes are defined here (loss.py imports them); the int8 kernels' row chunks belong to quant.py,
the float optimizers' row chunks and the lagged sketch to optim/, and are named here as they are there.
"""
from .optim.apollo import SKETCH_ROWS  # noqa: F401  (rows of the lagged mode's gradient sketch)
from .optim.updaters import FLOAT_CHUNK_ELEMS  # noqa: F401  (float tensors' optimizer row chunks)
from .quant import chunk_elems  # noqa: F401  (eager int8 row chunks, per device type)

LOSS_CHUNK_ELEMS = 1 << 22  # fp32 logits of one vocab slice of the chunked loss: ≤ 16 MB
# lm_head rows per slice of the int8 head's backward (model.lean_head): the slice's gradient (rows·h in the
# compute dtype) and its int8 update's fp32 transients stay a few MiB
HEAD_SLICE_ELEMS = 1 << 20


def loss_chunk_rows(n_tokens: int, vocab: int) -> int:
    """Vocabulary rows per slice of the chunked loss for `n_tokens` tokens."""
    return max(1, min(vocab, LOSS_CHUNK_ELEMS // max(1, n_tokens)))


def head_slice_rows(n_tokens: int, vocab: int, hidden: int) -> int:
    """Rows per slice of the int8 lm_head (model.lean_head)."""
    return max(1, min(loss_chunk_rows(n_tokens, vocab), HEAD_SLICE_ELEMS // hidden))
