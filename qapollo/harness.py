"""`qapollo eval RUN --tasks NAMES`: lm-evaluation-harness scores of a checkpoint or an HF folder.

`QapolloLM` is an lm-eval `LM` over the model as `qapollo eval` loads it (evaluate.load_for_eval): a
checkpoint as trained (int8 weights, its tokenizer), an HF folder in float or `--int8`. It is not HFLM:
HFLM wants a transformers tokenizer and its own loading, and qapollo's checkpoints are neither.

Text is tokenized as in training: `<s>` + ids. A (context, continuation) pair is encoded whole and split
where the context's own encoding ends (as HFLM does), so a word spanning the boundary is scored as the
model would read it; trailing spaces of the context move to the continuation first. Requests are scored
longest first in padded batches: right padding under a causal mask changes no scored position.
"""
from __future__ import annotations

import json
import os
import sys

import torch

from .evaluate import EvalError, load_for_eval


def require_lm_eval():
    try:
        import lm_eval
        import lm_eval.api.model  # noqa: F401
        import lm_eval.evaluator  # noqa: F401
    except ImportError:
        raise EvalError("qapollo eval --tasks needs lm-evaluation-harness: pip install lm_eval (or pip install -e "
                        "'.[eval]')") from None
    return lm_eval


def make_lm(model, tok, max_length: int, batch_size: int):
    """An lm-eval LM over `model` (built here so that lm_eval is imported only when --tasks is used)."""
    from lm_eval.api.model import LM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from .generate import generate

    class QapolloLM(LM):
        def __init__(self):
            super().__init__()
            self.model, self.tok, self.max_length, self.batch_size = model, tok, max_length, batch_size
            self.prefix = tok.bos_id if tok.bos_id is not None and tok.bos_id >= 0 else tok.eos_id
            self._device = next(model.parameters()).device

        def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
            n = len(context) - len(context.rstrip())
            context, continuation = context[: len(context) - n], context[len(context) - n:] + continuation
            ctx = [self.prefix] + self.tok.encode(context) if context else [self.prefix]
            whole = [self.prefix] + self.tok.encode(context + continuation)
            return ctx, whole[len(ctx):]

        def loglikelihood(self, requests):
            return score(self, [self._encode_pair(*r.args) for r in requests])

        def loglikelihood_rolling(self, requests):
            out = []
            for r in requests:  # disjoint windows: every token predicted once, with up to max_length context
                ids = self.tok.encode(r.args[0])
                pairs = [make_disjoint_window(w) for w in
                         get_rolling_token_windows(ids, self.prefix, self.max_length, context_len=1)]
                out.append(sum(lp for lp, _ in score(self, pairs)))
            return out

        def generate_until(self, requests):
            out = []
            for r in requests:
                context, kw = r.args
                until = kw.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                sample = kw.get("do_sample", False)
                n = min(int(kw.get("max_gen_toks", 256)), self.max_length - 1)  # leave room for the context
                res = generate(self.model, self.tok, context, n,
                               float(kw.get("temperature", 1.0)) if sample else 0.0, float(kw.get("top_p", 1.0)),
                               seed=0, stop=until)
                out.append(res["completion"])
            return out

    return QapolloLM()


@torch.no_grad()
def score(lm, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), whether greedy decoding gives the continuation) per pair."""
    model, out = lm.model, [None] * len(pairs)
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    for b in range(0, len(order), lm.batch_size):
        idx = order[b:b + lm.batch_size]
        seqs = [(pairs[i][0] + pairs[i][1])[-(lm.max_length + 1):][:-1] for i in idx]  # the inputs
        x = torch.zeros(len(idx), max(map(len, seqs)), dtype=torch.long)
        for row, s in enumerate(seqs):
            x[row, :len(s)] = torch.tensor(s)
        hidden = model.model(input_ids=x.to(lm.device)).last_hidden_state
        for row, (i, s) in enumerate(zip(idx, seqs)):
            cont = pairs[i][1]
            logp = torch.log_softmax(model.lm_head(hidden[row, len(s) - len(cont):len(s)]).float(), dim=-1)
            target = torch.tensor(cont, device=logp.device)
            out[i] = (float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all()))
    return out


def task_manager(tasks: list[str], include_path: str | None):
    """lm-eval's TaskManager: the --include-path folder alone when it defines every task asked for (indexing
    lm-eval's own thousands of task files takes seconds), else both. Unknown names are one error line."""
    from lm_eval.tasks import TaskManager
    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    tm = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in tm.all_tasks and not os.path.isfile(t)]
    if unknown:
        raise EvalError(f"unknown lm-eval task(s) {', '.join(unknown)}: use lm-eval's names (e.g. hellaswag, arc_easy, "
                        f"piqa; `lm_eval ls tasks` lists them) or --include-path DIR for your own task YAML files")
    return tm


def run_tasks(spec: str, tasks: list[str], include_path: str | None = None, num_fewshot: int | None = None,
              limit: float | None = None, batch_size: int = 8, device: str = "auto", dtype: str | None = None,
              int8: bool = False, group_size: int = 128, seed: int = 0, output: str | None = None) -> dict:
    """Score `spec` on lm-eval tasks; {"model", "checkpoint", "tasks": {task: {metric: value}}}."""
    if not tasks:
        raise EvalError("--tasks is empty: give task names, e.g. --tasks hellaswag,arc_easy,piqa")
    if include_path and not os.path.isdir(include_path):
        raise EvalError(f"--include-path {include_path}: no such folder (it holds your task YAML files)")
    lm_eval = require_lm_eval()
    tm = task_manager(tasks, include_path)  # before the model is loaded: a typo costs nothing
    model, tok, seq_len, ckpt = load_for_eval(spec, device, dtype, int8, group_size, progress=False)
    lm = make_lm(model, tok, model.config.max_position_embeddings, batch_size)
    res = lm_eval.evaluator.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                            task_manager=tm, log_samples=False, random_seed=seed,
                                            numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    if output:
        with open(output, "w") as f:
            json.dump(res, f, indent=1, default=str)
    scores = {t: {k.removesuffix(",none"): v for k, v in r.items() if k != "alias"} for t, r in res["results"].items()}
    return {"model": spec, "checkpoint": ckpt, "tasks": scores, "n_samples": res.get("n-samples"),
            "num_fewshot": res.get("n-shot"), "limit": limit}


def tasks_main(args) -> int:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    r = run_tasks(args.model, tasks, args.include_path, args.num_fewshot, args.limit, args.batch_size, args.device,
                  args.dtype, args.int8, args.group_size, args.seed, args.output)
    print(json.dumps(r))
    sys.stdout.flush()
    return 0
