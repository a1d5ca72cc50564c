"""Configuration: dataclasses with a help text per field, YAML files and `key=value` overrides.

Every command's options are one dataclass. A field's `metadata["help"]` is its documentation: it is
what `minillm <command> --help` prints. Values come, in increasing priority, from the dataclass
defaults, a YAML file (`--config FILE.yaml`) and command-line overrides (`key=value` or `--key value`).
Unknown keys are rejected with a "did you mean" hint, values are type-converted and range-checked, and
the resolved configuration is written next to every output (`config.yaml`).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError


def _f(default, help: str, **kw):  # noqa: A002 - "help" reads best here
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


# --------------------------------------------------------------------------------------------------
# Command configurations
# --------------------------------------------------------------------------------------------------

METHODS = ("sft", "kd", "seqkd", "rkl", "jsd", "tvd", "skl", "srkl", "onpolicy", "minillm")
DIVERGENCES = ("fkl", "rkl", "jsd", "tvd", "skl", "srkl")


@dataclass
class TrainConfig:
    """Options of `minillm sft` and `minillm distill` (one training loop for every method)."""

    # What to train
    method: str = _f("sft", "Training recipe: sft (no teacher), kd (word-level KD), seqkd (SFT on teacher "
                     "samples), rkl/jsd/tvd/skl/srkl (token-level divergence on ground truth), onpolicy "
                     "(token-level divergence on student samples, GKD-style), minillm (the paper).",
                     choices=METHODS)
    student: str = _f("", "Student model: local HF folder, .gguf file, hub id, or a built-in name "
                      "(smollm2-135m-instruct).")
    teacher: str = _f("", "Teacher model (same forms as `student`). Required by every method except sft.")
    train_data: str = _f("", "Instruction data: JSONL with instruction/input/output (or Dolly's "
                         "instruction/context/response), or a hub dataset name.")
    valid_data: str = _f("", "Validation instruction data (same format). Empty: hold out `valid_fraction` "
                         "of train_data.")
    valid_fraction: float = _f(0.1, "Fraction of train_data held out for validation when valid_data is empty.",
                               min=0.0, max=0.9)
    output_dir: str = _f("runs/minillm", "Where checkpoints, logs, metrics and the final model are written.")
    template: str = _f("minillm", "Prompt format: minillm (the paper's Alpaca template), chat (the "
                       "tokenizer's chat template), raw (instruction text only).",
                       choices=("minillm", "chat", "raw"))
    max_prompt_length: int = _f(256, "Prompts longer than this (tokens) are dropped (counted in the log).", min=1)
    max_length: int = _f(512, "Maximum prompt+response length in tokens for supervised batches.", min=2)
    limit_train: int = _f(0, "Use only the first N training examples (0 = all).", min=0)

    # Optimisation
    learning_rate: float = _f(5e-4, "Peak learning rate (AdamW).", min=0.0)
    weight_decay: float = _f(0.01, "AdamW weight decay.", min=0.0)
    adam_beta1: float = _f(0.9, "AdamW beta1.", min=0.0, max=1.0)
    adam_beta2: float = _f(0.999, "AdamW beta2.", min=0.0, max=1.0)
    adam_eps: float = _f(1e-8, "AdamW epsilon.", min=0.0)
    lr_scheduler: str = _f("cosine", "Learning-rate schedule after warmup: constant or cosine (to lr_min).",
                           choices=("constant", "cosine"))
    lr_min: float = _f(0.0, "Final learning rate of the cosine schedule.", min=0.0)
    warmup_steps: int = _f(0, "Linear warmup from 0 over this many optimiser steps.", min=0)
    max_steps: int = _f(0, "Stop after this many optimiser steps (0 = run `epochs` epochs).", min=0)
    epochs: float = _f(3.0, "Passes over the training data (supervised methods) or over the prompts "
                       "(onpolicy/minillm) when max_steps is 0.", min=0.0)
    batch_size: int = _f(8, "Micro-batch size per process (sequences per forward/backward).", min=1)
    gradient_accumulation_steps: int = _f(1, "Micro-batches accumulated per optimiser step.", min=1)
    max_grad_norm: float = _f(1.0, "Gradient-norm clipping (0 = off).", min=0.0)
    precision: str = _f("fp32", "Training precision: fp32, or bf16 mixed precision (fp32 master weights).",
                        choices=("fp32", "bf16"))
    teacher_dtype: str = _f("float32", "Teacher weights dtype: float32 or bfloat16 (it is never trained).",
                            choices=("float32", "bfloat16", "float16"))
    seed: int = _f(0, "Random seed (data order, initialisation of sampling).")
    chunk_size: int = _f(256, "Positions per chunk in full-vocabulary losses (memory is O(chunk x vocab)).",
                         min=1)
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory.")

    # Distillation (off-policy and on-policy divergences)
    kd_ratio: float = _f(0.5, "Weight of the distillation term: loss = (1 - kd_ratio) * CE + kd_ratio * "
                         "divergence (kd, seqkd, rkl, jsd, tvd, skl, srkl) and in L_PT.", min=0.0, max=1.0)
    divergence: str = _f("fkl", "Token-level divergence of the onpolicy method.", choices=DIVERGENCES)
    jsd_beta: float = _f(0.5, "Generalised JSD mixing weight beta (0 -> forward KL, 1 -> reverse KL).",
                         min=0.0, max=1.0)
    skew_alpha: float = _f(0.1, "Skew of DistiLLM's skl/srkl divergences.", min=0.0, max=1.0)
    onpolicy_fraction: float = _f(1.0, "onpolicy: probability that a step trains on fresh student samples "
                                  "(otherwise on ground truth) - GKD's lambda.", min=0.0, max=1.0)
    seqkd_data: str = _f("", "seqkd: JSONL of teacher responses (from `minillm generate`). Empty: "
                         "generated from train_data with the teacher and cached in output_dir.")

    # MiniLLM (Algorithm 1)
    teacher_mix_alpha: float = _f(0.2, "Teacher-mixed sampling: draw tokens from alpha*p + (1-alpha)*q "
                                  "(0 = pure student).", min=0.0, max=0.99)
    single_step: bool = _f(True, "Add the single-step term: exact token-level KL(q||p) over the vocabulary.")
    single_step_weighted: bool = _f(False, "Weight the single-step term by the importance weight (paper Eq. 7; "
                                    "the released code does not - with the token approximation both have the "
                                    "same expected gradient).")
    length_norm: bool = _f(True, "Length-normalise the long-term return (divide by the remaining tokens).")
    advantage: str = _f("lmops", "Long-term return: lmops (released code: includes r_t, gamma=0.95) or "
                        "paper (R_{t+1}, gamma=1).", choices=("lmops", "paper"))
    gamma: float = _f(0.95, "Discount of the long-term return (advantage=paper forces 1.0).", min=0.0, max=1.0)
    importance_weight: str = _f("token", "token: w_t = q(y_t)/p~(y_t) (paper Eq. 5, biased by design); prefix: "
                                "the exact product over the prefix with per-decision weights on the return "
                                "(unbiased, high variance).", choices=("token", "prefix"))
    clip_eps: float = _f(0.2, "PPO clipping of rho = q_theta / p~ (0 = no clipping).", min=0.0)
    reward_scaling: float = _f(0.5, "Rewards are divided by this before clipping (logging only after "
                               "whitening).", min=1e-6)
    reward_clip: float = _f(100.0, "Rewards are clipped to +-this (0 = off).", min=0.0)
    whiten_advantages: bool = _f(True, "Whiten advantages over the valid tokens of the round.")
    num_rollouts: int = _f(256, "Prompts sampled per round (all processes together).", min=1)
    rollout_batch_size: int = _f(16, "Prompts decoded together per generation call.", min=1)
    ppo_epochs: int = _f(4, "Passes over each round's rollouts with q_old fixed.", min=1)
    max_new_tokens: int = _f(256, "Maximum generated tokens per response (rollouts, validation, seqkd).", min=1)
    temperature: float = _f(1.0, "Sampling temperature (rollouts and validation).", min=1e-4)
    top_k: int = _f(0, "Top-k truncation (0 = off; not allowed with teacher mixing).", min=0)
    top_p: float = _f(1.0, "Nucleus truncation (1 = off; not allowed with teacher mixing).", min=0.0, max=1.0)
    pt_data: str = _f("", "Pretraining corpus for L_PT (.txt: documents separated by blank lines, or .jsonl "
                      "with `text`). Empty: no L_PT.")
    pt_seq_len: int = _f(512, "Length of the packed L_PT chunks.", min=2)
    lm_coef: float = _f(1.0, "Weight of L_PT in the total loss.", min=0.0)

    # Evaluation, checkpoints, logging
    eval_every: int = _f(0, "Validate every N optimiser steps (0 = only at the end of training).", min=0)
    eval_num_prompts: int = _f(100, "Validation prompts for generation-based validation (Rouge-L).", min=1)
    select_by: str = _f("auto", "Best-checkpoint metric: auto (sft/kd: valid loss; minillm/onpolicy: "
                        "valid Rouge-L), valid_loss, rougeL.", choices=("auto", "valid_loss", "rougeL"))
    save_every: int = _f(0, "Write a resumable checkpoint every N optimiser steps (0 = only at the end).",
                         min=0)
    keep_checkpoints: int = _f(2, "Resumable checkpoints kept on disk (newest first).", min=1)
    log_every: int = _f(1, "Log metrics every N optimiser steps.", min=1)
    resume: bool = _f(False, "Continue from the latest checkpoint in output_dir.")
    lora_r: int = _f(0, "LoRA rank for the student (0 = full fine-tuning; needs the peft extra).", min=0)
    lora_alpha: int = _f(32, "LoRA alpha.", min=1)
    lora_dropout: float = _f(0.0, "LoRA dropout.", min=0.0, max=1.0)

    def validate(self) -> None:
        if not self.student:
            raise ConfigError("`student` is required: a local HF folder, a .gguf file, a hub id or "
                              "smollm2-135m-instruct (set student=...).")
        if not self.train_data and not (self.method == "seqkd" and self.seqkd_data):
            raise ConfigError("`train_data` is required (an instruction JSONL file or a hub dataset name).")
        if self.method != "sft" and not self.teacher:
            raise ConfigError(f"method={self.method} needs a teacher: set teacher=... (or use method=sft).")
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(f"max_prompt_length ({self.max_prompt_length}) must be smaller than max_length "
                              f"({self.max_length}) so that responses have room.")
        if self.method in ("minillm", "onpolicy") and (self.top_k > 0 or self.top_p < 1.0):
            raise ConfigError(f"method={self.method} samples with the teacher in the loop, so top_k > 0 / top_p < 1 "
                              "are refused: a token drawn from the teacher part of the mixture could have zero "
                              "student probability (infinite importance weight), and a student token outside the "
                              "teacher's truncated support gets log p = -inf. Use top_k=0 top_p=1 (the paper's "
                              "rollout setting).")
        if self.method == "minillm" and self.num_rollouts < self.batch_size:
            raise ConfigError(f"num_rollouts ({self.num_rollouts}) must be at least batch_size "
                              f"({self.batch_size}).")


@dataclass
class GenerateConfig:
    """Options of `minillm generate`: sample or greedy-decode responses for an instruction file."""

    model: str = _f("", "Model to generate with (HF folder, .gguf, hub id, built-in name).")
    data: str = _f("", "Instruction JSONL (or hub dataset name) whose prompts are answered.")
    output: str = _f("", "Output JSONL: one record per example with prompt, response and settings.")
    template: str = _f("minillm", "Prompt format: minillm, chat or raw.", choices=("minillm", "chat", "raw"))
    max_prompt_length: int = _f(256, "Prompts longer than this are dropped.", min=1)
    max_new_tokens: int = _f(256, "Maximum generated tokens.", min=1)
    temperature: float = _f(1.0, "Sampling temperature.", min=1e-4)
    top_k: int = _f(0, "Top-k truncation (0 = off).", min=0)
    top_p: float = _f(1.0, "Nucleus truncation (1 = off).", min=0.0, max=1.0)
    no_repeat_ngram_size: int = _f(0, "Block repeated n-grams of this size (0 = off).", min=0)
    greedy: bool = _f(False, "Greedy decoding instead of sampling.")
    batch_size: int = _f(8, "Prompts decoded together.", min=1)
    seed: int = _f(0, "Sampling seed.")
    limit: int = _f(0, "Only the first N examples (0 = all).", min=0)
    dtype: str = _f("float32", "Model dtype.", choices=("float32", "bfloat16", "float16"))

    def validate(self) -> None:
        for key in ("model", "data", "output"):
            if not getattr(self, key):
                raise ConfigError(f"`{key}` is required (set {key}=...).")


@dataclass
class EvalConfig:
    """Options of `minillm evaluate`: generation-based evaluation over seeds (the paper's protocol)."""

    models: list = _f([], "Models to evaluate (comma-separated or a YAML list); name=path gives a label.")
    data: list = _f([], "Instruction JSONL files (or hub names) to evaluate on; the set name is the file stem.")
    output_dir: str = _f("runs/eval", "Where generations, results.json and results.md are written.")
    seeds: list = _f([10, 20, 30, 40, 50], "Sampling seeds (the paper averages 5).")
    max_new_tokens: int = _f(256, "Maximum generated tokens.", min=1)
    temperature: float = _f(1.0, "Sampling temperature.", min=1e-4)
    top_k: int = _f(0, "Top-k truncation (0 = off).", min=0)
    top_p: float = _f(1.0, "Nucleus truncation (1 = off).", min=0.0, max=1.0)
    no_repeat_ngram_size: int = _f(0, "Block repeated n-grams (paper-era numbers: effectively 0).", min=0)
    batch_size: int = _f(8, "Prompts decoded together.", min=1)
    limit: int = _f(0, "Only the first N examples of each set (0 = all).", min=0)
    template: str = _f("minillm", "Prompt format: minillm, chat or raw.", choices=("minillm", "chat", "raw"))
    max_prompt_length: int = _f(256, "Prompts longer than this are dropped.", min=1)
    dtype: str = _f("float32", "Model dtype.", choices=("float32", "bfloat16", "float16"))
    teacher: str = _f("", "Teacher, needed by exposure_bias and sequence_kl.")
    sequence_kl: bool = _f(False, "Also sequence-level reverse / forward KL of each model to the teacher, scored on "
                           "the generations (the teacher is evaluated too, as 'teacher'); needs temperature 1, "
                           "top_k 0, top_p 1, no_repeat_ngram_size 0 (else the samples are not from the model).")
    exposure_bias: bool = _f(False, "Also measure ExAccErr (needs teacher).")
    exposure_bias_samples: int = _f(1, "Samples per prompt for ExAccErr.", min=1)
    calibration: list = _f([], "Classification-style files (with `labels`) for ECE and reliability diagrams.")

    def validate(self) -> None:
        if not self.models:
            raise ConfigError("`models` is required (models=path1,path2 or models=[name=path]).")
        if not self.data and not self.calibration:
            raise ConfigError("`data` is required (data=file1.jsonl,file2.jsonl).")
        if self.exposure_bias and not self.teacher:
            raise ConfigError("exposure_bias=true needs teacher=...")
        if self.sequence_kl:
            if not self.teacher or not self.data:
                raise ConfigError("sequence_kl=true needs teacher=... and data=...")
            plain = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "no_repeat_ngram_size": 0}
            changed = {k: getattr(self, k) for k, v in plain.items() if getattr(self, k) != v}
            if changed:
                raise ConfigError(f"sequence_kl=true scores the generations as samples of the model, which needs "
                                  f"plain sampling; these settings change the distribution: {changed}")


