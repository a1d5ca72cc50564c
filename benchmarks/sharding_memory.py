"""Per-process memory of a sharded run: parameter, gradient and AdamW bytes each process holds, and peak RSS.

    PYTHONPATH=src python benchmarks/sharding_memory.py            # prints a markdown table (~2 min on 2
    cores)

Each configuration is one real `minillm distill` (kd or minillm) run of 2 optimiser steps, launched with
torchrun
on 1 or 2 CPU processes (gloo), on random Llama models built here (student 4 layers, hidden 256; teacher 6
layers,
hidden 384; vocab of the tiny test tokenizer). After the last step every process counts the bytes of the
tensors
it holds itself - for FSDP2 the local shards (`DTensor.to_local()`) - for the student's parameters, their
gradients (counted before they are freed, at the optimiser step) and AdamW's state, and the teacher's
parameters;
and reports its peak resident set size (`ru_maxrss`, which also counts the interpreter, torch and the data).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DRIVER = textwrap.dedent("""
    import json, os, resource, sys, torch
    torch.set_num_threads(1)
    from minillm import api
    from minillm.config import TrainConfig, build_config
    from minillm.trainer import Trainer

    def local_bytes(tensors):
        total = 0
        for t in tensors:
            t = t.to_local() if hasattr(t, "to_local") else t
            total += t.numel() * t.element_size()
        return total

    args = dict(a.split("=", 1) for a in sys.argv[1:])
    out = args.pop("_report")
    seen = {}
    original_step = torch.optim.AdamW.step
    def step(self, *a, **k):
        params = [p for g in self.param_groups for p in g["params"]]
        seen["grads"] = local_bytes(p.grad for p in params if p.grad is not None)
        return original_step(self, *a, **k)
    torch.optim.AdamW.step = step
    original_finish = Trainer.finish
    def finish(self):
        opt = self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer
        state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
        teacher = self.ctx.teacher
        report = {"params": local_bytes(self.student.parameters()), "grads": seen.get("grads", 0),
                  "optimizer": local_bytes(state),
                  "teacher": local_bytes(teacher.parameters()) if teacher is not None else 0,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        with open(f"{out}.{self.accelerator.process_index}", "w") as f:
            json.dump(report, f)
        return original_finish(self)
    Trainer.finish = finish
    api.train(build_config(TrainConfig, None, args))
""")

CONFIGS = [  # (label, processes, extra options)
    ("1 process", 1, {}),
    ("DDP, 2 processes", 2, {}),
    ("FSDP2, 2 processes, teacher replicated", 2, {"fsdp": "true", "teacher_sharding": "replicate"}),
    ("FSDP2, 2 processes, teacher sharded", 2, {"fsdp": "true", "teacher_sharding": "shard"}),
]


def make_models(root: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_instructions, write_jsonl
    from minillm.testing import tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer()
    for name, hidden, layers in (("student", 256, 4), ("teacher", 384, 6)):
        model = tiny_llama(tok, hidden_size=hidden, layers=layers, seed=1)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    write_jsonl(root / "train.jsonl", make_instructions(64))


def run(root: Path, method: str, procs: int, extra: dict) -> list[dict]:
    report = root / f"report-{method}-{procs}-{len(extra)}-{extra.get('teacher_sharding', '')}"
    args = dict(method=method, student=root / "student", teacher=root / "teacher",
                train_data=root / "train.jsonl",
                output_dir=root / f"run-{report.name}", batch_size=4, max_steps=2, max_length=200,
                max_prompt_length=160, valid_fraction=0.1, eval_num_prompts=2, _report=report, **extra)
    if method == "minillm":
        args.update(num_rollouts=8, max_new_tokens=16, ppo_epochs=1, rollout_batch_size=4)
    driver = root / "driver.py"
    driver.write_text(DRIVER)
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
              if procs > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([*launch, str(driver), *(f"{k}={v}" for k, v in args.items())], capture_output=True,
                          text=True, env=env, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return [json.loads(Path(f"{report}.{r}").read_text()) for r in range(procs)]


def main() -> None:
    mib = 2 ** 20
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_models(root)
        for method in ("kd", "minillm"):
            print(f"\n### {method}: bytes held by each process (MiB; the largest process)\n")
            print("| configuration | student params | grads | AdamW state | params+grads+AdamW "
                  "| vs 1 process | teacher params | peak RSS |")
            print("|---|---|---|---|---|---|---|---|")
            base = None
            for label, procs, extra in CONFIGS:
                ranks = run(root, method, procs, extra)
                worst = max(ranks, key=lambda r: r["params"] + r["grads"] + r["optimizer"])
                state = worst["params"] + worst["grads"] + worst["optimizer"]
                base = base or state
                print(f"| {label} | {worst['params'] / mib:.2f} | {worst['grads'] / mib:.2f} | "
                      f"{worst['optimizer'] / mib:.2f} | {state / mib:.2f} | {state / base:.3f}x | "
                      f"{max(r['teacher'] for r in ranks) / mib:.2f} | "
                      f"{max(r['peak_rss'] for r in ranks) / mib:.0f} |", flush=True)


if __name__ == "__main__":
    main()
