"""The rollout phase of a full MiniLLM step (teacher-mixed sampling, alpha 0.2): lockstep vs the speculative
sampler at several draft lengths, next to its floor (student decode alone + one teacher forward over the same
tokens).

usage: PYTHONPATH=src python benchmarks/speculative.py [--reps 3] [--max-new 128] [--batch 8] [--threads 2]
       [--drafts 2,3,4,6] [--alpha 0.2] [--device cpu|cuda] [--tiny]
       [--out benchmarks/results/speculative.json]

Same models, prompts and batch as docs/benchmarks.md section 2 (SmolLM2-135M-Instruct teacher, its 4-layer
pruned student, the first 8 Dolly prompts of ../shared/data/dolly_dev1000.jsonl in chat format, 128 new tokens
per row with EOS disabled so that every variant does the same work). Each repetition runs every variant once,
in turn (the first repetition is a warm-up); the table shows medians. Prints a markdown table and writes the
JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DOLLY, machine_info, prepare_models  # noqa: E402
from step_parts import timed_rollout  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--drafts", default="2,3,4,6")
    ap.add_argument("--alpha", type=float, default=0.2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the GPU run: same script, same table)")
    ap.add_argument("--tiny", action="store_true", help="smoke test on minillm.testing tiny models")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "speculative.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from minillm.data import InstructionExample, PromptDataset, collate_prompts, load_instructions
    from minillm.models import check_compatibility, load_model, load_tokenizer
    from minillm.sampling import score_with_teacher
    from minillm.sampling.speculative import SpeculativeStats

    if a.tiny:
        from minillm.testing import tiny_llama, tiny_tokenizer
        tok = tiny_tokenizer()
        student = tiny_llama(tok, layers=1)
        teachers = {"fp32": tiny_llama(tok, layers=2, seed=1),
                    "bf16": tiny_llama(tok, layers=2, seed=1).to(torch.bfloat16)}
        vocab = len(tok)
        examples = [InstructionExample(instruction=f"say something {i}", input="", outputs=["x"], id=str(i),
                                       extra={}) for i in range(a.batch)]
        template = "raw"
    else:
        teacher_dir, student_dir = prepare_models()
        tok = load_tokenizer(student_dir)
        student = load_model(student_dir, dtype="float32")
        teachers = {"fp32": load_model(teacher_dir, dtype="float32"),
                    "bf16": load_model(teacher_dir, dtype="bfloat16")}
        vocab = check_compatibility(load_tokenizer(teacher_dir), tok, teachers["fp32"], student)
        examples = load_instructions(str(DOLLY), limit=4 * a.batch)
        template = "chat"
    student.to(a.device)
    for t in teachers.values():
        t.requires_grad_(False).to(a.device)
    prompts = PromptDataset(examples, tok, template=template, max_prompt_length=256)
    batch = collate_prompts([prompts[i] for i in range(a.batch)], tok.pad_token_id)
    pids, pmask = batch["input_ids"].to(a.device), batch["attention_mask"].to(a.device)
    kw = dict(max_new_tokens=a.max_new, vocab=vocab, pad_token_id=tok.pad_token_id, alpha=a.alpha,
              hidden=True)
    drafts = [int(k) for k in a.drafts.split(",")]

    variants = ["student_alone"]
    for dtype in ("bf16", "fp32"):
        variants += [f"teacher_forward_{dtype}", f"lockstep_{dtype}"]
        variants += [f"speculative_k{k}_{dtype}" for k in (drafts if dtype == "bf16" else [4])]
    seconds = {v: [] for v in variants}
    stats = {v: SpeculativeStats() for v in variants if v.startswith("speculative")}
    t_all = time.perf_counter()
    for rep in range(a.reps + 1):
        r_student, t = timed_rollout(student, pids, pmask, max_new_tokens=a.max_new, vocab=vocab,
                                     pad_token_id=tok.pad_token_id, seed=rep)
        seconds["student_alone"].append(t)
        for dtype, teacher in teachers.items():
            t0 = time.perf_counter()
            with torch.no_grad():
                score_with_teacher(r_student, student, teacher, temperature=1.0, shared_vocab_size=vocab,
                                   return_teacher_hidden=True)
            seconds[f"teacher_forward_{dtype}"].append(time.perf_counter() - t0)
            _, t = timed_rollout(student, pids, pmask, teacher=teacher, seed=rep, draft_length=0, **kw)
            seconds[f"lockstep_{dtype}"].append(t)
            for k in (drafts if dtype == "bf16" else [4]):
                name = f"speculative_k{k}_{dtype}"
                run_stats = SpeculativeStats()
                _, t = timed_rollout(student, pids, pmask, teacher=teacher, seed=rep, draft_length=k,
                                     stats=run_stats, **kw)
                seconds[name].append(t)
                if rep > 0:
                    stats[name].add(run_stats)
        print("rep", rep, {k: round(v[-1], 2) for k, v in seconds.items()}, flush=True)
    med = {k: statistics.median(v[1:]) if len(v) > 1 else v[0] for k, v in seconds.items()}

    rows = []
    for dtype in ("bf16", "fp32"):
        floor = med["student_alone"] + med[f"teacher_forward_{dtype}"]
        rows.append((f"floor: student decode alone + one {dtype} teacher forward", floor, 1.0, None, None))
        rows.append((f"lockstep, {dtype} teacher", med[f"lockstep_{dtype}"], floor / med[f"lockstep_{dtype}"],
                     1.0, None))
        for k in (drafts if dtype == "bf16" else [4]):
            name = f"speculative_k{k}_{dtype}"
            st = stats[name]
            rows.append((f"speculative, k = {k}, {dtype} teacher", med[name], floor / med[name],
                         st.tokens_per_teacher_forward, st.acceptance_rate))
    new_tokens = a.batch * a.max_new
    lines = [f"Rollout of {a.batch} prompts x {a.max_new} new tokens ({new_tokens} tokens), "
             f"alpha = {a.alpha}; median of {a.reps} repetitions after one warm-up; student alone "
             f"{med['student_alone']:.2f} s, teacher forward bf16 {med['teacher_forward_bf16']:.2f} s / fp32 "
             f"{med['teacher_forward_fp32']:.2f} s.",
             "",
             "| rollout | s | floor / ours | tokens per teacher forward | acceptance rate |",
             "|---|---|---|---|---|"]
    for name, sec, ratio, tpf, acc in rows:
        lines.append(f"| {name} | {sec:.2f} | {ratio:.2f} | {'' if tpf is None else f'{tpf:.2f}'} | "
                     f"{'' if acc is None or acc != acc else f'{acc:.3f}'} |")
    table = "\n".join(lines)
    print(table)
    result = {
        "machine": machine_info(), "device": a.device,
        "gpu": torch.cuda.get_device_name() if a.device.startswith("cuda") else None,
        "reps": a.reps, "batch": a.batch, "max_new": a.max_new, "alpha": a.alpha,
        "threads": torch.get_num_threads(), "tiny": a.tiny, "seconds": seconds, "median_seconds": med,
        "stats": {k: {"acceptance_rate": v.acceptance_rate, "tokens_per_teacher_forward":
                      v.tokens_per_teacher_forward, "drafted": v.drafted, "accepted": v.accepted,
                      "teacher_forwards": v.teacher_forwards, "kept_counts": v.kept_counts}
                  for k, v in stats.items()},
        "table": table, "wall_seconds": time.perf_counter() - t_all,
    }
    if not a.tiny:
        Path(a.out).write_text(json.dumps(result, indent=1))
        print("wrote", a.out)


if __name__ == "__main__":
    main()
