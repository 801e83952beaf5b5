#!/usr/bin/env python3
"""Train a LLaMA with transformers' Trainer and qapollo's int8 weights + in-backward APOLLO-Mini.

    python examples/hf_trainer.py --tiny --max-steps 20            # a tiny random LLaMA, CPU, ~20 s
    python examples/hf_trainer.py --model DIR --max-steps 1000     # an HF folder: Llama, Mistral, Qwen2/2.5, Qwen3
    python examples/hf_trainer.py --tiny --max-steps 40 --resume   # continue from OUT's newest checkpoint-N

Text: the corpus qapollo ships (qapollo/assets/corpus) with qapollo's shipped tokenizer (--tiny) or the
model's own. Checkpoints: Trainer's OUT/checkpoint-N folders, and qapollo's OUT/qapollo/checkpoint-N
(safetensors; `qapollo eval OUT/qapollo --data ...`, `qapollo export OUT/qapollo HF_OUT` read it).
The last line printed is one JSON line: {"first_loss": ..., "last_loss": ..., "steps": ...}.
"""
import argparse
import glob
import json
import lzma
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import qapollo  # noqa: E402
from qapollo.tokenizer import load_tokenizer  # noqa: E402

CORPUS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "qapollo", "assets", "corpus")


class Blocks(torch.utils.data.Dataset):
    """The first `chars` characters of the shipped corpus, each paragraph `<s> ids </s>` as in qapollo's data
    pipeline, concatenated and cut into seq_len blocks."""

    def __init__(self, tok, seq_len: int, chars: int):
        with lzma.open(sorted(glob.glob(os.path.join(CORPUS, "*.train.txt.xz")))[-1], "rt") as f:
            text = f.read(chars)
        ids = []
        for doc in (p.strip() for p in text.split("\n\n")):
            if doc:
                ids += [tok.bos_id] + tok.encode(doc) + [tok.eos_id]
        n = len(ids) // seq_len
        self.blocks = torch.tensor(ids[: n * seq_len]).view(n, seq_len)

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def tiny_llama(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
                                        bos_token_id=1, eos_token_id=2))


def main(argv=None) -> int:
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny random LLaMA with the shipped tokenizer")
    ap.add_argument("--model", help="an HF folder of a family qapollo trains (AutoModelForCausalLM.from_pretrained: "
                                    "Llama, Mistral, Qwen2/2.5, Qwen3) instead of --tiny")
    ap.add_argument("--max-steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--grad-accum", type=int, default=2, help="micro-batches per optimizer step")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-2, help="peak lr (qapollo's warmup + cosine schedule)")
    ap.add_argument("--out", default="hf_trainer_out", help="Trainer's output_dir")
    ap.add_argument("--resume", action="store_true", help="continue from the newest checkpoint-N in --out")
    args = ap.parse_args(argv)
    if args.tiny == bool(args.model):
        ap.error("give --tiny or --model DIR")
    if args.tiny:
        tok = load_tokenizer()  # qapollo's shipped 32k tokenizer
        model = tiny_llama(tok.vocab_size)
    else:
        tok = load_tokenizer(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    cfg = qapollo.config_for(model, lr=args.lr, float_lr=args.lr, warmup_steps=max(1, args.max_steps // 10),
                             max_steps=args.max_steps, grad_accum_steps=args.grad_accum, batch_size=args.batch_size,
                             seq_len=args.seq_len, float_optim="adamw")
    targs = TrainingArguments(output_dir=args.out, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
                              gradient_accumulation_steps=args.grad_accum, max_grad_norm=0, logging_steps=1,
                              save_steps=args.max_steps // 2 or 1, report_to=[], use_cpu=not torch.cuda.is_available(),
                              dataloader_num_workers=0, seed=0, disable_tqdm=True)
    data = Blocks(tok, args.seq_len, chars=400_000)
    trainer = Trainer(model=model, args=targs, train_dataset=data, **qapollo.trainer_kwargs(model, cfg, tok))
    resume = args.resume and any(d.startswith("checkpoint-") for d in os.listdir(args.out))
    trainer.train(resume_from_checkpoint=True if resume else None)
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    print(json.dumps({"first_loss": losses[0], "last_loss": losses[-1], "steps": trainer.state.global_step}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
