"""Layer pruning for student initialisation (`minillm prune`)."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import PreTrainedModel

from minillm.config.paths import check_writable_parent
from minillm.errors import ConfigError, ModelError
from minillm.io import write_json
from minillm.models.loading import load_model, load_tokenizer
from minillm.models.saving import save_to_temp_sibling

__all__ = ["prune_command", "prune_model", "pruned_layer_indices"]


def _decoder_layers(model: PreTrainedModel) -> tuple[str, torch.nn.ModuleList]:
    """The (state-dict prefix, ModuleList) holding the decoder blocks: the unique ModuleList with
    `num_hidden_layers` entries (model.model.layers for Llama-likes, transformer.h for GPT-2)."""
    num_layers = getattr(model.config, "num_hidden_layers", None)
    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, torch.nn.ModuleList) and len(module) == num_layers]
    if num_layers is None or len(found) != 1:
        raise ModelError(f"cannot prune {type(model).__name__}: expected exactly one list of "
                         f"{num_layers} decoder layers, found {len(found)}; supported are decoder-only "
                         "models "
                         "such as Llama/Qwen/Mistral (model.layers) and GPT-2 (transformer.h)")
    return found[0]


def pruned_layer_indices(num_layers: int, keep: int, strategy: str = "spread") -> list[int]:
    """Which of `num_layers` layers to keep.

    "spread": evenly spaced, first and last included; "first": 0..keep-1; "ends": the first ceil(keep/2) and
    the last floor(keep/2) layers, i.e. one contiguous block of late-middle layers is removed. Removing a
    contiguous block before the last layers hurts least (Gromov et al. 2024, "The Unreasonable
    Ineffectiveness of the Deeper Layers"): on SmolLM2-135M-Instruct (30 layers), the cross-entropy of
    the pruned model on the teacher's own answers before any training is 7.9 nats/token keeping 12 layers
    with "ends" vs 14.7 with "spread" and 21.9 with "first" (6.5 / 12.6 / 21.8 keeping 16; teacher 1.02).
    """
    if not 1 <= keep <= num_layers:
        raise ModelError(f"cannot keep {keep} of {num_layers} layers; choose 1 <= layers <= {num_layers}")
    if strategy == "first":
        return list(range(keep))
    if strategy == "spread":
        if keep == 1:
            return [0]
        return [round(i * (num_layers - 1) / (keep - 1)) for i in range(keep)]
    if strategy == "ends":
        head = (keep + 1) // 2
        return list(range(head)) + list(range(num_layers - (keep - head), num_layers))
    raise ModelError(f"unknown prune strategy '{strategy}'; use 'spread', 'ends' or 'first'")


def prune_model(model: PreTrainedModel, num_layers: int, strategy: str = "spread") -> PreTrainedModel:
    """A new model keeping `num_layers` of the decoder layers; embeddings, final norm and head copied.

    The pruned model is built from a fresh config with K layers and then loaded with the kept
    weights, so every layer-indexed attribute (KV-cache `layer_idx`, per-layer `layer_types`,
    GPT-2's inverse-layer-index scaling) is exactly what `from_pretrained` of the saved folder gives.
    """
    prefix, layers = _decoder_layers(model)
    keep = pruned_layer_indices(len(layers), num_layers, strategy)
    config = copy.deepcopy(model.config)
    old_count = config.num_hidden_layers
    for key, value in config.to_dict().items():  # layer_types, mlp_layer_types, ...: one entry per layer
        if key.endswith("layer_types") and isinstance(value, list) and len(value) == old_count:
            setattr(config, key, [value[i] for i in keep])
    config.num_hidden_layers = num_layers  # GPT-2 maps this onto n_layer

    renumber = {old: new for new, old in enumerate(keep)}
    layer_key = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.*)$")
    state = {}
    for key, tensor in model.state_dict().items():
        match = layer_key.match(key)
        if match is None:
            state[key] = tensor
        elif int(match.group(1)) in renumber:
            state[f"{prefix}.{renumber[int(match.group(1))]}.{match.group(2)}"] = tensor
    pruned = type(model)._from_config(config, dtype=model.dtype)
    pruned.load_state_dict(state, strict=True)
    pruned.generation_config = copy.deepcopy(model.generation_config)
    return pruned.to(model.device).train(model.training)


def _count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights are counted once


PRUNE_MARKER = "prune.json"  # written into every prune output: what made it and which files it holds


def _prune_output_files(out: Path) -> list[str] | None:
    """The files an earlier `minillm prune` wrote into `out` (its marker); None if prune did not make it."""
    try:
        files = json.loads((out / PRUNE_MARKER).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return files if isinstance(files, list) and all(isinstance(f, str) for f in files) else None


def check_prune_out(out: str | os.PathLike) -> Path:
    """Refuse an `--out` that prune cannot write or must not replace, before any model is loaded.

    Accepted: a new path, an empty folder, or the folder of an earlier `minillm prune` that holds only
    the files that prune wrote (it is replaced). Refused: a file, a folder with anything else in it (prune
    never deletes or overwrites files it did not write), a place that cannot be written.
    """
    path = Path(os.path.abspath(Path(out).expanduser()))
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {out}: {path} is a file, not a folder; prune writes a model folder there. "
                          "Choose a new --out (a folder that does not exist yet).")
    if path.is_dir():
        try:
            present = sorted(str(p.relative_to(path)) for p in path.rglob("*") if not p.is_dir())
        except OSError as e:
            raise ConfigError(f"--out {out}: cannot read the folder {path} ({e.strerror}); choose a new "
                              "--out.") from None
        if present:
            ours = _prune_output_files(path)
            foreign = [f for f in present if ours is None or (f not in ours and f != PRUNE_MARKER)]
            if foreign:
                shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
                what = ("is not the output of an earlier `minillm prune`" if ours is None else
                        "holds files an earlier `minillm prune` did not write")
                raise ConfigError(f"--out {out}: the folder {path} {what} ({shown}); prune never deletes or "
                                  "overwrites files it did not write. Choose a new --out, or move or remove "
                                  "that folder yourself.")
    check_writable_parent(path, "--out")
    if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: cannot write into {path} (permission denied or a read-only file "
                          "system); choose a writable --out.")
    return path


def _save_pruned(pruned: PreTrainedModel, tokenizer, out: Path, marker: dict) -> Path:
    """Build the folder in a temporary sibling (model, tokenizer, marker) and rename it into place; an
    earlier prune output at `out` is replaced only once the new folder is complete."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = save_to_temp_sibling(pruned, tokenizer, out)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot write the pruned model next to it in {out.parent} "
                          f"({e.strerror or e}); choose a writable --out with free space.") from None
    old = None
    try:
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if not p.is_dir())
        write_json(tmp / PRUNE_MARKER, {**marker, "files": files})
        check_prune_out(out)  # again, right before the rename: nothing foreign appeared meanwhile
        if out.exists() and any(out.iterdir()):  # an earlier prune output: moved aside, removed at the end
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old)  # `old` is an empty folder, so a folder may replace it
        try:  # onto a new path or an empty folder: one atomic rename
            os.replace(tmp, out)
        except BaseException:
            if old is not None:
                os.replace(old, out)
            raise
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise ConfigError(f"--out {out}: cannot put the pruned model in place ({e.strerror or e}); "
                              "choose a writable --out.") from None
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


def prune_command(model: str, layers: int, strategy: str, out: str) -> Path:
    """`minillm prune`: load, keep `layers` decoder layers, save model + tokenizer atomically to `out`.

    `out` is checked before the model is loaded (see `check_prune_out`): prune writes a new folder, or
    replaces an earlier prune output, never a file or a folder holding anything else.
    """
    target = check_prune_out(out)
    source = load_model(model)
    tokenizer = load_tokenizer(model)
    total = source.config.num_hidden_layers
    kept = pruned_layer_indices(total, layers, strategy)
    pruned = prune_model(source, layers, strategy)
    path = _save_pruned(pruned, tokenizer, target, {"command": "minillm prune", "model": str(model),
                                                    "layers": layers, "strategy": strategy, "kept": kept})
    before, after = _count_parameters(source) / 1e6, _count_parameters(pruned) / 1e6
    print(f"pruned {model}: kept layers {kept} of {total} ({strategy}); parameters "
          f"{before:.1f}M -> {after:.1f}M; saved to {path}")
    return path
