"""A cost model of the speculative mixed sampler, fitted to this machine, checked against measured rollouts:
how close to its floor (student decode alone + one teacher forward) can draft-and-verify get, at which draft
length and acceptance rate, here and on the H200 of docs/benchmarks.md section 6.

usage: PYTHONPATH=src python benchmarks/speculative_model.py [--reps 3] [--drafts 2,3,4,6] [--threads 2]
       [--alpha 0.2] [--max-new 128] [--batch 8] [--sims 400] [--device cpu|cuda]
       [--out benchmarks/results/speculative_model.json]

1. Per-call costs, same models and prompts as benchmarks/speculative.py (SmolLM2-135M-Instruct teacher in
   bf16, its 4-layer pruned student in fp32, 8 Dolly prompts): one student decode step (batch 8, 1 token) and
   one teacher feed of c tokens per row (batch 8, c = 1..8, the verification forward of a draft of c - 1
   tokens), both at a context of prompt + 64 tokens, measured in each repetition next to its rollouts (this
   machine's speed drifts by 20-50 % within minutes). The teacher's cost is fitted as v0 + v1 * (c - 1).
2. Measured rollouts (EOS disabled, 128 new tokens per row): the floor's two parts and the speculative
   sampler at each fixed draft length k and with the adaptive length (`draft_adaptive`, at most 6), with its
   counts (rounds, per-token acceptance a = accepted drafts /
   (accepted drafts + rejections)). The model predicts a rollout as
   prefill + rounds * ((k + 1) * student step + teacher feed(k + 1)); the rest of the measured time is the
   sampler's own work (log-softmaxes, draws, cache bookkeeping).
3. Monte Carlo of the round structure (each drafted token kept with probability a independently, a round
   ends at the first rejection, every row decodes `max_new` tokens, all rows share each round): the best
   fixed draft length, the floor / rollout ratio it allows and what k = 4 and the adaptive length reach,
   at several a, with this machine's costs
   and with the H200 costs of section 6 (teacher decode step 20.3 ms and student step 5.5 ms at batch 32,
   teacher forward 0.067 s; a verification forward is assumed to cost one decode step there, since a GPU
   decode step is bound by reading the weights, not by the few tokens it computes).

Prints markdown tables; writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DOLLY, machine_info, prepare_models  # noqa: E402
from step_parts import timed_rollout  # noqa: E402

# docs/benchmarks.md section 6 (H200, bf16, batch 32, 128 new tokens, GPT-2-XL-shaped teacher, GPT-2-base-
# shaped student): per-step decode costs and the teacher forward over prompt + response.
H200 = {"student_step": 0.71 / 128, "teacher_step": 2.60 / 128, "teacher_forward": 0.0667, "v1": 0.0}


def call_costs(student, teacher, ids, mask, *, cols=range(1, 9), context=64, reps=3) -> dict:
    """Median seconds of a student step (1 token per row) and of teacher feeds of c tokens per row, each from
    a cache holding the prompt + `context` tokens (one prefilled cache per model, feeds taken in turn, so the
    context grows by a few dozen tokens over the measurement); prefill seconds of both; the linear fit."""
    from minillm.models import position_ids_from_mask
    from minillm.sampling.decoder import Decoder, prefill_groups

    dev = ids.device

    def clock() -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter()

    def start(model, extra: int) -> tuple[Decoder, torch.Tensor, torch.Tensor, float]:
        dec = Decoder(model, max_new_tokens=context + extra)
        m = mask.clone()
        t0 = clock()
        dec.prefill(ids, m, position_ids_from_mask(m), prefill_groups(m.sum(dim=1).tolist(), m.shape[1]))
        prefill = clock() - t0
        pos = m.sum(dim=1)
        m = torch.cat([m, torch.ones((m.shape[0], context), dtype=m.dtype, device=dev)], dim=1)
        dec.feed(torch.full((m.shape[0], context), 100, device=dev), m,
                 pos[:, None] + torch.arange(context, device=dev))
        return dec, m, pos + context, prefill

    def feed(dec, m, pos, width: int) -> tuple[float, torch.Tensor, torch.Tensor]:
        m = torch.cat([m, torch.ones((m.shape[0], width), dtype=m.dtype, device=dev)], dim=1)
        t0 = clock()
        dec.feed(torch.full((m.shape[0], width), 100, device=dev), m,
                 pos[:, None] + torch.arange(width, device=dev))
        return clock() - t0, m, pos + width

    with torch.no_grad():
        dec, m, pos, student_prefill = start(student, 2 * reps + 2)
        steps = []
        for _ in range(2 * reps + 1):
            t, m, pos = feed(dec, m, pos, 1)
            steps.append(t)
        dec, m, pos, teacher_prefill = start(teacher, (reps + 1) * sum(cols))
        times = {c: [] for c in cols}
        for _ in range(reps + 1):
            for c in cols:
                t, m, pos = feed(dec, m, pos, c)
                times[c].append(t)
    feeds = {c: statistics.median(v[1:]) for c, v in times.items()}
    xs, ys = [c - 1 for c in feeds], list(feeds.values())
    mx, my = statistics.mean(xs), statistics.mean(ys)
    v1 = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return {"student_step": statistics.median(steps[1:]), "teacher_feed": feeds, "v0": my - v1 * mx, "v1": v1,
            "prefill": student_prefill + teacher_prefill}


def round_seconds(k: int, student_step: float, v0: float, v1: float) -> float:
    """A round's model calls: k + 1 student steps and one teacher feed of k + 1 tokens per row."""
    return (k + 1) * student_step + v0 + v1 * k


