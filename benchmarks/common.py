"""Helpers shared by the benchmark scripts: subprocess runs with peak-RSS accounting, medians, machine
info."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DOLLY = SHARED / "data" / "dolly_dev1000.jsonl"
TRL_PEER = SHARED / "bench" / "trl_peer.py"
WORK = Path(os.environ.get("MINILLM_BENCH_DIR", "/tmp/minillm-bench"))
PY = sys.executable


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def run_measured(cmd: list[str], *, env: dict | None = None, cwd: str | None = None,
                 timeout: float | None = None) -> dict:
    """Run `cmd`; return rc, stdout, stderr and wall seconds."""
    full_env = {**os.environ, **(env or {})}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env, cwd=cwd,
                            text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    wall = time.perf_counter() - t0
    return {"rc": proc.returncode, "stdout": out, "stderr": err, "wall_s": wall}


def run_with_peak_rss(cmd: list[str], *, env: dict | None = None, cwd: str | None = None,
                      timeout: float | None = None) -> dict:
    """Like run_measured, plus the peak RSS of `cmd` (GB): the command is started by a tiny fresh Python
    whose only child it is, so RUSAGE_CHILDREN.ru_maxrss is that child's own peak (KiB on Linux), the
    figure `/usr/bin/time -v` reports as "Maximum resident set size"."""
    wrapper = ("import json,os,resource,subprocess,sys,time\n"
               "t=time.perf_counter(); p=subprocess.run(sys.argv[1:]); w=time.perf_counter()-t\n"
               "r=resource.getrusage(resource.RUSAGE_CHILDREN)\n"
               "sys.stderr.write('\\nBENCH_RUSAGE '+json.dumps({'maxrss_kib':r.ru_maxrss,'wall_s':w,"
               "'rc':p.returncode})+'\\n'); sys.exit(p.returncode)\n")
    res = run_measured([PY, "-c", wrapper, *cmd], env=env, cwd=cwd, timeout=timeout)
    for line in reversed(res["stderr"].splitlines()):
        if line.startswith("BENCH_RUSAGE "):
            info = json.loads(line[len("BENCH_RUSAGE "):])
            res["peak_rss_gb"] = info["maxrss_kib"] / 2**20
            res["wall_s"] = info["wall_s"]
            break
    return res


def last_json_line(text: str, prefix: str) -> dict | None:
    for line in reversed(text.splitlines()):
        if line.startswith(prefix):
            return json.loads(line[len(prefix):].strip())
    return None


def machine_info() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")),
                     "")
        isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
    except OSError:
        isa = []
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gb = int(line.split()[1]) / 2**20
    except OSError:
        pass
    import torch
    import transformers

    try:
        import accelerate
        acc_v = accelerate.__version__
    except ImportError:
        acc_v = None
    return {"cpu": cpu, "isa": isa, "cores": os.cpu_count(), "mem_gb": round(mem_gb, 1) if mem_gb else None,
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "accelerate": acc_v,
            "torch_threads": torch.get_num_threads()}


def prepare_models(log=print) -> tuple[Path, Path]:
    """(teacher HF folder, 4-layer pruned student folder); the student is made once with `minillm prune`."""
    from minillm.models import builtin_model_dir

    teacher = builtin_model_dir("smollm2-135m-instruct")
    student = WORK / "student-4l"
    if not (student / "config.json").is_file():
        WORK.mkdir(parents=True, exist_ok=True)
        cli = [str(Path(PY).parent / "minillm")]
        if not Path(cli[0]).exists():
            cli = [PY, "-m", "minillm.cli"]
        log(f"pruning the student: minillm prune --model smollm2-135m-instruct --layers 4 --out {student}")
        r = subprocess.run([*cli, "prune", "--model", "smollm2-135m-instruct", "--layers", "4",
                            "--out", str(student)], capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"minillm prune failed:\n{r.stderr[-3000:]}")
    return teacher, student
