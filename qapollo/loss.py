"""Causal-LM loss from the final hidden states without ever holding the full (tokens, vocab) logits.

HF's `LlamaForCausalLM(labels=…)` materializes the logits (N·V in the compute dtype), an fp32 upcast, the
fp32 log-softmax it saves for backward and, in backward, two more fp32 (N, V) tensors: 12·N·V bytes,
786 MB at 7B with seq 2048. `ChunkedLMHeadLoss` computes the same mean cross-entropy over vocabulary
slices of lm_head with an online log-sum-exp, saves only two fp32 numbers per token, and in backward
recomputes one slice of logits at a time: each row block of lm_head's gradient is computed once, from all
tokens, as a single matmul (the same reduction as the full matmul, so no extra rounding), and the hidden
states' gradient is accumulated in fp32 over the slices.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_CHUNK_ELEMS = 1 << 22  # fp32 logits of one vocab slice: ≤ 16 MB (memory.py plans with this)
IGNORE_INDEX = -100


def loss_is_chunked(cfg) -> bool:
    """The trainer always uses the chunked loss (same value as HF's; memory.py asks here)."""
    return True


def _chunk(n_tokens: int, vocab: int) -> int:
    return max(1, min(vocab, LOSS_CHUNK_ELEMS // max(1, n_tokens)))


class ChunkedLMHeadLoss(torch.autograd.Function):
    """mean over valid targets of CE(h @ Wᵀ, target); h (N, d), W (V, d), target (N,) with -100 = ignore."""

    @staticmethod
    def forward(ctx, h, weight, target):
        n, vocab = h.shape[0], weight.shape[0]
        step = _chunk(n, vocab)
        valid = target != IGNORE_INDEX
        tgt = torch.where(valid, target, torch.zeros_like(target))
        run_max = torch.full((n,), float("-inf"), device=h.device, dtype=torch.float32)
        run_sum = torch.zeros((n,), device=h.device, dtype=torch.float32)
        tgt_logit = torch.zeros((n,), device=h.device, dtype=torch.float32)
        for v0 in range(0, vocab, step):
            v1 = min(vocab, v0 + step)
            z = F.linear(h, weight[v0:v1]).float()  # (n, c): the compute dtype's logits, upcast like HF
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
        ctx.save_for_backward(h, weight, tgt, valid, lse)
        ctx.count = count
        return loss

    @staticmethod
    def backward(ctx, gout):
        h, weight, tgt, valid, lse = ctx.saved_tensors
        n, vocab = h.shape[0], weight.shape[0]
        step = _chunk(n, vocab)
        # d loss / d z = (softmax(z) - onehot(target)) · gout / count, zero on ignored tokens
        coef = (gout.float() / ctx.count.clamp(min=1).float()) * valid.float()  # (n,)
        gh = torch.zeros(h.shape, device=h.device, dtype=torch.float32) if ctx.needs_input_grad[0] else None
        gw = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        for v0 in range(0, vocab, step):
            v1 = min(vocab, v0 + step)
            w = weight[v0:v1]
            g = F.linear(h, w).float().sub_(lse[:, None]).exp_()
            inside = (tgt >= v0) & (tgt < v1)
            rows = inside.nonzero().squeeze(1)
            g[rows, tgt[rows] - v0] -= 1.0
            g.mul_(coef[:, None])
            g = g.to(h.dtype)
            if gw is not None:
                torch.mm(g.T, h, out=gw[v0:v1])
            if gh is not None:
                if h.dtype == torch.float32:
                    gh.addmm_(g, w)
                else:
                    gh += g @ w  # the slice's product in the compute dtype, summed in fp32
            del g
        return (gh.to(h.dtype) if gh is not None else None), gw, None


def causal_lm_loss(model, input_ids: torch.Tensor) -> torch.Tensor:
    """The loss of `model(input_ids=x, labels=x).loss` (HF LlamaForCausalLM) without full logits."""
    hidden = model.model(input_ids=input_ids).last_hidden_state  # (B, T, d)
    b, t, d = hidden.shape
    target = F.pad(input_ids, (0, 1), value=IGNORE_INDEX)[:, 1:]
    return ChunkedLMHeadLoss.apply(hidden.reshape(b * t, d), model.lm_head.weight, target.reshape(-1))
