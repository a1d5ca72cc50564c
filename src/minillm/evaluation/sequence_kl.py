"""Sequence-level KL between students and a teacher, estimated by sampling, plus Rouge-L on the same samples.

    reverse KL[q || p] = E_{y ~ q} [ sum_t log q(y_t|y_<t,x) - log p(y_t|y_<t,x) ]   (what MiniLLM minimises)
    forward KL[p || q] = E_{y ~ p} [ sum_t log p(y_t|y_<t,x) - log q(y_t|y_<t,x) ]   (what KD / SFT minimise)

Both are Monte-Carlo averages over prompts (one sample per prompt and seed, temperature 1, no
truncation), so each sample's log-ratio is an unbiased estimate of its prompt's sequence-level KL.
The work is shared: each student's samples are decoded with the teacher in lockstep (its log-probs come
for free) and also scored with Rouge-L; the teacher's samples, drawn once per seed, give the teacher's
own Rouge-L and are scored by every student with one teacher-forced forward pass.
"""

from __future__ import annotations

import math
import statistics

import torch

from minillm.data import PromptDataset, collate_prompts
from minillm.evaluation.metrics import mean_and_std, rouge_l
from minillm.losses import chunked_token_terms
from minillm.models import lm_head_fn
from minillm.sampling import SamplingConfig, generate_rollouts, response_hidden


def _texts(rollout, tokenizer) -> list[str]:
    return [t.strip() for t in tokenizer.batch_decode(rollout.response_ids.tolist(), skip_special_tokens=True)]


@torch.no_grad()
def _score(model, rollout, shared_vocab_size) -> torch.Tensor:
    """log model(y_t | y_<t, x) of a rollout's response tokens, by one teacher-forced forward pass.

    The forward runs over the rows' real tokens only (`response_hidden`: no padding inside the rows).
    """
    device = next(model.parameters()).device
    hidden = response_hidden(model, rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids,
                             rollout.response_mask)
    valid = rollout.response_mask.bool().to(device)
    terms = chunked_token_terms(hidden[valid], lm_head_fn(model),
                                targets=rollout.response_ids.to(device)[valid], vocab_size=shared_vocab_size)
    out = torch.zeros(rollout.response_ids.shape, dtype=torch.float32)
    out[valid.cpu()] = terms.logprobs.float().cpu()
    return out


@torch.no_grad()
def compare_to_teacher(students: dict, teacher, tokenizer, examples, *, template: str = "minillm",
                       seeds=(10,), max_new_tokens: int = 256, batch_size: int = 8, max_prompt_length: int = 256,
                       shared_vocab_size: int | None = None) -> dict[str, dict[str, float]]:
    """Per model (students and "teacher"): Rouge-L vs the references, reverse / forward sequence KL, length.

    Values are means over seeds of per-seed averages, with `<key>_std` the spread over seeds
    (`reverse_kl_median`: the mean over seeds of the per-seed median response);
    `responses` maps example id -> the first seed's response; `per_prompt` maps "rougeL" and "reverse_kl"
    (students; "rougeL" only for the teacher) to per-prompt means over seeds, in the order of `ids`, for
    paired comparisons between models (every student samples with the same random numbers per seed).
    """
    dataset = PromptDataset(examples, tokenizer, template=template, max_prompt_length=max_prompt_length)
    config = SamplingConfig(max_new_tokens=max_new_tokens)
    names = list(students) + ["teacher"]
    per_seed: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    first_seed_texts: dict[str, dict[str, str]] = {n: {} for n in names}
    prompt_sums: dict[str, dict[str, list[float]]] = {n: {} for n in names}

    def add(name: str, key: str, values: list[float]) -> None:
        per_seed[name].setdefault(key, []).append(sum(values) / max(1, len(values)))
        if key == "reverse_kl" and values:  # per-response KLs are heavy-tailed: the median is the robust summary
            per_seed[name].setdefault("reverse_kl_median", []).append(statistics.median(values))

    for seed in seeds:
        acc: dict[str, dict[str, list[float]]] = {n: {} for n in names}
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
            batch = collate_prompts(items, tokenizer.pad_token_id)
            refs = [it["references"] for it in items]
            ids = [it["id"] for it in items]
            gen = torch.Generator().manual_seed(int(seed) * 100_003 + start)
            t = generate_rollouts(teacher, batch["input_ids"], batch["attention_mask"], config=config,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                  generator=gen)
            t_logp = (t.student_logprobs * t.response_mask).sum(1)
            rec = acc["teacher"]
            texts = _texts(t, tokenizer)
            if seed == seeds[0]:
                first_seed_texts["teacher"].update(zip(ids, texts))
            rec.setdefault("rougeL", []).extend(rouge_l(x, r) for x, r in zip(texts, refs))
            rec.setdefault("length", []).extend(t.lengths.float().tolist())
            for name, student in students.items():
                gen = torch.Generator().manual_seed(int(seed) * 100_003 + start + 1)
                s = generate_rollouts(student, batch["input_ids"], batch["attention_mask"], config=config,
                                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                      teacher=teacher, shared_vocab_size=shared_vocab_size, generator=gen)
                rkl = ((s.student_logprobs - s.teacher_logprobs) * s.response_mask).sum(1)
                fkl = t_logp - (_score(student, t, shared_vocab_size) * t.response_mask).sum(1)
                rec = acc[name]
                texts = _texts(s, tokenizer)
                if seed == seeds[0]:
                    first_seed_texts[name].update(zip(ids, texts))
                rec.setdefault("rougeL", []).extend(rouge_l(x, r) for x, r in zip(texts, refs))
                rec.setdefault("length", []).extend(s.lengths.float().tolist())
                rec.setdefault("reverse_kl", []).extend(rkl.tolist())
                rec.setdefault("reverse_kl_per_token", []).extend((rkl / s.lengths.clamp(min=1)).tolist())
                rec.setdefault("forward_kl", []).extend(fkl.tolist())
        for name in names:
            for key, values in acc[name].items():
                add(name, key, values)
                if key in ("rougeL", "reverse_kl"):
                    sums = prompt_sums[name].setdefault(key, [0.0] * len(values))
                    prompt_sums[name][key] = [a + v for a, v in zip(sums, values)]
    ids = [dataset[i]["id"] for i in range(len(dataset))]
    result: dict[str, dict[str, float]] = {}
    for name in names:
        result[name] = {"num_prompts": len(dataset), "num_seeds": len(seeds), "responses": first_seed_texts[name],
                        "ids": ids, "per_prompt": {k: [v / len(seeds) for v in sums]
                                                   for k, sums in prompt_sums[name].items()}}
        for key, values in per_seed[name].items():
            mean, std = mean_and_std(values)
            result[name][key], result[name][key + "_std"] = mean, std
    return result


def paired_difference(after: list[float], before: list[float]) -> tuple[float, float]:
    """Mean of the per-prompt differences (after - before) and its standard error (sample std / sqrt(n))."""
    if len(after) != len(before) or not after:
        raise ValueError(f"paired_difference needs two equally long, non-empty lists; got {len(after)} and "
                         f"{len(before)}")
    diffs = [a - b for a, b in zip(after, before)]
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    return sum(diffs) / len(diffs), se
