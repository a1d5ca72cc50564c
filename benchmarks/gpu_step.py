"""GPU check: a MiniLLM step with a GPT-2-XL-shaped teacher and a GPT-2-base-shaped student in bf16.

    PYTHONPATH=src python benchmarks/gpu_step.py            # on the GPU machine (writes $OUT/gpu_step.json)
    PYTHONPATH=src python benchmarks/gpu_step.py --tiny     # CPU smoke test with tiny shapes

Random weights (transformers GPT2Config: teacher n_layer 48, n_embd 1600, n_head 25; student 12 / 768 / 12;
vocab 50,257), both models held in bf16 (the student is trained in pure bf16 with AdamW here: this
measures throughput, not training quality). Phases, each a median over --reps repetitions after one
warm-up: teacher decode alone, student decode alone (our KV-cache loop, every row decodes exactly
--max-new tokens), teacher-mixed rollout (alpha = 0.2, teacher hidden states recorded), Hugging Face
`generate(do_sample=True)` of the student, and the update (student forward, chunked log-probs + single-step
reverse KL, PPO-clipped term, backward, clip, AdamW) with its FLOPs counted by
torch.utils.flop_counter.FlopCounterMode and its MFU against a measured bf16 matmul rate.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_parts import make_batch, timed_rollout, update_step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(device, dtype, n, iters):
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    rates = []
    for _ in range(3):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            a @ b
        sync(device)
        rates.append(2 * n**3 * iters / (time.perf_counter() - t0))
    return statistics.median(rates)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--alpha", type=float, default=0.2)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--no-pad", action="store_true", help="no left padding in the prompt batch")
    ap.add_argument("--probe", action="store_true", help="only a 4-token student rollout (crash probe)")
    a = ap.parse_args()
    from transformers import GPT2Config, GPT2LMHeadModel

    device = torch.device("cuda" if torch.cuda.is_available() and not a.tiny else "cpu")
    dt = torch.bfloat16
    if a.tiny:
        tcfg = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=1000)
        scfg = dict(n_layer=1, n_embd=32, n_head=2, vocab_size=1000)
        a.batch, a.prompt_len, a.max_new, a.reps = 2, 8, 6, 1
    else:
        tcfg = dict(n_layer=48, n_embd=1600, n_head=25, vocab_size=50257)
        scfg = dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257)
    res = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "batch": a.batch, "prompt_len": a.prompt_len, "max_new": a.max_new,
           "alpha": a.alpha, "reps": a.reps, "left_padding": not a.no_pad, "teacher_cfg": tcfg,
           "student_cfg": scfg}
    import transformers
    res["transformers"] = transformers.__version__
    t_start = time.perf_counter()

    n = 512 if a.tiny else 8192
    res["matmul_bf16_tflops"] = matmul_rate(device, dt, n, 2 if a.tiny else 20) / 1e12
    print("matmul bf16 TFLOP/s", res["matmul_bf16_tflops"], flush=True)

    torch.manual_seed(0)
    with torch.device(device):
        special = dict(bos_token_id=tcfg["vocab_size"] - 1, eos_token_id=tcfg["vocab_size"] - 1)
        teacher = GPT2LMHeadModel(GPT2Config(n_positions=1024, **special, **tcfg)).to(dt).eval()
        student = GPT2LMHeadModel(GPT2Config(n_positions=1024, **special, **scfg)).to(dt).eval()
    teacher.requires_grad_(False)
    res["teacher_params_m"] = sum(p.numel() for p in teacher.parameters()) / 1e6
    res["student_params_m"] = sum(p.numel() for p in student.parameters()) / 1e6
    print("models", res["teacher_params_m"], res["student_params_m"], round(time.perf_counter() - t_start, 1),
          flush=True)
    from minillm.models import lm_head_fn

    s_head, t_head = lm_head_fn(student), lm_head_fn(teacher)
    g = torch.Generator().manual_seed(1)
    V = tcfg["vocab_size"]
    prompt_ids = torch.randint(0, V - 1, (a.batch, a.prompt_len), generator=g)
    prompt_mask = torch.ones_like(prompt_ids)
    # left padding of various lengths, as real prompt batches have
    for i in range(0 if a.no_pad else a.batch):
        pad = (i * a.prompt_len) // (2 * a.batch)
        prompt_mask[i, :pad] = 0
        prompt_ids[i, :pad] = V - 1
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    # diagnostic: non-finite last-position logits with left padding (the sampler would index out of range)
    from minillm.models import final_hidden, position_ids_from_mask
    diag = {}
    with torch.no_grad():
        for name, m in (("teacher", teacher), ("student", student)):
            hid = final_hidden(m, prompt_ids, prompt_mask, position_ids_from_mask(prompt_mask))
            lg = lm_head_fn(m)(hid[:, -1])
            diag[name] = {"nonfinite_rows_last_logits": int((~torch.isfinite(lg.float())).any(-1).sum()),
                          "nonfinite_hidden_positions": int((~torch.isfinite(hid.float())).any(-1).sum()),
                          "attn_impl": getattr(m.config, "_attn_implementation", None)}
    res["left_padding_diagnostic"] = diag
    print("diag", diag, flush=True)
    if any(d["nonfinite_rows_last_logits"] for d in diag.values()):
        res["left_padding_disabled"] = True
        prompt_mask = torch.ones_like(prompt_mask)
    if a.probe:
        with torch.no_grad():
            for m in (student, teacher):
                hid = final_hidden(m, prompt_ids, prompt_mask, position_ids_from_mask(prompt_mask))
                print("probe hidden nonfinite per layer-out",
                      int((~torch.isfinite(hid.float())).any(-1).sum()), flush=True)
        r, t = timed_rollout(student, prompt_ids, prompt_mask, max_new_tokens=4, pad_token_id=V - 1)
        print("PROBE OK", a.no_pad, r.response_ids[:2].tolist(), flush=True)
        return
    kw = dict(max_new_tokens=a.max_new, pad_token_id=V - 1)
    new_tokens = a.batch * a.max_new

    times = {k: [] for k in ("teacher_decode", "student_decode", "mixed_rollout", "hf_generate",
                             "teacher_forward",
                             "student_fwd_bwd")}
    upd = []
    opt = torch.optim.AdamW([p for p in student.parameters()], lr=1e-5)
    for rep in range(a.reps + 1):
        _, t = timed_rollout(teacher, prompt_ids, prompt_mask, seed=rep, **kw)
        times["teacher_decode"].append(t)
        _, t = timed_rollout(student, prompt_ids, prompt_mask, seed=rep, **kw)
        times["student_decode"].append(t)
        r, t = timed_rollout(student, prompt_ids, prompt_mask, teacher=teacher, alpha=a.alpha, hidden=True,
                             seed=rep, **kw)
        times["mixed_rollout"].append(t)
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            student.generate(input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=True, top_k=0,
                             top_p=1.0,
                             temperature=1.0, max_new_tokens=a.max_new, min_new_tokens=a.max_new,
                             pad_token_id=V - 1, eos_token_id=V - 1)
        sync(device)
        times["hf_generate"].append(time.perf_counter() - t0)
        batch = make_batch(r, device=device)
        ids, attn = batch["input_ids"], batch["attention_mask"]
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            teacher(input_ids=ids, attention_mask=attn)
        sync(device)
        times["teacher_forward"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        out = student(input_ids=ids, attention_mask=attn)
        out.logits.float().logsumexp(-1).mean().backward()
        student.zero_grad(set_to_none=True)
        sync(device)
        times["student_fwd_bwd"].append(time.perf_counter() - t0)
        del out
        upd.append(update_step(student, s_head, t_head, batch, opt))
        print("rep", rep, {k: round(v[-1], 3) for k, v in times.items()}, round(upd[-1]["update_s"], 3),
              flush=True)

    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        update_step(student, s_head, t_head, batch, opt)
    update_flops = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        teacher(input_ids=ids, attention_mask=attn)
    teacher_fwd_flops = fc.get_total_flops()

    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    u = {k: statistics.median([x[k] for x in upd[1:]]) for k in upd[0] if k.endswith("_s")}
    res["seconds"] = med
    res["update_seconds"] = u
    res["response_tokens"] = upd[-1]["response_tokens"]
    res["sequence_tokens"] = upd[-1]["sequence_tokens"]
    res["tokens_per_s"] = {
        "teacher_decode": new_tokens / med["teacher_decode"],
        "student_decode": new_tokens / med["student_decode"],
        "mixed_rollout": new_tokens / med["mixed_rollout"],
        "hf_generate_student": new_tokens / med["hf_generate"],
        "update_response_tokens": res["response_tokens"] / u["update_s"],
        "teacher_forward_scoring": res["sequence_tokens"] / med["teacher_forward"],
    }
    floor = med["teacher_decode"] + med["student_decode"]
    res["mixed_vs_floor"] = floor / med["mixed_rollout"]
    res["student_vs_hf_generate"] = med["hf_generate"] / med["student_decode"]
    res["update_flops"] = update_flops
    res["update_tflops_achieved"] = update_flops / u["update_s"] / 1e12
    res["update_mfu_vs_measured_matmul"] = res["update_tflops_achieved"] / res["matmul_bf16_tflops"]
    res["teacher_forward_mfu"] = teacher_fwd_flops / med["teacher_forward"] / 1e12 / res["matmul_bf16_tflops"]
    if device.type == "cuda":
        res["max_memory_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
    res["wall_s"] = time.perf_counter() - t_start
    print("GPU_STEP " + json.dumps(res), flush=True)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / ("gpu_step_tiny.json" if a.tiny else "gpu_step.json")).write_text(json.dumps(res,
                                                                                                indent=1))


if __name__ == "__main__":
    main()
