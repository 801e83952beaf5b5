"""lm-evaluation-harness over a qapollo model: what `qapollo eval RUN --tasks NAMES` scores with (evaluate.py).

`QapolloLM` is an lm-eval `LM` over the model as `qapollo eval` loads it (inference.load_for_eval): a
checkpoint as trained (int8 weights, its tokenizer), an HF folder in float or `--int8`. It is not HFLM:
HFLM wants a transformers tokenizer and its own loading, and qapollo's checkpoints are neither.

Text is tokenized as in training: `<s>` + ids. A (context, continuation) pair is encoded whole and split
where the context's own encoding ends (as HFLM does), so a word spanning the boundary is scored as the
model would read it; trailing spaces of the context move to the continuation first. Requests are scored
longest first in padded batches: right padding under a causal mask changes no scored position.
"""
from __future__ import annotations

import os

import torch

from .decode import generate
from .errors import EvalError


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


def score(lm, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), whether greedy decoding gives the continuation) per pair.

    The context is cut from the left to fit the model's max_length; a continuation longer than that is
    scored in pieces of max_length tokens, each with as much of the text before it as fits (every token once).
    """
    pieces, owner = [], []
    for i, (ctx, cont) in enumerate(pairs):
        whole = ctx + cont
        for a in range(len(ctx), len(whole), lm.max_length):
            pieces.append((whole[:a], whole[a:a + lm.max_length]))
            owner.append(i)
    out = [(0.0, True)] * len(pairs)
    for i, (lp, greedy) in zip(owner, _score(lm, pieces)):
        out[i] = (out[i][0] + lp, out[i][1] and greedy)
    return out


@torch.no_grad()
def _score(lm, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """score() of pairs whose continuation fits max_length (the context is cut from the left)."""
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


def load_tasks(tm, tasks: list[str]) -> list:
    """lm-eval's task (or group) objects of `tasks`, their data sets loaded: before the model is, and a data set
    that cannot be read (offline, a data file not found) is one error line."""
    objs = []
    for name in tasks:
        try:
            loaded = tm.load([name])
        except Exception as e:  # the task's files and data set: what the user gave or asked for
            raise EvalError(f"lm-eval could not load task {name}: {type(e).__name__}: {first_line(e)}; "
                            f"{load_hint(e)}") from e
        named = loaded["groups"].get(name) or loaded["tasks"].get(name)
        objs += [named] if named is not None else list(loaded["tasks"].values())  # a tag: its tasks
    return objs


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def load_hint(e: BaseException) -> str:
    if isinstance(e, ConnectionError) or "offline" in str(e).lower():
        return ("its data set comes from the Hugging Face Hub, which needs the network once (then datasets caches "
                "it): go online for the first run, or use a local task (--include-path)")
    if isinstance(e, FileNotFoundError):
        return (f"a task's data_files are read relative to the folder the command runs in ({os.getcwd()}), not to "
                f"--include-path: run from the folder they are relative to, or make them absolute paths")
    return "check the task's YAML file and its data set"
