"""Causal-LM loss from the final hidden states without ever holding the full (tokens, vocab) logits.

HF's `LlamaForCausalLM(labels=…)` materializes the logits (N·V in the compute dtype), an fp32 upcast, the
fp32 log-softmax it saves for backward and, in backward, two more fp32 (N, V) tensors: 12·N·V bytes,
786 MB at 7B with seq 2048. `ChunkedLMHeadLoss` computes the same mean cross-entropy over vocabulary
slices of lm_head with an online log-sum-exp, saves only two fp32 numbers per token, and in backward
recomputes one slice of logits at a time: each row block of lm_head's gradient is computed once, from all
tokens, as a single matmul (the same reduction as the full matmul, so no extra rounding), and the hidden
states' gradient is accumulated in fp32 over the slices.

With an int8 lm_head (model.lean_head) its gradient is never whole either: `Int8HeadLoss` hands the head a
`HeadGradSlices`, which recomputes each slice's gradient on demand, and the optimizer (layerwise.py) reads
it twice — once for APOLLO-Mini's projected gradient and norm, once to update the rows slice by slice.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import quant
from .model import Int8Linear
from .sizes import head_slice_rows, loss_chunk_rows

IGNORE_INDEX = -100


def _forward(h, rows, vocab: int, target, step: int | None = None):
    """Online log-sum-exp over vocab slices; rows(v0, v1) gives lm_head's rows in the compute dtype.
    Returns (target with ignored → 0, valid mask, lse, loss, count of valid targets)."""
    n = h.shape[0]
    step = step or loss_chunk_rows(n, vocab)
    valid = target != IGNORE_INDEX
    tgt = torch.where(valid, target, torch.zeros_like(target))
    run_max = torch.full((n,), float("-inf"), device=h.device, dtype=torch.float32)
    run_sum = torch.zeros((n,), device=h.device, dtype=torch.float32)
    tgt_logit = torch.zeros((n,), device=h.device, dtype=torch.float32)
    for v0 in range(0, vocab, step):
        v1 = min(vocab, v0 + step)
        z = F.linear(h, rows(v0, v1)).float()  # (n, c): the compute dtype's logits, upcast like HF
        new_max = torch.maximum(run_max, z.amax(dim=1))
        run_sum.mul_(torch.exp(run_max - new_max)).add_(torch.exp(z - new_max[:, None]).sum(dim=1))
        run_max = new_max
        inside = (tgt >= v0) & (tgt < v1)
        idx = (tgt - v0).clamp(0, v1 - v0 - 1)
        tgt_logit += torch.where(inside, z.gather(1, idx[:, None]).squeeze(1), torch.zeros_like(tgt_logit))
        del z
    lse = run_max + run_sum.log()
    count = valid.sum()
    loss = torch.where(valid, lse - tgt_logit, torch.zeros_like(lse)).sum() / count.clamp(min=1)
    if count == 0:
        loss = loss * float("nan")  # HF's mean over no targets is nan too
    return tgt, valid, lse, loss, count


def _slice_grad(h, w, v0: int, v1: int, tgt, lse, coef):
    """d loss / d logits of vocab rows v0:v1, (n, c) in h's dtype: (softmax - onehot) · coef."""
    g = F.linear(h, w).float().sub_(lse[:, None]).exp_()
    inside = (tgt >= v0) & (tgt < v1)
    rows = inside.nonzero().squeeze(1)
    g[rows, tgt[rows] - v0] -= 1.0
    g.mul_(coef[:, None])
    return g.to(h.dtype)


class ChunkedLMHeadLoss(torch.autograd.Function):
    """mean over valid targets of CE(h @ Wᵀ, target); h (N, d), W (V, d), target (N,) with -100 = ignore."""

    @staticmethod
    def forward(ctx, h, weight, target):
        tgt, valid, lse, loss, count = _forward(h, lambda v0, v1: weight[v0:v1], weight.shape[0], target)
        ctx.save_for_backward(h, weight, tgt, valid, lse)
        ctx.count = count
        return loss

    @staticmethod
    def backward(ctx, gout):
        h, weight, tgt, valid, lse = ctx.saved_tensors
        n, vocab = h.shape[0], weight.shape[0]
        step = loss_chunk_rows(n, vocab)
        # d loss / d z = (softmax(z) - onehot(target)) · gout / count, zero on ignored tokens
        coef = (gout.float() / ctx.count.clamp(min=1).float()) * valid.float()  # (n,)
        gh = torch.zeros(h.shape, device=h.device, dtype=torch.float32) if ctx.needs_input_grad[0] else None
        gw = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        for v0 in range(0, vocab, step):
            v1 = min(vocab, v0 + step)
            w = weight[v0:v1]
            g = _slice_grad(h, w, v0, v1, tgt, lse, coef)
            if gw is not None:
                torch.mm(g.T, h, out=gw[v0:v1])
            if gh is not None:
                if h.dtype == torch.float32:
                    gh.addmm_(g, w)
                else:
                    gh += g @ w  # the slice's product in the compute dtype, summed in fp32
            del g
        return (gh.to(h.dtype) if gh is not None else None), gw, None


