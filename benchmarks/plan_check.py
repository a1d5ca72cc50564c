"""`minillm plan` against memory measured on this CPU, and the planner's output for the paper's recipes.

    PYTHONPATH=src python benchmarks/plan_check.py            # estimated vs measured (~3.5 min, 2 cores)
    PYTHONPATH=src python benchmarks/plan_check.py --recipes  # the paper's recipes (markdown, seconds)

What is measured. Each configuration runs in a fresh process (`--measure`) started with
MALLOC_MMAP_THRESHOLD_=65536, so that glibc serves every tensor larger than 64 KiB with its own mmap and
returns it on free: the resident set then follows the live tensors, as CUDA's allocated bytes would. The
process imports everything and runs a warm-up step of a tiny model (lazy kernel and library set-up), then
records its resident size, builds the random models (fp32 student, teacher in its dtype), creates AdamW
(foreach=True, as on GPUs) and fills its state with one step on zero gradients (the steady state, where the
moments exist while activations are alive), and runs one training step: the trainer's supervised loss
(`teacher_forced` + `token_loss`, chunked fused LM-head loss; KD: forward KL with kd_ratio 0.5), backward,
gradient clipping, AdamW step. "measured" = peak resident size (VmHWM) minus the resident size before the
models were built: weights, gradients, AdamW state and temporaries, activations, loss chunks, allocator slack.
Against it: the planner's update-phase peak for one process (option ddp, gpus=1). The activations alone are
measured exactly as well: the bytes autograd saves during the student's forward (saved-tensor hooks,
parameters excluded), against the planner's activation row. The rollout check measures, the same way, the
peak during one teacher-mixed `generate_rollouts` (alpha 0.2, teacher hidden states recorded) above the
resident size with both models built, against the planner's KV caches plus decoding transients.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
BATCH, LENGTH, ROWS, PROMPT, NEW = 4, 256, 8, 64, 64
def _gpt2(layers: int, hidden: int, heads: int) -> dict:
    return dict(model_type="gpt2", n_layer=layers, n_embd=hidden, n_head=heads, vocab_size=50257,
                n_positions=1024)


def _opt(layers: int, hidden: int, heads: int, ffn: int) -> dict:
    return dict(model_type="opt", num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                ffn_dim=ffn, vocab_size=50272, word_embed_proj_dim=hidden, max_position_embeddings=2048)


def _decoder(kind: str, layers: int, hidden: int, heads: int, kv: int, inter: int, vocab: int,
             tied: bool) -> dict:
    return dict(model_type=kind, num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab, tie_word_embeddings=tied)


SIZES = {  # random models of this benchmark
    "llama 512x6": _decoder("llama", 6, 512, 8, 4, 1376, 16384, False),
    "llama 768x8": _decoder("llama", 8, 768, 12, 4, 2048, 16384, False),
    "gpt2 512x6": _gpt2(6, 512, 8) | dict(vocab_size=16384, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0,
                                          embd_pdrop=0.0, attn_pdrop=0.0),
}
RUNS = [  # (student, teacher, method, gradient_checkpointing, precision)
    ("llama 512x6", None, "sft", False, "fp32"),
    ("llama 512x6", None, "sft", True, "fp32"),
    ("llama 768x8", None, "sft", False, "fp32"),
    ("gpt2 512x6", None, "sft", False, "fp32"),
    ("gpt2 512x6", None, "sft", True, "fp32"),
    ("llama 512x6", "llama 768x8", "kd", False, "fp32"),
    ("llama 512x6", None, "sft", False, "bf16"),
]


def _rss() -> tuple[int, int]:
    status = open("/proc/self/status").read()
    return tuple(int(re.search(rf"{k}:\s+(\d+)", status).group(1)) * 1024 for k in ("VmRSS", "VmHWM"))


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS


def _build(config: dict, dtype=None):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    return model if dtype is None else model.to(dtype)


def _step(student, teacher, batch: dict, optimizer, precision: str) -> None:
    import contextlib

    import torch

    from minillm.algorithms.supervised import supervised_loss_fn, teacher_forced
    from minillm.losses import token_loss
    from minillm.models import final_hidden, lm_head_fn

    def teacher_fn(ids, mask):
        with torch.no_grad():
            return final_hidden(teacher, ids, mask)

    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    )
    with autocast:
        hidden, t_hidden, targets = teacher_forced(
            batch, lambda i, m: final_hidden(student, i, m), teacher_fn if teacher is not None else None
        )
        div = "fkl" if teacher is not None else None
        f = token_loss(
            hidden,
            lm_head_fn(student),
            supervised_loss_fn(div, (0.5, 0.5) if div else (1.0, 0.0), targets.numel()),
            targets=targets,
            teacher_hidden=t_hidden,
            divergence=div,
            chunk_size=256,
            teacher_head=lm_head_fn(teacher) if teacher is not None else None,
        )
    f.loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _saved_activations(model, batch: dict, precision: str) -> int:
    import contextlib

    import torch

    from minillm.models import final_hidden

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    )
    with autocast, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        final_hidden(model, batch["input_ids"], batch["attention_mask"])
    return sum(saved.values())


def measure(spec: dict) -> dict:
    """One configuration in this (fresh) process; see the module docstring."""
    import torch

    from minillm.models import enable_checkpointing

    torch.set_num_threads(1)
    ids = torch.randint(3, 16000, (BATCH, LENGTH))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    if spec["kind"] == "rollout":
        return _measure_rollout(spec)
    tiny = _build(SIZES["llama 512x6"] | dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1))
    _step(tiny, None, batch, torch.optim.AdamW(tiny.parameters(), foreach=True), spec["precision"])  # warm-up
    del tiny
    base = _rss()[0]
    _reset_peak()
    student = _build(SIZES[spec["student"]])
    teacher = _build(SIZES[spec["teacher"]]).eval().requires_grad_(False) if spec["teacher"] else None
    if spec["checkpointing"]:
        enable_checkpointing(student)
    student.train()
    optimizer = torch.optim.AdamW(student.parameters(), foreach=True)
    for p in student.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # AdamW's state exists from now on, as after the first step of a run
    optimizer.zero_grad(set_to_none=True)
    _step(student, teacher, batch, optimizer, spec["precision"])
    peak = _rss()[1] - base
    return {"peak": peak, "activations": _saved_activations(student, batch, spec["precision"])}


def _measure_rollout(spec: dict) -> dict:
    import torch

    from minillm.config import SamplingConfig
    from minillm.sampling import generate_rollouts

    student, teacher = _build(SIZES[spec["student"]]).eval(), _build(SIZES[spec["teacher"]]).eval()
    prompts = torch.randint(3, 16000, (ROWS, PROMPT))
    kw = dict(
        config=SamplingConfig(max_new_tokens=NEW),
        eos_token_id=16383,
        pad_token_id=0,
        teacher=teacher,
        teacher_mix_alpha=0.2,
        return_teacher_hidden=True,
        generator=torch.Generator().manual_seed(0),
    )
    generate_rollouts(student, prompts[:2, :8], torch.ones_like(prompts[:2, :8]), **kw)  # warm-up
    base = _rss()[0]
    _reset_peak()
    generate_rollouts(student, prompts, torch.ones_like(prompts), **kw)
    return {"peak": _rss()[1] - base}


def _run(spec: dict) -> dict:
    env = {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT / "src"),
    }
    proc = subprocess.run(
        [sys.executable, __file__, "--measure", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check() -> None:
    sys.path.insert(0, str(ROOT / "src"))
    from minillm.plan import model_shape, plan_memory

    with tempfile.TemporaryDirectory() as tmp:
        shapes = {}
        for name, config in SIZES.items():
            path = Path(tmp) / f"{name.replace(' ', '-')}.json"
            path.write_text(json.dumps(config))
            shapes[name] = model_shape(str(path))
        print(
            "| student | params | method | checkpointing | precision | activations estimated / saved (MiB) "
            "| error | step peak estimated / measured (MiB) | error |\n|---|---|---|---|---|---|---|---|---|"
        )
        for student, teacher, method, ckpt, precision in RUNS:
            m = _run(
                dict(kind="update", student=student, teacher=teacher, checkpointing=ckpt, precision=precision)
            )
            plan = plan_memory(
                shapes.get(teacher),
                shapes[student],
                method,
                1,
                1000.0,
                batch_size=BATCH,
                max_length=LENGTH,
                gradient_checkpointing=ckpt,
                precision=precision,
            )
            ddp = plan.option("ddp")
            act = next(v for k, v in ddp.parts.items() if k.endswith("(counted)"))
            if ckpt:  # the saved bytes end with the forward: without the layer recomputed in backward
                full = ddp.parts["activations, gradient_checkpointing=false"]
                s = shapes[student]
                act -= (full - BATCH * LENGTH * s.hidden * (8 if s.family == "llama" else 4)) // s.layers
            if not ckpt:  # autocast's bf16 weight copies are saved by the linears as well
                act += ddp.parts["bf16 autocast weight copies"]
            label = student + (f" (teacher {teacher})" if teacher else "")
            print(
                f"| {label} | {shapes[student].params / 1e6:.1f}M | {method} | {'yes' if ckpt else 'no'} | "
                f"{precision} | {act / MIB:.1f} / {m['activations'] / MIB:.1f} | "
                f"{act / m['activations'] - 1:+.1%} | {ddp.update_peak / MIB:.0f} / {m['peak'] / MIB:.0f} | "
                f"{ddp.update_peak / m['peak'] - 1:+.1%} |",
                flush=True,
            )
        m = _run(dict(kind="rollout", student="llama 512x6", teacher="llama 768x8"))
        parts = (
            plan_memory(
                shapes["llama 768x8"],
                shapes["llama 512x6"],
                "minillm",
                1,
                1000.0,
                rollout_batch_size=ROWS,
                max_prompt_length=PROMPT,
                max_new_tokens=NEW,
            )
            .option("ddp")
            .parts
        )
        est = sum(
            parts[k]
            for k in (
                "rollout KV cache, student",
                "rollout KV cache, teacher",
                "decoding transients (logits, prefill, records)",
            )
        )
        print(
            f"\nRollout (student llama 512x6, teacher llama 768x8, {ROWS} rows, {PROMPT} + {NEW} tokens, "
            f"alpha 0.2): KV caches + decoding transients estimated {est / MIB:.1f} MiB, measured "
            f"{m['peak'] / MIB:.1f} MiB ({est / m['peak'] - 1:+.1%})."
        )


RECIPES = {  # the published architectures
    "gpt2-xl": _gpt2(48, 1600, 25), "gpt2-base": _gpt2(12, 768, 12), "gpt2-medium": _gpt2(24, 1024, 16),
    "gpt2-large": _gpt2(36, 1280, 20), "opt-13b": _opt(40, 5120, 40, 20480),
    "opt-1.3b": _opt(24, 2048, 32, 8192),
    "llama-13b": _decoder("llama", 40, 5120, 40, 40, 13824, 32000, False),
    "llama-7b": _decoder("llama", 32, 4096, 32, 32, 11008, 32000, False),
    "qwen2.5-7b": _decoder("qwen2", 28, 3584, 28, 4, 18944, 152064, False),
    "qwen2.5-1.5b": _decoder("qwen2", 28, 1536, 12, 2, 8960, 151936, True),
}
PAIRS = [  # teacher, student, training config (configs/paper/), GPUs x GiB
    ("gpt2-xl", "gpt2-base", "gpt2-base-minillm.yaml", 16, 32),
    ("gpt2-xl", "gpt2-medium", "gpt2-medium-minillm.yaml", 16, 32),
    ("gpt2-xl", "gpt2-large", "gpt2-large-minillm.yaml", 16, 32),
    ("opt-13b", "opt-1.3b", "opt-1.3b-minillm.yaml", 8, 80),
    ("llama-13b", "llama-7b", "llama-7b-minillm.yaml", 8, 80),
    ("qwen2.5-7b", "qwen2.5-1.5b", "qwen2.5-1.5b-minillm.yaml", 8, 80),
]


def recipes() -> None:
    sys.path.insert(0, str(ROOT / "src"))
    from minillm.config import TrainConfig, build_config
    from minillm.plan import format_plan, model_shape, plan_memory

    with tempfile.TemporaryDirectory() as tmp:
        shapes = {}
        for name, config in RECIPES.items():
            (Path(tmp) / f"{name}.json").write_text(json.dumps(config))
            shapes[name] = model_shape(str(Path(tmp) / f"{name}.json"))
            shapes[name].name = f"{name}.json"
        for teacher, student, yaml, gpus, gib in PAIRS:
            cfg = build_config(TrainConfig, str(ROOT / "configs" / "paper" / yaml), {})
            print(
                f"\n### {teacher} -> {student} on {gpus} x {gib} GiB (configs/paper/{yaml})\n\n"
                f"`minillm plan --config configs/paper/{yaml} --teacher {teacher}.json "
                f"--student {student}.json --gpus {gpus} --gpu-memory {gib}`\n\n```"
            )
            print(
                format_plan(
                    plan_memory(shapes[teacher], shapes[student], gpus=gpus, gpu_memory_gib=gib, config=cfg)
                )
            )
            print("```")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipes", action="store_true", help="print the paper's recipes")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(json.loads(args.measure))))
    elif args.recipes:
        recipes()
    else:
        check()
