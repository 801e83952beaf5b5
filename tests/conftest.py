import lzma
import os

import pytest
import torch

from tests.helpers import ROOT


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: threads only add contention on a shared 2-core box (use via pytestmark)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """200 kB of Shakespeare and a 512-piece BPE trained on it, so the tiny model's vocab fits."""
    import sentencepiece as spm
    d = tmp_path_factory.mktemp("corpus")
    with lzma.open(os.path.join(ROOT, "qapollo/assets/corpus/shakespeare.train.txt.xz"), "rt") as f:
        (d / "corpus.txt").write_text(f.read(200_000))
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "tok"), model_type="bpe", vocab_size=512,
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    return {"data.path": str(d / "corpus.txt"), "data.tokenizer": str(d / "tok.model"),
            "data.cache_dir": str(d / "cache"), "eval.tokens": 256}