def head_rows(head, v0: int, v1: int, dtype):
    """Rows v0:v1 of an int8 lm_head, dequantized (whole groups: hidden % group_size == 0)."""
    return quant.dequantize(*head.row_block(v0, v1), head.group_size, dtype)


class HeadGradSlices:
    """lm_head's gradient (V, h), given only slice by slice: `each(fn)` recomputes the logits of each
    slice of rows from the head as it is *now* and calls fn(row slice, G[rows]) in row order.

    A consumer may update rows v0:v1 inside fn: later slices never read them, so a second pass that
    updates as it goes still sees the gradient of the weights the forward used. The first pass also
    accumulates the hidden states' gradient (`gh`, fp32) from the forward's weights."""

    def __init__(self, h, head, tgt, lse, coef, need_gh: bool):
        self.h, self.head, self.tgt, self.lse, self.coef = h, head, tgt, lse, coef
        self.shape = tuple(head.shape)
        self.step = head_slice_rows(h.shape[0], self.shape[0], self.shape[1])
        self.gh = torch.zeros(h.shape, device=h.device, dtype=torch.float32) if need_gh else None
        self._passes = 0

    def each(self, fn) -> None:
        h, first = self.h, self._passes == 0
        self._passes += 1
        for v0 in range(0, self.shape[0], self.step):
            v1 = min(self.shape[0], v0 + self.step)
            w = head_rows(self.head, v0, v1, h.dtype)
            g = _slice_grad(h, w, v0, v1, self.tgt, self.lse, self.coef)
            if first and self.gh is not None:
                if h.dtype == torch.float32:
                    self.gh.addmm_(g, w)
                else:
                    self.gh += g @ w
            del w
            gw = g.T @ h
            del g
            fn(slice(v0, v1), gw)

    def hidden_grad(self) -> torch.Tensor | None:
        """The hidden states' gradient (fp32); one pass of its own if no consumer has read the slices."""
        if self.gh is not None and self._passes == 0:
            self.each(lambda sl, gw: None)
        return self.gh

    def full(self) -> torch.Tensor:
        """The whole gradient (the plain path: no slice hook, e.g. accumulation in a reference run)."""
        out = torch.empty(self.shape, dtype=self.h.dtype, device=self.h.device)
        self.each(lambda sl, gw: out[sl].copy_(gw))
        return out


class Int8HeadLoss(torch.autograd.Function):
    """ChunkedLMHeadLoss for an int8 lm_head (model.lean_head): its rows are dequantized slice by slice, and
    backward hands the head a HeadGradSlices instead of a (V, h) gradient."""

    @staticmethod
    def forward(ctx, h, target, head):
        step = head_slice_rows(h.shape[0], head.shape[0], head.shape[1])
        tgt, valid, lse, loss, count = _forward(h, lambda v0, v1: head_rows(head, v0, v1, h.dtype), head.shape[0],
                                                target, step)
        ctx.save_for_backward(h, tgt, valid, lse)
        ctx.count, ctx.head = count, head
        return loss

    @staticmethod
    def backward(ctx, gout):
        h, tgt, valid, lse = ctx.saved_tensors
        coef = (gout.float() / ctx.count.clamp(min=1).float()) * valid.float()
        src = HeadGradSlices(h, ctx.head, tgt, lse, coef, ctx.needs_input_grad[0])
        ctx.head.receive_slices(src)
        gh = src.hidden_grad()
        return (gh.to(h.dtype) if gh is not None else None), None, None


def causal_lm_loss(model, input_ids: torch.Tensor) -> torch.Tensor:
    """The loss of `model(input_ids=x, labels=x).loss` (HF LlamaForCausalLM) without full logits."""
    hidden = model.model(input_ids=input_ids).last_hidden_state  # (B, T, d)
    b, t, d = hidden.shape
    target = F.pad(input_ids, (0, 1), value=IGNORE_INDEX)[:, 1:]
    head = model.lm_head
    if isinstance(head, Int8Linear):  # model.lean_head
        return Int8HeadLoss.apply(hidden.reshape(b * t, d), target.reshape(-1), head)
    return ChunkedLMHeadLoss.apply(hidden.reshape(b * t, d), head.weight, target.reshape(-1))
