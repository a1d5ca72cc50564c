"""Training configs, grouped as TRL groups them: one base config, one subclass per method.

`TrainConfig` holds what every method reads (what to train and on which data, optimisation, precision,
validation with its sampling, checkpoints, logging, LoRA) and is the config of `method=sft`. Each method's
class adds only the options that method reads and documents only those:

    TrainConfig                      sft
      TeacherConfig                  (teacher, teacher_dtype: every method with a teacher)
        DistillConfig                kd, rkl, jsd, tvd, skl, srkl
        SeqKDConfig                  seqkd
        OnPolicyConfig               onpolicy
        MiniLLMConfig                minillm

`build_config(TrainConfig, ...)` and `TrainConfig(method=...)` return the class of `method` (see
`config_class`); an option of another method is refused with the method(s) it belongs to.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import ConfigError
from .engine import ENGINE_HELP, ENGINES, VLLMConfig, validate_engine_mixing, validate_engine_sampling
from .options import Options, group, option
from .paths import check_output_dir
from .sampling import SamplingConfig, validate_teacher_mix_alpha, validate_untruncated_sampling

METHODS = ("sft", "kd", "seqkd", "rkl", "jsd", "tvd", "skl", "srkl", "onpolicy", "minillm")
DIVERGENCES = ("fkl", "rkl", "jsd", "tvd", "skl", "srkl")
_METHOD_HELP = ("Training recipe: sft (no teacher), kd (word-level KD), seqkd (SFT on teacher samples), "
                "rkl/jsd/tvd/skl/srkl (token-level divergence on ground truth), onpolicy (token-level "
                "divergence on student samples, GKD-style), minillm (the paper).")


def _method(default: str):
    return option(default, _METHOD_HELP, choices=METHODS)


@dataclass
class TrainConfig(Options):
    """Options of every training method (`minillm sft` / `minillm distill`); the config of method=sft."""

    methods: ClassVar[tuple[str, ...]] = ("sft",)
    refused: ClassVar[dict[str, str]] = {
        "sampling.greedy": "training validates (and trains) on samples of the model; greedy decoding is "
                           "`minillm generate greedy=true`.",
        "sampling.no_repeat_ngram_size": "training samples from the model's own distribution, without an "
                                         "n-gram ban (it is an option of `minillm generate` / `evaluate`).",
    }

    # What to train, on which data
    method: str = _method("sft")
    student: str = option("", "Student model: local HF folder, .gguf file, hub id, or a built-in name "
                              "(smollm2-135m-instruct).")
    train_data: str = option("", "Instruction data: JSONL with instruction/input/output (or Dolly's "
                                 "instruction/context/response), or a hub dataset name.")
    valid_data: str = option("", "Validation instruction data (same format). Empty: hold out "
                                 "`valid_fraction` of train_data.")
    valid_fraction: float = option(0.1, "Fraction of train_data held out for validation when valid_data is "
                                        "empty.", min=0.0, max=0.9)
    output_dir: str = option("runs/minillm", "Where checkpoints, logs, metrics and the final model are "
                                             "written.")
    template: str = option("minillm", "Prompt format: minillm (the paper's Alpaca template), chat (the "
                                      "tokenizer's chat template), raw (instruction text only).",
                           choices=("minillm", "chat", "raw"))
    max_prompt_length: int = option(256, "Prompts longer than this (tokens) are dropped (counted in the "
                                         "log).", min=1)
    max_length: int = option(512, "Maximum prompt+response length in tokens for supervised batches.", min=2)
    limit_train: int = option(0, "Use only the first N training examples (0 = all).", min=0)

    # Optimisation and precision
    learning_rate: float = option(5e-4, "Peak learning rate (AdamW).", min=0.0)
    weight_decay: float = option(0.01, "AdamW weight decay.", min=0.0)
    adam_beta1: float = option(0.9, "AdamW beta1.", min=0.0, max=1.0)
    adam_beta2: float = option(0.999, "AdamW beta2.", min=0.0, max=1.0)
    adam_eps: float = option(1e-8, "AdamW epsilon.", min=0.0)
    lr_scheduler: str = option("cosine", "Learning-rate schedule after warmup: constant or cosine (to "
                                         "lr_min).", choices=("constant", "cosine"))
    lr_min: float = option(0.0, "Final learning rate of the cosine schedule.", min=0.0)
    warmup_steps: int = option(0, "Linear warmup from 0 over this many optimiser steps.", min=0)
    max_steps: int = option(0, "Stop after this many optimiser steps (0 = run `epochs` epochs).", min=0)
    epochs: float = option(3.0, "Passes over the training data (supervised methods) or over the prompts "
                                "(onpolicy/minillm) when max_steps is 0.", min=0.0)
    batch_size: int = option(8, "Micro-batch size per process (sequences per forward/backward).", min=1)
    gradient_accumulation_steps: int = option(1, "Micro-batches accumulated per optimiser step.", min=1)
    max_grad_norm: float = option(1.0, "Gradient-norm clipping (0 = off).", min=0.0)
    precision: str = option("fp32", "Training precision: fp32, or bf16 mixed precision (fp32 master "
                                    "weights).", choices=("fp32", "bf16"))
    seed: int = option(0, "Random seed (data order, initialisation of sampling).")
    chunk_size: int = option(256, "Positions per chunk in full-vocabulary losses (memory is O(chunk x "
                                  "vocab)).", min=1)
    gradient_checkpointing: bool = option(False, "Recompute each decoder layer's activations in backward to "
                                                 "save memory (every method; dropout stays off for "
                                                 "minillm).")

    # Sharding (several processes: accelerate launch / torchrun)
    fsdp: bool = option(False, "Shard the student with PyTorch FSDP2 (fully_shard per decoder layer) over "
                               "all processes instead of replicating it (DDP). Also switched on by an "
                               "Accelerate config with distributed_type FSDP and fsdp_version 2.")
    fsdp_mixed_precision: bool = option(False, "With fsdp: FSDP2's mixed-precision policy - bf16 parameters "
                                               "for compute, fp32 gradient reduction, fp32 sharded master "
                                               "weights.")

    # Validation
    eval_every: int = option(0, "Validate every N optimiser steps (0 = only at the end of training).", min=0)
    eval_num_prompts: int = option(100, "Validation prompts for generation-based validation (Rouge-L).",
                                        min=1)
    select_by: str = option("auto", "Best-checkpoint metric: auto (sft/kd: valid loss; minillm/onpolicy: "
                                    "valid Rouge-L), valid_loss, rougeL.",
                                    choices=("auto", "valid_loss", "rougeL"))
    sampling: SamplingConfig = group(SamplingConfig, "How text is sampled: by generation-based validation, "
                                                     "by the minillm/onpolicy rollouts and (max_new_tokens "
                                                     "only) for seqkd's teacher samples.")
    rollout_batch_size: int = option(16, "Prompts decoded together per generation call (validation, minillm "
                                         "rollouts, seqkd's teacher samples).", min=1)
    rollout_engine: str = option("hf", "Engine of the samples where one model samples alone: minillm "
                                       "with teacher_mix_alpha=0 and onpolicy rollouts, generation-based "
                                       "validation, seqkd's teacher samples. " + ENGINE_HELP,
                                 choices=ENGINES)
    vllm: VLLMConfig = group(VLLMConfig, "The vLLM engine (rollout_engine=vllm): its python, memory and "
                                         "timeouts.")

    # Checkpoints and logging
    save_every: int = option(0, "Write a resumable checkpoint every N optimiser steps (0 = only at the end).",
                             min=0)
    keep_checkpoints: int = option(2, "Resumable checkpoints kept on disk (newest first).", min=1)
    log_every: int = option(1, "Log metrics every N optimiser steps.", min=1)
    report_to: list = option(["tensorboard"], "Experiment trackers (Accelerate's tracker API), a list: "
                                              "tensorboard (in output_dir/tensorboard), wandb, mlflow; none "
                                              "for metrics.jsonl only (always written).")
    tracker_project: str = option("minillm", "Project (W&B) or experiment (MLflow) the run is logged under; "
                                             "the run is named after output_dir.")
    resume: bool = option(False, "Continue from the latest checkpoint in output_dir.")
    overwrite: bool = option(False, "Start a new run in an output_dir that holds another run or other files: "
                                    "the old content is moved aside to <output_dir>.replaced-<time> (nothing "
                                    "is deleted).")

    # LoRA
    lora_r: int = option(0, "LoRA rank for the student (0 = full fine-tuning; needs the peft extra).", min=0)
    lora_alpha: int = option(32, "LoRA alpha.", min=1)
    lora_dropout: float = option(0.0, "LoRA dropout.", min=0.0, max=1.0)

    @classmethod
    def class_for(cls, values: dict[str, Any]) -> type:
        method = values.get("method", cls.method)
        if not isinstance(method, str) or method not in METHOD_CONFIGS:  # e.g. `method: [kd]` in YAML
            return cls  # the `method` field's choices name the methods (with a "did you mean")
        target = config_class(method)
        if issubclass(target, cls):
            return target
        if method in cls.methods:  # a subclass of the method's class
            return cls
        raise ConfigError(f"method={method} is configured by {target.__name__}, not {cls.__name__}.")

    @classmethod
    def related(cls) -> list[type]:
        return [c for c in dict.fromkeys(METHOD_CONFIGS.values()) if c is not cls]

    @classmethod
    def label(cls) -> str:
        return f"method={'/'.join(cls.methods)} ({cls.__name__})"

    def has_train_data(self) -> bool:
        return bool(self.train_data)

    def validate(self) -> None:
        if self.method not in self.methods:
            raise ConfigError(f"method={self.method} is configured by {config_class(self.method).__name__}, "
                              f"not {type(self).__name__} (build_config(TrainConfig, ...) picks the class).")
        if not self.student:
            raise ConfigError("`student` is required: a local HF folder, a .gguf file, a hub id or "
                              "smollm2-135m-instruct (set student=...).")
        if not self.has_train_data():
            raise ConfigError("`train_data` is required (an instruction JSONL file or a hub dataset name).")
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(f"max_prompt_length ({self.max_prompt_length}) must be smaller than max_length "
                              f"({self.max_length}) so that responses have room.")
        super().validate()
        validate_engine_sampling(self.rollout_engine, self.sampling, "rollout_engine")
        check_trackers(self.report_to)
        # a file in the way is refused before any model is loaded; whether the folder is writable is checked
        # when the run starts (`minillm plan` reads configs written for another machine)
        check_output_dir(self.output_dir, "output_dir", writable=False)


TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # name -> module it needs


def check_trackers(names: list) -> None:
    """`report_to`: known tracker names whose package is installed, or `none` alone."""
    names = [str(n) for n in names]
    if "none" in names:
        if len(names) > 1:
            raise ConfigError(f"report_to={','.join(names)}: `none` cannot be combined with a tracker.")
        return
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"report_to: unknown tracker {name!r}; choose from "
                              f"{', '.join([*TRACKERS, 'none'])}.")
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise ConfigError(f"report_to={name} needs the {TRACKERS[name]} package, which is not installed "
                              f"(pip install {TRACKERS[name]}), or leave {name} out of report_to.")


@dataclass
class TeacherConfig(TrainConfig):
    """The teacher of every distillation method."""

    methods: ClassVar[tuple[str, ...]] = ()

    teacher: str = option("", "Teacher model (same forms as `student`). Required.")
    teacher_dtype: str = option("float32", "Teacher weights dtype: float32 or bfloat16 (it is never "
                                           "trained).", choices=("float32", "bfloat16", "float16"))
    teacher_sharding: str = option("auto", "With fsdp: shard the teacher over the processes too (shard; "
                                           "no optimizer state, each layer all-gathered when used), keep a "
                                           "whole copy on each (replicate), or auto: shard when its weights "
                                           "take more than half of one GPU's memory.",
                                   choices=("auto", "shard", "replicate"))

    def validate(self) -> None:
        super().validate()
        accelerate_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true", "yes")
        if self.teacher_sharding == "shard" and not (self.fsdp or accelerate_fsdp):
            raise ConfigError("teacher_sharding=shard needs fsdp=true (the teacher is sharded with FSDP2).")
        if not self.teacher:
            raise ConfigError(f"method={self.method} needs a teacher: set teacher=... (or use method=sft).")


@dataclass
class DivergenceOptions:
    """Parameters of the divergence menu (shared by the off-policy and on-policy token-level methods)."""

    jsd_beta: float = option(0.5, "jsd: generalised JSD mixing weight beta (0 -> forward KL, 1 -> reverse "
                                  "KL).", min=0.0, max=1.0)
    skew_alpha: float = option(0.1, "skl/srkl: skew of DistiLLM's skewed KL divergences.", min=0.0, max=1.0)


@dataclass
class DistillConfig(DivergenceOptions, TeacherConfig):
    """Word-level KD (kd = forward KL) and the token-level divergence menu on the dataset's responses."""

    methods: ClassVar[tuple[str, ...]] = ("kd", "rkl", "jsd", "tvd", "skl", "srkl")

    method: str = _method("kd")
    kd_ratio: float = option(0.5, "Weight of the distillation term: loss = (1 - kd_ratio) * CE + kd_ratio * "
                                  "divergence.", min=0.0, max=1.0)


