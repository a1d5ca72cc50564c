"""The paper's pipeline inside a controlled world: a teacher fitted to the truth, students initialised by SFT
on teacher samples, then every method from the same initialisation with the same budget (issue 24).

Everything trains through `minillm.api.train` - the same code path a user runs - on instruction files of
world samples with the `raw` template (the prompt is the prompt's token text; the world's word-level
tokenizer maps text and ids 1:1). Models are small Llama configs built here with the world's tokenizer.

    world = World(WorldSpec(...))
    folder = save_world(world, out / "world")                 # spec.json + tokenizer
    truth = write_truth_data(world, out / "data", n_per_prompt=256, seed=0)
    teacher = fit(world, "sft", out / "teacher", init=new_model(world, out / "teacher0", 64, 2, seed=1),
                  train_data=truth, budget=Budget(steps=600, batch_size=32, learning_rate=3e-3))

`method_settings` holds what each method needs beyond the budget (MiniLLM's rollout sizes, the ablations).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from minillm.io import write_jsonl, write_text
from minillm.world.measures import sample_model
from minillm.world.process import World, WorldSpec

__all__ = [
    "Budget", "METHODS", "ABLATIONS", "fit", "load_world", "method_settings", "model_records", "new_model",
    "save_world", "train_config", "write_model_data", "write_truth_data",
]

# method name -> (training method, its settings): the rows of the paper's Table 1 and Table 4 in the world
METHODS = {
    "sft": ("sft", {}),                           # SFT w/o KD: more SFT on the truth's samples
    "kd": ("kd", {}),                             # word-level KD on the truth's samples
    "seqkd": ("seqkd", {}),                       # SFT on teacher samples
    "rkl": ("rkl", {}),                           # token-level reverse KL on the truth's samples
    "jsd": ("jsd", {}),
    "tvd": ("tvd", {}),
    "onpolicy": ("onpolicy", {}),                 # GKD: token-level forward KL on student samples
    "minillm": ("minillm", {}),                   # the paper's defaults (released-code advantage)
    "minillm_paper_adv": ("minillm", {"advantage": "paper"}),
}
ABLATIONS = {  # Table 4: MiniLLM without one stabiliser each
    "minillm_no_mix": ("minillm", {"teacher_mix_alpha": 0.0}),
    "minillm_no_norm": ("minillm", {"length_norm": False}),
    "minillm_no_single": ("minillm", {"single_step": False}),
}


@dataclass(frozen=True)
class Budget:
    """What every method of one comparison gets: optimiser steps, batch size (responses per step for the
    supervised methods, prompts per round for the sampling ones) and learning rate."""

    steps: int
    batch_size: int
    learning_rate: float


def save_world(world: World, folder: Path) -> Path:
    """The world's spec (`spec.json`) and tokenizer in `folder` (read back by `load_world`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    world.tokenizer().save_pretrained(folder)
    write_text(folder / "spec.json", json.dumps(world.spec.to_dict(), indent=1))
    return folder


def load_world(folder: Path) -> World:
    return World(WorldSpec.from_dict(json.loads((Path(folder) / "spec.json").read_text())))


def new_model(world: World, folder: Path, hidden: int, layers: int, seed: int) -> Path:
    """A randomly initialised Llama of width `hidden` and `layers` layers over the world's tokenizer, saved as
    a plain HF folder. Heads of width 8 (at least 1); the MLP is 2 x hidden."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from minillm.models.saving import save_pretrained_atomic

    tok = world.tokenizer()
    heads = max(1, hidden // 8)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=4 * (world.spec.prompt_length + world.max_length + 2),
                      bos_token_id=world.eos_id, eos_token_id=world.eos_id, pad_token_id=world.eos_id,
                      tie_word_embeddings=False)
    torch.manual_seed(seed)
    return save_pretrained_atomic(LlamaForCausalLM(cfg), tok, folder)


def write_truth_data(world: World, path: Path, n_per_prompt: int, seed: int) -> Path:
    """Instruction JSONL of `n_per_prompt` samples of the truth per prompt."""
    return write_jsonl(path, world.instruction_records(n_per_prompt, seed))


def model_records(model, world: World, n_per_prompt: int, seed: int) -> list[dict]:
    """Instruction records of a model's temperature-1 samples (complete responses only: a sample cut at the
    length cap is dropped)."""
    rows = []
    for i in range(world.spec.prompts):
        for j, y in enumerate(sample_model(model, world, i, n_per_prompt, seed=seed)):
            if y and y[-1] == world.eos_id:
                rows.append({"instruction": world.prompt_text(i), "input": "", "output": world.text(y),
                             "id": f"model-{i}-{j}", "source": "minillm.world model sample",
                             "prompt_index": i})
    return rows


def write_model_data(model_dir: Path, world: World, path: Path, n_per_prompt: int, seed: int) -> Path:
    from minillm.models import load_model

    return write_jsonl(path, model_records(load_model(str(model_dir)), world, n_per_prompt, seed))


def method_settings(name: str) -> tuple[str, dict]:
    """(training method, settings) of a method row: a name of METHODS or ABLATIONS."""
    table = {**METHODS, **ABLATIONS}
    if name not in table:
        raise KeyError(f"unknown world method {name!r}; choose from {', '.join(table)}")
    return table[name]


def train_config(world: World, name: str, out: Path, init: Path, train_data: Path, budget: Budget, *,
                 teacher: Path | None = None, seed: int = 0, **extra):
    """The `TrainConfig` of method row `name` in this world (the raw template; lengths from the world; the
    final model is what is measured, so no selection runs and validation is minimal)."""
    from minillm.config import TrainConfig, build_config

    method, settings = ("sft", {}) if name == "teacher" else method_settings(name)
    prompt_len = world.spec.prompt_length
    values = dict(method=method, student=str(init), train_data=str(train_data), output_dir=str(out),
                  template="raw", max_prompt_length=prompt_len + 1,
                  max_length=prompt_len + world.max_length + 3,
                  max_steps=budget.steps, batch_size=budget.batch_size, learning_rate=budget.learning_rate,
                  lr_scheduler="constant", warmup_steps=0, valid_fraction=0.02, eval_num_prompts=4,
                  seed=seed, report_to="none", precision="fp32", overwrite=True,
                  max_new_tokens=world.max_length + 1)
    if method != "sft":
        values["teacher"] = str(teacher)
    if method in ("minillm", "onpolicy"):
        values["rollout_batch_size"] = budget.batch_size
    if method == "minillm":
        values.update(num_rollouts=budget.batch_size, ppo_epochs=1, pt_data="", lm_coef=0.0)
    values.update(settings)
    values.update(extra)
    return build_config(TrainConfig, None, values)


def fit(world: World, name: str, out: Path, init: Path, train_data: Path, budget: Budget,
        teacher: Path | None = None, seed: int = 0, **extra) -> Path:
    """Train method row `name` from `init`; returns the final model's folder (out/final)."""
    from minillm import api

    api.train(train_config(world, name, out, init, train_data, budget, teacher=teacher, seed=seed, **extra))
    return Path(out) / "final"
