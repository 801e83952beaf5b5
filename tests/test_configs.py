"""The shipped pre-training configs use the peak lrs the stability probe found stable at their width."""
import glob
import os

import pytest

from qapollo.config import load_config
from qapollo.optim.schedule import stable_lrs
from tests.helpers import ROOT

PRETRAIN = [p for p in sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
            if load_config(p).model.init_from is None]  # continued pre-training picks its own (lower) lr


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
    assert "optim.lr=0.01 is 10.0x the largest peak lr the stability probe found stable at width 4096" in \
        out.out + out.err
    cfg = load_config(os.path.join(ROOT, "configs", "llama_7b.yaml"),
                      ["optim.lr=1.8e-3", f"train.output_dir={tmp_path}", "train.device=cpu"])
    tr = Trainer(cfg, progress=False)
    tr._note_lr()  # 2.4x the recipe's lr but 1.8x the largest stable one: no note
    out = capsys.readouterr()
    assert "note" not in out.out + out.err


def test_retired_key_is_read_and_ignored(capsys):
    """train.compile never had an effect and is gone; configs holding it (old YAML files, the config.yaml of
    older checkpoints: tests/data/legacy) still load."""
    from qapollo.config import config_from_dict
    cfg = load_config(None, ["train.compile=true"])
    assert "train.compile (in the command line) is no longer a setting and is ignored" in capsys.readouterr().err
    assert not hasattr(cfg.train, "compile") and "compile" not in cfg.to_dict()["train"]
    assert config_from_dict({"train": {"compile": False, "max_steps": 7}}).train.max_steps == 7
