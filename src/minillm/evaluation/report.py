"""Side-by-side comparison of several evaluation runs (`minillm report DIR...`).

Each run directory holds the `results.json` written by :func:`minillm.evaluation.runner.evaluate_models`.
Runs are typically one per method (SFT, KD, SeqKD, MiniLLM, teacher), evaluated separately as they
finish training, so the report merges them into the paper's Table 1 layout: one row per model, one
column per test set, Rouge-L "mean ± std" over seeds, plus a grouped bar chart with the same numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

from minillm.errors import DataError
from minillm.io import write_text


def load_results(run_dir: str | Path) -> dict:
    """The parsed `results.json` of one evaluation run directory."""
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise DataError(f"{path} not found; pass directories written by `minillm evaluate` (they contain "
                        "results.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); re-run the evaluation to "
                        "rewrite it") from e


def format_mean_std(stat: dict) -> str:
    """A table cell "mean ± std" (two decimals, as the paper's tables); "mean (1 seed)" when there is no
    spread.

    A single seed has no standard deviation: "± 0.00" would read as a measured, zero spread.
    """
    if len(stat.get("per_seed", (0, 0))) == 1:
        return f"{stat['mean']:.2f} (1 seed)"
    return f"{stat['mean']:.2f} ± {stat['std']:.2f}"


_METRICS = (("rougeL", "Rouge-L"), ("exact_match", "exact match"), ("length", "length (tokens)"),
            ("dist4", "Dist-4"))


def results_markdown(results: dict, settings: dict, protocol: dict | None = None,
                     published: dict | None = None) -> str:
    """results.md of one evaluation: the Table 1 layout (Rouge-L, rows = models, columns = sets; with the
    paper's published rows below ours when given) and a per-set table of every metric, all "mean ± std"
    over seeds."""
    sets = list(dict.fromkeys(s for per_set in results.values() for s in per_set))
    out = ["# Evaluation results", ""]
    if protocol:
        out += [f"Protocol: {protocol['description']}", ""]
    out += ["Rouge-L (F, stemmed, max over references, ×100): mean ± std over seeds.", "",
            f"| model | {' | '.join(sets)} |", "|---|" + "---|" * len(sets)]
    for model, per_set in results.items():
        cells = [format_mean_std(per_set[s]["rougeL"]) if s in per_set else "–" for s in sets]
        out.append(f"| {model} | {' | '.join(cells)} |")
    if published:
        from minillm.evaluation.published import published_table_rows

        out += published_table_rows(published, sets)
        out += ["", f"(published) rows: the paper's numbers for {published['student']} students of "
                f"{published['teacher']} (chosen by {published['chosen_by']}), copied from the paper, NOT "
                f"re-measured here; '–' = not recovered. Source: {published['source']}."]
    out += ["", "| model | set | n (dropped) | " + " | ".join(t for _, t in _METRICS) + " |",
            "|---|---|---|" + "---|" * len(_METRICS)]
    for model, per_set in results.items():
        for s, r in per_set.items():
            cells = [format_mean_std(r[k]) for k, _ in _METRICS]
            out.append(f"| {model} | {s} | {r['n']} ({r['n_dropped']}) | {' | '.join(cells)} |")
    out += ["", "Exact match: SQuAD-normalised, max over references, ×100. Length: generated tokens without "
            "EOS. Dist-4: distinct word 4-grams / all word 4-grams over a seed's responses, ×100."]
    shown = ", ".join(f"{k}={v}" for k, v in settings.items())
    note = ("no_repeat_ngram_size=0 matches the paper's published numbers (the fork bug disabled the 6-gram "
            "block until Sep 2024 in the LMOps transformers fork).")
    out += ["", f"Settings: {shown}.", note, ""]
    if protocol and protocol.get("notes"):
        out += ["Notes (where this run differs from the paper's evaluation):", "",
                *(f"- {n}" for n in protocol["notes"]), ""]
    return "\n".join(out)


def _collect(run_dirs: list[str | Path], metric: str) -> tuple[dict[str, dict[str, dict]], list[str]]:
    """{row name: {set: {"mean", "std"}}} over all runs, and the ordered union of set names.

    A model name that appears in more than one run is qualified with its run directory name, so
    two runs that both call their model "student" stay distinguishable.
    """
    runs = [(Path(d), load_results(d)["results"]) for d in run_dirs]
    counts: dict[str, int] = {}
    for _, results in runs:
        for model in results:
            counts[model] = counts.get(model, 0) + 1
    rows: dict[str, dict[str, dict]] = {}
    sets: list[str] = []
    for run_dir, results in runs:
        for model, per_set in results.items():
            name = f"{run_dir.name}/{model}" if counts[model] > 1 else model
            rows[name] = {s: r[metric] for s, r in per_set.items() if metric in r}
            sets.extend(s for s in per_set if s not in sets)
    return rows, sets


def render_report(run_dirs: list[str | Path], out_path_md: str | Path, out_path_png: str | Path, *,
                  metric: str = "rougeL") -> dict[str, dict[str, dict]]:
    """Write the markdown table and the grouped bar chart of `metric` for `run_dirs`; return the table.

    `metric` is any per-set entry of results.json with mean/std ("rougeL", "exact_match", "length",
    "dist4"). Missing (model, set) cells show as "–" and are left out of the chart.
    """
    if not run_dirs:
        raise DataError("no run directories given; pass one or more `minillm evaluate` output directories")
    rows, sets = _collect(run_dirs, metric)
    lines = [f"| model | {' | '.join(sets)} |", "|---|" + "---|" * len(sets)]
    for name, cells in rows.items():
        shown = [format_mean_std(cells[s]) if s in cells else "–" for s in sets]
        lines.append(f"| {name} | {' | '.join(shown)} |")
    title = f"{metric}: mean ± std over seeds"
    out_md = Path(out_path_md)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    write_text(out_md, f"# {title}\n\n" + "\n".join(lines) + "\n")  # atomic: old or complete
    _bar_chart(rows, sets, Path(out_path_png), title)
    return rows


def _bar_chart(rows: dict[str, dict[str, dict]], sets: list[str], path: Path, title: str) -> None:
    # on use: pyplot costs 1.6 s to import (measured, 2 cores), and `runner` imports this module for
    # `format_mean_std` only
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.5 * len(sets) + 2), 4))
    for i, (name, cells) in enumerate(rows.items()):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j, s in enumerate(sets) if s in cells]
        present = [s for s in sets if s in cells]
        ax.bar(xs, [cells[s]["mean"] for s in present], width, yerr=[cells[s]["std"] for s in present],
               capsize=3, label=name)
    ax.set_xticks(range(len(sets)))
    ax.set_xticklabels(sets, rotation=15)
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
