"""How much of a Rouge-L gap is answer length? A diagnostic over the table-1 run's stored generations.

Rouge-L F is the harmonic mean of precision and recall of the longest common subsequence, so an answer
that carries the reference's content and then runs on scores low on precision. This script reads
eval-rouge's generation files (OUT/eval/rouge/<model>/<set>/seed<N>.jsonl; nothing is generated) and, per
model and test set, reports:

- words: mean whitespace words of the answers;
- Rouge-L F, precision, recall (×100; the reference with the best F, as the headline metric picks it);
- Rouge-L at the reference model's length: each answer cut to its first n words, n = the word count of
  the `--reference` model's answer to the same prompt and seed (an answer already shorter stays as it is);
- that length-matched Rouge-L minus the reference model's, paired over prompts (each prompt's score first
  averaged over the seeds), mean ± standard error.

If a model's gap to the reference shrinks to noise at matched length, its deficit is length (it says what
the reference model says and then more); if it stays, the first n words themselves are worse.

    python experiments/table1/length_control.py --out /work/table1-run [--reference sft] [--seeds 10 20]

Prints a markdown table and writes OUT/diagnostics/length_control-<reference>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from minillm.errors import DataError
from minillm.evaluation.metrics import rouge_l, rouge_l_scores
from minillm.evaluation.sequence_kl import paired_difference
from minillm.io import iter_jsonl, write_text


def truncate_words(text: str, n: int) -> str:
    """The first `n` whitespace-separated words of `text` (all of it if it has fewer)."""
    return " ".join(text.split()[:max(n, 0)])


def _load(path: Path) -> dict[str, dict]:
    """Prompt id -> {response, references} of a generation file (the package's JSONL reader: errors name the
    line)."""
    out = {}
    try:
        for where, rec in iter_jsonl(path, shape="a generation record of minillm evaluate"):
            try:
                out[str(rec["id"])] = {"response": rec["response"], "references": rec["references"]}
            except (KeyError, TypeError) as e:
                raise SystemExit(
                    f"{where}: not a generation record of minillm evaluate (missing {e})"
                ) from None
    except DataError as e:
        raise SystemExit(str(e)) from None
    return out


def length_control(root: Path, reference: str, models: list[str] | None = None,
                   seeds: list[int] | None = None,
                   sets: tuple[str, ...] = ("dollyeval", "sni")) -> dict:
    """model -> set -> {words, rougeL, precision, recall, rougeL_at_ref_length, paired_vs_ref: [mean, se],
    n}."""
    base = root / "eval" / "rouge"
    if not (base / reference).is_dir():
        raise SystemExit(f"{base / reference}: no generations of the reference model {reference!r} "
                         "(models there: "
                         f"{', '.join(sorted(p.name for p in base.iterdir() if p.is_dir())) or 'none'})")
    models = models or sorted(p.name for p in base.iterdir() if p.is_dir())
    result: dict[str, dict] = {}
    for set_name in sets:
        ref_dir = base / reference / set_name
        found = sorted(int(p.stem[4:]) for p in ref_dir.glob("seed*.jsonl")) if ref_dir.is_dir() else []
        use = [s for s in (seeds or found) if s in found]
        if not use:
            raise SystemExit(f"{ref_dir}: no generation file for seeds {seeds or 'any'}")
        ref = {s: _load(ref_dir / f"seed{s}.jsonl") for s in use}
        # the reference model's own Rouge-L per (seed, prompt): scored once, shared by every model's paired
        # difference
        ref_score = {s: {k: rouge_l(x["response"], x["references"]) for k, x in ref[s].items()} for s in use}
        for model in models:
            files = {s: base / model / set_name / f"seed{s}.jsonl" for s in use}
            missing = [str(f) for f in files.values() if not f.exists()]
            if missing:
                raise SystemExit("missing generation files (run eval-rouge for these seeds): "
                                 f"{', '.join(missing)}")
            per_seed = {s: _load(f) for s, f in files.items()}
            ids = [k for k in ref[use[0]] if all(k in per_seed[s] and k in ref[s] for s in use)]
            words: list[int] = []
            prec: list[float] = []
            rec: list[float] = []
            f1, matched = dict.fromkeys(ids, 0.0), dict.fromkeys(ids, 0.0)
            for s in use:
                for k in ids:
                    r, refs = per_seed[s][k]["response"], per_seed[s][k]["references"]
                    p_, r_, f_ = rouge_l_scores(r, refs)
                    words.append(len(r.split()))
                    prec.append(p_)
                    rec.append(r_)
                    f1[k] += f_ / len(use)
                    matched[k] += rouge_l(truncate_words(r, len(ref[s][k]["response"].split())),
                                          refs) / len(use)
            mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
            entry = {"n": len(ids), "seeds": use, "words": mean(words), "rougeL": mean(list(f1.values())),
                     "precision": mean(prec), "recall": mean(rec),
                     "rougeL_at_ref_length": mean(list(matched.values()))}
            if model != reference:
                ref_f1 = [sum(ref_score[s][k] for s in use) / len(use) for k in ids]
                entry["paired_vs_ref"] = list(paired_difference([matched[k] for k in ids], ref_f1))
            result.setdefault(model, {})[set_name] = entry
    return result


def to_markdown(result: dict, reference: str) -> str:
    sets = list(dict.fromkeys(s for per_set in result.values() for s in per_set))
    lines = []
    for set_name in sets:
        seeds = next(iter(result.values()))[set_name]["seeds"]
        lines += [f"**{set_name}** (seeds {seeds}; cut = each answer cut to the length of {reference}'s "
                  "answer "
                  "to the same prompt and seed)", "",
                  f"| model | words | Rouge-L | precision | recall | Rouge-L, cut | cut − {reference} "
                  "(paired) |",
                  "|---|---|---|---|---|---|---|"]
        for model, per_set in result.items():
            e = per_set[set_name]
            diff = ("–" if "paired_vs_ref" not in e else
                    f"{e['paired_vs_ref'][0]:+.2f} ± {e['paired_vs_ref'][1]:.2f}")
            lines.append(f"| {model} | {e['words']:.1f} | {e['rougeL']:.2f} | {e['precision']:.2f} | "
                         f"{e['recall']:.2f} | {e['rougeL_at_ref_length']:.2f} | {diff} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the table-1 run directory (OUT of run.py)")
    p.add_argument("--reference", default="sft", help="model whose answer lengths set the cut (default: sft)")
    p.add_argument("--models", nargs="+", default=None, help="models to report (default: all in "
                                                             "OUT/eval/rouge)")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="seeds (default: every seed the reference model has files for)")
    args = p.parse_args(argv)
    root = Path(args.out).resolve()
    result = length_control(root, args.reference, args.models, args.seeds)
    md = to_markdown(result, args.reference)
    out = root / "diagnostics" / f"length_control-{args.reference}.json"
    write_text(out, json.dumps(result, indent=1))
    print(md)
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
