"""The shipped configs use the peak lrs of the width rules: from scratch, the largest the stability probe found
stable; continuing a trained model, the continued-training rule."""
import glob
import os

import pytest

from qapollo.config import load_config
from qapollo.optim.schedule import continued_lrs, continued_warmup, stable_lrs
from tests.helpers import ROOT

PRETRAIN = [p for p in sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
            if load_config(p).model.init_from is None]  # continued pre-training picks its own (lower) lr
# the continued-training presets and the widths of the models they are for
CONTINUE = {"llama_7b_continue.yaml": 4096, "llama3_8b_12gb.yaml": 4096, "mistral_7b_12gb.yaml": 4096,
            "qwen2.5_7b_12gb.yaml": 3584, "qwen3_8b_12gb.yaml": 4096}


def test_rule_values():
    assert stable_lrs(256) == (3e-3, 3e-3)
    assert stable_lrs(1024) == (3e-3, 7.5e-4)
    assert stable_lrs(2048) == (1e-3, 2e-4)
    assert stable_lrs(4096) == (7.5e-4, 1.875e-4)
    assert stable_lrs(5120) == (6e-4, 1.5e-4)  # measured (2-layer probe), no longer extrapolated
    assert stable_lrs(512) == pytest.approx((3e-3, 1.5e-3)) and stable_lrs(768) == pytest.approx((3e-3, 1e-3))
    assert stable_lrs(8192) == pytest.approx((3.75e-4, 9.375e-5))  # beyond the table: 1/width


@pytest.mark.parametrize("path", PRETRAIN, ids=os.path.basename)
def test_shipped_lrs_follow_the_width_rule(path):
    cfg = load_config(path)
    lr, float_lr = stable_lrs(cfg.model.hidden_size)
    assert cfg.optim.lr == pytest.approx(lr, rel=1e-6)
    assert (cfg.optim.lr if cfg.optim.float_lr is None else cfg.optim.float_lr) == pytest.approx(float_lr, rel=1e-6)


def test_recipe_note_for_an_unstable_lr(capsys, tmp_path):
    from qapollo.train import Trainer
    cfg = load_config(os.path.join(ROOT, "configs", "llama_7b.yaml"),
                      ["optim.lr=0.01", f"train.output_dir={tmp_path}", "train.device=cpu"])
    tr = Trainer(cfg, progress=False)
    tr._note_lr()
    out = capsys.readouterr()
    # against the largest lr found stable at width 4096 (1e-3), not the recipe's 7.5e-4
    assert "optim.lr=0.01 is 10.00x the largest peak lr the stability probe found stable at width 4096" in \
        out.out + out.err
    cfg = load_config(os.path.join(ROOT, "configs", "llama_7b.yaml"),
                      ["optim.lr=1.8e-3", f"train.output_dir={tmp_path}", "train.device=cpu"])
    tr = Trainer(cfg, progress=False)
    tr._note_lr()  # 2.4x the recipe's lr but 1.8x the largest stable one: no note
    out = capsys.readouterr()
    assert "note" not in out.out + out.err
    cfg.optim.warmup_steps, cfg.train.max_steps = 2000, 500  # a preset's warmup on a short run: never peaks
    Trainer(cfg, progress=False)._note_lr()
    out = capsys.readouterr()
    assert "optim.warmup_steps=2000 is over half of train.max_steps=500: the lr never reaches its peak" in \
        out.out + out.err


def test_retired_key_is_read_and_ignored(capsys):
    """train.compile never had an effect and is gone; configs holding it (old YAML files, the config.yaml of
    older checkpoints: tests/data/legacy) still load."""
    from qapollo.config import config_from_dict
    cfg = load_config(None, ["train.compile=true"])
    assert "train.compile (in the command line) is no longer a setting and is ignored" in capsys.readouterr().err
    assert not hasattr(cfg.train, "compile") and "compile" not in cfg.to_dict()["train"]
    assert config_from_dict({"train": {"compile": False, "max_steps": 7}}).train.max_steps == 7


