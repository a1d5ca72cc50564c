"""`minillm generate`: answer every prompt of an instruction file with a model, resumably.

Used directly, for SeqKD's teacher data and for inspection. Each batch is sampled with its own
generator seeded by (seed, batch index), so an interrupted run continues where it stopped and gives
the same file as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import PromptDataset, collate_prompts
from .sampling import SamplingConfig, generate_rollouts, response_texts

logger = logging.getLogger("minillm")


def batch_generator(seed: int, batch_index: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + batch_index)


@torch.no_grad()
def generate_file(model, tokenizer, examples, output: str | os.PathLike, *, template: str = "minillm",
                  max_prompt_length: int = 256, sampling: SamplingConfig | None = None, batch_size: int = 8,
                  seed: int = 0, model_name: str = "", desc: str = "generate") -> Path:
    """Write one JSONL record per example: id, instruction, input, prompt, response, references, settings."""
    sampling = sampling or SamplingConfig()
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    dataset = PromptDataset(examples, tokenizer, template=template, max_prompt_length=max_prompt_length)
    done = 0
    if partial.exists():
        lines = [ln for ln in partial.read_text().split("\n") if ln.strip()]
        done = len(lines)
        done -= done % batch_size  # restart the last (possibly incomplete) batch
        partial.write_text("".join(ln + "\n" for ln in lines[:done]))
        logger.info("resuming %s after %d records", out, done)
    settings = {"model": model_name, "template": template, "seed": seed,
                "max_new_tokens": sampling.max_new_tokens, "temperature": sampling.temperature,
                "top_k": sampling.top_k, "top_p": sampling.top_p,
                "no_repeat_ngram_size": sampling.no_repeat_ngram_size, "greedy": sampling.greedy}
    device = next(model.parameters()).device
    n = len(dataset)
    progress = tqdm(total=n, initial=done, desc=desc, unit="prompt", dynamic_ncols=True)
    with open(partial, "a") as f, progress as bar:
        for start in range(done, n, batch_size):
            items = [dataset[i] for i in range(start, min(n, start + batch_size))]
            batch = collate_prompts(items, tokenizer.pad_token_id)
            r = generate_rollouts(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                  config=sampling, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id,
                                  generator=batch_generator(seed, start // batch_size))
            texts = response_texts(tokenizer, r)
            last = r.response_ids.gather(1, (r.lengths - 1).clamp(min=0)[:, None])[:, 0]
            eos = torch.tensor(tokenizer.eos_token_id).reshape(-1)
            finished = ((r.lengths > 0) & torch.isin(last, eos)).tolist()
            for item, text, length, done_ in zip(items, texts, r.lengths.tolist(), finished):
                ex = item["example"]
                rec = {"instruction": ex.instruction, "input": ex.input, "id": item["id"],
                       "prompt": item["prompt"], "response": text, "references": item["references"],
                       "length": int(length),
                       "finished": bool(done_), "settings": settings}
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            bar.update(len(items))
    os.replace(partial, out)
    return out