@dataclass
class SeqKDConfig(TeacherConfig):
    """SeqKD: SFT on the teacher's own samples for the training prompts (plain sampling at temperature 1)."""

    methods: ClassVar[tuple[str, ...]] = ("seqkd",)

    method: str = _method("seqkd")
    seqkd_data: str = option("", "JSONL of teacher responses (from `minillm generate`). Empty: generated "
                                 "from train_data with the teacher and cached in output_dir.")

    def has_train_data(self) -> bool:
        return bool(self.train_data or self.seqkd_data)


@dataclass
class OnPolicyConfig(DivergenceOptions, TeacherConfig):
    """On-policy token-level distillation (GKD): a divergence on fresh student samples."""

    methods: ClassVar[tuple[str, ...]] = ("onpolicy",)

    method: str = _method("onpolicy")
    divergence: str = option("fkl", "Token-level divergence between teacher and student.",
                                    choices=DIVERGENCES)
    onpolicy_fraction: float = option(1.0, "Probability that a step trains on fresh student samples "
                                           "(otherwise on ground truth) - GKD's lambda.", min=0.0, max=1.0)

    def validate(self) -> None:
        super().validate()
        validate_untruncated_sampling(self.sampling, "method=onpolicy")


@dataclass
class MiniLLMConfig(TeacherConfig):
    """MiniLLM (Algorithm 1 of the paper): sequence-level reverse KL by policy gradient, plus L_PT."""

    methods: ClassVar[tuple[str, ...]] = ("minillm",)

    method: str = _method("minillm")
    teacher_mix_alpha: float = option(0.2, "Teacher-mixed sampling: draw tokens from alpha*p + (1-alpha)*q, "
                                           "alpha in [0, 1) (0 = pure student).")
    single_step: bool = option(True, "Add the single-step term: exact token-level KL(q||p) over the "
                                     "vocabulary.")
    single_step_weighted: bool = option(False, "Weight the single-step term by the importance weight (paper "
                                               "Eq. 7; the released code does not - with the token "
                                               "approximation both have the same expected gradient).")
    length_norm: bool = option(True, "Length-normalise the long-term return (divide by the remaining "
                                     "tokens).")
    advantage: str = option("lmops", "Long-term return: lmops (released code: includes r_t, gamma=0.95) or "
                                     "paper (R_{t+1}, gamma=1).", choices=("lmops", "paper"))
    gamma: float = option(0.95, "Discount of the long-term return (advantage=paper forces 1.0).", min=0.0,
                          max=1.0)
    importance_weight: str = option("token", "token: w_t = q(y_t)/p~(y_t) (paper Eq. 5, biased by design); "
                                             "prefix: the exact product over the prefix with per-decision "
                                             "weights on the return (unbiased, high variance).",
                                    choices=("token", "prefix"))
    clip_eps: float = option(0.2, "PPO clipping of rho = q_theta / p~ (0 = no clipping).", min=0.0)
    reward_scaling: float = option(0.5, "Rewards are divided by this before clipping (logging only after "
                                        "whitening).", min=1e-6)
    reward_clip: float = option(100.0, "Rewards are clipped to +-this (0 = off).", min=0.0)
    whiten_advantages: bool = option(True, "Whiten advantages over the valid tokens of the round.")
    num_rollouts: int = option(256, "Prompts sampled per round (all processes together).", min=1)
    ppo_epochs: int = option(4, "Passes over each round's rollouts with q_old fixed.", min=1)
    pt_data: str = option("", "Pretraining corpus for L_PT (.txt: documents separated by blank lines, or "
                              ".jsonl with `text`). Empty: no L_PT.")
    pt_seq_len: int = option(512, "Length of the packed L_PT chunks.", min=2)
    lm_coef: float = option(1.0, "Weight of L_PT in the total loss.", min=0.0)
    kd_ratio: float = option(0.5, "L_PT = (1 - kd_ratio) * CE + kd_ratio * KL(p || q) on the pretraining "
                                  "chunks (0 = plain language modelling).", min=0.0, max=1.0)

    def validate(self) -> None:
        super().validate()
        validate_teacher_mix_alpha(self.teacher_mix_alpha)
        validate_untruncated_sampling(self.sampling, "method=minillm")
        validate_engine_mixing(self.rollout_engine, self.teacher_mix_alpha)
        if self.num_rollouts < self.batch_size:
            raise ConfigError(f"num_rollouts ({self.num_rollouts}) must be at least batch_size "
                              f"({self.batch_size}).")


METHOD_CONFIGS: dict[str, type[TrainConfig]] = {
    "sft": TrainConfig, "seqkd": SeqKDConfig, "onpolicy": OnPolicyConfig, "minillm": MiniLLMConfig,
    **{m: DistillConfig for m in DistillConfig.methods},
}


def config_class(method: str) -> type[TrainConfig]:
    """The config class of a training method: `config_class("minillm") is MiniLLMConfig`."""
    if method not in METHOD_CONFIGS:
        hint = difflib.get_close_matches(str(method), METHODS, n=1)
        extra = f" Did you mean '{hint[0]}'?" if hint else ""
        raise ConfigError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}.{extra}")
    return METHOD_CONFIGS[method]
