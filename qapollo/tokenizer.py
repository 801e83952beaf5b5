"""Tokenizers: the shipped LLaMA-layout sentencepiece model, any `.model` file, or an HF tokenizer folder.

`load_tokenizer(spec)` returns one small interface whatever the backend. A `.model` file (or a folder
holding only `tokenizer.model`) is run with the `sentencepiece` library itself: it is the reference
implementation, fast in batch, and transformers 5.x's conversion differs from it on runs of spaces.
A folder with `tokenizer.json` (any HF tokenizer) goes through `AutoTokenizer`.
"""

import hashlib
import json
import logging
import os
import shutil
import time

from qapollo.textfiles import DataError, iter_file_documents, resolve_paths

log = logging.getLogger(__name__)

DEFAULT_DIR = os.path.join(os.path.dirname(__file__), "assets", "tokenizer")


class TokenizerNotFound(DataError, FileNotFoundError):
    """data.tokenizer names no file or folder."""


class Tokenizer:
    """Common surface used by qapollo.data and the HF export. encode() adds no BOS/EOS."""

    name_or_path: str
    vocab_size: int
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str], num_threads: int | None = None) -> list[list[int]]:
        """num_threads: the backend's native threads for this call (None: its default)."""
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def save(self, out_dir: str) -> None:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """sha256 of what decides the token ids: equal for a tokenizer and its saved copy, else different."""
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}({self.name_or_path!r}, vocab_size={self.vocab_size})"


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model_file: str, name_or_path: str | None = None):
        import sentencepiece as spm

        self.model_file = model_file
        self.name_or_path = name_or_path or model_file
        self.sp = spm.SentencePieceProcessor(model_file=model_file)
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        if self.eos_id < 0:
            raise ValueError(f"{model_file}: sentencepiece model has no EOS piece; retrain it with eos_id set")
        self.num_threads = min(4, os.cpu_count() or 1)

    def encode_batch(self, texts, num_threads=None):
        return self.sp.encode(list(texts), num_threads=num_threads or self.num_threads)

    def decode(self, ids):
        return self.sp.decode([int(i) for i in ids])

    def fingerprint(self):
        return hashlib.sha256(self.sp.serialized_model_proto()).hexdigest()

    def save(self, out_dir):
        os.makedirs(out_dir, exist_ok=True)
        dst = os.path.join(out_dir, "tokenizer.model")
        if not (os.path.exists(dst) and os.path.samefile(self.model_file, dst)):
            shutil.copyfile(self.model_file, dst)
        piece = lambda i: self.sp.id_to_piece(i) if i >= 0 else None  # noqa: E731
        special = {"bos_token": piece(self.bos_id), "eos_token": piece(self.eos_id), "unk_token": piece(self.sp.unk_id())}
        special = {k: v for k, v in special.items() if v is not None}
        # LlamaTokenizer + add_bos_token: AutoTokenizer then adds <s> like the LLaMA tokenizer does
        config = {"tokenizer_class": "LlamaTokenizer", **special, "add_bos_token": self.bos_id >= 0,
                  "add_eos_token": False, "clean_up_tokenization_spaces": False, "legacy": False}
        _write_json(os.path.join(out_dir, "tokenizer_config.json"), config)
        _write_json(os.path.join(out_dir, "special_tokens_map.json"), special)


