"""Scaled-down replication of the paper's Table 1 (issue 7): one resumable driver.

    python experiments/table1/run.py --out ~/table1-run            # the real run (hours, 2 CPU cores)
    python experiments/table1/run.py --out /tmp/t1 --smoke         # tiny models, same stage code, < 90 s

Stages (each skipped when its marker `OUT/stages/<name>.json` exists; training stages also resume
inside via resume=true save_every=N; evaluate_models resumes per (model, set, seed) file):
  data            Dolly dev1000 -> train 900 / valid 100 (fixed seed); DollyEval 500; S-NI subset 500
  teacher-sft     SmolLM2-135M-Instruct SFT'd on the train split (selected by validation loss)
  teacher-select  shipped vs SFT teacher: Rouge-L on the validation split over seeds; keep the better
  student-pruned  the chosen teacher pruned to K layers
  init            SFT of the pruned student on the train split, selected by validation loss
  method-<m>      sft / kd / seqkd / minillm (/ rkl / onpolicy) from the init, same optimiser steps
  eval-rouge      every method + teacher + init on both test sets, seeds, Rouge-L (evaluate_models)
  eval-kl-teacher the teacher's log p of its own DollyEval samples (shared by every eval-kl-<m>)
  eval-kl-<m>     sequence-level reverse / forward KL and length on eval-rouge's DollyEval samples
                  (of the --kl-seeds seeds; default all)
  eval-eb-<m>     ExAccErr curve against the teacher (measure_exposure_bias)
  results         OUT/results.json, OUT/results.md, OUT/exposure_bias.png, OUT/training_curves.png

Nothing is written outside OUT (the built-in teacher is converted once into ~/.cache/minillm).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shlex
import shutil
import sys
import time
from importlib import resources
from pathlib import Path

import torch

from minillm import api
from minillm.config import TrainConfig, build_config
from minillm.data import build_prompt, load_instructions
from minillm.evaluation.exposure_bias import measure_exposure_bias
from minillm.evaluation.runner import evaluate_models
from minillm.evaluation.sequence_kl import kl_from_generations, teacher_self_logprobs
from minillm.io import read_jsonl, write_jsonl, write_text
from minillm.models import (
    builtin_model_dir,
    check_compatibility,
    load_model,
    load_tokenizer,
    prune_model,
    save_pretrained_atomic,
)
from minillm.stages import Stages
from minillm.testing import tiny_llama, tiny_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the results stage, and the run budgets every training stage records (step_records: for the tests)
from results_table import run_budget, stage_results, step_records  # noqa: E402, F401

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
TEACHER = "smollm2-135m-instruct"
TEMPLATE = "minillm"  # the paper's prompt template (issue 7: "prompts in the MiniLLM template")
# MiniLLM variants: the exact sequence-level return, and the stabiliser ablation of the paper's Table 4
# (Gu et al., arXiv 2306.08543: w/o length normalisation, w/o teacher-mixed sampling, w/o single-step
# decomposition).
MINILLM_VARIANTS = {
    "minillm": {},
    "minillm-seqret": {"advantage": "paper", "length_norm": False},
    # the paper's Eq. 6/7 as written: R_{t+1} (current reward left to the single-step term), no discount,
    # length-normalised; the released code's return (the `minillm` row) adds r_t and discounts by 0.95
    "minillm-paper": {"advantage": "paper"},
    "minillm-nolen": {"length_norm": False},
    "minillm-nomix": {"teacher_mix_alpha": 0.0},
    "minillm-noss": {"single_step": False},
    # optimisation checks (not in the paper's tables): a 5x lower lr, and 4 instead of 16 optimiser steps per
    # round (16 rollouts a round, closer to the released GPT-2 base script's 4 steps per round)
    "minillm-lr1e-5": {"learning_rate": 1e-5},
    "minillm-r4": {"num_rollouts": 16},
}
METHODS = ("sft", "kd", "seqkd", *MINILLM_VARIANTS, "rkl", "onpolicy")
# minillm-seqret: MiniLLM with the exact sequence-level return (advantage=paper, length_norm=false) - the
# quickstart found that the length-normalised return lengthens a weak student's answers (README, quickstart).

logger = logging.getLogger("table1")


# --------------------------------------------------------------------------------------------- utils

def run_training(stages: Stages, name: str, run_dir: Path, fn):
    """`stages.run` for a training stage; once its marker exists, the run's resume checkpoints are deleted.

    They hold the optimiser state (~2 GB for the 85M student, ~3 GB for the teacher) and are only
    needed until the stage finishes; the selected and final models stay.
    """
    info = stages.run(name, fn)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return info


# --------------------------------------------------------------------------------------------- settings

def settings_from_args(args) -> dict:
    """Every size and hyperparameter of the run; --smoke only changes numbers, never code paths."""
    s = dict(  # noqa: C408
        n_train=900, n_valid=100, n_dolly_test=500, n_sni_test=500, split_seed=0,
        layers=args.layers, prune_strategy=args.prune_strategy, steps=args.steps,
        seeds=list(args.seeds or [10, 20, 30]),
        max_new_tokens=args.max_new_tokens,
        train_max_new_tokens=args.train_max_new_tokens or args.max_new_tokens,
        max_prompt_length=256, batch_size=8, eval_batch_size=args.eval_batch_size,
        teacher_sft_steps=args.teacher_sft_steps, teacher_sft_lr=args.teacher_sft_lr,
        teacher_select_seeds=list(args.seeds or [10, 20, 30])[:3],
        init_steps=args.init_steps, init_lr=args.init_lr,
        baseline_lr=args.baseline_lr, minillm_lr=args.minillm_lr, minillm_rounds=args.minillm_rounds,
        ppo_epochs=args.ppo_epochs, teacher_mix_alpha=0.2, clip_eps=0.2, pt_seq_len=128,
        save_every=args.save_every, kl_prompts=args.kl_prompts, eb_prompts=args.eb_prompts,
        eb_samples=args.eb_samples, teacher_dtype="bfloat16", eval_dtype=args.eval_dtype,
        methods=list(args.methods), smoke=bool(args.smoke), valid_prompts=args.valid_prompts,
        method_evals=args.method_evals,
        max_input_chars=0,  # 0 = texts as they are; --smoke cuts instruction/input to keep prompts short
    )
    if args.smoke:
        s.update(n_train=16, n_valid=8, n_dolly_test=8, n_sni_test=8, layers=2, steps=2,
                 seeds=list(args.seeds or [10]), teacher_select_seeds=list(args.seeds or [10])[:1],
                 max_new_tokens=8, train_max_new_tokens=8, batch_size=4,
                 eval_batch_size=8, teacher_sft_steps=2, init_steps=2, minillm_rounds=2, ppo_epochs=1,
                 pt_seq_len=16, save_every=1, kl_prompts=8, eb_prompts=4, eb_samples=1,
                 teacher_dtype="float32", max_input_chars=120, max_prompt_length=512)
        # the tiny BPE of minillm.testing needs ~4x more tokens per character than SmolLM2's
    s["max_length"] = s["max_prompt_length"] + s["train_max_new_tokens"]
    s["kl_seeds"] = list(args.kl_seeds or s["seeds"])
    if not set(s["kl_seeds"]) <= set(s["seeds"]):
        raise SystemExit(f"--kl-seeds {' '.join(map(str, s['kl_seeds']))}: the KL is scored on eval-rouge's "
                         "samples, "
                         f"so every KL seed must be one of --seeds ({' '.join(map(str, s['seeds']))})")
    # MiniLLM: one round = num_rollouts prompts, ppo_epochs passes of num_rollouts / batch_size steps.
    # The rollouts per round are chosen so that `minillm_rounds` rounds use exactly `steps` optimiser steps.
    steps_per_round = max(1, s["steps"] // s["minillm_rounds"])
    s["minillm_num_rollouts"] = max(s["batch_size"],
                                    (steps_per_round // s["ppo_epochs"] or 1) * s["batch_size"])
    return s


# --------------------------------------------------------------------------------------------- stages

def stage_data(root: Path, s: dict) -> dict:
    """Dolly dev1000 -> train / valid; DollyEval; a fixed random S-NI subset; the L_PT corpus path."""
    out = root / "data"
    dev = read_jsonl(DATA / "dolly_dev1000.jsonl")
    order = list(range(len(dev)))
    random.Random(s["split_seed"]).shuffle(order)
    train = [dev[i] for i in order[:s["n_train"]]]
    valid = [dev[i] for i in order[s["n_train"]:s["n_train"] + s["n_valid"]]]
    dolly = read_jsonl(DATA / "dolly_eval500.jsonl")[:s["n_dolly_test"]]
    sni_all = read_jsonl(DATA / "sni_test_minillm_11plus.jsonl")
    sni_idx = sorted(random.Random(s["split_seed"]).sample(range(len(sni_all)), min(s["n_sni_test"],
                                                                                    len(sni_all))))
    sni = [sni_all[i] for i in sni_idx]
    if s["max_input_chars"]:
        n = s["max_input_chars"]
        train, valid, dolly, sni = ([{**r, "instruction": r["instruction"][:n], "input": r.get("input",
                                                                                               "")[:n]}
                                     for r in rows] for rows in (train, valid, dolly, sni))
    paths = {"train": out / "train.jsonl", "valid": out / "valid.jsonl",
             "dollyeval": out / "dollyeval.jsonl", "sni": out / "sni.jsonl"}
    for name, rows in (("train", train), ("valid", valid), ("dollyeval", dolly), ("sni", sni)):
        write_jsonl(paths[name], rows)
    corpus = Path(str(resources.files("minillm").joinpath("resources", "pretrain_corpus.txt")))
    return {**{k: str(v) for k, v in paths.items()}, "pt_data": str(corpus),
            "sizes": {"train": len(train), "valid": len(valid), "dollyeval": len(dolly), "sni": len(sni)},
            "sni_indices": sni_idx}


def shipped_teacher(root: Path, s: dict) -> str:
    """SmolLM2-135M-Instruct as shipped; with --smoke a tiny random Llama saved into OUT (no downloads)."""

    if not s["smoke"]:
        return str(builtin_model_dir(TEACHER))
    path = root / "smoke-teacher"
    if not (path / "config.json").exists():
        tok = tiny_tokenizer()
        save_pretrained_atomic(tiny_llama(tok, layers=4, hidden_size=32), tok, path)
    return str(path)


def train_stage(out_dir: Path, **kw) -> dict:
    """One training run (resumable inside); returns the selected model folder and its budget."""
    cfg = build_config(TrainConfig, None, {"output_dir": str(out_dir), "template": TEMPLATE, "resume": True,
                                           "log_every": 1, "seed": 0, **kw})
    t0 = time.perf_counter()
    model = Path(api.train(cfg))
    summary = json.loads((out_dir / "summary.json").read_text())
    return {"model": str(model), "steps": summary["steps"], "best": summary["best"], **run_budget(out_dir),
            "train_seconds_this_sitting": time.perf_counter() - t0}


def common_train(s: dict, data: dict) -> dict:
    return dict(train_data=data["train"], valid_data=data["valid"], max_prompt_length=s["max_prompt_length"],  # noqa: C408
                max_length=s["max_length"], save_every=s["save_every"], batch_size=s["batch_size"])


def stage_teacher_sft(root: Path, s: dict, data: dict, shipped: str) -> dict:
    steps = s["teacher_sft_steps"]
    return train_stage(root / "runs" / "teacher-sft", method="sft", student=shipped,
                       learning_rate=s["teacher_sft_lr"],
                       max_steps=steps, lr_scheduler="cosine", warmup_steps=min(10, steps // 10),
                       select_by="valid_loss", eval_every=max(1, steps // 4), **common_train(s, data))


def stage_teacher_select(root: Path, s: dict, data: dict, candidates: dict[str, str]) -> dict:
    res = evaluate_models(candidates, [data["valid"]], root / "eval" / "teacher-select",
                          seeds=s["teacher_select_seeds"], max_new_tokens=s["max_new_tokens"],
                          batch_size=s["eval_batch_size"], template=TEMPLATE,
                          max_prompt_length=s["max_prompt_length"], dtype=s["eval_dtype"])
    scores = {name: res["results"][name]["valid"]["rougeL"] for name in candidates}
    best = max(scores, key=lambda n: scores[n]["mean"])
    return {"chosen": best, "path": candidates[best], "valid_rougeL": scores}


def stage_prune(root: Path, s: dict, teacher: str) -> dict:
    out = root / "student-pruned"
    full = load_model(teacher)
    pruned = prune_model(full, s["layers"], s.get("prune_strategy", "spread"))
    save_pretrained_atomic(pruned, load_tokenizer(teacher), out)
    return {"path": str(out), "layers": s["layers"], "prune_strategy": s.get("prune_strategy", "spread"),
            "parameters": int(sum(p.numel() for p in pruned.parameters())),
            "teacher_parameters": int(sum(p.numel() for p in full.parameters()))}


def stage_init(root: Path, s: dict, data: dict, pruned: str) -> dict:
    steps = s["init_steps"]
    return train_stage(root / "runs" / "init-sft", method="sft", student=pruned, learning_rate=s["init_lr"],
                       max_steps=steps, lr_scheduler="cosine", warmup_steps=min(10, steps // 10),
                       select_by="valid_loss", eval_every=max(1, steps // 4), **common_train(s, data))


def stage_method(root: Path, s: dict, data: dict, method: str, init: str, teacher: str) -> dict:
    """`method` from the init with `steps` optimiser steps; best checkpoint by validation Rouge-L."""
    base = "minillm" if method.startswith("minillm") else method
    kw = dict(method=base, student=init, max_steps=s["steps"], select_by="rougeL",
              eval_every=max(1, s["steps"] // s["method_evals"]),
              eval_num_prompts=min(s["valid_prompts"], s["n_valid"]),
              max_new_tokens=s["train_max_new_tokens"], rollout_batch_size=16, **common_train(s, data))
    if method != "sft":
        kw.update(teacher=teacher, teacher_dtype=s["teacher_dtype"])
    # the paper's defaults scaled down (arXiv 2306.08543 / LMOps): alpha 0.2, single step, length norm, clip
    if base == "minillm":
        kw.update(learning_rate=s["minillm_lr"], lr_scheduler="constant", warmup_steps=0, adam_beta2=0.95,
                  weight_decay=1e-6, num_rollouts=s["minillm_num_rollouts"], ppo_epochs=s["ppo_epochs"],
                  teacher_mix_alpha=s["teacher_mix_alpha"], single_step=True, length_norm=True,
                  clip_eps=s["clip_eps"], pt_data=data["pt_data"], pt_seq_len=s["pt_seq_len"])
        kw.update(MINILLM_VARIANTS[method])
    else:
        kw.update(learning_rate=s["baseline_lr"], lr_scheduler="cosine", warmup_steps=0)
    info = train_stage(root / "runs" / method, **kw)
    if base == "minillm":
        info["rounds"] = s["steps"] // max(1, (kw["num_rollouts"] // s["batch_size"]) * s["ppo_epochs"])
        info["num_rollouts"] = kw["num_rollouts"]
    return info


def stage_eval_rouge(root: Path, s: dict, data: dict, models: dict[str, str]) -> dict:
    res = evaluate_models(models, [data["dollyeval"], data["sni"]], root / "eval" / "rouge", seeds=s["seeds"],
                          max_new_tokens=s["max_new_tokens"], temperature=1.0, top_k=0, top_p=1.0,
                          batch_size=s["eval_batch_size"], template=TEMPLATE,
                          max_prompt_length=s["max_prompt_length"], dtype=s["eval_dtype"])
    return res


def _kl_files(root: Path, s: dict, data: dict, name: str) -> dict[int, Path]:
    set_name = Path(data["dollyeval"]).stem
    return {seed: root / "eval" / "rouge" / name / set_name / f"seed{seed}.jsonl" for seed in s["kl_seeds"]}


def stage_eval_kl_teacher(root: Path, s: dict, data: dict, teacher: str) -> dict:
    """The teacher's log p of its own DollyEval samples, per seed and prompt: the first term of every
    student's
    forward KL, computed once instead of once per student (a third of eval-kl's forwards)."""
    tok = load_tokenizer(teacher)
    teacher_model = load_model(teacher, dtype=s["eval_dtype"])
    shared = check_compatibility(tok, tok, teacher_model, teacher_model)
    logp = teacher_self_logprobs(teacher_model, tok, load_instructions(data["dollyeval"],
                                                                       limit=s["kl_prompts"]),
                                 _kl_files(root, s, data, "teacher"), template=TEMPLATE,
                                 max_prompt_length=s["max_prompt_length"], batch_size=s["eval_batch_size"],
                                 shared_vocab_size=shared)
    return {"seeds": sorted(logp), "shared_vocab_size": shared, "logprobs": logp}


def stage_eval_kl(root: Path, s: dict, data: dict, name: str, path: str, teacher: str,
                  teacher_self: dict | None = None) -> dict:
    """Sequence-level reverse / forward KL on the DollyEval samples of eval-rouge (same samples as Rouge-L).

    Scoring the stored samples (teacher-forced forwards) replaces drawing new ones: each seed's student file
    gives the reverse KL, the teacher's file of the same seed the forward KL. Models are loaded in the dtype
    that sampled them (eval_dtype), so log q is the distribution the samples came from. `teacher_self`: the
    eval-kl-teacher stage's result (used when it scored the same shared vocabulary).
    """
    tok = load_tokenizer(path)
    student = load_model(path, dtype=s["eval_dtype"])
    teacher_model = load_model(teacher, dtype=s["eval_dtype"])
    shared = check_compatibility(load_tokenizer(teacher), tok, teacher_model, student)
    examples = load_instructions(data["dollyeval"], limit=s["kl_prompts"])
    t_logp = None
    # JSON keys are strings: back to int seeds
    if teacher_self and teacher_self["shared_vocab_size"] == shared:
        t_logp = {int(seed): v for seed, v in teacher_self["logprobs"].items()}
    res = kl_from_generations(student, teacher_model, tok, examples, _kl_files(root, s, data, name),
                              _kl_files(root, s, data, "teacher"), template=TEMPLATE,
                              max_prompt_length=s["max_prompt_length"], batch_size=s["eval_batch_size"],
                              shared_vocab_size=shared, name=name, teacher_logprobs=t_logp)
    return {"student": res[name], "teacher": res["teacher"], "seeds": list(s["kl_seeds"])}


def stage_eval_eb(s: dict, data: dict, name: str, path: str, teacher: str) -> dict:
    tok = load_tokenizer(path)
    student = load_model(path)
    teacher_model = load_model(teacher)
    shared = check_compatibility(load_tokenizer(teacher), tok, teacher_model, student)
    prompts = [build_prompt(ex, TEMPLATE, tok) for ex in load_instructions(data["dollyeval"],
                                                                           limit=s["eb_prompts"])]
    curve = measure_exposure_bias(student, teacher_model, tok, prompts, max_new_tokens=s["max_new_tokens"],
                                  samples_per_prompt=s["eb_samples"], seed=int(s["seeds"][0]),
                                  shared_vocab_size=shared, batch_size=s["eval_batch_size"],
                                  max_prompt_length=s["max_prompt_length"])
    return {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in curve.items()}


# --------------------------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (all files land here; re-run to resume)")
    p.add_argument("--smoke", action="store_true", help="tiny models and sizes, same stage code (< 90 s)")
    p.add_argument("--layers", type=int, default=16, help="student layers kept from the 30 of the teacher "
                   "(16 with --prune-strategy ends: the quickstart measured validation CE 3.25 after SFT vs "
                   "4.57 "
                   "for 12 layers; 4 gave word salad)")
    p.add_argument("--prune-strategy", default="ends", choices=("ends", "spread", "first"),
                   help="which teacher layers the student keeps (minillm.models.pruned_layer_indices); "
                        "'ends' "
                   "keeps the first and last K/2 and hurts least on SmolLM2 (see its docstring)")
    p.add_argument("--steps", type=int, default=128, help="optimiser steps of every method (equal budget)")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="evaluation seeds (default 10 20 30; --smoke: 10). A finished run can be given more "
                        "seeds later: only the new generations, the KL scoring and the results run")
    p.add_argument("--kl-seeds", type=int, nargs="+", default=None,
                   help="the seeds (of --seeds) whose DollyEval samples are scored for sequence-level KL "
                        "(default: "
                        "all). Scoring costs about as much as generating; one seed's ~500 prompts already "
                        "give "
                        "the KL's standard error over prompts")
    p.add_argument("--max-new-tokens", type=int, default=256, help="evaluation generation cap (paper: 256)")
    p.add_argument("--train-max-new-tokens", type=int, default=0,
                   help="rollout / seqkd / validation generation cap (0 = --max-new-tokens)")
    p.add_argument("--methods", nargs="+", default=["sft", "kd", "seqkd", "minillm", "minillm-seqret"],
                   choices=METHODS)
    p.add_argument("--teacher-sft-steps", type=int, default=225, help="teacher SFT steps (225 = 2 epochs, bs "
                                                                      "8)")
    p.add_argument("--teacher-sft-lr", type=float, default=2e-5)
    p.add_argument("--init-steps", type=int, default=338,
                   help="student init SFT steps (338 = 3 epochs, bs 8)")
    p.add_argument("--init-lr", type=float, default=5e-4)
    p.add_argument("--baseline-lr", type=float, default=1e-4, help="lr of continued sft / kd / seqkd / rkl / "
                                                                   "onpolicy")
    p.add_argument("--minillm-lr", type=float, default=5e-5)
    p.add_argument("--minillm-rounds", type=int, default=8, help="MiniLLM rounds within --steps")
    p.add_argument("--ppo-epochs", type=int, default=2)
    p.add_argument("--save-every", type=int, default=16, help="resumable checkpoint every N steps")
    p.add_argument("--eval-batch-size", type=int, default=32,
                   help="prompts sampled together in evaluation (2 threads, bf16, 16-layer student, 128 new "
                        "tokens: 2.7-3.1 ms/token at 32 vs 3.2-4.2 at 16, measured 2026-11-29)")
    p.add_argument("--eval-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="weights dtype for evaluation sampling (the paper evaluates in fp16; bf16 samples "
                        "~1.5x "
                        "faster than fp32 on CPU)")
    p.add_argument("--kl-prompts", type=int, default=500, help="DollyEval prompts for sequence-level KL")
    p.add_argument("--eb-prompts", type=int, default=50, help="DollyEval prompts for ExAccErr")
    p.add_argument("--eb-samples", type=int, default=1, help="samples per prompt for ExAccErr (paper: 10)")
    p.add_argument("--valid-prompts", type=int, default=100,
                   help="validation prompts generated for each method's Rouge-L checkpoint selection")
    p.add_argument("--method-evals", type=int, default=4, help="validations (checkpoint candidates) per "
                                                               "method")
    p.add_argument("--allow-changed-settings", action="store_true",
                   help="continue an OUT started with other options (finished stages are not redone)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default; --smoke: "
                                                          "1, "
                   "since tiny models on a busy 2-core machine are ~50x slower with 2 spinning threads)")
    return p


def pin_settings(root: Path, s: dict, allow_changed: bool) -> None:
    """Write OUT/settings.json, or refuse (unless `allow_changed`) an OUT started with other settings."""
    settings_file = root / "settings.json"
    if settings_file.exists():
        old = json.loads(settings_file.read_text())
        if old != json.loads(json.dumps(s)):
            changed = sorted(k for k in set(old) | set(s) if old.get(k) != json.loads(json.dumps(s)).get(k))
            if not allow_changed:
                raise SystemExit(f"{root} was started with different settings ({', '.join(changed)}); use a "
                                 "new --out, the original options, or --allow-changed-settings (finished "
                                 "stages are kept: delete OUT/stages/<name>.json of the stages to redo)")
            logger.warning("settings changed (%s): finished stages are kept as they are", ", ".join(changed))
            write_text(settings_file, json.dumps(s, indent=1))
    else:
        write_text(settings_file, json.dumps(s, indent=1))


def run_stages(root: Path, s: dict, st: Stages, command: str) -> None:
    """Every stage of the driver, in order; each is skipped when its marker exists."""
    data = st.run("data", lambda: stage_data(root, s))
    shipped = shipped_teacher(root, s)
    t_sft = run_training(st, "teacher-sft", root / "runs" / "teacher-sft",
                            lambda: stage_teacher_sft(root, s, data, shipped))
    choice = st.run("teacher-select", lambda: stage_teacher_select(
        root, s, data, {"teacher-shipped": shipped, "teacher-sft": t_sft["model"]}))
    teacher = choice["path"]
    student = st.run("student-pruned", lambda: stage_prune(root, s, teacher))
    init = run_training(st, "init", root / "runs" / "init-sft", lambda: stage_init(root, s, data,
                                                                                   student["path"]))
    train = {"teacher-sft": t_sft, "init": init}
    for m in s["methods"]:
        train[m] = run_training(st, f"method-{m}", root / "runs" / m,
                                   lambda m=m: stage_method(root, s, data, m, init["model"], teacher))
    models = {"teacher": teacher, "student-init": init["model"], **{m: train[m]["model"]
                                                                    for m in s["methods"]}}
    # Evaluation markers are dropped when models or seeds were added (an ablation row, more seeds for a run
    # first evaluated with one): evaluate_models resumes from its per-(model, set, seed) files, so only the
    # new generations run; the KL stages rescore from those files.
    seeds = sorted(s["seeds"])
    st.drop_stale("eval-rouge", lambda info: set(info["results"]) != set(models) or any(
        sorted(r["seeds"]) != seeds for per_set in info["results"].values() for r in per_set.values()))
    # Generation order: MiniLLM rows, then the baselines, the init and the teacher, so that a sitting that
    # ends
    # mid-evaluation leaves the method comparison's files first (each (model, set, seed) file is kept).
    order = sorted(models, key=lambda n: (not n.startswith("minillm"), n in ("student-init", "teacher"),
                                          n == "teacher"))
    rouge = st.run("eval-rouge", lambda: stage_eval_rouge(root, s, data, {n: models[n] for n in order}))
    students = {k: v for k, v in models.items() if k != "teacher"}
    kl_seeds = sorted(s["kl_seeds"])
    for n in ("teacher", *students):
        st.drop_stale(f"eval-kl-{n}", lambda info: sorted(info.get("seeds", [])) != kl_seeds)
    teacher_self = None  # the teacher's scores of its own samples: run when some student's KL stage is to run
    if st.done("eval-kl-teacher") or not all(st.done(f"eval-kl-{n}") for n in students):
        teacher_self = st.run("eval-kl-teacher", lambda: stage_eval_kl_teacher(root, s, data, teacher))
    kl = {n: st.run(f"eval-kl-{n}", lambda n=n, path=path: stage_eval_kl(root, s, data, n, path, teacher,
                                                                         teacher_self))
          for n, path in students.items()}
    eb = {n: st.run(f"eval-eb-{n}", lambda n=n, path=path: stage_eval_eb(s, data, n, path, teacher))
          for n, path in students.items()}
    info = {"models": models, "rouge": rouge, "kl": kl, "eb": eb, "train": train, "teacher_choice": choice,
            "student": student}
    # results is rebuilt from the cached stage outputs: cheap, redone whenever another stage ran
    if st.ran:
        (st.dir / "results.json").unlink(missing_ok=True)
    st.run("results", lambda: stage_results(root, s, st, info, command))


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    threads = args.threads or (1 if args.smoke else 0)
    if threads:
        torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    command = " ".join(shlex.quote(a) for a in [sys.executable, str(Path(__file__)), *(argv or sys.argv[1:])])

    root = Path(args.out).resolve()
    s = settings_from_args(args)  # checks the options before anything is written
    root.mkdir(parents=True, exist_ok=True)
    pin_settings(root, s, args.allow_changed_settings)
    st = Stages(root / "stages", log=logger)
    run_stages(root, s, st, command)
    logger.info("table1: %d stage(s) run, %d skipped; results in %s", len(st.ran), len(st.skipped),
                root / "results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
