"""One rank of the 2-process tests (tests/test_distributed.py), started by torchrun.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_worker.py SPEC.json

SPEC: {"small_bytes": int, "bucket_bytes": int, "scenarios": [{"kind", "config" or "config_path", "out"}]},
the first scenario of kind cli, the others train or perturb:
  train    Trainer setup + fit; every rank writes its weights to out/rank<r>.safetensors
  cli      `qapollo train --config config_path` (the entry point run_7b.py calls); out/rank<r>.rc
  perturb     as train, but rank 1 changes one int8 code after setup
  other_seed  as train, but rank 1 gets another train.seed
  save_fails  as train, but rank 0's checkpoint save raises (a full disk)
  (a run that stops with a DistributedError, TrainError or CheckpointError writes it to out/rank<r>.err
  instead of its weights)
"""
import json
import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from qapollo import checkpoint
from qapollo.checkpoint import CheckpointError, DiskSpaceError
from qapollo.cli import main as cli_main
from qapollo.config import config_from_dict
from qapollo.distributed import DistributedError, GradAverager
from qapollo.model import int8_modules
from qapollo.train import Trainer, TrainError

PERTURBED = "model.layers.1.mlp.up_proj"


def run_trainer(cfg, out: str, rank: int, kind: str) -> None:
    if kind == "other_seed" and rank == 1:
        cfg.train.seed += 1
    tr = Trainer(cfg, progress=False)
    real_save = checkpoint.save
    if kind == "save_fails" and rank == 0:
        def full_disk(*args, **kwargs):
            raise DiskSpaceError("the disk filled up while writing checkpoint-1 (simulated)")
        checkpoint.save = full_disk
    try:
        tr.setup()
        if kind == "perturb" and rank == 1:
            mod = dict(int8_modules(tr.model))[PERTURBED]
            mod.weight_codes[3, 5] ^= 1  # one bit of one code: the smallest possible divergence
        tr.fit()
    except (DistributedError, TrainError, CheckpointError) as e:
        with open(os.path.join(out, f"rank{rank}.err"), "w") as f:
            f.write(str(e))
        return
    finally:
        checkpoint.save = real_save
        tr.dist.close()
    state = {k: v.contiguous() for k, v in tr.model.state_dict().items()}
    save_file(state, os.path.join(out, f"rank{rank}.safetensors"))


def main(spec_path: str) -> None:
    torch.set_num_threads(1)
    with open(spec_path) as f:
        spec = json.load(f)
    # lower thresholds than a real model's, so the tiny model's tensors take both paths (own all-reduce / bucket)
    GradAverager.SMALL_BYTES, GradAverager.BUCKET_BYTES = spec["small_bytes"], spec["bucket_bytes"]
    rank = int(os.environ["RANK"])
    cli, others = spec["scenarios"][0], spec["scenarios"][1:]
    # the real path first: the run joins (and leaves) the process group itself, from torchrun's environment
    os.makedirs(cli["out"], exist_ok=True)
    rc = cli_main(["train", "--config", cli["config_path"], "--no-progress"])
    with open(os.path.join(cli["out"], f"rank{rank}.rc"), "w") as f:
        f.write(str(rc))
    # then one group for the rest, which each run finds and keeps (a group created again under the same
    # name in torchrun's store could read the keys of the one before it: a connection race)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
    dist.init_process_group("gloo", store=dist.PrefixStore("tests", store), rank=rank,
                            world_size=int(os.environ["WORLD_SIZE"]))
    for sc in others:
        os.makedirs(sc["out"], exist_ok=True)
        run_trainer(config_from_dict(sc["config"]), sc["out"], rank, sc["kind"])
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
