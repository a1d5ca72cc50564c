"""Table 1 driver, last stage: OUT/results.json, OUT/results.md and the plots, from the other stages' results.

Also the run budgets (`run_budget`: training tokens and step time from a run's metrics.jsonl), which the
driver records with every training stage. Imported by `run.py` (scripts import each other by path).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

from minillm.evaluation.sequence_kl import paired_difference
from minillm.io import read_jsonl, write_text
from minillm.stages import Stages

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def step_records(path: Path) -> dict[int, dict]:
    """The optimiser-step records of a metrics.jsonl, by step in step order: the last record of each step
    (a run resumed from a checkpoint logs the steps after it again)."""
    last = {r["step"]: r for r in (read_jsonl(path) if path.exists() else []) if "loss" in r and "step" in r}
    return dict(sorted(last.items()))


def run_budget(out_dir: Path) -> dict:
    """Training tokens and summed step time of a run, one record per optimiser step.

    A run resumed from a checkpoint repeats the steps after it in metrics.jsonl; the last record of each
    step is the one that counts. `step_seconds` covers the optimiser steps (rollouts included), not the
    validations; it is the training compute even when the run took several sittings.
    """
    last = step_records(out_dir / "metrics.jsonl")
    return {"train_tokens": int(sum(r.get("tokens", 0) for r in last.values())),
            "step_seconds": round(sum(r.get("step_seconds", 0.0) for r in last.values()), 1)}


def _finish_plot(fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> str:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def _plot_curves(root: Path, eb: dict[str, dict], runs: dict[str, Path]) -> dict[str, str]:
    out = {}
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, curve in eb.items():
        ax.plot(curve["length"], curve["exacc_err"], label=name)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    out["exposure_bias"] = _finish_plot(fig, ax, root / "exposure_bias.png", "generation length l",
                                        "ExAccErr(l) (%)",
                                        "Excess accumulated error vs the teacher (DollyEval prompts)")
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, run in runs.items():
        rows = step_records(run / "metrics.jsonl")  # a resumed run's repeated steps drawn once
        if rows:
            ax.plot(list(rows), [r["loss"] for r in rows.values()], label=name)
    out["training_curves"] = _finish_plot(fig, ax, root / "training_curves.png", "optimiser step",
                                          "training loss", "Training curves")
    return out


def _fmt(m: float | None, sd: float | None = None, nd: int = 2) -> str:
    if m is None or not _finite(m):
        return "–"
    return f"{m:.{nd}f}" if sd is None or not _finite(sd) else f"{m:.{nd}f} ± {sd:.{nd}f}"


def _per_prompt_rouge(root: Path, name: str, set_name: str, seeds: list[int]) -> dict[str, float]:
    """Prompt id -> Rouge-L averaged over seeds, from eval-rouge's generation files."""
    sums: dict[str, float] = {}
    for seed in seeds:
        for rec in read_jsonl(root / "eval" / "rouge" / name / set_name / f"seed{seed}.jsonl"):
            sums[str(rec["id"])] = sums.get(str(rec["id"]), 0.0) + rec["rougeL"]
    return {k: v / len(seeds) for k, v in sums.items()}


def paired_rouge(per_prompt, names: list[str], reference: str) -> dict[str, dict[str, list[float]]]:
    """name -> set -> [mean, standard error] of the per-prompt Rouge-L difference (name - reference).

    `per_prompt(name, set)` gives prompt id -> Rouge-L averaged over the seeds (`_per_prompt_rouge`,
    memoised).
    Each prompt's Rouge-L is first averaged over the seeds; the standard error is over prompts. This
    answers "is the gap between two methods larger than noise" more sharply than the seed spread, since
    both models answer the same prompts.
    """
    out: dict[str, dict[str, list[float]]] = {}
    for set_name in ("dollyeval", "sni"):
        ref = per_prompt(reference, set_name)
        for name in names:
            if name == reference:
                continue
            other = per_prompt(name, set_name)
            ids = [k for k in ref if k in other]
            out.setdefault(name, {})[set_name] = list(paired_difference([other[k] for k in ids],
                                                                        [ref[k] for k in ids]))
    return out


