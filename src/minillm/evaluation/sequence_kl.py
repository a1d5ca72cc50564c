"""Sequence-level KL between a student and a teacher, estimated by sampling (no reference text needed).

    reverse KL[q || p] = E_{y ~ q} [ sum_t log q(y_t|y_<t,x) - log p(y_t|y_<t,x) ]   (what MiniLLM minimises)
    forward KL[p || q] = E_{y ~ p} [ sum_t log p(y_t|y_<t,x) - log q(y_t|y_<t,x) ]   (what KD / SFT minimise)

Both are Monte-Carlo averages over prompts (one sample per prompt and seed) with temperature 1 and
no truncation, so each sample's log-ratio is an unbiased estimate of the sequence-level KL of its prompt.
"""

from __future__ import annotations

import torch

from minillm.data import PromptDataset, collate_prompts
from minillm.evaluation.metrics import mean_and_std
from minillm.sampling import SamplingConfig, generate_rollouts


@torch.no_grad()
def sequence_kls(student, teacher, tokenizer, examples, *, template: str = "minillm", seeds=(10,),
                 max_new_tokens: int = 256, batch_size: int = 8, max_prompt_length: int = 256,
                 shared_vocab_size: int | None = None) -> dict[str, float]:
    """Reverse and forward sequence-level KL (nats per response, and per token) with their seed spread."""
    dataset = PromptDataset(examples, tokenizer, template=template, max_prompt_length=max_prompt_length)
    config = SamplingConfig(max_new_tokens=max_new_tokens)
    out: dict[str, list[float]] = {"reverse_kl": [], "forward_kl": [], "reverse_kl_per_token": [],
                                   "forward_kl_per_token": [], "student_length": [], "teacher_length": []}
    for seed in seeds:
        gen = torch.Generator().manual_seed(int(seed))
        sums = {k: [] for k in out}
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
            batch = collate_prompts(items, tokenizer.pad_token_id)
            for sampler, scorer, key, length_key in ((student, teacher, "reverse_kl", "student_length"),
                                                     (teacher, student, "forward_kl", "teacher_length")):
                r = generate_rollouts(sampler, batch["input_ids"], batch["attention_mask"], config=config,
                                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                      teacher=scorer, shared_vocab_size=shared_vocab_size, generator=gen)
                seq = ((r.student_logprobs - r.teacher_logprobs) * r.response_mask).sum(1)
                sums[key].extend(seq.tolist())
                sums[key + "_per_token"].extend((seq / r.lengths.clamp(min=1)).tolist())
                sums[length_key].extend(r.lengths.float().tolist())
        for k, v in sums.items():
            out[k].append(sum(v) / max(1, len(v)))
    result: dict[str, float] = {}
    for k, per_seed in out.items():
        mean, std = mean_and_std(per_seed)
        result[k] = mean
        result[k + "_std"] = std
    result["num_prompts"] = len(dataset)
    return result
