"""Pre-flight checks: what would fail deep inside torch (or after hours) is refused before any work.

- `check_context`: the longest sequence a run or a generation feeds a model (prompt + response) against
  the model's context (`max_position_embeddings` / `n_positions`): past it, absolute-position models fail
  with an IndexError inside `torch.embedding` and rotary ones silently run out of their trained range.
- `check_embeddings`: the tokenizer's ids against the model's input embedding rows (an id past them is
  the same IndexError).
- `check_disk`: free space in the output folder against the checkpoints and model folders a training run
  plans to write.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from .errors import ConfigError, ModelError

__all__ = ["check_context", "check_disk", "check_embeddings", "generation_length", "model_context",
           "training_lengths"]

logger = logging.getLogger("minillm")

_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


def model_context(model) -> tuple[int, str] | None:
    """(context length, the config key it comes from), or None when the config states none."""
    config = getattr(model, "config", None)
    config = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    for key in _CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value, key
    return None


def training_lengths(cfg) -> dict[str, int]:
    """The sequence lengths a training run feeds its models: what each is made of -> positions."""
    lengths = {f"max_length ({cfg.max_length})": cfg.max_length,
               **generation_length("max_prompt_length", cfg.max_prompt_length, cfg.sampling.max_new_tokens)}
    if getattr(cfg, "pt_data", None):
        lengths[f"pt_seq_len ({cfg.pt_seq_len})"] = cfg.pt_seq_len
    return lengths


def generation_length(prompt_what: str, prompt: int, max_new_tokens: int) -> dict[str, int]:
    """{"<prompt_what> (P) + max_new_tokens (N)": P + N}: the longest sequence a generation feeds."""
    return {f"{prompt_what} ({prompt}) + max_new_tokens ({max_new_tokens})": prompt + max_new_tokens}


def check_context(model, role: str, lengths: dict[str, int]) -> None:
    """Refuse when any of `lengths` (description -> positions) exceeds `role`'s context."""
    found = model_context(model)
    if found is None:
        return
    context, key = found
    for what, positions in lengths.items():
        if positions > context:
            raise ConfigError(f"{what} = {positions} positions, but the {role} model's context is {context} "
                              f"(its config.{key}); longer sequences would fail inside the model. Lower "
                              "max_length / max_prompt_length / max_new_tokens (or pt_seq_len) to fit.")


def check_embeddings(model, tokenizer, role: str) -> None:
    """Refuse a tokenizer with more ids than `role`'s input embedding has rows."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is None:
        return
    ids = len(tokenizer)
    if ids > rows:
        top = tokenizer.convert_ids_to_tokens(ids - 1)
        raise ModelError(f"the tokenizer has {ids} tokens (ids up to {ids - 1}, {top!r}) but the {role} "
                         f"model's input embedding has only {rows} rows, so those ids cannot be fed to it; "
                         "use the model's own tokenizer, or resize its embeddings "
                         "(model.resize_token_embeddings) and train them.")


def _parameter_bytes(model) -> tuple[int, int]:
    """(bytes of all parameters as stored, number of trainable parameters)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def check_disk(out: Path, student, cfg, steps: int | None = None) -> None:
    """Refuse when `out`'s file system has less free space than the run will write: the resumable
    checkpoints kept at once (weights + AdamW's two fp32 moments of the trainable parameters, one more while
    a new one is written) and the best / final model folders."""
    weights, trainable = _parameter_bytes(student)
    if getattr(cfg, "lora_r", 0):
        trainable = 0  # adapters only: their optimizer state is negligible next to the weights
    checkpoint = weights + 8 * trainable
    saves = 1
    if cfg.save_every and steps:
        saves = max(1, steps // cfg.save_every)
    kept = min(cfg.keep_checkpoints, saves) + 1
    planned = kept * checkpoint + 2 * weights
    probe = out if out.exists() else next((p for p in out.parents if p.exists()), Path("/"))
    free = shutil.disk_usage(probe).free
    if free < planned:
        gib = 1 << 30
        raise ConfigError(f"output_dir={out}: {free / gib:.2f} GiB free, but the run plans to write about "
                          f"{planned / gib:.2f} GiB ({kept} checkpoint(s) of {checkpoint / gib:.2f} GiB at "
                          f"once, keep_checkpoints={cfg.keep_checkpoints}, and the best/final models). Free "
                          "space, choose another output_dir, or lower keep_checkpoints / save less often.")