def stage_results(root: Path, s: dict, stages: Stages, info: dict, command: str) -> dict:
    rouge = info["rouge"]["results"]
    rows = {}
    for name in info["models"]:
        r = rouge[name]
        row = {"rougeL_dollyeval": r["dollyeval"]["rougeL"], "rougeL_sni": r["sni"]["rougeL"],
               "length_dollyeval": r["dollyeval"]["length"]}
        kl = info["kl"].get(name)
        if kl:
            st = kl["student"]
            row.update({k: st.get(k) for k in ("reverse_kl", "reverse_kl_std", "forward_kl", "forward_kl_std",
                                               "reverse_kl_per_token", "length", "rougeL")})
        eb = info["eb"].get(name)
        if eb:
            errs = [x for x in eb["exacc_err"] if _finite(x)]
            row["exacc_err_final"] = errs[-1] if errs else None
            row["exacc_err_max"] = max(errs) if errs else None
        rows[name] = row
    plots = _plot_curves(root, info["eb"], {m: root / "runs" / m for m in s["methods"]})
    runs = {"teacher-sft": "teacher-sft", "init": "init-sft"}
    budgets = {name: {**{k: v for k, v in st.items() if k in ("steps", "rounds", "num_rollouts")},
                      # recounted: markers may predate dedup
                      **run_budget(root / "runs" / runs.get(name, name))}
               for name, st in info["train"].items()}
    students = [n for n in info["models"] if n != "teacher"]
    baselines = [m for m in s["methods"] if not m.startswith("minillm")]
    best = max(baselines, key=lambda m: rows[m]["rougeL_dollyeval"]["mean"]) if baselines else None
    cache: dict[tuple[str, str], dict[str, float]] = {}  # each generation file is read once

    def per_prompt(name: str, set_name: str) -> dict[str, float]:
        if (name, set_name) not in cache:
            cache[name, set_name] = _per_prompt_rouge(root, name, set_name, s["seeds"])
        return cache[name, set_name]

    paired = {"vs_student_init": paired_rouge(per_prompt, students, "student-init")}
    if best:
        paired["vs_best_baseline"] = {"baseline": best, **paired_rouge(per_prompt, students, best)}
    result = {"command": command, "settings": s, "teacher_choice": info["teacher_choice"],
              "student": info["student"], "rows": rows, "budgets": budgets, "paired_rougeL": paired,
              "stage_seconds": stages.marker_seconds(), "plots": plots,
              "teacher_kl_reference": next((kl["teacher"] for kl in info["kl"].values()), None)}
    write_text(root / "results.json", json.dumps(result, indent=1, default=str))
    write_text(root / "results.md", results_markdown(s, info, rows, paired, best, budgets, stages, command))
    return {"results_json": str(root / "results.json"), "results_md": str(root / "results.md")}


def _kl_cell(name: str, r: dict, key: str, spread, seeds: list[int]) -> str:
    return "0 (itself)" if name == "teacher" else _fmt(r.get(key), spread(r.get(f"{key}_std"), seeds), 1)