class HFTokenizer(Tokenizer):
    def __init__(self, spec: str):
        from transformers import AutoTokenizer

        self.name_or_path = spec
        self.tok = AutoTokenizer.from_pretrained(spec)
        self.vocab_size = len(self.tok)
        self.eos_id = self.tok.eos_token_id
        self.bos_id = self.tok.bos_token_id if self.tok.bos_token_id is not None else -1
        if self.eos_id is None:
            raise ValueError(f"tokenizer {spec!r} has no eos_token; qapollo needs one to separate documents")

    def encode_batch(self, texts, num_threads=None):  # the fast tokenizer's threads: TOKENIZERS_PARALLELISM
        return self.tok(list(texts), add_special_tokens=False)["input_ids"]

    def decode(self, ids):
        return self.tok.decode([int(i) for i in ids])

    def fingerprint(self):
        # the vocabulary and the special ids: stable across save_pretrained/from_pretrained round trips
        ids = json.dumps([sorted(self.tok.get_vocab().items()), self.bos_id, self.eos_id])
        return hashlib.sha256(ids.encode()).hexdigest()

    def save(self, out_dir):
        self.tok.save_pretrained(out_dir)


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """The tokenizer and the model must agree on the vocabulary: an id >= model.vocab_size would index past
    the embedding table, and a larger model vocabulary trains rows no token can ever reach."""
    if tokenizer.vocab_size != model_vocab_size:
        raise DataError(
            f"tokenizer {tokenizer.name_or_path!r} has vocab_size {tokenizer.vocab_size} but model.vocab_size is "
            f"{model_vocab_size}: set model.vocab_size={tokenizer.vocab_size} or use a tokenizer with "
            f"{model_vocab_size} tokens")


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def load_tokenizer(spec: str | None = None) -> Tokenizer:
    """None/"default" = the shipped 32k tokenizer; else a `.model` file, a folder, or an HF hub name."""
    if spec in (None, "", "default"):
        return SentencePieceTokenizer(os.path.join(DEFAULT_DIR, "tokenizer.model"), name_or_path="default")
    spec = os.path.expanduser(str(spec))
    try:
        if os.path.isfile(spec):
            return SentencePieceTokenizer(spec)
        if os.path.isdir(spec):
            has = lambda f: os.path.exists(os.path.join(spec, f))  # noqa: E731
            if not has("tokenizer.json") and has("tokenizer.model"):
                return SentencePieceTokenizer(os.path.join(spec, "tokenizer.model"), name_or_path=spec)
            if not any(has(f) for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
                raise DataError(f"tokenizer folder {spec!r} has no tokenizer.model (sentencepiece) and no "
                                f"tokenizer.json (Hugging Face): copy the tokenizer files into it, or point "
                                f"data.tokenizer at the .model file")
            return HFTokenizer(spec)
        if spec.endswith(".model") or spec.startswith((".", "/", "~")):
            raise TokenizerNotFound(f"tokenizer {spec!r} not found: give a sentencepiece .model file or a tokenizer folder")
        return HFTokenizer(spec)  # a hub name such as "meta-llama/Llama-2-7b-hf" (needs network or HF cache)
    except (OSError, ValueError, RuntimeError) as e:  # sentencepiece and transformers raise these for bad files
        if isinstance(e, (DataError, FileNotFoundError)):
            raise
        raise DataError(f"tokenizer {spec!r} cannot be loaded ({str(e).strip().splitlines()[0][:200]}); give a "
                        f"sentencepiece .model file or a folder with tokenizer.model or tokenizer.json") from None


def train_tokenizer(files, vocab_size: int, out_dir: str, max_sentences: int = 2_000_000,
                    text_field: str = "text") -> Tokenizer:
    """Train a LLaMA-like sentencepiece BPE on local files (any format qapollo.data reads; `text_field`: the
    jsonl/parquet field holding the text).

    BPE, not unigram: transformers' LlamaTokenizer assumes BPE when it converts tokenizer.model, so a
    unigram model would tokenize differently after the HF export.
    """
    import sentencepiece as spm

    paths = resolve_paths(files, what="corpus")
    docs = iter_file_documents(paths, text_field, field_key="--text-field", files_key="the corpus")
    lines = (ln for doc in docs for ln in doc.split("\n") if ln.strip())
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.time()
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines, model_prefix=os.path.join(out_dir, "tokenizer"), model_type="bpe",
        vocab_size=vocab_size, input_sentence_size=max_sentences, shuffle_input_sentence=True,
        num_threads=min(4, os.cpu_count() or 1), character_coverage=0.99995, byte_fallback=True,
        split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        max_sentence_length=16384, minloglevel=2,
    )
    os.remove(os.path.join(out_dir, "tokenizer.vocab"))  # the .model holds the vocabulary already
    tok = SentencePieceTokenizer(os.path.join(out_dir, "tokenizer.model"), name_or_path=out_dir)
    tok.save(out_dir)  # adds tokenizer_config.json + special_tokens_map.json for AutoTokenizer
    log.info("trained BPE tokenizer, vocab %d, in %.1fs -> %s", vocab_size, time.time() - t0, out_dir)
    return tok


def tokenizer_main(argv: list[str]) -> int:
    """`qapollo tokenizer train CORPUS... --vocab N OUT/`"""
    import argparse

    if not argv or argv[0] != "train":  # one subcommand; a plain parser takes the flags anywhere (see below)
        print("usage: qapollo tokenizer train CORPUS... --vocab N [--text-field F] [--force] OUT/")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    ap = argparse.ArgumentParser(prog="qapollo tokenizer train",
                                 description="Train a LLaMA-like sentencepiece BPE tokenizer on local text files.")
    ap.add_argument("corpus", nargs="+", help="files or globs (.txt, .jsonl, .parquet, optionally .gz/.xz)")
    ap.add_argument("out", help="output folder (gets tokenizer.model + tokenizer_config.json)")
    ap.add_argument("--vocab", type=int, required=True, help="vocabulary size, e.g. 32000")
    ap.add_argument("--text-field", default="text", help="jsonl/parquet field holding the text (default %(default)s)")
    ap.add_argument("--force", action="store_true", help="replace the tokenizer files in a non-empty OUT")
    args = ap.parse_intermixed_args(argv[1:])  # CORPUS... --vocab N OUT, the order the usage shows, works too
    out = os.path.normpath(args.out)
    if os.path.isfile(out) or (os.path.isdir(out) and os.listdir(out) and not args.force):
        raise DataError(f"{out} exists and is not empty: choose another folder or pass --force to replace the "
                        f"tokenizer files in it")
    created = not os.path.exists(out)
    try:
        tok = train_tokenizer(args.corpus, args.vocab, out, text_field=args.text_field)
    except BaseException as e:
        if created:  # a failed run leaves no folder behind
            shutil.rmtree(out, ignore_errors=True)
        if isinstance(e, RuntimeError):  # sentencepiece's trainer, e.g. a vocabulary larger than the corpus allows
            raise DataError(f"tokenizer training failed: {str(e).strip().splitlines()[0]}") from None
        raise
    print(f"wrote {out} (vocab {tok.vocab_size}); use it with data.tokenizer={out}")
    return 0
