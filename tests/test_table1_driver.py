"""The Table 1 driver (experiments/table1/run.py) end to end with --smoke, and its stage-level resume."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "experiments" / "table1" / "run.py"
PROBE = ROOT / "experiments" / "table1" / "probe.py"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

pytestmark = pytest.mark.skipif(not (DATA / "dolly_dev1000.jsonl").exists(),
                                reason=f"{DATA} (Dolly / S-NI files) is not available")

METHODS = ["sft", "kd", "seqkd", "minillm", "rkl", "onpolicy"]


def _run(out: Path) -> str:
    proc = subprocess.run([sys.executable, str(DRIVER), "--out", str(out), "--smoke", "--methods", *METHODS],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stderr + proc.stdout


def _finite_numbers(obj) -> list[float]:
    if isinstance(obj, bool):
        return []
    if isinstance(obj, (int, float)):
        return [obj]
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _finite_numbers(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in _finite_numbers(v)]
    return []


def test_smoke_run_and_resume(tmp_path):
    out = tmp_path / "t1"
    log = _run(out)
    assert " skip " not in log
    result = json.loads((out / "results.json").read_text())
    rows = result["rows"]
    assert list(rows) == ["teacher", "student-init", *METHODS]
    for name, row in rows.items():
        for key in ("rougeL_dollyeval", "rougeL_sni", "length_dollyeval"):
            assert math.isfinite(row[key]["mean"]) and math.isfinite(row[key]["std"]), (name, key)
        if name != "teacher":
            for key in ("reverse_kl", "forward_kl", "exacc_err_final"):
                assert math.isfinite(row[key]), (name, key)
        assert all(math.isfinite(x) for x in _finite_numbers(row)), name
    for method in METHODS:  # the same optimiser-step budget for every method
        assert result["budgets"][method]["steps"] == result["settings"]["steps"]
    assert result["teacher_choice"]["chosen"] in ("teacher-shipped", "teacher-sft")
    paired = result["paired_rougeL"]
    assert set(paired["vs_student_init"]) == set(METHODS)
    best = paired["vs_best_baseline"]["baseline"]
    assert best == max((m for m in METHODS if not m.startswith("minillm")),
                       key=lambda m: rows[m]["rougeL_dollyeval"]["mean"])
    for name in METHODS:  # one seed: the paired mean difference is the difference of the set means
        diff = rows[name]["rougeL_dollyeval"]["mean"] - rows["student-init"]["rougeL_dollyeval"]["mean"]
        assert paired["vs_student_init"][name]["dollyeval"][0] == pytest.approx(diff, abs=1e-6)
    md = (out / "results.md").read_text()
    assert md.count("\n| ") >= len(rows)
    table = md.split("## Paired")[0]  # one seed has no spread: no "± 0.00" cells in the main table
    cells = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    assert "(one seed: no spread yet)" in table and len(cells) == len(rows) and not any(" ± " in c
                                                                                        for c in cells)
    assert (out / "exposure_bias.png").exists() and (out / "training_curves.png").exists()
    # finished training runs keep their models, not their resume checkpoints
    for run in ("teacher-sft", "init-sft", *METHODS):
        assert (out / "runs" / run / "final").is_dir() and not (
            out / "runs" / run / "checkpoints"
        ).exists(), run
    # nothing is written next to the driver or into docs/
    assert not (DRIVER.parent / "data").exists()

    stages = sorted(p.stem for p in (out / "stages").glob("*.json"))
    before = (out / "results.json").read_text()
    log2 = _run(out)
    for stage in stages:
        assert f"skip {stage} " in log2, stage
    assert "INFO run " not in log2
    assert (out / "results.json").read_text() == before

    # an ablation row added later: only its training stage, its evaluations and the results run again
    proc = subprocess.run([sys.executable, str(DRIVER), "--out", str(out), "--smoke",
                           "--allow-changed-settings",
                           "--methods", *METHODS, "minillm-nomix"], capture_output=True, text=True,
                           timeout=600,
                          cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ran = sorted(line.split("INFO run ")[1].split()[0] for line in proc.stderr.splitlines()
                 if "INFO run " in line)
    assert ran == ["eval-eb-minillm-nomix", "eval-kl-minillm-nomix", "eval-rouge", "method-minillm-nomix",
                   "results"]
    assert "evaluate" in proc.stderr and "sft/dollyeval" not in proc.stderr  # old generation files are reused
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert list(rows) == ["teacher", "student-init", *METHODS, "minillm-nomix"]
    assert (out / "runs" / "minillm-nomix" / "config.yaml").read_text().count("teacher_mix_alpha: 0.0") == 1

    # a second seed added to the finished run: its generations, the KL rescoring and the results run again
    students = ["student-init", *METHODS, "minillm-nomix"]
    proc = subprocess.run([sys.executable, str(DRIVER), "--out", str(out), "--smoke",
                           "--allow-changed-settings",
                           "--seeds", "10", "20", "--methods", *METHODS, "minillm-nomix"],
                           capture_output=True,
                          text=True, timeout=600, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ran = sorted(line.split("INFO run ")[1].split()[0] for line in proc.stderr.splitlines()
                 if "INFO run " in line)
    assert ran == sorted(["eval-rouge", "results", "eval-kl-teacher", *(f"eval-kl-{n}" for n in students)])
    assert "/seed20" in proc.stderr and "/seed10" not in proc.stderr  # seed 10's files are reused
    rouge = json.loads((out / "stages" / "eval-rouge.json").read_text())["info"]["results"]
    assert {tuple(r["seeds"]) for per_set in rouge.values() for r in per_set.values()} == {(10, 20)}
    kl = json.loads((out / "stages" / "eval-kl-kd.json").read_text())["info"]
    assert kl["seeds"] == [10, 20] and kl["student"]["num_seeds"] == 2
    table = (out / "results.md").read_text().split("## Paired")[0]
    cells = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    assert "no spread yet" not in table and all(c.count(" ± ") >= 2 for c in cells)

    # a third seed for Rouge-L only (--kl-seeds keeps the KL on seeds 10 and 20): no KL stage runs again
    proc = subprocess.run([sys.executable, str(DRIVER), "--out", str(out), "--smoke",
                           "--allow-changed-settings",
                           "--seeds", "10", "20", "30", "--kl-seeds", "10", "20", "--methods", *METHODS,
                           "minillm-nomix"], capture_output=True, text=True, timeout=600, cwd=ROOT,
                           check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ran = sorted(line.split("INFO run ")[1].split()[0] for line in proc.stderr.splitlines()
                 if "INFO run " in line)
    assert ran == ["eval-rouge", "results"]
    result = json.loads((out / "results.json").read_text())
    assert result["settings"]["kl_seeds"] == [10, 20] and result["settings"]["seeds"] == [10, 20, 30]
    assert json.loads((out / "stages" / "eval-kl-kd.json").read_text())["info"]["seeds"] == [10, 20]
    assert "on the samples of seed(s) [10, 20], mean ± std" in (out / "results.md").read_text()

    # probe.py: the first step of the minillm row again, from the same init; it repeats the row exactly up to
    # the row's first validation (constant lr, same seed), so its one validation equals the row's at step 1
    probe_out = tmp_path / "probe"
    cmd = [sys.executable, str(PROBE), "--out", str(out), "--method", "minillm", "--steps", "1",
           "--probe-out", str(probe_out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    probe = json.loads((probe_out / "probe.json").read_text())
    row = probe["run_rows"]["minillm"]["valid"]
    assert probe["valid"] == row and set(row) >= {"valid_rougeL", "valid_length", "valid_reverse_kl"}
    assert probe["train"]["steps"] == 1 and len(probe["rollout_lengths"]) == 1
    assert probe["rollout_lengths"] == probe["run_rows"]["minillm"]["rollout_lengths"]
    assert "| probe: minillm |" in proc.stdout and "| minillm |" in proc.stdout
    assert not (probe_out / "runs" / "minillm" / "checkpoints").exists()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, check=False)
    assert proc.returncode == 0 and "skip method-minillm" in proc.stderr  # a finished probe is not retrained
    assert json.loads((probe_out / "probe.json").read_text())["valid"] == row


def test_changed_settings_are_refused(tmp_path):
    out = tmp_path / "t1"
    out.mkdir()
    (out / "settings.json").write_text(json.dumps({"steps": 12345}))
    proc = subprocess.run([sys.executable, str(DRIVER), "--out", str(out), "--smoke"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, check=False)
    assert proc.returncode != 0
    assert "different settings" in proc.stderr


def test_kl_seeds_must_be_evaluation_seeds(tmp_path):
    proc = subprocess.run([sys.executable, str(DRIVER), "--out", str(tmp_path / "t1"), "--smoke", "--seeds",
                           "10",
                           "--kl-seeds", "20"], capture_output=True, text=True, timeout=120, cwd=ROOT,
                           check=False)
    assert proc.returncode != 0 and "--kl-seeds 20" in proc.stderr and "--seeds (10)" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "t1").exists()


def test_run_budget_counts_each_step_once(tmp_path):
    """A run resumed from a checkpoint logs the redone steps again: the last record of each step counts."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("table1_run", DRIVER)
    driver = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(driver)
    rows = [{"step": 1, "loss": 1.0, "tokens": 10, "step_seconds": 2.0},
            # lost: the run died before a checkpoint
            {"step": 2, "loss": 1.0, "tokens": 20, "step_seconds": 3.0},
            {"step": 2, "valid_loss": 0.5},  # a validation row is not a step
            {"step": 2, "loss": 1.0, "tokens": 25, "step_seconds": 4.0},  # redone after the resume
            {"step": 3, "loss": 1.0, "tokens": 30, "step_seconds": 5.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert driver.run_budget(tmp_path) == {"train_tokens": 65, "step_seconds": 11.0}
    assert driver.run_budget(tmp_path / "missing") == {"train_tokens": 0, "step_seconds": 0.0}
    # the training-curve plot draws the same records: each step once, in order
    steps = driver.step_records(tmp_path / "metrics.jsonl")
    assert list(steps) == [1, 2, 3] and steps[2]["tokens"] == 25


def test_probe_refuses_what_it_cannot_repeat(tmp_path):
    def probe(*args):
        return subprocess.run([sys.executable, str(PROBE), *args], capture_output=True, text=True,
                              timeout=120,
                              cwd=ROOT, check=False)

    proc = probe("--out", str(tmp_path), "--method", "minillm-nomix", "--steps", "4")
    assert (
        proc.returncode != 0 and "settings.json is missing" in proc.stderr and "Traceback" not in proc.stderr
    )
    (tmp_path / "settings.json").write_text(json.dumps({"smoke": True}))
    proc = probe("--out", str(tmp_path), "--method", "kd", "--steps", "4")  # cosine lr: not repeatable
    assert (
        proc.returncode != 0 and "constant-lr MiniLLM row" in proc.stderr and "minillm-nomix" in proc.stderr
    )
    proc = probe("--out", str(tmp_path), "--method", "minillm", "--steps", "0")
    assert proc.returncode != 0 and "--steps 0" in proc.stderr
    proc = probe("--out", str(tmp_path), "--method", "minillm", "--steps", "4")
    assert (
        proc.returncode != 0
        and "stages/data.json is missing" in proc.stderr
        and "Traceback" not in proc.stderr
    )
