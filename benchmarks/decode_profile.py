"""Student-only decode throughput: `generate_rollouts` (teacher=None) against HF `generate` on the same
prompts.

usage: decode_profile.py --student DIR [--data JSONL] [--threads 1] [--batch 8] [--max-new 128] [--reps 5]
                         [--padded-prefill] [--profile]

Both decodes sample at temperature 1 without truncation and run exactly --max-new tokens (eos_token_id=-1 for
ours, min_new_tokens for HF), as the student_alone / hf_generate_student rows of phases.py do. The repetitions
alternate the two (one warm-up each first), so the ratio compares runs seconds apart; it prints the median
new tokens/s of each and the ratio of the medians. --padded-prefill adds a third decoder to the rotation:
ours with
the CPU unpadded prompt prefill switched off (one left-padded batched prefill, the code before it). --profile
adds
a torch.profiler table of one decode of ours.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dolly_eval500.jsonl"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--student", required=True)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--padded-prefill", action="store_true")
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from minillm import sampling
    from minillm.data import PromptDataset, collate_prompts, load_instructions
    from minillm.models import load_model, load_tokenizer
    from minillm.sampling import SamplingConfig, decoder, generate_rollouts

    tok = load_tokenizer(a.student)
    student = load_model(a.student, dtype="float32").eval()
    prompts = PromptDataset(load_instructions(a.data, limit=4 * a.batch), tok, template="chat",
                            max_prompt_length=256)
    batch = collate_prompts([prompts[i] for i in range(a.batch)], tok.pad_token_id)
    pids, pmask = batch["input_ids"], batch["attention_mask"]
    cfg = SamplingConfig(max_new_tokens=a.max_new)

    def ours(seed):
        generate_rollouts(student, pids, pmask, config=cfg, eos_token_id=-1, pad_token_id=tok.pad_token_id,
                          generator=torch.Generator().manual_seed(seed))

    def ours_padded_prefill(seed):
        saved, decoder.UNPADDED_PREFILL_MAX_COST = decoder.UNPADDED_PREFILL_MAX_COST, 0.0
        try:
            ours(seed)
        finally:
            decoder.UNPADDED_PREFILL_MAX_COST = saved

    def hf(seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            student.generate(input_ids=pids, attention_mask=pmask, do_sample=True, top_k=0, top_p=1.0,
                             temperature=1.0, max_new_tokens=a.max_new, min_new_tokens=a.max_new,
                             pad_token_id=tok.pad_token_id)

    decoders = [("ours", ours), ("hf_generate", hf)]
    if a.padded_prefill:
        decoders.insert(1, ("ours_padded", ours_padded_prefill))
    times = {name: [] for name, _ in decoders}
    for rep in range(a.reps + 1):
        for name, fn in decoders:
            t0 = time.perf_counter()
            fn(rep)
            times[name].append(time.perf_counter() - t0)
    new_tokens = a.batch * a.max_new
    tps = {k: new_tokens / statistics.median(v[1:]) for k, v in times.items()}
    ratios = [h / o for o, h in zip(times["ours"][1:], times["hf_generate"][1:])]
    lengths = pmask.sum(dim=1).tolist()
    print(f"threads={torch.get_num_threads()} batch={a.batch} max_new={a.max_new} "
          f"prompt_width={pids.shape[1]} "
          f"reps={a.reps} padding={1 - sum(lengths) / pmask.numel():.0%} "
          f"prefill_groups={sampling.prefill_groups(lengths, pids.shape[1])}")
    print(f"{'decoder':<12} {'tokens/s':>9} {'ms/step':>8}")
    for k, v in tps.items():
        print(f"{k:<12} {v:9.1f} {1000 * a.batch / v:8.2f}")
    print(f"ratio ours/hf (medians) {tps['ours'] / tps['hf_generate']:.3f}; per-rep pairs "
          f"median {statistics.median(ratios):.3f} [{min(ratios):.3f}, {max(ratios):.3f}]")
    if a.padded_prefill:
        print(f"ratio ours_padded/hf (medians) {tps['ours_padded'] / tps['hf_generate']:.3f}; "
              f"ours/ours_padded {tps['ours'] / tps['ours_padded']:.3f}")

    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            ours(0)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))


if __name__ == "__main__":
    main()
