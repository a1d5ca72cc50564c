"""Configs of `minillm generate` and `minillm evaluate`; both sample through the one `SamplingConfig`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePath
from typing import ClassVar

from ..errors import ConfigError
from ..evaluation.protocol import PROTOCOLS, PUBLISHED_CHOICES, check_published, check_settings
from .engine import ENGINE_HELP, ENGINES, VLLMConfig, validate_engine_sampling
from .options import Options, group, option
from .paths import check_output_dir, check_output_file
from .sampling import SamplingConfig, validate_plain_sampling

_TEMPLATES = ("minillm", "chat", "raw")
_DTYPES = ("float32", "bfloat16", "float16")


def _path_parts(path: str) -> list[str]:
    """The named components of a model path / hub id, innermost last (no root, no "." or "..")."""
    parts = PurePath(path.rstrip("/")).parts
    return [p for p in parts if p not in ("/", ".", "..") and not p.endswith(("/", "\\"))]


def _default_label(path: str) -> str:
    """The label of an unnamed model: its folder name (runs/x/best -> x-best), or the built-in name."""
    parts = _path_parts(path)
    label = parts[-1] if parts else path
    if label in ("best", "final") and len(parts) > 1:
        label = f"{parts[-2]}-{label}"
    return label


def model_labels(specs) -> dict[str, str]:
    """Label -> path of `models=` entries (`name=path` or `path`), every label unique, nothing dropped.

    An unnamed model is labelled by its folder name (`runs/x/best` -> `x-best`); when that collides with
    another label (`a/student`, `b/student`), parent folder names are prefixed until it is unique
    (`a-student`, `b-student`), deterministically. A model listed twice, or an explicit `name=` used twice,
    is refused.
    """
    entries: list[tuple[str, str]] = []  # (explicit name or "", path), in the given order
    seen_paths: dict[str, str] = {}
    for spec in specs:
        spec = str(spec)
        name, _, path = spec.partition("=") if "=" in spec else ("", "", spec)
        if path in seen_paths:
            raise ConfigError(f"models: {path!r} is listed twice ({seen_paths[path]!r} and {spec!r}); list "
                              "each model once (give another copy its own folder to compare it with itself).")
        seen_paths[path] = spec
        entries.append((name, path))
    named: dict[str, str] = {}
    for name, path in entries:
        if name and name in named:
            raise ConfigError(f"models: the label {name!r} is given to both {named[name]!r} and {path!r}; "
                              "give each model its own label (name=path).")
        if name:
            named[name] = path
    unnamed = [path for name, path in entries if not name]
    depth = dict.fromkeys(unnamed, 0)  # parent folders prefixed to the default label

    def label(path: str) -> str:
        parts = _path_parts(path)
        base = _default_label(path)
        used = 2 if parts and base != parts[-1] else 1  # runs/x/best -> x-best uses two parts
        parents = parts[:-used] if len(parts) > used else []
        k = min(depth[path], len(parents))
        return "-".join([*parents[len(parents) - k:], base])

    while True:
        labels = {path: label(path) for path in unnamed}
        counts: dict[str, int] = {}
        for lab in labels.values():
            counts[lab] = counts.get(lab, 0) + 1
        clash = [p for p, lab in labels.items() if counts[lab] > 1 or lab in named]
        if not clash:
            break
        grown = False
        for p in clash:
            before = labels[p]
            depth[p] += 1
            grown |= label(p) != before
        if not grown:  # no parent folder left to tell them apart
            p = clash[0]
            other = next((q for q in unnamed if q != p and labels[q] == labels[p]), None) or named[labels[p]]
            raise ConfigError(f"models: {p!r} and {other!r} would both be labelled {labels[p]!r} (the label "
                              f"names the output folder); name them: models={labels[p]}-1={p},"
                              f"{labels[p]}-2={other}.")
    return {(name or labels[path]): path for name, path in entries}


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
    engine: str = option("hf", "Engine that generates. " + ENGINE_HELP, choices=ENGINES)
    vllm: VLLMConfig = group(VLLMConfig, "The vLLM engine (engine=vllm): its python, memory and timeouts.")

    def validate(self) -> None:
        for key in ("model", "data", "output"):
            if not getattr(self, key):
                raise ConfigError(f"`{key}` is required (set {key}=...).")
        super().validate()
        validate_engine_sampling(self.engine, self.sampling, "engine")
        check_output_file(self.output, "output")  # before the model is loaded and anything generated


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
    engine: str = option("hf", "Engine of the evaluation's generations (exposure_bias always samples with "
                               "hf). " + ENGINE_HELP, choices=ENGINES)
    vllm: VLLMConfig = group(VLLMConfig, "The vLLM engine (engine=vllm): its python, memory and timeouts.")
    teacher: str = option("", "Teacher, needed by exposure_bias and sequence_kl.")
    sequence_kl: bool = option(False, "Also sequence-level reverse / forward KL of each model to the "
                                      "teacher, scored on the generations (the teacher is evaluated too, as "
                                      "'teacher'); needs plain sampling: temperature 1, top_k 0, top_p 1, "
                                      "no_repeat_ngram_size 0 (else the samples are not from the model).")
    exposure_bias: bool = option(False, "Also measure ExAccErr (needs teacher).")
    exposure_bias_samples: int = option(1, "Samples per prompt for ExAccErr.", min=1)
    calibration: list = option([], "Classification-style files (with `labels`) for ECE and reliability "
                                   "diagrams.")
    protocol: str = option("none", "minillm: evaluate exactly as the MiniLLM paper's Table 1 (seeds 10-50, "
                                   "temperature 1, no top-k/top-p/n-gram ban, <= 256 new tokens, prompts "
                                   "<= 256 tokens, the minillm template, no limit; other values are "
                                   "refused) on its sets (dolly, selfinst, vicuna, sni, unni: by `set` "
                                   "field, file name or `source` field), with the paper's published numbers "
                                   "beside ours. none: any settings.", choices=PROTOCOLS)
    published: str = option("auto", "protocol=minillm: which published Table 1 block to show: auto (the "
                                    "student size nearest to the smallest model evaluated), none, or one of "
                                    "gpt2-120m, gpt2-760m, opt-1.3b, opt-6.7b, llama-7b.",
                            choices=PUBLISHED_CHOICES)

    @classmethod
    def label(cls) -> str:
        return "`minillm evaluate` (EvalConfig)"

    def validate(self) -> None:
        if not self.models:
            raise ConfigError("`models` is required (models=path1,path2 or models=[name=path]).")
        # Labels name the output folders: unnamed models whose folder names collide are named here
        # (a/student, b/student -> a-student=a/student, b-student=b/student) so none is dropped; the
        # names are kept in the config (and config.yaml), so every reader of `models` sees the same labels.
        labels = {path: label for label, path in model_labels(self.models).items()}
        self.models = [spec if "=" in str(spec) or _default_label(str(spec)) == labels[str(spec)]
                       else f"{labels[str(spec)]}={spec}" for spec in self.models]
        if not self.data and not self.calibration:
            raise ConfigError("`data` is required (data=file1.jsonl,file2.jsonl).")
        if self.exposure_bias and not self.teacher:
            raise ConfigError("exposure_bias=true needs teacher=...")
        if self.sequence_kl:
            if not self.teacher or not self.data:
                raise ConfigError("sequence_kl=true needs teacher=... and data=...")
            validate_plain_sampling(self.sampling, "sequence_kl=true")
        super().validate()
        validate_engine_sampling(self.engine, self.sampling, "engine")
        self._check_protocol()
        check_output_dir(self.output_dir, "output_dir")  # before any model is loaded

    def _check_protocol(self) -> None:
        """protocol=minillm: refuse every option that contradicts the paper's evaluation, by its name."""
        check_published(self.protocol, self.published)
        if self.protocol == "none":
            return
        if not self.data:
            raise ConfigError("protocol=minillm needs data=... (one or more of the paper's test sets: dolly, "
                              "selfinst, vicuna, sni, unni).")
        s = self.sampling
        keys = ("temperature", "top_k", "top_p", "max_new_tokens", "no_repeat_ngram_size")
        values = {**{k: getattr(s, k) for k in keys}, "seeds": self.seeds, "template": self.template,
                  "max_prompt_length": self.max_prompt_length, "limit": self.limit}
        check_settings(values, {k: f"sampling.{k}" for k in keys})
