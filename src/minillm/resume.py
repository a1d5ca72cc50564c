"""What `resume=true` may change: the saved config.yaml against the new config, and the optimiser settings
applied after a checkpoint is loaded.

A resumed run must be the run its checkpoint belongs to. The keys fall into three classes:

* FIXED (`FIXED_KEYS`, and `ROLLOUT_KEYS` for the methods that train on their own samples): what the run
  is - the method, the models, the data and its split, the prompt format and sequence shapes, the batch
  geometry, the seed, the objective's parameters, LoRA's shape and the best-model metric. The checkpoint's
  data position, rollout buffer, RNG states and optimizer moments only mean something for these values,
  so a change is refused (ConfigError) with each differing key, old and new value, and the ways on: keep
  the old value, or start a new run in a new output_dir. (`lora_r` and `fsdp` are checked by the
  checkpoint itself: a different adapter shape does not load, a sharded checkpoint needs fsdp.)
* IGNORED: `resume` and `output_dir` (they name the run, they do not describe it).
* Everything else may change and is applied and logged: the run length (max_steps, epochs), validation,
  checkpoint and log settings, precision, memory knobs (chunk_size, gradient_checkpointing), clipping,
  and the optimiser: learning_rate, lr_scheduler, lr_min, warmup_steps, weight_decay, adam_* are applied
  for real - the scheduler is rebuilt from the new config and, after the checkpoint is loaded,
  `apply_optimizer_settings` puts the new base learning rate and AdamW hyperparameters into the optimizer
  and scheduler (a checkpoint's own values would otherwise win). A lowered learning rate keeps the
  schedule's position: the learning rate of the next step is scaled by new / old.

The trainer then writes the new config as config.yaml: it always equals what runs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from .checkpoint import CHECKPOINT_DIR, COMPLETE_MARKER
from .config import config_to_dict
from .errors import ConfigError

logger = logging.getLogger("minillm")

__all__ = ["FIXED_KEYS", "IGNORED_KEYS", "ROLLOUT_KEYS", "apply_optimizer_settings", "check_resume_config"]

FIXED_KEYS = (
    # what is trained, on what
    "method", "student", "teacher", "train_data", "valid_data", "valid_fraction", "limit_train", "seqkd_data",
    "pt_data",
    # prompt format and sequence shapes
    "template", "max_prompt_length", "max_length", "pt_seq_len",
    # batch geometry and randomness: the data position and RNG states in the checkpoint depend on them
    "batch_size", "gradient_accumulation_steps", "num_rollouts", "ppo_epochs", "seed",
    # the objective
    "kd_ratio", "jsd_beta", "skew_alpha", "divergence", "single_step", "single_step_weighted", "length_norm",
    "advantage", "gamma", "importance_weight", "clip_eps", "reward_scaling", "reward_clip",
    "whiten_advantages", "lm_coef",
    # the adapters' shape (lora_r: the checkpoint does not load) and the best-model metric
    "lora_alpha", "lora_dropout", "select_by",
)
ROLLOUT_SAMPLERS = ("minillm", "onpolicy")  # methods that train on samples: how they sample is the data
ROLLOUT_KEYS = ("sampling", "rollout_batch_size", "teacher_mix_alpha", "onpolicy_fraction")
IGNORED_KEYS = ("resume", "output_dir")
_PATH_KEYS = ("student", "teacher", "train_data", "valid_data", "seqkd_data", "pt_data")
_MISSING = "<not set>"


def check_resume_config(cfg) -> None:
    """Compare `cfg` (resume=true) with the config.yaml of the run in its output_dir; refuse a change of a
    fixed key, log the changes that will be applied. Nothing to compare without a checkpoint."""
    out = Path(cfg.output_dir)
    root = out / CHECKPOINT_DIR
    if not cfg.resume or not root.is_dir() or not any((p / COMPLETE_MARKER).exists() for p in root.iterdir()):
        return
    saved_path = out / "config.yaml"
    try:
        saved = yaml.safe_load(saved_path.read_text())
    except (OSError, yaml.YAMLError) as err:
        logger.warning("resume: %s cannot be read (%s); the new settings cannot be checked against the run's",
                       saved_path, err)
        return
    if not isinstance(saved, dict):
        logger.warning("resume: %s holds no config; the new settings are not checked", saved_path)
        return
    fixed, applied = _differences(saved, config_to_dict(cfg))
    if fixed:
        listing = "\n".join(f"  {key}: {old!r} (the run) -> {new!r} (now)" for key, old, new in fixed)
        raise ConfigError(
            f"resume=true: the run in {out} cannot continue with these settings - they cannot change "
            f"mid-run (its checkpoint's data position, random states and optimizer belong to the old "
            f"values):\n{listing}\nEither keep the run's values (see {saved_path}) to continue it, or start "
            "a new run with the new values: resume=false and a new output_dir."
        )
    for key, old, new in applied:
        logger.warning("resume: %s changes from %r to %r (applied from the resumed step on)", key, old, new)


def _differences(saved: dict, new: dict) -> tuple[list, list]:
    """(fixed, applied): the differing keys as (key, old, new), nested groups as `group.key`."""
    method = new.get("method")
    fixed_keys = set(FIXED_KEYS) | (set(ROLLOUT_KEYS) if method in ROLLOUT_SAMPLERS else set())
    fixed, applied = [], []
    for key, old, value in _flat_diff(saved, new):
        if key.split(".")[0] in IGNORED_KEYS:
            continue
        (fixed if key.split(".")[0] in fixed_keys else applied).append((key, old, value))
    return fixed, applied


def _flat_diff(saved: dict, new: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    out = []
    for key in list(saved) + [k for k in new if k not in saved]:
        old, value = saved.get(key, _MISSING), new.get(key, _MISSING)
        if isinstance(old, dict) and isinstance(value, dict):
            out += _flat_diff(old, value, f"{prefix}{key}.")
        elif not _same(key, old, value):
            out.append((prefix + key, old, value))
    return out


def _same(key: str, old: Any, new: Any) -> bool:
    if old == new:
        return True
    if key in _PATH_KEYS and isinstance(old, str) and isinstance(new, str) and old and new:
        a, b = Path(old).expanduser(), Path(new).expanduser()
        return a.exists() and b.exists() and a.resolve() == b.resolve()  # ./runs/x and runs/x are one path
    return False


def apply_optimizer_settings(optimizer, scheduler, cfg) -> None:
    """After a checkpoint is loaded: the optimizer and scheduler use the config's learning rate and AdamW
    hyperparameters (the checkpoint restored the old ones). Unchanged values are left untouched (a plain
    resume stays bit-exact)."""
    sched = getattr(scheduler, "scheduler", scheduler)  # Accelerate's wrapper holds the LambdaLR
    for i, group in enumerate(optimizer.param_groups):
        old = sched.base_lrs[i]
        if old != cfg.learning_rate:
            factor = group["lr"] / old if old > 0 else sched.lr_lambdas[i](sched.last_epoch)
            group["lr"] = cfg.learning_rate * factor
            group["initial_lr"] = sched.base_lrs[i] = cfg.learning_rate
            logger.info("resume: learning rate %g -> %g (the next step's: %g)", old, cfg.learning_rate,
                        group["lr"])
        for name, value in (("betas", (cfg.adam_beta1, cfg.adam_beta2)), ("eps", cfg.adam_eps),
                            ("weight_decay", cfg.weight_decay)):
            current = tuple(group[name]) if name == "betas" else group[name]
            if current != value:
                group[name] = value
