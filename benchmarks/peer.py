"""Side-by-side runs: `minillm distill --method minillm` (several settings) and TRL's MiniLLMTrainer.

Each run is its own process started through a wrapper that reports the process's peak RSS. Our per-step
time is `step_seconds` of metrics.jsonl (one round of rollouts + one optimiser step each, since
num_rollouts = batch_size and ppo_epochs = 1), and the rollout part is `rollout/seconds` of the same round.
The first step of every run (warm-up) is excluded from the medians, as the peer script does for TRL.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from common import DOLLY, PY, TRL_PEER, WORK, last_json_line, median, run_with_peak_rss

TRL_PY = Path("/tmp/trl-peer/bin/python")

OUR_SETTINGS = {
    # name: (overrides, description)
    "ours_a0_fp32": ({"teacher_mix_alpha": 0.0}, "alpha = 0, fp32 (TRL's work)"),
    "ours_full_fp32": ({"teacher_mix_alpha": 0.2}, "full MiniLLM (alpha 0.2), fp32"),
    "ours_a0_bf16": ({"teacher_mix_alpha": 0.0, "teacher_dtype": "bfloat16", "precision": "bf16"},
                     "alpha = 0, bf16 teacher + bf16 autocast update"),
    "ours_full_bf16": ({"teacher_mix_alpha": 0.2, "teacher_dtype": "bfloat16", "precision": "bf16"},
                       "full MiniLLM, bf16 teacher + bf16 autocast update"),
    "ours_a0_tbf16": ({"teacher_mix_alpha": 0.0, "teacher_dtype": "bfloat16"},
                      "alpha = 0, bf16 teacher, fp32 update"),
    "ours_full_tbf16": ({"teacher_mix_alpha": 0.2, "teacher_dtype": "bfloat16"},
                        "full MiniLLM, bf16 teacher, fp32 update"),
    # the lockstep teacher-mixed sampler (before the speculative one became the default, issue 20)
    "ours_full_bf16_lockstep": ({"teacher_mix_alpha": 0.2, "teacher_dtype": "bfloat16", "precision": "bf16",
                                 "draft_length": 0},
                                "full MiniLLM, lockstep sampling, bf16 teacher + bf16 autocast update"),
    "ours_full_tbf16_lockstep": ({"teacher_mix_alpha": 0.2, "teacher_dtype": "bfloat16", "draft_length": 0},
                                 "full MiniLLM, lockstep sampling, bf16 teacher, fp32 update"),
    # the speculative sampler's fixed draft length of 2026-12-05 (the default adapts the length since)
    "ours_full_tbf16_k4": ({"teacher_mix_alpha": 0.2, "teacher_dtype": "bfloat16", "draft_length": 4,
                            "draft_adaptive": "false"},
                           "full MiniLLM, speculative k = 4 fixed, bf16 teacher, fp32 update"),
}

COMMON = {"method": "minillm", "template": "chat", "num_rollouts": 8, "batch_size": 8,
          "rollout_batch_size": 8,
          "ppo_epochs": 1, "max_new_tokens": 128, "single_step": "true", "length_norm": "true",
          "valid_fraction": 0.0, "save_every": 0, "log_every": 1, "seed": 0}


def minillm_cli() -> list[str]:
    exe = Path(PY).parent / "minillm"
    return [str(exe)] if exe.exists() else [PY, "-m", "minillm.cli"]


def our_command(name: str, teacher: Path, student: Path, steps: int) -> tuple[list[str], Path]:
    out = WORK / "runs" / name
    overrides = {**COMMON, **OUR_SETTINGS[name][0], "teacher": str(teacher), "student": str(student),
                 "train_data": str(DOLLY), "limit_train": steps * 8, "max_steps": steps,
                 "output_dir": str(out)}
    cmd = [*minillm_cli(), "distill", "--method", "minillm"]
    cmd += [f"{k}={v}" for k, v in overrides.items() if k != "method"]
    return cmd, out


def run_ours(name: str, teacher: Path, student: Path, steps: int, env: dict) -> dict:
    cmd, out = our_command(name, teacher, student, steps)
    if out.exists():
        shutil.rmtree(out)
    res = run_with_peak_rss(cmd, env=env, timeout=1800)
    rec = {"name": name, "setting": OUR_SETTINGS[name][1], "command": " ".join(cmd), "rc": res["rc"],
           "peak_rss_gb": res.get("peak_rss_gb"), "process_wall_s": res["wall_s"]}
    if res["rc"]:
        rec["error"] = res["stderr"][-3000:]
        return rec
    from minillm.data import read_jsonl

    rows = read_jsonl(out / "metrics.jsonl")
    steps_rows = [r for r in rows if "step_seconds" in r]
    rollout_rows = [r for r in rows if "rollout/seconds" in r]
    rec["step_s"] = [r["step_seconds"] for r in steps_rows]
    rec["rollout_s"] = [r["rollout/seconds"] for r in rollout_rows]
    rec["tokens"] = [r.get("tokens") for r in steps_rows]
    rec["mixed_length"] = [r.get("rollout/mixed_length") for r in rollout_rows]
    rec["acceptance_rate"] = [r.get("rollout/acceptance_rate") for r in rollout_rows]
    rec["tokens_per_teacher_forward"] = [r.get("rollout/tokens_per_teacher_forward") for r in rollout_rows]
    later = slice(1, None) if len(rec["step_s"]) > 1 else slice(None)
    rec["median_step_s"] = median(rec["step_s"][later])
    rec["median_rollout_s"] = median(rec["rollout_s"][later])
    rec["median_update_s"] = median([s - r for s, r in zip(rec["step_s"][later], rec["rollout_s"][later])])
    rec["median_tokens"] = median(rec["tokens"][later])
    rec["ms_per_token"] = median([1000 * s / t for s, t in zip(rec["step_s"][later], rec["tokens"][later])
                                  if t])
    return rec


def run_trl(teacher: Path, student: Path, steps: int, env: dict) -> dict:
    cmd = [str(TRL_PY), str(TRL_PEER), "--trainer", "minillm", "--teacher", str(teacher), "--student",
           str(student),
           "--prompts", str(DOLLY), "--steps", str(steps), "--batch", "8", "--max-new", "128", "--threads",
           "2",
           "--out", str(WORK / "runs" / "trl")]
    rec = {"name": "trl", "setting": "TRL 1.14.2 MiniLLMTrainer, fp32", "command": " ".join(cmd)}
    if not TRL_PY.exists():
        rec["error"] = f"{TRL_PY} missing: create the peer venv (see {TRL_PEER} docstring)"
        return rec
    res = run_with_peak_rss(cmd, env=env, timeout=2400)
    rec.update(rc=res["rc"], peak_rss_gb=res.get("peak_rss_gb"), process_wall_s=res["wall_s"])
    peer = last_json_line(res["stdout"], "PEER_RESULT")
    if res["rc"] or peer is None:
        rec["error"] = (res["stderr"] + res["stdout"])[-3000:]
        return rec
    rec["peer"] = peer
    rec["step_s"] = peer["step_times_s"]
    lens = peer.get("mean_completion_len") or []
    rec["tokens"] = [None if x is None else x * 8 for x in lens]
    later = slice(1, None) if len(rec["step_s"]) > 1 else slice(None)
    rec["median_step_s"] = median(rec["step_s"][later])
    rec["median_tokens"] = median(rec["tokens"][later]) if rec["tokens"] else None
    pairs = [(s, t) for s, t in zip(rec["step_s"][later], rec["tokens"][later]) if t]
    rec["ms_per_token"] = median([1000 * s / t for s, t in pairs]) if pairs else None
    rec["self_reported_peak_rss_gb"] = peer.get("peak_rss_gb")
    return rec
