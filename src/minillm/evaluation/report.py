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
