"""Configs of `minillm generate` and `minillm evaluate`; both sample through the one `SamplingConfig`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import ConfigError
from .options import Options, group, option
from .sampling import SamplingConfig, validate_plain_sampling

_TEMPLATES = ("minillm", "chat", "raw")
_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class GenerateConfig(Options):
    """Options of `minillm generate`: sample or greedy-decode responses for an instruction file."""

    model: str = option("", "Model to generate with (HF folder, .gguf, hub id, built-in name).")
    data: str = option("", "Instruction JSONL (or hub dataset name) whose prompts are answered.")
    output: str = option("", "Output JSONL: one record per example with prompt, response and settings.")
    template: str = option("minillm", "Prompt format: minillm, chat or raw.", choices=_TEMPLATES)
    max_prompt_length: int = option(256, "Prompts longer than this are dropped.", min=1)
    sampling: SamplingConfig = group(SamplingConfig, "How responses are decoded.")
    batch_size: int = option(8, "Prompts decoded together.", min=1)
    seed: int = option(0, "Sampling seed.")
    limit: int = option(0, "Only the first N examples (0 = all).", min=0)
    dtype: str = option("float32", "Model dtype.", choices=_DTYPES)

    def validate(self) -> None:
        for key in ("model", "data", "output"):
            if not getattr(self, key):
                raise ConfigError(f"`{key}` is required (set {key}=...).")
        super().validate()


@dataclass
class EvalConfig(Options):
    """Options of `minillm evaluate`: generation-based evaluation over seeds (the paper's protocol)."""

    refused: ClassVar[dict[str, str]] = {
        "sampling.greedy": "evaluation samples once per seed and averages over the seeds (the paper's "
                           "protocol); for greedy answers use `minillm generate greedy=true`.",
    }

    models: list = option([], "Models to evaluate (comma-separated or a YAML list); name=path gives a label.")
    data: list = option([], "Instruction JSONL files (or hub names) to evaluate on; the set name is the file "
                            "stem.")
    output_dir: str = option("runs/eval", "Where generations, results.json and results.md are written.")
    seeds: list = option([10, 20, 30, 40, 50], "Sampling seeds (the paper averages 5).")
    sampling: SamplingConfig = group(SamplingConfig, "How responses are sampled (paper-era numbers: no "
                                                     "n-gram ban).")
    batch_size: int = option(8, "Prompts decoded together.", min=1)
    limit: int = option(0, "Only the first N examples of each set (0 = all).", min=0)
    template: str = option("minillm", "Prompt format: minillm, chat or raw.", choices=_TEMPLATES)
    max_prompt_length: int = option(256, "Prompts longer than this are dropped.", min=1)
    dtype: str = option("float32", "Model dtype.", choices=_DTYPES)
    teacher: str = option("", "Teacher, needed by exposure_bias and sequence_kl.")
    sequence_kl: bool = option(False, "Also sequence-level reverse / forward KL of each model to the "
                                      "teacher, scored on the generations (the teacher is evaluated too, as "
                                      "'teacher'); needs plain sampling: temperature 1, top_k 0, top_p 1, "
                                      "no_repeat_ngram_size 0 (else the samples are not from the model).")
    exposure_bias: bool = option(False, "Also measure ExAccErr (needs teacher).")
    exposure_bias_samples: int = option(1, "Samples per prompt for ExAccErr.", min=1)
    calibration: list = option([], "Classification-style files (with `labels`) for ECE and reliability "
                                   "diagrams.")

    @classmethod
    def label(cls) -> str:
        return "`minillm evaluate` (EvalConfig)"

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
            validate_plain_sampling(self.sampling, "sequence_kl=true")
        super().validate()
