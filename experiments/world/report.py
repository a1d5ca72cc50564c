"""Aggregation, plots and the results page of experiments/world/run.py: every number comes from the run's
results (measures of each model), nothing is written in by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from minillm.io import write_text

KEYS = ("reverse_kl_support", "forward_kl", "reverse_kl_ref", "forward_kl_ref", "precision",
        "outside_support", "mode_coverage", "mode_mass_l1", "length", "exacc_err")
PAIRED = ("reverse_kl_support", "forward_kl", "reverse_kl_ref", "outside_support", "exacc_err", "length")
REF_KEYS = ("reverse_kl_ref", "forward_kl_ref")  # against the teacher: 0 for the teacher itself
NOT_STABILISERS = {"minillm_paper_adv": "the paper's printed advantage in place of the released code's (a "
                                        "variant, not a removed stabiliser)"}
BASELINES = ("sft", "kd", "seqkd", "rkl", "jsd", "tvd", "onpolicy")
PAPER_BASELINES = ("sft", "kd", "seqkd")


def _stats(values: list[float]) -> dict:
    v = np.array(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": len(v),
            "values": [float(x) for x in v]}


def _per_seed(measures: dict, student: str, row: str, seeds, key: str) -> list[float]:
    return [measures[f"{student}-{row}-s{seed}"][key] for seed in seeds]


def aggregate(results: dict, s: dict) -> dict:
    """Per world, student and row: mean / std over seeds of each measure; paired (per-seed) differences of
    MiniLLM minus each baseline and of each ablation minus MiniLLM."""
    out = {}
    for wname, w in results["worlds"].items():
        m, seeds = w["measures"], s["seeds"]
        all_rows = s["rows"] if wname == "main" else ["minillm", "kd", "minillm_no_norm"]
        students = s["students"] if wname == "main" else dict([next(iter(s["students"].items()))])
        ws = {}
        for student in students:
            rows = [r for r in all_rows if f"{student}-{r}-s{seeds[0]}" in m]
            table = {row: {k: _stats(_per_seed(m, student, row, seeds, k)) for k in KEYS} for row in rows}
            paired = {}
            if "minillm" in rows:
                for other in rows:
                    if other == "minillm":
                        continue
                    sign = 1 if other in BASELINES else -1  # baselines: minillm - b; ablations: abl - minillm
                    paired[other] = {k: _stats([sign * (a - b) for a, b in zip(
                        _per_seed(m, student, "minillm", seeds, k), _per_seed(m, student, other, seeds, k))])
                        for k in PAIRED}
            ws[student] = {"table": table, "paired": paired,
                           "init": {k: m[f"init-{student}"][k] for k in KEYS}}
        ws["teacher"] = {k: m["teacher"].get(k, 0.0 if k in REF_KEYS else float("nan"))
                         for k in (*KEYS, "truth_length")}
        out[wname] = ws
    return out


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(results: dict, s: dict, docs: Path) -> dict:
    """docs/<stem>_distribution.png (prompt 0: truth, teacher, KD and MiniLLM students over the truth's top
    responses) and docs/<stem>_kl_scatter.png (reverse vs forward KL of every row and student)."""
    from minillm.models import load_model
    from minillm.world.measures import model_log_probs
    from minillm.world.pipeline import load_world

    plt = _plt()
    docs = Path(docs)
    docs.parent.mkdir(parents=True, exist_ok=True)
    main = results["worlds"]["main"]
    world = load_world(Path(main["world"]))
    student, seed = next(iter(s["students"])), s["seeds"][0]
    top = world.top_responses(0, s["plot_top"])
    responses = [list(y) for y, _ in top]
    dists = {"truth": np.array([q for _, q in top])}
    for label, key in (("teacher", "teacher"), ("KD student", f"{student}-kd-s{seed}"),
                       ("MiniLLM student", f"{student}-minillm-s{seed}")):
        if key in main["models"]:
            dists[label] = np.exp(model_log_probs(load_model(main["models"][key]), world, 0, responses))
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(dists)
    for k, (label, probs) in enumerate(dists.items()):
        ax.bar(np.arange(len(responses)) + k * width, probs, width, label=label)
    ax.set_xticks(np.arange(len(responses)) + 0.4, [world.text(y) for y in responses], rotation=45,
                  ha="right", fontsize=7)
    ax.set_ylabel("probability of the whole response")
    ax.set_title(f"prompt '{world.prompt_text(0)}': the truth's {len(responses)} most likely responses "
                 f"(student {student}, seed {seed})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    dist_png = docs.with_name(docs.stem + "_distribution.png")
    fig.savefig(dist_png, dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    panels = (("forward_kl", "reverse_kl_support", "the truth p", "KL(p || q)", "KL(q_S || p)"),
              ("forward_kl_ref", "reverse_kl_ref", "the teacher r", "KL(r || q)", "KL(q || r)"))
    for ax, (fx, fy, whom, xl, yl) in zip(axes, panels):
        for student, ws in results["summary"]["main"].items():
            if student == "teacher":
                continue
            for row, t in ws["table"].items():
                x, y = t[fx]["mean"], t[fy]["mean"]
                ax.scatter([x], [y], marker="o" if student == next(iter(s["students"])) else "s")
                ax.annotate(f"{row} ({student})", (x, y), fontsize=6)
        ax.set_xlabel(f"forward {xl}, to {whom}")
        ax.set_ylabel(f"reverse {yl}, to {whom}")
        ax.set_title(f"against {whom} (means over seeds)", fontsize=9)
    fig.tight_layout()
    kl_png = docs.with_name(docs.stem + "_kl_scatter.png")
    fig.savefig(kl_png, dpi=110)
    plt.close(fig)
    return {"distribution": str(dist_png), "kl_scatter": str(kl_png)}


def _pm(st: dict, digits: int = 3) -> str:
    return f"{st['mean']:.{digits}f} ± {st['std']:.{digits}f}"


def _table(ws: dict, rows) -> list[str]:
    lines = ["| row | " + " | ".join(KEYS) + " |", "|---|" + "---|" * len(KEYS)]
    init = " | ".join(f"{ws['init'][k]:.3f}" for k in KEYS)
    lines.append(f"| init (SFT on teacher samples) | {init} |")
    for row in rows:
        if row in ws["table"]:
            lines.append(f"| {row} | " + " | ".join(_pm(ws["table"][row][k]) for k in KEYS) + " |")
    return lines


def _paired(ws: dict, rows, what: str) -> list[str]:
    keys = PAIRED
    lines = [f"| {what} | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for row in rows:
        if row in ws["paired"]:
            lines.append(f"| {row} | " + " | ".join(_pm(ws["paired"][row][k]) for k in keys) + " |")
    return lines


def _verdict(st: dict, subject: str, what: str, lower: str, higher: str) -> str:
    """'subject's what is LOWER/HIGHER by X ± Y over N seeds' from a paired difference (subject - other);
    'consistently' only when every seed has the sign of the mean."""
    mean, n = st["mean"], st["n"]
    every = all(v < 0 for v in st["values"]) if mean < 0 else all(v > 0 for v in st["values"])
    word = lower if mean < 0 else higher
    how = "in every seed" if every else "on average but not in every seed"
    return (f"{subject}'s {what} is {word} by {abs(mean):.3f} ± {st['std']:.3f} over {n} seed(s) ({how}; "
            f"paired per-seed differences {', '.join(f'{v:+.3f}' for v in st['values'])})")


def _effect(st: dict, variant: bool) -> str:
    """What a paired (row - MiniLLM) reverse-KL difference says of the stabiliser (or variant) it removes."""
    values = st["values"]
    if all(v > 0 for v in values):
        return ("the released code's choice is better here" if variant
                else "removing it raises the reverse KL in every seed, so the stabiliser helps here")
    if all(v < 0 for v in values):
        return ("the variant is better here" if variant
                else "removing it lowers the reverse KL in every seed, so the stabiliser does not help here")
    return "the seeds disagree: no effect shown at this budget"


def _claims(summary: dict, s: dict) -> list[str]:
    lines = ["## Do the paper's claims hold here?", "",
             "Each sentence below is computed from the paired per-seed differences above; a claim is counted "
             "as holding only when the difference has the claimed sign in every seed.", ""]
    for student, ws in summary["main"].items():
        if student == "teacher" or "minillm" not in ws["table"]:
            continue
        p, t = ws["paired"], ws["table"]
        base = [b for b in BASELINES if b in t]
        lines.append(f"Student `{student}`:")
        paper = [b for b in PAPER_BASELINES if b in t]
        for label, group in (("the paper's Table 1 baselines (SFT w/o KD, KD, SeqKD)", paper),
                             ("every baseline here (with the token-level divergences, on-policy KD)", base)):
            if not group:
                continue
            for key, what in (("reverse_kl_support", "reverse KL to the truth"),
                              ("reverse_kl_ref", "reverse KL to the teacher (what MiniLLM minimises)")):
                best = min(group, key=lambda b: t[b][key]["mean"])
                lines.append(f"- Table 1, {what}, against {label}: the best of them is {best}; "
                             + _verdict(p[best][key], "MiniLLM", what.split(" (")[0], "lower",
                                        "not lower: higher") + ".")
        if "kd" in p:
            lines.append("- Precision: " + _verdict(p["kd"]["outside_support"], "MiniLLM",
                                                    "share of samples outside the support (vs KD)",
                                                    "lower", "not lower: higher") + ".")
            lines.append("- Mode covering trade-off: " + _verdict(p["kd"]["forward_kl"], "MiniLLM",
                                                                   "forward KL (vs KD)", "lower",
                                                                   "higher") + ".")
            lines.append("- Exposure bias: " + _verdict(p["kd"]["exacc_err"], "MiniLLM", "ExAccErr (vs KD)",
                                                        "lower", "not lower: higher") + ".")
        for abl in (a for a in p if a not in BASELINES):
            st = p[abl]["reverse_kl_support"]
            said = _verdict(st, f"`{abl}`", "reverse KL (vs MiniLLM)", "lower", "higher")
            what = (NOT_STABILISERS[abl] if abl in NOT_STABILISERS
                    else f"Table 4, MiniLLM without one stabiliser ({abl})")
            lines.append(f"- {what}: {said}: " + _effect(st, abl in NOT_STABILISERS) + ".")
        lines.append("")
    lines += _length_claims(summary, s)
    return lines


def _length_claims(summary: dict, s: dict) -> list[str]:
    lines = ["Length axis (the small student; minillm vs kd vs minillm_no_norm):", ""]
    for wname, ws in sorted(summary.items(), key=lambda kv: _world_length(kv[0], s)):
        student = next(k for k in ws if k != "teacher")
        p, t = ws[student]["paired"], ws[student]["table"]
        truth = ws["teacher"]["truth_length"]
        L = _world_length(wname, s)
        if "kd" in p:
            lines.append(f"- length {L}: " + _verdict(p["kd"]["reverse_kl_support"], "MiniLLM",
                                                      "reverse KL (vs KD)", "lower", "not lower: higher")
                         + ".")
        if "minillm_no_norm" in p:
            st = p["minillm_no_norm"]["reverse_kl_support"]
            lines.append(f"- length {L}: " + _verdict(st, "without length normalisation, MiniLLM",
                                                      "reverse KL", "lower", "higher")
                         + ": " + _effect(st, False) + ".")
        if "minillm_no_norm" in t and "minillm" in t:
            a, b = t["minillm"]["length"]["mean"], t["minillm_no_norm"]["length"]["mean"]
            lines.append(f"- length {L}: mean sample length MiniLLM {a:.2f}, without length normalisation "
                         f"{b:.2f}, truth {truth:.2f}: the normalised one is "
                         f"{'closer to' if abs(a - truth) < abs(b - truth) else 'not closer to'} the truth.")
    return lines + [""]


def _world_length(wname: str, s: dict) -> int:
    return s["spec"]["length"] if wname == "main" else int(wname[3:])


MEASURES_HELP = [
    "How to read the measures (against the world's exact process p, except the two `_ref` columns; the model "
    "is q; definitions in `src/minillm/world/measures.py`):", "",
    "- `reverse_kl_support`: the sequence-level reverse KL(q || p) to the truth, on the exact log p of the "
    "model's samples. With noise > 0 p gives every content sequence of at most max_length tokens some "
    "mass, so S (p's support) is all of them and this is the full reverse KL except for samples p cannot "
    "produce at all (a prompt / unk token, or longer than max_length; rare): those are dropped and the rest "
    "renormalised (KL(q_S || p)). With noise 0, S is the chains' sparse support, and the same number "
    "ignores all the mass a model puts outside it: see docs/world_notes.md for why the default world has "
    "noise.",
    "- `forward_kl`: KL(p || q) on the truth's samples (mode covering); `reverse_kl_ref` / `forward_kl_ref`: "
    "the same two divergences to the teacher the students learnt from (Monte Carlo on the model's and the "
    "teacher's samples); KL(q || teacher) is what MiniLLM minimises.",
    "- `precision`: mean exact log p of the model's samples inside the noise-free support (not "
    "length-normalised); `outside_support`: the share of the model's samples outside the noise-free support "
    "(the truth's own share is about 1 - (1 - noise)^(length + 1)); `mode_coverage` / `mode_mass_l1`: modes "
    "hit, and the L1 distance of the model's mode masses to the truth's; `exacc_err`: ExAccErr with the "
    "truth as the teacher (negative when the model's errors along its own prefixes are smaller than along "
    "the truth's).",
    "- The students learn from the teacher, not from the truth: a gap between teacher and truth (see Setup) "
    "is inherited by every method.", ""]


def write_page(results: dict, docs: Path) -> Path:
    s, summary = results["settings"], results["summary"]
    main = results["worlds"]["main"]
    teacher = main["teacher"]
    b = s["budget"]
    lines = ["# MiniLLM in a controlled world (issue 24)", "",
             f"Generated by `experiments/world/run.py --size {s['size']}` from its results.json; every "
             "number below comes from that run.", "", "## Setup", "",
             f"- world: `{main['spec']}`",
             f"- teacher: width {s['teacher'][0]}, {s['teacher'][1]} layers, {teacher['steps']} steps "
             f"(rounds of {s['teacher_budget'][0]} until forward KL < {s['teacher_target']}; reached: "
             f"{teacher['reached_target']}); measured: " + ", ".join(
                 f"{k} {summary['main']['teacher'][k]:.3f}"
                 for k in ("reverse_kl_support", "forward_kl", "outside_support")),
             "- students: " + ", ".join(f"`{k}` (width {w}, {n} layer(s))"
                                        for k, (w, n) in s["students"].items())
             + f", each initialised by {s['init_budget'][0]} steps of SFT on {s['n_data']} teacher samples "
             "per prompt",
             f"- every method row: the same init and Budget: {b[0]} steps, batch {b[1]}, learning rate "
             f"{b[2]}; "
             f"seeds {s['seeds']}; measures on {s['n_measure']} samples per prompt (measurement seed "
             f"{s['measure_seed']})",
             "- investigation (a first run in a noise-free world, what was tried, the budgets): "
             "[world_notes.md](world_notes.md)",
             f"- wall time: {sum(results['stage_seconds'].values()) / 60:.1f} min over "
             f"{len(results['stage_seconds'])} stages (per stage: results.json `stage_seconds`)", "",
             *MEASURES_HELP]
    for student, ws in summary["main"].items():
        if student == "teacher":
            continue
        init, tm = ws["init"], summary["main"]["teacher"]
        ablations = [r for r in ws["table"] if r.startswith("minillm_no")]
        fails = init["mode_mass_l1"] > tm["mode_mass_l1"] + 0.1
        lines += [f"## Student `{student}`", "",
                  f"Its init: mode_mass_l1 {init['mode_mass_l1']:.3f}, outside_support "
                  f"{init['outside_support']:.3f} (teacher: {tm['mode_mass_l1']:.3f}, "
                  f"{tm['outside_support']:.3f}). Fails to represent every mode (condition: init "
                  f"mode_mass_l1 > teacher's + 0.1): {'yes' if fails else 'no'}.", "",
                  "Methods (Table 1 rows), mean ± std over seeds:", "",
                  *_table(ws, BASELINES + ("minillm", "minillm_paper_adv")), "",
                  "Ablations (Table 4):", "", *_table(ws, ablations),
                  "", "Paired differences, MiniLLM minus baseline (per seed):", "",
                  *_paired(ws, BASELINES, "baseline"), "",
                  "Paired differences, ablation minus MiniLLM:", "",
                  *_paired(ws, [r for r in ws["paired"] if r not in BASELINES], "ablation"), ""]
    lines += ["## Length axis", ""]
    for wname, ws in summary.items():
        student = next(k for k in ws if k != "teacher")
        lines += [f"World length {_world_length(wname, s)} (teacher forward KL "
                  f"{ws['teacher']['forward_kl']:.3f}, truth length {ws['teacher']['truth_length']:.2f}), "
                  f"student `{student}`:", "", *_table(ws[student], ("minillm", "kd", "minillm_no_norm")), ""]
    for label, path in results["plots"].items():
        lines += [f"![{label}]({Path(path).name})", ""]
    lines += _claims(summary, s)
    return write_text(Path(docs), "\n".join(lines) + "\n")