def simulate(k: int, a: float, *, student_step: float, v0: float, v1: float, batch: int, max_new: int,
             sims: int, seed: int = 0, alpha: float | None = None) -> dict:
    """Mean rounds and model seconds (prefill excluded) of speculative decoding with draft length k when each
    drafted token is kept with probability a; with `alpha`, k is the adaptive length's maximum
    (`adaptive_draft_length` from the counts so far, as the sampler does)."""
    from minillm.sampling.speculative import adaptive_draft_length

    rng = random.Random(seed)
    rounds_all, secs_all = [], []
    for _ in range(sims):
        left = [max_new - 1] * batch  # the first token comes with the prefill
        rounds = secs = accepted = rejected = 0
        while max(left) > 0:
            kk = k if alpha is None else adaptive_draft_length(accepted, rejected, alpha=alpha, max_length=k)
            kk = max(0, min(kk, max(left) - 1))
            rounds += 1
            secs += round_seconds(kk, student_step, v0, v1)
            for i in range(batch):
                if left[i] > 0:
                    kept = 0
                    while kept < kk and rng.random() < a:
                        kept += 1
                    accepted, rejected = accepted + kept, rejected + (kept < kk)
                    left[i] -= kept + 1
        rounds_all.append(rounds)
        secs_all.append(secs)
    return {"rounds": statistics.mean(rounds_all), "seconds": statistics.mean(secs_all)}


