"""Per-phase timings of our MiniLLM step next to their floors, sampling throughput, matmul peak, bf16
tolerance.

usage: phases.py --teacher DIR --student DIR [--reps 3] [--max-new 128] [--batch 8] [--threads 2]
Prints 'PHASES {json}'. Every timing is the median of --reps repetitions after one warm-up, and the
repetitions interleave the variants (so a ratio compares runs seconds apart, not minutes).

Decode runs use eos_token_id = -1 (no token matches), so every row decodes exactly --max-new tokens and
the per-token times of different variants are comparable (a real rollout stops when all rows are done).
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
from step_parts import gradient_agreement, make_batch, timed_rollout, update_gradient, update_step


def matmul_gflops(dtype, n=4096, reps=3):
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        out.append(2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return statistics.median(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher")
    ap.add_argument("--student")
    ap.add_argument("--data")
    ap.add_argument("--tiny", action="store_true", help="smoke test on minillm.testing tiny models")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--matmul-n", type=int, default=4096)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from minillm.data import PromptDataset, collate_prompts, load_instructions
    from minillm.models import check_compatibility, lm_head_fn, load_model, load_tokenizer

    res = {"reps": a.reps, "max_new": a.max_new, "batch": a.batch, "threads": torch.get_num_threads()}
    t_all = time.perf_counter()
    res["matmul_gflops"] = {"fp32": matmul_gflops(torch.float32, a.matmul_n),
                           "bf16": matmul_gflops(torch.bfloat16, a.matmul_n), "n": a.matmul_n}
    print("matmul", res["matmul_gflops"], flush=True)

    if a.tiny:
        from minillm.data import InstructionExample
        from minillm.testing import tiny_llama, tiny_tokenizer

        tok = tiny_tokenizer()
        student, teacher = tiny_llama(tok, layers=1), tiny_llama(tok, layers=2, seed=1)
        teacher_bf16 = tiny_llama(tok, layers=2, seed=1).to(torch.bfloat16)
        vocab = len(tok)
        examples = [InstructionExample(instruction=f"say something {i}", input="", outputs=["x"], id=str(i),
                                       extra={})
                    for i in range(a.batch)]
        template = "raw"
    else:
        tok = load_tokenizer(a.student)
        student = load_model(a.student, dtype="float32")
        teacher = load_model(a.teacher, dtype="float32")
        teacher_bf16 = load_model(a.teacher, dtype="bfloat16")
        vocab = check_compatibility(load_tokenizer(a.teacher), tok, teacher, student)
        examples = load_instructions(a.data, limit=4 * a.batch)
        template = "chat"
    for t in (teacher, teacher_bf16):
        t.requires_grad_(False)
    prompts = PromptDataset(examples, tok, template=template, max_prompt_length=256)
    batch = collate_prompts([prompts[i] for i in range(a.batch)], tok.pad_token_id)
    pids, pmask = batch["input_ids"], batch["attention_mask"]
    res["prompt_tokens"] = int(pmask.sum())
    res["prompt_width"] = int(pids.shape[1])
    kw = dict(max_new_tokens=a.max_new, vocab=vocab, pad_token_id=tok.pad_token_id)
    new_tokens = a.batch * a.max_new

    # ---------------------------------------------------------------- decoding and sampling
    dec = {k: [] for k in ("student_alone", "teacher_alone_fp32", "teacher_alone_bf16", "mixed_a0.2_fp32",
                           "mixed_a0.2_teacher_bf16", "hf_generate_student")}
    keep = {}
    for rep in range(a.reps + 1):
        _, t = timed_rollout(student, pids, pmask, seed=rep, **kw)
        dec["student_alone"].append(t)
        _, t = timed_rollout(teacher, pids, pmask, seed=rep, **kw)
        dec["teacher_alone_fp32"].append(t)
        _, t = timed_rollout(teacher_bf16, pids, pmask, seed=rep, **kw)
        dec["teacher_alone_bf16"].append(t)
        # the lockstep decode (the speculative sampler has its own benchmark: benchmarks/speculative.py)
        keep["fp32"], t = timed_rollout(student, pids, pmask, teacher=teacher, alpha=0.2, hidden=True,
                                        seed=rep, draft_length=0, **kw)
        dec["mixed_a0.2_fp32"].append(t)
        keep["bf16"], t = timed_rollout(student, pids, pmask, teacher=teacher_bf16, alpha=0.2, hidden=True,
                                        seed=rep, draft_length=0, **kw)
        dec["mixed_a0.2_teacher_bf16"].append(t)
        t0 = time.perf_counter()
        with torch.no_grad():
            student.generate(input_ids=pids, attention_mask=pmask, do_sample=True, top_k=0, top_p=1.0,
                             temperature=1.0, max_new_tokens=a.max_new, min_new_tokens=a.max_new,
                             pad_token_id=tok.pad_token_id)
        dec["hf_generate_student"].append(time.perf_counter() - t0)
        print("decode rep", rep, {k: round(v[-1], 2) for k, v in dec.items()}, flush=True)
    res["decode_seconds"] = {k: statistics.median(v[1:]) for k, v in dec.items()}
    res["decode_seconds_all"] = dec
    res["new_tokens"] = new_tokens

    # ---------------------------------------------------------------- update phase and its floors
    b32 = make_batch(keep["fp32"])
    ids, attn = b32["input_ids"], b32["attention_mask"]
    s_head, t_head = lm_head_fn(student), lm_head_fn(teacher)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-7)
    upd = {"fp32": [], "bf16_autocast": []}
    floors = {k: [] for k in ("student_forward", "student_fwd_bwd", "teacher_forward_fp32",
                              "teacher_forward_bf16")}
    for rep in range(a.reps + 1):
        upd["fp32"].append(update_step(student, s_head, t_head, b32, opt, vocab=vocab, chunk_size=a.chunk))
        upd["bf16_autocast"].append(update_step(student, s_head, t_head, b32, opt, vocab=vocab,
                                                chunk_size=a.chunk,
                                                autocast=torch.bfloat16))
        t0 = time.perf_counter()
        with torch.no_grad():
            student(input_ids=ids, attention_mask=attn)
        floors["student_forward"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        out = student(input_ids=ids, attention_mask=attn, labels=ids)
        out.loss.backward()
        student.zero_grad(set_to_none=True)
        floors["student_fwd_bwd"].append(time.perf_counter() - t0)
        del out
        for name, m in (("teacher_forward_fp32", teacher), ("teacher_forward_bf16", teacher_bf16)):
            t0 = time.perf_counter()
            with torch.no_grad():
                m(input_ids=ids, attention_mask=attn)
            floors[name].append(time.perf_counter() - t0)
        print("update rep", rep, round(upd["fp32"][-1]["update_s"], 2),
              round(upd["bf16_autocast"][-1]["update_s"], 2),
              {k: round(v[-1], 2) for k, v in floors.items()}, flush=True)
    res["update_seconds"] = {k: {f: statistics.median([x[f] for x in v[1:]]) for f in v[0]
                                 if f.endswith("_s")}
                             for k, v in upd.items()}
    res["update_tokens"] = {f: upd["fp32"][-1][f] for f in ("response_tokens", "sequence_tokens",
                                                            "padded_tokens")}
    res["floor_seconds"] = {k: statistics.median(v[1:]) for k, v in floors.items()}

    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        update_step(student, s_head, t_head, b32, opt, vocab=vocab, chunk_size=a.chunk)
    res["update_flops"] = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        out = student(input_ids=ids, attention_mask=attn, labels=ids)
        out.loss.backward()
    student.zero_grad(set_to_none=True)
    res["student_fwd_bwd_flops"] = fc.get_total_flops()
    del out

    # ---------------------------------------------------------------- bf16 tolerance against fp32
    tol = {}
    r = keep["fp32"]
    m = r.response_mask.bool()
    with torch.no_grad():
        from minillm.models import final_hidden

        lp = {}
        for name, mdl in (("fp32", teacher), ("bf16", teacher_bf16)):
            h = final_hidden(mdl, ids, attn)[:, r.prompt_ids.shape[1] - 1:-1]
            logits = lm_head_fn(mdl)(h).float()[..., :vocab]
            lp[name] = torch.log_softmax(logits, -1)
        tok_lp = {k: v.gather(-1, r.response_ids[..., None]).squeeze(-1)[m] for k, v in lp.items()}
        d = (tok_lp["bf16"] - tok_lp["fp32"]).abs()
        tol["teacher_logp_abs_err_mean"] = float(d.mean())
        tol["teacher_logp_abs_err_p99"] = float(d.quantile(0.99))
        rew = (tok_lp["fp32"] - r.student_logprobs[m])
        tol["reward_std"] = float(rew.std())
        tol["teacher_kl_fp32_vs_bf16_per_token"] = float(
            (lp["fp32"].exp() * (lp["fp32"] - lp["bf16"])).sum(-1)[m].mean())
        tol["teacher_logp_decode_vs_forward_abs_err_mean"] = float(
            (r.teacher_logprobs[m] - tok_lp["fp32"]).abs().mean()
        )
        del lp
    # one update's gradient under bf16 autocast vs fp32 on the same rollout (step_parts.update_gradient)
    g32, loss32 = update_gradient(student, s_head, t_head, b32, vocab=vocab, chunk_size=a.chunk)
    g16, loss16 = update_gradient(student, s_head, t_head, b32, vocab=vocab, chunk_size=a.chunk,
                                  autocast=torch.bfloat16)
    tol.update(gradient_agreement(g32, loss32, g16, loss16))
    res["bf16_tolerance"] = tol
    res["wall_s"] = time.perf_counter() - t_all
    res["student_params_m"] = sum(p.numel() for p in student.parameters()) / 1e6
    res["teacher_params_m"] = sum(p.numel() for p in teacher.parameters()) / 1e6
    print("PHASES " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
