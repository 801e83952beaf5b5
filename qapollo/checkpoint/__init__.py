"""Checkpoints: atomic, pickle-free saves; exact resume; one-line errors for broken checkpoints.

    <output_dir>/<run_name>/
      checkpoint-<step>/
        model.safetensors       int8 codes + per-group scales/zeros + float tensors, bit for bit
        optimizer.safetensors   per-tensor optimizer state keyed by tensor name (`<name>.exp_avg`, ...)
        rng_state.safetensors   torch CPU/CUDA generator states (uint8 tensors), numpy, python
        trainer_state.json      step, tokens seen, lr position, data cursor, config hash, versions,
                                metrics pointer, and a manifest (size + crc32 of every file above)
        config.yaml             the resolved run config
        tokenizer/              the tokenizer files (the HF export copies them from here)
      latest                    name of the newest checkpoint (written just before its rename)
      metrics.jsonl

A checkpoint is written into `.tmp-checkpoint-<step>-<pid>/`, every file fsynced, named in `latest`,
renamed into place, and only then are checkpoints beyond train.keep_checkpoints removed: a crash at any
point (tests/test_reliability.py kills the process at each of these moments) leaves every folder under a
`checkpoint-<step>` name complete, and `--resume auto` continues from the newest one. A save checks the
free disk space first and refuses a step that did not complete (a half-applied in-backward update).
Nothing is pickled: tensors go to safetensors (written here tensor by tensor), the rest to JSON/YAML.
Stochastic rounding noise is a function of (seed, tensor, step), so step counters are all it needs.

The API takes states, not a trainer: `save(run_dir, step, {"model": ..., "optimizer": ..., "trainer": ...},
config=...)`; `first_valid(ckpts, cfg, model_state, optimizer_spec)` then `load(ckpt, model)` (model tensors
and RNG in place; the optimizer's state returned) and the saved record for the trainer to apply.
Modules: files (the format, safetensors writer), saving, validation, loading.
"""
from .files import (CKPT_RE, SCHEMA, CheckpointError, DiskSpaceError, IncompatibleCheckpoint,  # noqa: F401
                    file_crc32, list_checkpoints, open_safetensors, say, tensor_items, write_safetensors)
from .loading import LOAD_BATCH_BYTES, first_valid, load, load_model_tensors, load_rng, saved_accumulation  # noqa: F401
from .saving import check_disk_space, check_output_dir, checkpoint_bytes, save, versions  # noqa: F401
from .validation import (candidates, check_compatible, check_files, check_tensor, files_ok,  # noqa: F401
                         find_checkpoint, is_checkpoint_dir, read_config, read_state, resume_candidates, resume_config,
                         resume_notes, resume_target, validate)