# --------------------------------------------------------------------------------------------------
# Mechanics
# --------------------------------------------------------------------------------------------------

_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


def field_help(cls) -> dict[str, str]:
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def _base_type(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if origin is Literal:
        return str
    return origin or tp


def _convert(cls, f: dataclasses.Field, value: Any, where: str):
    tp = _base_type(typing.get_type_hints(cls)[f.name])
    name = f.name
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in _TRUE:
                return True
            if s in _FALSE:
                return False
            raise ValueError
        if tp is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is list:
            if isinstance(value, list):
                return value
            if isinstance(value, str):
                s = value.strip()
                if s.startswith("["):
                    return list(yaml.safe_load(s))
                items = [v.strip() for v in s.split(",") if v.strip()]
                return [yaml.safe_load(v) if v.lstrip("-").isdigit() else v for v in items]
            return [value]
        if tp is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return "" if value is None else str(value)
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise ConfigError(f"{where}: `{name}` expects {tp.__name__}, got {value!r}.")


def _check_range(f: dataclasses.Field, value: Any, where: str) -> None:
    md = f.metadata
    if "choices" in md and value not in md["choices"]:
        hint = difflib.get_close_matches(str(value), [str(c) for c in md["choices"]], n=1)
        extra = f" Did you mean '{hint[0]}'?" if hint else ""
        raise ConfigError(f"{where}: `{f.name}` must be one of {', '.join(md['choices'])}; got {value!r}.{extra}")
    if "min" in md and value < md["min"]:
        raise ConfigError(f"{where}: `{f.name}` must be >= {md['min']}; got {value!r}.")
    if "max" in md and value > md["max"]:
        raise ConfigError(f"{where}: `{f.name}` must be <= {md['max']}; got {value!r}.")


def unknown_key_error(cls, key: str, where: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    hint = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    msg = f"{where}: unknown option `{key}` for `{cls.__name__}`."
    if hint:
        msg += f" Did you mean `{hint[0]}`?"
    else:
        msg += " Run the command with --help to list the options."
    return ConfigError(msg)


def build_config(cls, yaml_path: str | None = None, overrides: dict[str, Any] | list[str] | None = None):
    """Resolve a config: dataclass defaults < YAML file < overrides (dict or `key=value` strings)."""
    values: dict[str, tuple[Any, str]] = {}
    if yaml_path:
        path = Path(yaml_path)
        if not path.is_file():
            raise ConfigError(f"config file {yaml_path} does not exist.")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{yaml_path}{line}: invalid YAML ({getattr(e, 'problem', e)}).") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{yaml_path}: expected a mapping of option: value at the top level.")
        for k, v in data.items():
            values[str(k).replace("-", "_")] = (v, f"{yaml_path}")
    if isinstance(overrides, list):
        parsed = {}
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"command line: expected key=value, got {item!r}.")
            k, v = item.split("=", 1)
            parsed[k.strip().lstrip("-").replace("-", "_")] = v
        overrides = parsed
    for k, v in (overrides or {}).items():
        values[k.replace("-", "_")] = (v, "command line")

    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, (v, where) in values.items():
        if k not in fields:
            raise unknown_key_error(cls, k, where)
        conv = _convert(cls, fields[k], v, where)
        _check_range(fields[k], conv, where)
        kwargs[k] = conv
    cfg = cls(**kwargs)
    for f in dataclasses.fields(cls):  # defaults must satisfy the ranges too
        if f.name not in kwargs:
            _check_range(f, getattr(cfg, f.name), "default")
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def config_to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg, out_dir: str | os.PathLike, name: str = "config.yaml") -> Path:
    """Write the resolved config (atomically) so every output records how it was produced."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)
    return path
