"""Fault suite (issue 22): kill -9 at random points, a full disk, read-only places and concurrent runs.

Each case runs the real command line (`python -m minillm.cli ...`) in a subprocess, as a user would, and
checks that nothing is lost, outputs are never mixed and every failure is a message with exit code 2, not a
traceback. Full and read-only disks are small tmpfs mounts (root only; skipped elsewhere). The number of
command runs is shown in pytest's terminal summary.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from conftest import SUITE_CASES

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
CASES = {"tried": 0}


@pytest.fixture(scope="module", autouse=True)
def _report_cases():
    yield
    SUITE_CASES["fault suite (command runs)"] = CASES["tried"]


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "minillm.cli", *map(str, args)]


def _sft(tiny_dirs, data, out, *extra) -> list[str]:
    return _cli("sft", f"student={tiny_dirs['student']}", f"train_data={data}", f"output_dir={out}",
                "batch_size=2", "max_length=200", "max_prompt_length=160", "valid_fraction=0.0",
                "learning_rate=1e-2", "lr_scheduler=constant", "seed=3", *extra)


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    CASES["tried"] += 1
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600, **kw)


def _clean_failure(proc: subprocess.CompletedProcess, *phrases: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for phrase in phrases:
        assert phrase in proc.stderr, proc.stderr[-3000:]


def test_kill_9_at_random_points_then_resume_ends_bit_exact(tiny_dirs, instruction_file, tmp_path):
    steps = 8
    reference = tmp_path / "reference"
    assert _run(_sft(tiny_dirs, instruction_file, reference, f"max_steps={steps}")).returncode == 0
    expected = load_file(str(reference / "final" / "model.safetensors"))
    rng = random.Random(20261205)
    for case in range(3):
        out = tmp_path / f"killed{case}"
        cmd = _sft(tiny_dirs, instruction_file, out, f"max_steps={steps}", "save_every=1")
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
        CASES["tried"] += 1
        # kill once the run has logged a random number of steps (0..steps-2), at a random moment after it
        target = rng.randrange(0, steps - 1)
        deadline = time.time() + 120
        metrics = out / "metrics.jsonl"
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and metrics.read_text().count("\n") >= target:
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        resumed = _run([*cmd, "resume=true"])
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        got = load_file(str(out / "final" / "model.safetensors"))
        assert got.keys() == expected.keys()
        assert all(bool((got[k] == expected[k]).all()) for k in got), f"kill case {case} (target {target})"
        records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        logged = [r["step"] for r in records if "loss" in r]
        assert logged == sorted(set(logged)), "a step was logged twice"


def test_two_runs_started_at_once_into_one_folder(tiny_dirs, instruction_file, tmp_path):
    out = tmp_path / "shared"
    procs = [subprocess.Popen(_sft(tiny_dirs, instruction_file, out, "max_steps=3", f"learning_rate={lr}"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for lr in (1e-2, 1e-3)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    CASES["tried"] += 2
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "Traceback" not in loser and ("is in use by" in loser or "already holds run" in loser), loser
    import yaml

    winner_lr = yaml.safe_load((out / "config.yaml").read_text())["learning_rate"]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]  # one run's metrics, not interleaved
    assert max(r["lr"] for r in records if "lr" in r) == pytest.approx(winner_lr)  # and that run's


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a small tmpfs at tmp_path/mnt (root only); yields (path, remount function)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")

    def mount(size: str, read_only: bool = False) -> None:
        opts = f"size={size}" + (",ro" if read_only else "")
        if os.path.ismount(mnt):
            subprocess.run(["umount", str(mnt)], check=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)], capture_output=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode()[-200:]}")

    yield mnt, mount
    if os.path.ismount(mnt):
        subprocess.run(["umount", "-l", str(mnt)])


def test_read_only_places_give_clear_errors(tiny_dirs, instruction_file, tmpfs, tmp_path):
    mnt, mount = tmpfs
    mount("4m", read_only=True)
    data = instruction_file
    cases = [
        (_sft(tiny_dirs, data, mnt / "run", "max_steps=1"), "output_dir="),
        (_cli("generate", f"model={tiny_dirs['student']}", f"data={data}", f"output={mnt / 'g.jsonl'}",
              "max_new_tokens=2", "limit=2"), "cannot write into"),
        (_cli("evaluate", f"models={tiny_dirs['student']}", f"data={data}", f"output_dir={mnt / 'eval'}",
              "seeds=1", "max_new_tokens=2", "limit=2"), "output_dir="),
        (_cli("prune", "--model", tiny_dirs["student"], "--layers", "1", "--out", mnt / "pruned"), str(mnt)),
    ]
    for cmd, phrase in cases:
        _clean_failure(_run(cmd), phrase)


def test_a_full_disk_is_a_clear_error_and_loses_nothing(tiny_dirs, instruction_file, tmpfs):
    mnt, mount = tmpfs
    mount("64k")  # smaller than one checkpoint of the tiny student: refused before the first step
    proc = _run(_sft(tiny_dirs, instruction_file, mnt / "run", "max_steps=2"))
    _clean_failure(proc, "GiB free, but the run plans to write")
    # room for the run's plan, then the disk fills up while it trains: the save fails cleanly and every
    # checkpoint already written stays intact and resumable
    mount("40m")
    out = mnt / "run2"
    filler = mnt / "filler"
    code = ("import runpy, sys\n"
            "from minillm.trainer import Trainer\n"
            "orig = Trainer.finish\n"
            "def finish(self):\n"
            f"    open({str(filler)!r}, 'wb').write(b'0' * (64 << 20))\n"  # fails part-way: the disk is full
            "    return orig(self)\n"
            "def fill(self):\n"
            "    try:\n"
            "        finish(self)\n"
            "    except OSError:\n"
            "        return orig(self)\n"
            "Trainer.finish = fill\n"
            "runpy.run_module('minillm.cli', run_name='__main__')\n")
    cmd = _sft(tiny_dirs, instruction_file, out, "max_steps=2", "save_every=1")
    proc = _run([sys.executable, "-c", code, *cmd[3:]])
    _clean_failure(proc, "No space left")
    filler.unlink()
    checkpoints = sorted((out / "checkpoints").glob("step-*"))
    assert checkpoints, "the checkpoints written before the disk filled are kept"
    resumed = _run([*cmd, "resume=true"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (out / "final" / "model.safetensors").is_file()


