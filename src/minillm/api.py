"""Python API: the functions behind the CLI commands.

    from minillm import MiniLLMConfig, train
    best = train(MiniLLMConfig(student="runs/sft/best", teacher="smollm2-135m-instruct",
                               train_data="dolly.jsonl", output_dir="runs/minillm"))

(`TrainConfig(method="minillm", ...)` gives the same `MiniLLMConfig`.)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from accelerate import PartialState

from .algorithms import build_algorithm
from .algorithms.common import split_train_valid
from .config import (
    EvalConfig,
    GenerateConfig,
    SamplingConfig,
    SeqKDConfig,
    TeacherConfig,
    TrainConfig,
    save_config,
)
from .data import InstructionExample, PromptDataset, build_prompt, load_instructions
from .errors import ConfigError, DataError
from .evaluation.calibration import evaluate_calibration, reliability_diagram
from .evaluation.exposure_bias import measure_exposure_bias, plot_exposure_bias
from .evaluation.runner import check_names, evaluate_models
from .evaluation.sequence_kl import kl_from_generations, teacher_self_logprobs
from .generation import finished_records, generate_file, job_settings
from .io import read_jsonl, write_text
from .models import check_compatibility, load_model, load_tokenizer
from .ownership import claim_output_dir
from .preflight import check_context, check_disk, check_embeddings, generation_length, training_lengths
from .resume import check_resume_config
from .sampling.vllm_client import find_vllm_python
from .sampling.vllm_rollout import engine_sampler
from .trainer import Trainer

logger = logging.getLogger("minillm")


def load_pair(cfg: TrainConfig):
    """Student (+ teacher, for a method with one) and tokenizer, with the teacher/student compatibility
    check."""
    tokenizer = load_tokenizer(cfg.student)
    student = load_model(cfg.student, dtype="float32")
    teacher, shared = None, None
    if isinstance(cfg, TeacherConfig) and cfg.teacher:
        teacher = load_model(cfg.teacher, dtype=cfg.teacher_dtype)
        teacher_tok = load_tokenizer(cfg.teacher)
        shared = check_compatibility(teacher_tok, tokenizer, teacher, student)
    return student, teacher, tokenizer, shared


def seqkd_examples(cfg: SeqKDConfig, teacher, tokenizer, examples):
    """Teacher samples for the training prompts (cached in output_dir), as SFT targets (SeqKD, Kim & Rush
    2016, the paper's baseline).

    The teacher samples plainly at temperature 1 (no top-k / top-p), whatever `cfg.sampling` says about
    validation; only `cfg.sampling.max_new_tokens` caps the samples.
    """
    path = Path(cfg.seqkd_data) if cfg.seqkd_data else Path(cfg.output_dir) / "seqkd_teacher_data.jsonl"
    sampling = SamplingConfig(max_new_tokens=cfg.sampling.max_new_tokens)
    engine_name = cfg.rollout_engine
    if cfg.seqkd_data and not path.exists():
        raise ConfigError(f"seqkd_data={cfg.seqkd_data} does not exist (create it with `minillm generate`).")
    if not cfg.seqkd_data and path.exists():
        # The run's own cache: reused only when this teacher (by content), these prompts and these settings
        # made it; otherwise the teacher or the data changed under the run, which a resume may not do.
        dataset = PromptDataset(examples, tokenizer, template=cfg.template,
                                max_prompt_length=cfg.max_prompt_length)
        settings = job_settings(teacher, dataset, sampling, template=cfg.template, seed=cfg.seed,
                                model_name=cfg.teacher, engine=engine_name)
        ok, reason = finished_records(path, dataset, settings)
        if not ok:
            raise ConfigError(f"{path} (this run's SeqKD teacher data) was not made by this teacher from "
                              f"these prompts with these settings ({reason}): the teacher at {cfg.teacher} "
                              "or the training data changed since the run started. Start a new run (a new "
                              "output_dir, or overwrite=true), or restore the teacher and data it used.")
    if not path.exists():
        logger.info("SeqKD: sampling the teacher's responses for %d prompts into %s", len(examples), path)
        with engine_sampler(engine_name, cfg.vllm, dtype=cfg.teacher_dtype,
                            max_model_len=cfg.max_prompt_length + sampling.max_new_tokens,
                            log_path=str(Path(cfg.output_dir) / "vllm_seqkd.log")) as engine:
            generate_file(teacher, tokenizer, examples, path, template=cfg.template,
                          max_prompt_length=cfg.max_prompt_length, sampling=sampling,
                          batch_size=cfg.rollout_batch_size, seed=cfg.seed, model_name=cfg.teacher,
                          desc="seqkd data", engine=engine)
    out = []
    for line, rec in enumerate(read_jsonl(path), start=1):
        response = rec.get("response") if isinstance(rec, dict) else None
        if not isinstance(response, str):
            raise DataError(f"{path}:{line}: a SeqKD record needs a `response` string (the teacher's answer; "
                            "`minillm generate` writes such files)")
        out.append(InstructionExample(instruction=rec.get("instruction", ""), input=rec.get("input", ""),
                                      outputs=[response], id=str(rec.get("id", len(out))),
                                      extra={"teacher_response": True}))
    return out


def train(cfg: TrainConfig, accelerator=None) -> Path:
    """Run `cfg.method`; returns the folder of the selected model (a plain Hugging Face folder)."""
    cfg.validate()
    if cfg.rollout_engine == "vllm":
        find_vllm_python(cfg.vllm.python)  # a missing vLLM environment fails before any model is loaded
    check_resume_config(cfg)  # before any expensive work: a resume may not change what the run is
    with claim_output_dir(cfg, "train"):  # one run per output_dir: locked, recorded, never mixed
        return _train(cfg, accelerator)


def _train(cfg: TrainConfig, accelerator) -> Path:
    student, teacher, tokenizer, shared = load_pair(cfg)
    lengths = training_lengths(cfg)
    for role, model in (("student", student), ("teacher", teacher)):
        if model is not None:
            check_context(model, role, lengths)
            check_embeddings(model, tokenizer, role)
    limit = cfg.limit_train or None
    train_examples = load_instructions(cfg.train_data, limit=limit) if cfg.train_data else []
    valid_examples = load_instructions(cfg.valid_data) if cfg.valid_data else None
    train_examples, valid_examples = split_train_valid(train_examples, valid_examples, cfg.valid_fraction,
                                                       cfg.seed)
    if cfg.method == "seqkd":  # several processes: the main one samples the teacher data, the others read it
        with PartialState(cpu=not torch.cuda.is_available()).main_process_first():
            train_examples = seqkd_examples(cfg, teacher, tokenizer, train_examples)
    algorithm = build_algorithm(cfg.method, train_examples, valid_examples, cfg)
    trainer = Trainer(cfg, student, tokenizer, algorithm, teacher=teacher, shared_vocab_size=shared,
                      accelerator=accelerator)
    if trainer.accelerator.is_main_process:  # before the first step: room for what the run will write
        check_disk(Path(cfg.output_dir), student, cfg, trainer.total_steps)
    return trainer.train()


def generate(cfg: GenerateConfig) -> Path:
    """`minillm generate`: answer every prompt of `cfg.data` (a resumable JSONL, settings alongside)."""
    cfg.validate()
    if cfg.engine == "vllm":
        find_vllm_python(cfg.vllm.python)  # before the model is loaded
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, dtype=cfg.dtype)
    check_embeddings(model, tokenizer, "generating")
    check_context(model, "generating",
                  generation_length("max_prompt_length", cfg.max_prompt_length, cfg.sampling.max_new_tokens))
    examples = load_instructions(cfg.data, limit=cfg.limit or None, require_output=False)
    with engine_sampler(cfg.engine, cfg.vllm, dtype=cfg.dtype,
                        max_model_len=cfg.max_prompt_length + cfg.sampling.max_new_tokens) as engine:
        out = generate_file(model, tokenizer, examples, cfg.output, template=cfg.template,
                            max_prompt_length=cfg.max_prompt_length, sampling=cfg.sampling,
                            batch_size=cfg.batch_size, seed=cfg.seed, model_name=cfg.model, engine=engine)
    save_config(cfg, Path(cfg.output).parent, name=Path(cfg.output).stem + ".config.yaml")
    return out


def _model_labels(specs: list) -> dict[str, str]:
    """`name=path` or `path` (label = the folder name, or the built-in name)."""
    out: dict[str, str] = {}
    for spec in specs:
        spec = str(spec)
        name, _, path = spec.partition("=") if "=" in spec else ("", "", spec)
        label = name or Path(path.rstrip("/")).name or path
        if label in ("best", "final"):  # runs/x/best -> x-best
            label = f"{Path(path.rstrip('/')).parent.name}-{label}"
        out[label] = path
    return out


def evaluate(cfg: EvalConfig) -> Path:
    """`minillm evaluate`: Rouge-L etc. over seeds, plus optional exposure bias / calibration."""
    cfg.validate()
    if cfg.engine == "vllm":
        find_vllm_python(cfg.vllm.python)  # before any model is loaded
    out = Path(cfg.output_dir)
    save_config(cfg, out)
    models = _model_labels(cfg.models)
    teacher_label = None
    if cfg.sequence_kl:  # the teacher's own generations give the forward KL
        teacher_label = next((k for k, v in models.items() if v == str(cfg.teacher)), None)
        if teacher_label is None:
            if "teacher" in models:
                raise ConfigError(f"sequence_kl=true adds the teacher as model 'teacher', but that label is "
                                  f"already {models['teacher']!r}; name that model otherwise (name=path)")
            teacher_label = "teacher"
            models = {**models, "teacher": str(cfg.teacher)}
    if cfg.data:
        s = cfg.sampling
        evaluate_models(models, [str(d) for d in cfg.data], str(out), seeds=tuple(int(x) for x in cfg.seeds),
                        max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
                        top_p=s.top_p, no_repeat_ngram_size=s.no_repeat_ngram_size, batch_size=cfg.batch_size,
                        limit=cfg.limit or None, template=cfg.template,
                        max_prompt_length=cfg.max_prompt_length, dtype=cfg.dtype, protocol=cfg.protocol,
                        published=cfg.published, engine=cfg.engine, vllm=cfg.vllm)
        # the printed table: Rouge-L / exact match / length / Dist-4 per set (and the published rows)
        logger.info("evaluation results (%s):\n%s", out / "results.md", (out / "results.md").read_text())
    if teacher_label is not None:
        _sequence_kl(cfg, models, teacher_label, out)
    if cfg.exposure_bias:
        _exposure_bias(cfg, models, out)
    if cfg.calibration:
        _calibration(cfg, models, out)
    return out


def _sequence_kl(cfg, models: dict[str, str], teacher_label: str, out: Path) -> None:
    """Reverse / forward sequence KL of each model to the teacher from the generations just written."""
    teacher = load_model(str(cfg.teacher), dtype=cfg.dtype)
    teacher_tok = load_tokenizer(str(cfg.teacher))
    seeds = [int(s) for s in cfg.seeds]
    sets = check_names(models, [str(d) for d in cfg.data], cfg.protocol)
    results: dict[str, dict] = {}
    lines = ["| model | set | reverse KL | forward KL | reverse KL / token | length |",
             "|---|---|---|---|---|---|"]
    self_logp: dict[tuple, dict] = {}  # (set, shared vocab) -> the teacher's log p of its own samples
    for label, path in models.items():
        if label == teacher_label:
            continue
        tok = load_tokenizer(path)
        student = load_model(path, dtype=cfg.dtype)
        shared = check_compatibility(teacher_tok, tok, teacher, student)
        for set_name, source in sets.items():
            files = {m: {s: out / m / set_name / f"seed{s}.jsonl" for s in seeds}
                     for m in (label, teacher_label)}
            examples = load_instructions(source, limit=cfg.limit or None)
            kw = {"template": cfg.template, "max_prompt_length": cfg.max_prompt_length,
                  "batch_size": cfg.batch_size, "shared_vocab_size": shared}
            if (set_name, shared) not in self_logp:
                self_logp[set_name, shared] = teacher_self_logprobs(teacher, tok, examples,
                                                                    files[teacher_label], **kw)
            r = kl_from_generations(student, teacher, tok, examples, files[label], files[teacher_label],
                                    name=label, teacher_logprobs=self_logp[set_name, shared], **kw)[label]
            keep = {k: v for k, v in r.items() if k not in ("responses", "ids", "per_prompt")}
            results.setdefault(label, {})[set_name] = keep
            lines.append(f"| {label} | {set_name} | " + " | ".join(  # one seed: no spread to show
                f"{keep[k]:.2f}" + (f" ± {keep[k + '_std']:.2f}" if len(seeds) > 1 else "")
                for k in ("reverse_kl", "forward_kl", "reverse_kl_per_token", "length")) + " |")
    summary = {"teacher": str(cfg.teacher), "seeds": seeds, "results": results}
    write_text(out / "sequence_kl.json", json.dumps(summary, indent=1))
    spread = "mean ± std over seeds" if len(seeds) > 1 else "one seed: no spread"
    write_text(out / "sequence_kl.md", f"Sequence-level KL to the teacher ({spread}; "
               f"teacher {cfg.teacher}, samples at temperature 1)\n\n" + "\n".join(lines) + "\n")


def _exposure_bias(cfg, models: dict[str, str], out: Path) -> None:
    """ExAccErr (Arora et al. 2022; the paper's exposure-bias analysis, §4.3) of each model against the
    teacher on the first data file's prompts."""
    teacher = load_model(cfg.teacher, dtype=cfg.dtype)
    teacher_tok = load_tokenizer(cfg.teacher)
    examples = load_instructions(str(cfg.data[0]), limit=cfg.limit or None)
    results = {}
    for label, path in models.items():
        tok = load_tokenizer(path)
        student = load_model(path, dtype=cfg.dtype)
        shared = check_compatibility(teacher_tok, tok, teacher, student)
        prompts = [build_prompt(ex, cfg.template, tok) for ex in examples]
        curve = measure_exposure_bias(student, teacher, tok, prompts,
                                      max_new_tokens=cfg.sampling.max_new_tokens,
                                      samples_per_prompt=cfg.exposure_bias_samples, seed=int(cfg.seeds[0]),
                                      shared_vocab_size=shared, batch_size=cfg.batch_size,
                                      max_prompt_length=cfg.max_prompt_length)
        plot_exposure_bias(curve, out / f"exposure_bias_{label}.png", label=label)
        results[label] = curve
    write_text(out / "exposure_bias.json", json.dumps(results))


def _calibration(cfg, models: dict[str, str], out: Path) -> None:
    """ECE and reliability diagrams on classification-style files (records with `labels`)."""
    results: dict[str, dict] = {}
    for label, path in models.items():
        tok = load_tokenizer(path)
        model = load_model(path, dtype=cfg.dtype)
        for data in cfg.calibration:
            name = Path(str(data)).stem
            r = evaluate_calibration(model, tok, load_instructions(str(data), limit=cfg.limit or None),
                                     template=cfg.template, batch_size=cfg.batch_size,
                                     max_prompt_length=cfg.max_prompt_length)
            reliability_diagram(r["confidences"], r["correct"], out / f"reliability_{label}_{name}.png")
            results.setdefault(label, {})[name] = {k: r[k] for k in ("ece", "accuracy", "n", "n_dropped")}
    write_text(out / "calibration.json", json.dumps(results, indent=1))