def test_continued_rule_values():
    # a tenth of the from-scratch stable lr at the width, float tensors at a fifth of that
    assert continued_lrs(576) == pytest.approx((3e-4, 6e-5))
    assert continued_lrs(4096) == pytest.approx((7.5e-5, 1.5e-5))
    assert continued_warmup(0.999, 20000) == 2000 and continued_warmup(0.999, 25) == 2
    assert continued_warmup(0.95, 20000) == 40 and continued_warmup(0.999, 5) == 1


def test_every_continue_preset_is_checked():
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "configs", "*.yaml"))
                  if load_config(p).model.init_from is not None) == sorted(CONTINUE)


@pytest.mark.parametrize("name", sorted(CONTINUE))
def test_continue_presets_follow_the_continued_rule(name):
    cfg = load_config(os.path.join(ROOT, "configs", name))
    assert cfg.model.init_from is not None
    lr, float_lr = continued_lrs(CONTINUE[name])
    assert (cfg.optim.lr, cfg.optim.float_lr) == pytest.approx((lr, float_lr), rel=0.01)  # 3 digits in the yaml
    assert cfg.optim.warmup_steps >= continued_warmup(cfg.optim.beta2, cfg.train.max_steps)


def test_continued_note_compares_with_the_continued_rule(capsys, tmp_path):
    """With model.init_from the start-up note measures the lr against the continued-training rule (the
    issue's 5e-4 at width 576 blew a trained model up), and a warmup too short for fresh states."""
    from qapollo.train import Trainer
    over = ["model.init_from=/models/some-hf-folder", f"train.output_dir={tmp_path}", "train.device=cpu"]
    cfg = load_config(os.path.join(ROOT, "configs", "llama_7b_continue.yaml"), over + ["optim.lr=5e-4",
                      "optim.float_lr=1e-4", "optim.warmup_steps=1"])
    cfg.model.hidden_size = 576  # what the folder's config.json sets (SmolLM2-135M)
    Trainer(cfg, progress=False)._note_lr()
    out = capsys.readouterr()
    text = out.out + out.err
    assert "optim.lr=" not in text and "optim.float_lr" not in text  # 1.67x the rule's 3e-4 / 6e-5: no note
    assert "optim.warmup_steps=1 is short for fresh optimizer states on a trained model: 2000" in text
    cfg.optim.lr, cfg.optim.float_lr, cfg.optim.warmup_steps = 1e-3, 6e-5, 2000
    Trainer(cfg, progress=False)._note_lr()
    out = capsys.readouterr()
    text = out.out + out.err
    assert "optim.lr=0.001 is 3.33x the continued-training lr for width 576 (0.0003;" in text
    assert "float_lr" not in text and "warmup" not in text
    cfg.optim.lr, cfg.optim.float_lr = 7.5e-5, None  # the preset's own width-4096 lr on a 576-wide model
    Trainer(cfg, progress=False)._note_lr()
    out = capsys.readouterr()
    text = out.out + out.err
    assert "optim.lr=7.5e-05 is 0.25x the continued-training lr for width 576 (0.0003;" in text
    assert "it learns slower than it could" in text
    # float_lr unset steps the float tensors at lr: 1.25x their rule (6e-05), neither high nor low
    assert "float_lr" not in text
    cfg.optim.lr = 1.5e-4  # float tensors at lr (unset): 2.5x their rule
    Trainer(cfg, progress=False)._note_lr()
    out = capsys.readouterr()
    assert "optim.float_lr (unset: optim.lr)=0.00015 is 2.50x the continued-training lr" in out.out + out.err
    cfg.optim.lr, cfg.optim.float_lr = 1e-3, 6e-5
    cfg.model.init_from = None  # the same lr from scratch is under the probe's largest stable 3e-3: no note
    Trainer(cfg, progress=False)._note_lr()
    out = capsys.readouterr()
    assert "note" not in out.out + out.err
