"""`minillm plan` against memory measured on this CPU, and the planner's figures for the paper's recipes.

    PYTHONPATH=src python benchmarks/plan_check.py            # measured vs estimated (~2 min on 2 cores)
    PYTHONPATH=src python benchmarks/plan_check.py --recipes  # the paper's five recipes (markdown)

Measured: each configuration is a real 2-step `minillm sft` run (random Llama student, fp32, AdamW, batch 4
x 256
tokens) in a fresh process; its memory is the peak resident set size during training minus the resident size
just before `api.train` (torch, transformers and the tokenizer already imported), so it counts the loaded
weights, the gradients, AdamW's moments, activations, the loss chunks and allocator overhead. The decoder
body's activations are also measured exactly: the bytes autograd saves during its forward (saved-tensor
hooks).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB, MIB = 2**30, 2**20

MEASURE = textwrap.dedent("""
    import json, resource, sys, psutil, torch
    torch.set_num_threads(1)
    from minillm import api
    from minillm.config import TrainConfig, build_config
    from minillm.models import load_tokenizer
    args = dict(a.split("=", 1) for a in sys.argv[2:])
    load_tokenizer(args["student"])
    base = psutil.Process().memory_info().rss
    api.train(build_config(TrainConfig, None, args))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    json.dump({"peak_minus_base": peak - base}, open(sys.argv[1], "w"))