def results_markdown(s: dict, info: dict, rows: dict, paired: dict, best: str | None, budgets: dict,
                     stages: Stages, command: str) -> str:
    """OUT/results.md: the main table, the paired differences, budgets, wall-clock and settings."""
    students = [n for n in info["models"] if n != "teacher"]
    tc = info["teacher_choice"]
    md = ["# Table 1, scaled down: results", "",
          (f"Rouge-L (×100) mean ± std over seeds {s['seeds']}"
           f"{' (one seed: no spread yet)' if len(s['seeds']) == 1 else ''}; sampling at temperature 1, "
           "top-k 0, top-p 1, "
           f"≤ {s['max_new_tokens']} new tokens; MiniLLM prompt template. Sequence-level KL (nats per "
           "answer, "
           f"DollyEval) on the samples of seed(s) {s['kl_seeds']}"
           f"{', mean ± std over those seeds' if len(s['kl_seeds']) > 1 else ''}."), "",
          ("| model | DollyEval Rouge-L | S-NI Rouge-L | reverse KL[q‖p] (seq) | forward KL[p‖q] (seq) | "
           "length (DollyEval) | ExAccErr(final) % |"),
          "|---|---|---|---|---|---|---|"]
    # one seed has no spread: the mean alone, not a measured-looking "± 0.00"
    def spread(sd, seeds=s["seeds"]):
        return sd if len(seeds) > 1 else None

    for name, r in rows.items():
        md.append(
            f"| {name} | {_fmt(r['rougeL_dollyeval']['mean'], spread(r['rougeL_dollyeval']['std']))} | "
            f"{_fmt(r['rougeL_sni']['mean'], spread(r['rougeL_sni']['std']))} | "
            f"{_kl_cell(name, r, 'reverse_kl', spread, s['kl_seeds'])} | "
            f"{_kl_cell(name, r, 'forward_kl', spread, s['kl_seeds'])} | "
            f"{_fmt(r['length_dollyeval']['mean'], None, 1)} | "
            f"{_fmt(r.get('exacc_err_final'), None, 1)} |"
        )
    md += ["", "## Paired Rouge-L differences", "",
           ("Per prompt, Rouge-L averaged over the seeds; mean difference ± standard error over the prompts "
            "(both models answer the same prompts)."
            + (f" Best baseline on DollyEval: **{best}**." if best else "")), "",
           "| model | DollyEval − init | S-NI − init |" + (" DollyEval − best baseline | S-NI − best "
                                                           "baseline |"
                                                            if best else ""),
           "|---|---|---|" + ("---|---|" if best else "")]
    for name in students:
        if name == "student-init":
            continue
        cells = [_fmt(*paired["vs_student_init"][name][k]) for k in ("dollyeval", "sni")]
        if best:
            cells += (["–", "–"] if name == best else
                      [_fmt(*paired["vs_best_baseline"][name][k]) for k in ("dollyeval", "sni")])
        md.append(f"| {name} | " + " | ".join(cells) + " |")
    md += ["", f"Teacher: **{tc['chosen']}** (validation Rouge-L: " +
           ", ".join(f"{k} {_fmt(v['mean'], v['std'])}" for k, v in tc["valid_rougeL"].items()) + ").",
           (f"Student: {info['student']['layers']}-layer pruned teacher "
            f"({info['student']['parameters'] / 1e6:.1f}M of "
            f"{info['student']['teacher_parameters'] / 1e6:.1f}M "
            "parameters), SFT init selected by validation loss."), "",
           "## Budgets (per training run)", "",
           ("Step time = the summed optimiser-step times of the run (rollouts included, validations not), "
            "over "
            "all sittings; stage wall-clock = the stage's last sitting, validations included."), "",
           "| run | optimiser steps | training tokens | step time (s) | stage wall-clock (s) |",
           "|---|---|---|---|---|"]
    secs = stages.marker_seconds()
    for name, b in budgets.items():
        stage = {"teacher-sft": "teacher-sft", "init": "init"}.get(name, f"method-{name}")
        extra = f" ({b['rounds']} rounds × {b['num_rollouts']} rollouts)" if "rounds" in b else ""
        md.append(f"| {name}{extra} | {b.get('steps')} | {b.get('train_tokens')} | "
                  f"{b.get('step_seconds', 0):.0f} | "
                  f"{secs.get(stage, 0):.0f} |")
    md += ["", "## Wall-clock per stage (s)", "", "| stage | seconds |", "|---|---|"]
    md += [f"| {k} | {v:.0f} |" for k, v in secs.items()]
    md += ["", "## Settings", "", "```json", json.dumps(s, indent=1, default=str), "```", "",
           "![exposure bias](exposure_bias.png)", "", "![training curves](training_curves.png)", "",
           "## Command", "", f"```bash\n{command}\n```", ""]
    return "\n".join(md)
