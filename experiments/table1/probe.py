"""The first optimiser steps of a MiniLLM variant, from a finished table-1 run's init: a cheap ablation probe.

A full MiniLLM row costs ~100 min of training and ~35 min of evaluation per seed on 2 CPU cores. The
`minillm*` rows train at a constant learning rate and validate every `steps / method_evals` optimiser
steps, so their first N steps (up to their first validation) do not depend on the run's length: a probe
of N steps, with the same seed, init, teacher, data and settings, repeats them exactly and then validates
once, on the same validation prompts with the same sampling. `--steps 32` therefore compares a variant
(e.g. `minillm-nomix`, α = 0: the paper's Table 4 "w/o teacher-mixed sampling") with the run's rows at
their step-32 validation (`minillm`: 2 rounds of 64 rollouts), at a quarter of a row's training cost
and no test-set evaluation. It is a diagnostic of direction (does the answer length / Rouge-L move as in
the full row after two rounds?), not a Table 1 row: validation is 96 prompts, one sample each.

    python experiments/table1/probe.py --out /work/table1-run --method minillm-nomix --steps 32

Trains into PROBE/runs/<method> (PROBE = --probe-out, default OUT/probes/<method>-<steps>; resumable; a
finished probe is skipped by its marker PROBE/stages/method-<method>.json),
prints a markdown table of the validation at the last step next to the run's rows at the same step, and
writes PROBE/probe.json. Nothing in OUT outside PROBE is changed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from minillm.io import read_jsonl, write_text
from minillm.stages import Stages

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as table1  # noqa: E402  (the driver's own stage code: the probe trains exactly as a row does)

VALID_KEYS = ("valid_rougeL", "valid_length", "valid_reverse_kl", "valid_reverse_kl_per_token")


def _marker(root: Path, name: str) -> dict:
    path = root / "stages" / f"{name}.json"
    if not path.exists():
        raise SystemExit(f"{path} is missing: the probe needs a table-1 run whose '{name}' stage has "
                         "finished "
                         "(python experiments/table1/run.py --out OUT)")
    return json.loads(path.read_text())["info"]


def _records(metrics: Path) -> list[dict]:
    return read_jsonl(metrics) if metrics.exists() else []


def validation_at(records: list[dict], step: int) -> dict | None:
    """The validation record of `step` among a run's metrics records (the last one, if a resumed run logged it
    twice)."""
    found = [r for r in records if r.get("step") == step and "valid_rougeL" in r]
    return {k: found[-1][k] for k in VALID_KEYS if k in found[-1]} if found else None


def rollout_lengths(records: list[dict], max_step: int) -> list[float]:
    """Mean (teacher-mixed) rollout length of each round that started before `max_step`."""
    rounds = {}
    for r in records:
        if "rollout/round" in r and r.get("step", 0) < max_step:
            rounds[int(r["rollout/round"])] = r["rollout/mixed_length"]
    return [rounds[k] for k in sorted(rounds)]


def probe(root: Path, method: str, steps: int, out: Path) -> dict:
    settings_file = root / "settings.json"
    if not settings_file.exists():
        raise SystemExit(f"{settings_file} is missing: --out must be a table-1 run folder")
    if method not in table1.MINILLM_VARIANTS:
        raise SystemExit(f"--method {method}: the probe repeats the first steps of a constant-lr MiniLLM "
                         "row; "
                         f"choose one of {', '.join(table1.MINILLM_VARIANTS)}")
    if steps < 1:
        raise SystemExit(f"--steps {steps}: give a positive number of optimiser steps")
    s = json.loads(settings_file.read_text())
    data, init, teacher = _marker(root, "data"), _marker(root, "init"), _marker(root, "teacher-select")
    s.update(steps=steps, method_evals=1)  # one validation, at the last step; everything else as the run
    # a stage marker, as in the driver: a finished probe is not trained (or validated) again when re-run, and
    # its
    # resume checkpoints are deleted once it is done
    stages = Stages(out / "stages", log=table1.logger)
    info = table1.run_training(stages, f"method-{method}", out / "runs" / method, lambda: table1.stage_method(
        out, s, data, method, init["model"], teacher["path"]))
    records = _records(out / "runs" / method / "metrics.jsonl")
    result = {"method": method, "steps": steps, "run": str(root), "train": info,
              "valid": validation_at(records, steps), "rollout_lengths": rollout_lengths(records, steps),
              "run_rows": {}}
    for row in sorted(p.name for p in (root / "runs").iterdir() if p.is_dir()):
        if row in ("teacher-sft", "init-sft"):
            continue
        records = _records(root / "runs" / row / "metrics.jsonl")
        v = validation_at(records, steps)
        if v is not None:
            result["run_rows"][row] = {"valid": v, "rollout_lengths": rollout_lengths(records, steps)}
    write_text(out / "probe.json", json.dumps(result, indent=1))
    return result


def format_table(result: dict) -> str:
    def line(name: str, v: dict | None, lengths: list[float]) -> str:
        if v is None:
            return f"| {name} | – | – | – | – |"
        kl = v.get("valid_reverse_kl")  # not measured by the rows without a teacher (sft)
        return (f"| {name} | {v['valid_rougeL']:.2f} | {v['valid_length']:.0f} | "
                f"{'–' if kl is None else f'{kl:.1f}'} | "
                f"{' / '.join(f'{x:.0f}' for x in lengths) or '–'} |")

    rows = [f"Validation at step {result['steps']} ({result['run']}):", "",
            "| run | Rouge-L | length | reverse KL (seq) | rollout length per round |",
            "|---|---|---|---|---|",
            line(f"probe: {result['method']}", result["valid"], result["rollout_lengths"])]
    rows += [line(name, r["valid"], r["rollout_lengths"]) for name, r in result["run_rows"].items()]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="a table-1 run folder (its data, teacher-select and init "
                                                "stages done)")
    p.add_argument("--method", required=True, help="a MiniLLM variant of run.py, e.g. minillm-nomix")
    p.add_argument("--steps", type=int, required=True, help="optimiser steps; the probe validates once, at "
                                                            "the last")
    p.add_argument("--probe-out", default=None, help="default OUT/probes/<method>-<steps>")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = the run's: 1 for --smoke "
                                                          "runs)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    root = Path(args.out).resolve()
    smoke = (root / "settings.json").exists() and json.loads((root / "settings.json").read_text()).get(
        "smoke"
    )
    threads = args.threads or (1 if smoke else 0)
    if threads:
        torch.set_num_threads(threads)
    out = (
        Path(args.probe_out).resolve() if args.probe_out else root / "probes" / f"{args.method}-{args.steps}"
    )
    result = probe(root, args.method, args.steps, out)
    print(format_table(result))
    print(f"\nwritten: {out / 'probe.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