""")


def body_activations(student: Path, checkpointing: bool) -> int:
    """Bytes autograd saves in the student's decoder body for a 4 x 256 batch (alive at the end of
    forward)."""
    import torch
    from transformers import AutoModelForCausalLM

    from minillm.models import enable_checkpointing

    model = AutoModelForCausalLM.from_pretrained(student)
    if checkpointing:
        enable_checkpointing(model)
    model.train()
    ids = torch.randint(3, model.config.vocab_size, (4, 256))
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return sum(storages.values())


SIZES = [  # hidden, layers, intermediate, vocab
    (256, 4, 688, 8192),
    (512, 6, 1376, 16384),
    (768, 8, 2048, 16384),
]


def make_student(root: Path, hidden: int, layers: int, intermediate: int, vocab: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT / "src"))
    from minillm.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 128,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        tie_word_embeddings=False,
    )
    out = root / f"student-{hidden}-{layers}"
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def measured(root: Path, student: Path, data: Path, checkpointing: bool) -> dict:
    script = root / "measure.py"
    script.write_text(MEASURE)
    report = root / "report.json"
    args = dict(
        method="sft",
        student=student,
        train_data=data,
        output_dir=root / "run",
        batch_size=4,
        max_length=256,
        max_prompt_length=128,
        max_steps=2,
        valid_fraction=0.05,
        eval_every=0,
        gradient_checkpointing=str(checkpointing).lower(),
        limit_train=64,
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [sys.executable, str(script), str(report), *(f"{k}={v}" for k, v in args.items())],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(report.read_text())


def check() -> None:
    sys.path.insert(0, str(ROOT / "src"))
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import WORDS, write_jsonl
    from minillm.plan import plan_memory

    print(
        "| student (hidden x layers, vocab) | params | checkpointing "
        "| activations kept through forward, estimated / measured (MiB) "
        "| error | update-phase peak estimated / measured (MiB) | error |"
    )
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # long responses so every sequence fills max_length = 256 tokens (the planner assumes full sequences)
        rows = [
            {
                "instruction": f"Say {WORDS[i % len(WORDS)]}.",
                "input": "",
                "output": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(400)),
            }
            for i in range(80)
        ]
        data = write_jsonl(root / "train.jsonl", rows)
        for hidden, layers, inter, vocab in SIZES:
            student = make_student(root, hidden, layers, inter, vocab)
            for ckpt in (False, True):
                m = measured(root, student, data, ckpt)
                m["activations"] = body_activations(student, ckpt)
                plan = plan_memory(
                    None,
                    str(student),
                    "sft",
                    1,
                    1000.0,
                    batch_size=4,
                    max_length=256,
                    gradient_checkpointing=ckpt,
                )[0]
                act = plan.parts["activations"]
                if ckpt:  # the measurement ends with the forward: without the layer recomputed in backward
                    full = plan_memory(None, str(student), "sft", 1, 1000.0, batch_size=4, max_length=256)[0]
                    act -= full.parts["activations"] // _layers(student)
                print(
                    f"| {hidden} x {layers}, {vocab} | {_params(student) / 1e6:.1f}M "
                    f"| {'yes' if ckpt else 'no'} | "
                    f"{act / MIB:.1f} / {m['activations'] / MIB:.1f} | {act / m['activations'] - 1:+.0%} | "
                    f"{plan.update_peak / MIB:.0f} / {m['peak_minus_base'] / MIB:.0f} | "
                    f"{plan.update_peak / m['peak_minus_base'] - 1:+.0%} |",
                    flush=True,
                )


def _layers(folder: Path) -> int:
    from minillm.plan import model_shape

    return model_shape(str(folder)).layers


def _params(folder: Path) -> int:
    from minillm.plan import model_shape

    return model_shape(str(folder)).params


RECIPES = {  # the paper's pairs: (teacher config, student config), from the published architectures
    "gpt2-xl": dict(
        model_type="gpt2", n_layer=48, n_embd=1600, n_head=25, vocab_size=50257, n_positions=1024
    ),
    "gpt2-base": dict(
        model_type="gpt2", n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024
    ),
    "gpt2-medium": dict(
        model_type="gpt2", n_layer=24, n_embd=1024, n_head=16, vocab_size=50257, n_positions=1024
    ),
    "gpt2-large": dict(
        model_type="gpt2", n_layer=36, n_embd=1280, n_head=20, vocab_size=50257, n_positions=1024
    ),
    "opt-13b": dict(
        model_type="opt",
        num_hidden_layers=40,
        hidden_size=5120,
        num_attention_heads=40,
        ffn_dim=20480,
        vocab_size=50272,
        word_embed_proj_dim=5120,
        max_position_embeddings=2048,
    ),
    "opt-1.3b": dict(
        model_type="opt",
        num_hidden_layers=24,
        hidden_size=2048,
        num_attention_heads=32,
        ffn_dim=8192,
        vocab_size=50272,
        word_embed_proj_dim=2048,
        max_position_embeddings=2048,
    ),
    "llama-13b": dict(
        model_type="llama",
        num_hidden_layers=40,
        hidden_size=5120,
        num_attention_heads=40,
        num_key_value_heads=40,
        intermediate_size=13824,
        vocab_size=32000,
    ),
    "llama-7b": dict(
        model_type="llama",
        num_hidden_layers=32,
        hidden_size=4096,
        num_attention_heads=32,
        num_key_value_heads=32,
        intermediate_size=11008,
        vocab_size=32000,
    ),
    "qwen2.5-7b": dict(
        model_type="qwen2",
        num_hidden_layers=28,
        hidden_size=3584,
        num_attention_heads=28,
        num_key_value_heads=4,
        intermediate_size=18944,
        vocab_size=152064,
        tie_word_embeddings=False,
    ),
    "qwen2.5-1.5b": dict(
        model_type="qwen2",
        num_hidden_layers=28,
        hidden_size=1536,
        num_attention_heads=12,
        num_key_value_heads=2,
        intermediate_size=8960,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
}
PAIRS = [  # teacher, student, GPUs x GiB, settings from configs/paper/
    ("gpt2-xl", "gpt2-base", 16, 32, dict(batch_size=4, rollout_batch_size=16, teacher_dtype="float16")),
    (
        "gpt2-xl",
        "gpt2-large",
        16,
        32,
        dict(batch_size=4, rollout_batch_size=16, teacher_dtype="float16", gradient_checkpointing=True),
    ),
    (
        "opt-13b",
        "opt-1.3b",
        8,
        80,
        dict(
            batch_size=2,
            rollout_batch_size=8,
            teacher_dtype="bfloat16",
            gradient_checkpointing=True,
            precision="bf16",
        ),
    ),
    (
        "llama-13b",
        "llama-7b",
        8,
        80,
        dict(
            batch_size=2,
            rollout_batch_size=8,
            teacher_dtype="bfloat16",
            gradient_checkpointing=True,
            precision="bf16",
        ),
    ),
    (
        "qwen2.5-7b",
        "qwen2.5-1.5b",
        8,
        80,
        dict(
            batch_size=2,
            rollout_batch_size=8,
            teacher_dtype="bfloat16",
            gradient_checkpointing=True,
            precision="bf16",
        ),
    ),
]


def recipes() -> None:
    sys.path.insert(0, str(ROOT / "src"))
    from minillm.plan import format_plan, model_shape, plan_memory

    with tempfile.TemporaryDirectory() as tmp:
        shapes = {}
        for name, config in RECIPES.items():
            path = Path(tmp) / f"{name}.json"
            path.write_text(json.dumps(config))
            shapes[name] = model_shape(str(path))
        for teacher, student, gpus, gib, settings in PAIRS:
            plans = plan_memory(shapes[teacher], shapes[student], "minillm", gpus, gib, **settings)
            print(
                f"\n### {teacher} -> {student} (minillm, {gpus} x {gib} GiB; "
                f"{', '.join(f'{k}={v}' for k, v in settings.items())})\n"
            )
            print(
                f"teacher {shapes[teacher].params / 1e9:.2f}B, student {shapes[student].params / 1e9:.2f}B "
                "parameters\n"
            )
            print(format_plan(plans, gpus, gib))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipes", action="store_true")
    recipes() if parser.parse_args().recipes else check()
