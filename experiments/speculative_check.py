"""Does the speculative sampler change what MiniLLM learns? (issue 20)

The quickstart's `tiny` budget (data, pruned 4-layer student and its SFT init, made by `minillm quickstart
--budget tiny`), then the quickstart's MiniLLM stage from that init once per sampler and seed:
`draft_length=0` (lockstep teacher-mixed sampling) and `draft_length=4` (speculative), `--seeds` seeds each,
`--steps` optimiser steps. Every final student is evaluated as the quickstart evaluates (Rouge-L against the
teacher's answers on the held-out split, sequence-level reverse / forward KL to the teacher; sampling seed
10), and the training rounds' rollout rewards are read from each run's metrics.jsonl.

    PYTHONPATH=src python experiments/speculative_check.py --out /tmp/spec-check [--seeds 0,1,2] [--steps 6]

Prints a markdown table (mean +- std over seeds per sampler and the difference of the means) and writes
OUT/speculative_check.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from minillm import quickstart as qs
from minillm.data import read_jsonl
from minillm.io import write_text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=6)
    a = ap.parse_args()
    root = Path(a.out)
    t0 = time.perf_counter()
    qs.quickstart(str(root / "quickstart"), budget="tiny")  # data, student, init (stages skip when done)
    b = dict(qs.BUDGETS["tiny"])
    init = qs._selected_model(root / "quickstart" / "runs" / "init-sft")
    data = root / "quickstart" / "data"
    teacher_dir, tokenizer = qs._teacher()
    common = dict(train_data=str(data / "train.jsonl"), valid_data=str(data / "valid.jsonl"),
                  max_prompt_length=256, max_length=256 + b["teacher_tokens"], log_every=1)
    runs: dict[str, dict] = {}
    for draft in (0, 4):
        for seed in [int(s) for s in a.seeds.split(",")]:
            name = f"draft{draft}-seed{seed}"
            out = root / "runs" / name
            if not (out / "summary.json").exists():
                qs._train(out, method="minillm", student=str(init), num_rollouts=b["rollouts"],
                          batch_size=b["batch"], ppo_epochs=b["ppo_epochs"], max_steps=a.steps,
                          pt_data=str(qs._resource("pretrain_corpus.txt")), pt_seq_len=64, select_by="rougeL",
                          precision="bf16", **qs.MINILLM_RETURN, eval_every=0, **qs._rl_settings(b),
                          **common, seed=seed, draft_length=draft)
            metrics = read_jsonl(out / "metrics.jsonl")
            rounds = [m for m in metrics if "rollout/reward" in m]
            runs[name] = {"draft_length": draft, "seed": seed, "model": str(qs._selected_model(out)),
                          "rollout_reward": [m["rollout/reward"] for m in rounds],
                          "rollout_seconds": [m["rollout/seconds"] for m in rounds],
                          "acceptance_rate": [m.get("rollout/acceptance_rate") for m in rounds]}
    results = qs.evaluate(root, {n: Path(r["model"]) for n, r in runs.items()}, teacher_dir, tokenizer,
                          data / "test.jsonl", b)
    keys = ("rougeL", "reverse_kl", "forward_kl", "length")
    for name, r in runs.items():
        r["eval"] = {k: results[name][k] for k in keys}
    lines = ["| measure | lockstep (draft 0) | speculative (draft 4) | difference of means |",
             "|---|---|---|---|"]
    rows = {k: lambda r, k=k: r["eval"][k] for k in keys}
    rows["mean rollout reward (training rounds)"] = lambda r: statistics.mean(r["rollout_reward"])
    rows["rollout seconds per round"] = lambda r: statistics.mean(r["rollout_seconds"])
    for label, get in rows.items():
        cells = []
        means = []
        for draft in (0, 4):
            values = [get(r) for r in runs.values() if r["draft_length"] == draft]
            m, sd = statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0
            means.append(m)
            cells.append(f"{m:.3f} ± {sd:.3f}")
        lines.append(f"| {label} | {cells[0]} | {cells[1]} | {means[1] - means[0]:+.3f} |")
    table = "\n".join(lines)
    print(table)
    write_text(root / "speculative_check.json", json.dumps({"runs": runs, "table": table,
                                                            "seconds": time.perf_counter() - t0}, indent=1))


if __name__ == "__main__":
    main()
