"""One full MiniLLM step (alpha 0.2) with the speculative sampler vs the lockstep one, vs our alpha = 0
step and vs TRL 1.14.2's MiniLLMTrainer: the runs of docs/benchmarks.md section 1 (same models, prompts,
batch, tokens).

usage: PYTHONPATH=src python benchmarks/speculative_step.py [--steps 4] [--quick]
Needs the TRL peer venv at /tmp/trl-peer (see ../shared/bench/trl_peer.py). Runs one process per setting,
one after another (TRL in the middle), prints a markdown table and writes
benchmarks/results/speculative_step.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, prepare_models  # noqa: E402
from peer import run_ours, run_trl  # noqa: E402
from run import ENV  # noqa: E402

ORDER = ["ours_a0_bf16", "ours_full_bf16_lockstep", "trl", "ours_full_bf16", "ours_a0_tbf16",
         "ours_full_tbf16_lockstep", "ours_full_tbf16", "ours_full_tbf16_k4"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="our bf16 settings only, no TRL")
    a = ap.parse_args()
    teacher, student = prepare_models()
    order = [n for n in ORDER if "bf16" in n and "tbf16" not in n] if a.quick else ORDER
    runs, t0 = {}, time.perf_counter()
    for name in order:
        print(f"run {name} ({a.steps} steps)", flush=True)
        runs[name] = (run_trl(teacher, student, a.steps, ENV) if name == "trl"
                      else run_ours(name, teacher, student, a.steps, ENV))
        r = runs[name]
        done = "error" not in r
        print("  ", f"median {r['median_step_s']:.2f} s/step, steps {r['step_s']}" if done
              else r["error"][-800:], flush=True)
    ok = {k: v for k, v in runs.items() if "error" not in v}
    trl = ok.get("trl", {}).get("median_step_s")
    lines = ["| setting | s / step | × TRL | × our α = 0 (same precision) | rollout s | update s | "
             "tokens / step | acceptance | tokens / teacher fwd | peak RSS GB |", "|" + "---|" * 10]
    for name, r in ok.items():
        base = ok.get("ours_a0_bf16" if "tbf16" not in name else "ours_a0_tbf16", {}).get("median_step_s")
        acc = [x for x in r.get("acceptance_rate", [])[1:] if x is not None]
        tpf = [x for x in r.get("tokens_per_teacher_forward", [])[1:] if x is not None]
        lines.append(" | ".join([
            f"| {r['setting']}", f"{r['median_step_s']:.2f}",
            f"{r['median_step_s'] / trl:.2f}" if trl else "–",
            f"{r['median_step_s'] / base:.2f}" if base and name != "trl" else "–",
            f"{r['median_rollout_s']:.2f}" if "median_rollout_s" in r else "–",
            f"{r['median_update_s']:.2f}" if "median_update_s" in r else "–",
            f"{r['median_tokens']:.0f}" if r.get("median_tokens") else "–",
            f"{sum(acc) / len(acc):.3f}" if acc else "–", f"{sum(tpf) / len(tpf):.2f}" if tpf else "–",
            f"{r['peak_rss_gb']:.2f} |" if r.get("peak_rss_gb") else "– |"]))
    table = "\n".join(lines)
    print(table)
    out = Path(__file__).resolve().parent / "results" / "speculative_step.json"
    out.write_text(json.dumps({"machine": machine_info(), "steps": a.steps, "runs": runs, "table": table,
                               "wall_seconds": time.perf_counter() - t0}, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
