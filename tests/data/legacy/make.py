"""How tests/data/legacy was made (run once, with the code of the commit that added it):

    PYTHONPATH=. python tests/data/legacy/make.py

Three tiny runs of 5 steps, each saving checkpoint-3 on the way; checkpoint-3 of each is kept, with the
losses of steps 4-5 and a hash of the final model and optimizer tensors of the uninterrupted run
(expected.json). tests/test_legacy_checkpoints.py resumes each checkpoint-3 with today's code and must
reproduce them bit for bit.
"""
import hashlib
import json
import lzma
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, ROOT)

RUNS = {  # name: overrides of the tiny config (tests/test_legacy_checkpoints.py builds the same)
    "exact": {"optim.float_optim": "adam8bit"},
    "lagged": {"train.grad_accum_steps": 2, "train.accum_mode": "lagged"},
    "lean_head": {"model.lean_head": True},
}


def tiny(corpus_dir: str, cache: str, out: str, run: str, over: dict):
    from qapollo.config import load_config
    base = {"model.hidden_size": 32, "model.intermediate_size": 64, "model.num_hidden_layers": 2,
            "model.num_attention_heads": 2, "model.vocab_size": 128, "model.max_position_embeddings": 64,
            "model.group_size": 32, "optim.warmup_steps": 2, "optim.float_optim": "adamw",
            "train.batch_size": 2, "train.seq_len": 16, "train.max_steps": 5, "train.save_every": 3,
            "train.keep_checkpoints": 0, "train.log_every": 1, "train.output_dir": out, "train.run_name": run,
            "data.path": os.path.join(corpus_dir, "corpus.txt"), "data.tokenizer": os.path.join(corpus_dir, "tok.model"),
            "data.cache_dir": cache, "eval.tokens": 256}
    return load_config(None, [f"{k}={v}" for k, v in {**base, **over}.items()])


def tensors_hash(ckpt: str) -> str:
    """sha256 over (name, dtype, shape, bytes) of every model and optimizer tensor, names sorted."""
    from safetensors import safe_open
    h = hashlib.sha256()
    for f in ("model.safetensors", "optimizer.safetensors"):
        with safe_open(os.path.join(ckpt, f), framework="pt") as st:
            for k in sorted(st.keys()):
                t = st.get_tensor(k).contiguous()
                h.update(f"{f}:{k}:{t.dtype}:{list(t.shape)}".encode())
                h.update(t.reshape(-1).view(-1).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def main():
    import sentencepiece as spm
    import torch
    torch.set_num_threads(1)
    from qapollo.metrics import read_metrics
    from qapollo.train import Trainer
    if not os.path.exists(os.path.join(HERE, "tok.model")):
        with lzma.open(os.path.join(ROOT, "qapollo/assets/corpus/shakespeare.train.txt.xz"), "rt") as f:
            text = f.read(24_000)
        with open(os.path.join(HERE, "corpus.txt"), "w") as f:
            f.write(text[: text.rfind("\n\n") + 1])
        spm.SentencePieceTrainer.train(
            input=os.path.join(HERE, "corpus.txt"), model_prefix=os.path.join(HERE, "tok"), model_type="bpe",
            vocab_size=128, character_coverage=1.0, normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
            minloglevel=2)
        os.remove(os.path.join(HERE, "tok.vocab"))
    expected = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run, over in RUNS.items():
            cfg = tiny(HERE, os.path.join(tmp, "cache"), os.path.join(tmp, "out"), run, over)
            tr = Trainer(cfg, progress=False)
            tr.setup()
            tr.fit()
            run_dir = os.path.join(tmp, "out", run)
            losses = [r["loss"] for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if r["step"] > 3]
            expected[run] = {"overrides": over, "losses": losses,
                             "final_hash": tensors_hash(os.path.join(run_dir, "checkpoint-5"))}
            dst = os.path.join(HERE, run, "checkpoint-3")
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(os.path.join(run_dir, "checkpoint-3"), dst)
    with open(os.path.join(HERE, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