def model_ratios(a: float, costs: dict, floor: float, prefill: float, alpha: float, **kw) -> dict:
    """floor / predicted rollout at every fixed k in 1..12, k = 4 and the adaptive length (at most 6)."""
    def ratio(k: int, adaptive: bool = False) -> float:
        sim = simulate(k, a, student_step=costs["student_step"], v0=costs["v0"], v1=costs["v1"],
                       alpha=alpha if adaptive else None, **kw)
        return floor / (prefill + sim["seconds"])

    fixed = {k: ratio(k) for k in range(1, 13)}
    best = max(fixed, key=fixed.get)
    return {"best_k": best, "best": fixed[best], "k4": fixed[4], "adaptive": ratio(6, adaptive=True)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--drafts", default="2,3,4,6")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the 'here' columns are then this GPU's)")
    ap.add_argument("--alpha", type=float, default=0.2)
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--sims", type=int, default=400)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"
                                         / "speculative_model.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from minillm.data import PromptDataset, collate_prompts, load_instructions
    from minillm.models import check_compatibility, load_model, load_tokenizer
    from minillm.sampling import score_with_teacher
    from minillm.sampling.speculative import SpeculativeStats

    teacher_dir, student_dir = prepare_models()
    tok = load_tokenizer(student_dir)
    student = load_model(student_dir, dtype="float32").requires_grad_(False).eval().to(a.device)
    teacher = load_model(teacher_dir, dtype="bfloat16").requires_grad_(False).eval().to(a.device)
    vocab = check_compatibility(load_tokenizer(teacher_dir), tok, teacher, student)
    prompts = PromptDataset(load_instructions(str(DOLLY), limit=4 * a.batch), tok, template="chat",
                            max_prompt_length=256)
    batch = collate_prompts([prompts[i] for i in range(a.batch)], tok.pad_token_id)
    ids, mask = batch["input_ids"].to(a.device), batch["attention_mask"].to(a.device)
    variants = {f"k{k}": (k, False) for k in (int(k) for k in a.drafts.split(","))}
    variants["adaptive"] = (6, True)
    kw = dict(max_new_tokens=a.max_new, vocab=vocab, pad_token_id=tok.pad_token_id, alpha=a.alpha,
              hidden=True)
    seconds = {"student_alone": [], "teacher_forward": [], **{n: [] for n in variants}}
    counts = {n: [] for n in variants}
    costs_by_rep = []
    t_all = time.perf_counter()
    for rep in range(a.reps + 1):
        costs = call_costs(student, teacher, ids, mask)
        costs_by_rep.append(costs)
        r, t = timed_rollout(student, ids, mask, max_new_tokens=a.max_new, vocab=vocab,
                             pad_token_id=tok.pad_token_id, seed=rep)
        seconds["student_alone"].append(t)
        t0 = time.perf_counter()
        with torch.no_grad():
            score_with_teacher(r, student, teacher, temperature=1.0, shared_vocab_size=vocab,
                               return_teacher_hidden=True)
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds["teacher_forward"].append(time.perf_counter() - t0)
        for name, (k, adaptive) in variants.items():
            run = SpeculativeStats()
            _, t = timed_rollout(student, ids, mask, teacher=teacher, seed=rep, draft_length=k,
                                 draft_adaptive=adaptive, stats=run, **kw)
            seconds[name].append(t)
            counts[name].append({"rounds": run.rounds, "accepted": run.accepted, "drafted": run.drafted,
                                 "rejections": run.rejected, "draft_lengths": run.draft_lengths,
                                 "model_seconds": costs["prefill"] + sum(
                                     round_seconds(d, costs["student_step"], costs["v0"], costs["v1"])
                                     for d in run.draft_lengths)})
        print("rep", rep, f"student step {1000 * costs['student_step']:.1f} ms, teacher feed "
              f"{1000 * costs['v0']:.1f} + {1000 * costs['v1']:.1f} * (c - 1) ms;",
              {n: round(v[-1], 2) for n, v in seconds.items()}, flush=True)
    med = {n: statistics.median(v[1:]) for n, v in seconds.items()}
    floor = med["student_alone"] + med["teacher_forward"]
    cost = {key: statistics.median(c[key] for c in costs_by_rep[1:])
            for key in ("student_step", "v0", "v1", "prefill")}

    rows, measured = [], {}
    for name, (k, adaptive) in variants.items():
        reps = counts[name][1:]
        rounds = statistics.mean(c["rounds"] for c in reps)
        acc_tokens = sum(c["accepted"] for c in reps)
        acc = acc_tokens / (acc_tokens + sum(c["rejections"] for c in reps))
        model = statistics.median(c["model_seconds"] for c in reps)
        sim = simulate(k, acc, student_step=cost["student_step"], v0=cost["v0"], v1=cost["v1"], batch=a.batch,
                       max_new=a.max_new, sims=max(1, a.sims // 4), alpha=a.alpha if adaptive else None)
        lengths = [d for c in reps for d in c["draft_lengths"]]
        label = f"adaptive (at most {k}; mean k {statistics.mean(lengths):.2f})" if adaptive else str(k)
        measured[name] = {"seconds": med[name], "rounds": rounds, "per_token_acceptance": acc,
                          "model_seconds": model, "simulated_rounds": sim["rounds"]}
        rows.append(f"| {label} | {med[name]:.2f} | {floor / med[name]:.2f} | {rounds:.1f} | "
                    f"{sim['rounds']:.1f} | "
                    f"{acc:.3f} | {model:.2f} | {med[name] - model:.2f} |")
    table1 = "\n".join([
        f"Floor {floor:.2f} s (student alone {med['student_alone']:.2f} s + bf16 teacher forward "
        f"{med['teacher_forward']:.2f} s); alpha = {a.alpha}; medians of {a.reps} after a warm-up. Per-call "
        f"costs (medians over the repetitions): student step {1000 * cost['student_step']:.1f} ms, teacher "
        f"feed {1000 * cost['v0']:.1f} + {1000 * cost['v1']:.1f} * (c - 1) ms, prefills "
        f"{1000 * cost['prefill']:.0f} ms.", "",
        "| k | measured s | floor / measured | rounds | rounds (Monte Carlo at a) | per-token acceptance a | "
        "model s (calls only) | rest: sampler work s |",
        "|---|---|---|---|---|---|---|---|", *rows])
    print(table1, flush=True)

    acc_measured = statistics.mean(m["per_token_acceptance"] for m in measured.values())
    gpu = {"student_step": H200["student_step"], "v0": H200["teacher_step"], "v1": H200["v1"]}
    rows, bests = [], {}
    for acc in sorted({round(acc_measured, 3), 0.9, 0.95, 0.98}):
        here = model_ratios(acc, cost, floor, cost["prefill"], a.alpha, batch=a.batch, max_new=a.max_new,
                            sims=max(1, a.sims // 8))
        h200 = model_ratios(acc, gpu, 0.71 + H200["teacher_forward"], 0.0, a.alpha, batch=32, max_new=128,
                            sims=max(1, a.sims // 16))
        bests[acc] = {"here": here, "h200": h200}
        rows.append(f"| {acc:.3f} | {here['best_k']}: {here['best']:.2f} | {here['k4']:.2f} | "
                    f"{here['adaptive']:.2f} | {h200['best_k']}: {h200['best']:.2f} | {h200['k4']:.2f} | "
                    f"{h200['adaptive']:.2f} |")
    table2 = "\n".join([
        "floor / rollout by the cost model (model calls only: the sampler's own work lowers every ratio):",
        "", "| per-token acceptance a | here: best k: ratio | here: k = 4 | here: adaptive (at most 6) | "
        "H200: best k: ratio | H200: k = 4 | H200: adaptive |", "|---|---|---|---|---|---|---|", *rows])
    print(table2)
    result = {"machine": machine_info(), "threads": torch.get_num_threads(), "batch": a.batch,
              "max_new": a.max_new, "alpha": a.alpha, "reps": a.reps, "costs": costs_by_rep, "cost": cost,
              "seconds": seconds, "median_seconds": med, "floor": floor, "counts": counts,
              "measured": measured,
              "model": bests, "h200_inputs": H200, "tables": [table1, table2],
              "wall_seconds": time.perf_counter() - t_all}
    Path(a.out).write_text(json.dumps(result, indent=1, default=str))
    print("wrote", a.out)


if __name__ == "__main__":
    main()
