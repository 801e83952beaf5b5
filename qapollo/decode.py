"""What a model writes: greedy or sampled (top-p) continuation of a prompt (used by `qapollo generate`,
the trainer's eval samples and the lm-eval harness' generate_until).

The prompt is encoded as a document starts in training (`<s>` + ids); generation stops
at `</s>`, at a stop string, or after max_new_tokens. Decoding reuses the keys and values of earlier
positions (transformers' cache), so each new token costs one position's forward.

Sampling draws from a torch.Generator seeded by `seed` on the CPU: the same seed gives the same text on
any device, and a trainer that samples at eval steps (eval.sample_prompts, greedy) leaves the training
RNG untouched, so resumed runs stay bit-exact.
"""
from __future__ import annotations

import inspect

import torch


def _next_token(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    """Greedy when temperature is 0; else a draw from the smallest top set of probability >= top_p."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    if top_p < 1:
        p, idx = probs.sort(descending=True)
        keep = p.cumsum(0) - p < top_p  # the first token is always kept
        probs = torch.zeros_like(probs).scatter_(0, idx[keep], p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


def _after(tok, prompt_ids: list[int], new: list[int]) -> str:
    """The text of `new` as it reads after the prompt: decoded together, so that the space a sentencepiece
    token carries at its start is kept (decoding `new` alone drops it)."""
    head = tok.decode(prompt_ids)
    full = tok.decode(prompt_ids + new)
    return full[len(head):] if full.startswith(head) else tok.decode(new)


@torch.no_grad()
def generate(model, tok, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, stop: list[str] | tuple = ()) -> dict:
    """{"prompt", "completion", "tokens"}: the text after the prompt, cut before the first stop string."""
    bos = [tok.bos_id] if tok.bos_id is not None and tok.bos_id >= 0 else []
    room = model.config.max_position_embeddings - max_new_tokens
    if room < 1:
        raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's "
                         f"{model.config.max_position_embeddings} positions")
    ids = (bos + tok.encode(prompt))[-room:]  # a long prompt keeps its end: what the continuation needs most
    dev = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    # transformers 5 renamed past_key_values (argument and output) to cache
    kw = "cache" if "cache" in inspect.signature(model.model.forward).parameters else "past_key_values"
    out, past, x = [], None, torch.tensor([ids], device=dev)
    try:
        for _ in range(max_new_tokens):
            o = model.model(input_ids=x, use_cache=True, **({kw: past} if past is not None else {}))
            past = getattr(o, kw)
            t = _next_token(model.lm_head(o.last_hidden_state[0, -1:])[0], temperature, top_p, gen)
            if t == tok.eos_id:
                break
            out.append(t)
            if stop and any(s in _after(tok, ids, out) for s in stop):
                break
            x = torch.tensor([[t]], device=dev)
    finally:
        model.train(was_training)
    text = _after(tok, ids, out)
    for s in stop:
        text = text.split(s)[0]
    return {"prompt": prompt, "completion": text, "tokens": len(out)}
