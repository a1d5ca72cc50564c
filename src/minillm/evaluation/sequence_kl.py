"""Sequence-level KL between students and a teacher, estimated by sampling, plus Rouge-L on the same samples.

    reverse KL[q || p] = E_{y ~ q} [ sum_t log q(y_t|y_<t,x) - log p(y_t|y_<t,x) ]   (what MiniLLM minimises)
    forward KL[p || q] = E_{y ~ p} [ sum_t log p(y_t|y_<t,x) - log q(y_t|y_<t,x) ]   (what KD / SFT minimise)

Both are Monte-Carlo averages over prompts (one sample per prompt and seed, temperature 1, no
truncation), so each sample's log-ratio is an unbiased estimate of its prompt's sequence-level KL.
The work is shared: each student's samples are decoded with the teacher in lockstep (its log-probs come
for free) and also scored with Rouge-L; the teacher's samples, drawn once per seed, give the teacher's
own Rouge-L and are scored by every student with one teacher-forced forward pass (`compare_to_teacher`).
`kl_from_generations` computes the same numbers from samples already drawn and stored by
`evaluate_models` (their token ids), with forward passes only; the teacher's log-probabilities of its own
samples do not depend on the student, so `teacher_self_logprobs` computes them once for all students.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Union

import torch
from tqdm.auto import tqdm

from minillm.data import PromptDataset, collate_prompts, read_jsonl
from minillm.errors import DataError
from minillm.evaluation.metrics import mean_and_std, rouge_l
from minillm.sampling import SamplingConfig, generate_rollouts, response_texts, teacher_forced_logprobs

# Positions per LM-head call when scoring stored samples (the grouping these figures were first made with).
_SCORE_CHUNK = 256


def _score(model, rollout, shared_vocab_size) -> torch.Tensor:
    """log model(y_t | y_<t, x) [B, T] of a rollout's response tokens, by one teacher-forced forward pass."""
    logprobs, _ = teacher_forced_logprobs(model, rollout, vocab_size=shared_vocab_size,
                                          chunk_size=_SCORE_CHUNK)
    return logprobs


@torch.no_grad()
def compare_to_teacher(students: dict, teacher, tokenizer, examples, *, template: str = "minillm",
                       seeds=(10,), max_new_tokens: int = 256, batch_size: int = 8,
                       max_prompt_length: int = 256,
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
    device = next(teacher.parameters()).device  # the models' device (the quickstart uses CUDA when present)
    runs: list[dict[str, dict[str, list[float]]]] = []
    first_seed_texts: dict[str, dict[str, str]] = {n: {} for n in names}
    for seed in seeds:
        acc: dict[str, dict[str, list[float]]] = {n: {} for n in names}
        for start in tqdm(range(0, len(dataset), batch_size), desc=f"compare to teacher (seed {seed})",
                          unit="batch", dynamic_ncols=True):
            items = [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
            batch = collate_prompts(items, tokenizer.pad_token_id)
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            refs = [it["references"] for it in items]
            ids = [it["id"] for it in items]
            gen = torch.Generator().manual_seed(int(seed) * 100_003 + start)
            t = generate_rollouts(teacher, batch["input_ids"], batch["attention_mask"], config=config,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                  generator=gen)
            t_logp = (t.student_logprobs * t.response_mask).sum(1)
            rec = acc["teacher"]
            texts = response_texts(tokenizer, t)
            if seed == seeds[0]:
                first_seed_texts["teacher"].update(zip(ids, texts))
            rec.setdefault("rougeL", []).extend(rouge_l(x, r) for x, r in zip(texts, refs))
            rec.setdefault("length", []).extend(t.lengths.float().tolist())
            for name, student in students.items():
                gen = torch.Generator().manual_seed(int(seed) * 100_003 + start + 1)
                s = generate_rollouts(student, batch["input_ids"], batch["attention_mask"], config=config,
                                      eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id, teacher=teacher,
                                      shared_vocab_size=shared_vocab_size, generator=gen)
                rkl = ((s.student_logprobs - s.teacher_logprobs) * s.response_mask).sum(1)
                fkl = t_logp - (_score(student, t, shared_vocab_size) * t.response_mask).sum(1)
                texts = response_texts(tokenizer, s)
                if seed == seeds[0]:
                    first_seed_texts[name].update(zip(ids, texts))
                _add_student(acc[name], texts, refs, s.lengths.float(), rkl, fkl)
        runs.append(acc)
    return _summarise(runs, [dataset[i]["id"] for i in range(len(dataset))], first_seed_texts)


def _add_student(rec: dict[str, list[float]], texts, refs, lengths: torch.Tensor, rkl: torch.Tensor,
                 fkl: torch.Tensor) -> None:
    rec.setdefault("rougeL", []).extend(rouge_l(x, r) for x, r in zip(texts, refs))
    rec.setdefault("length", []).extend(lengths.tolist())
    rec.setdefault("reverse_kl", []).extend(rkl.tolist())
    rec.setdefault("reverse_kl_per_token", []).extend((rkl / lengths.clamp(min=1)).tolist())
    rec.setdefault("forward_kl", []).extend(fkl.tolist())


def _summarise(runs: list[dict[str, dict[str, list[float]]]], ids: list, responses: dict[str, dict]) -> dict:
    """`runs`: one dict per seed, name -> key -> per-prompt values in the order of `ids`.

    Per key: the mean over seeds of the per-seed averages and its spread (`<key>_std`); for "reverse_kl"
    also the per-seed median ("reverse_kl_median": per-response KLs are heavy-tailed); "per_prompt" holds
    the per-prompt means over seeds of "rougeL" and "reverse_kl".
    """
    result: dict[str, dict] = {}
    for name in runs[0]:
        entry: dict = {"num_prompts": len(ids), "num_seeds": len(runs), "responses": responses[name],
                       "ids": ids, "per_prompt": {}}
        for key in runs[0][name]:
            per_seed = [run[name][key] for run in runs]
            summaries = {key: [sum(v) / max(1, len(v)) for v in per_seed]}
            if key == "reverse_kl":
                summaries["reverse_kl_median"] = [statistics.median(v) for v in per_seed if v]
            for k, values in summaries.items():
                entry[k], entry[k + "_std"] = mean_and_std(values)
            if key in ("rougeL", "reverse_kl"):
                entry["per_prompt"][key] = [sum(col) / len(runs) for col in zip(*per_seed)]
        result[name] = entry
    return result


GenerationRecords = Union[str, os.PathLike, Sequence[dict]]


def _records(source: GenerationRecords, what: str) -> tuple[dict[str, dict], str]:
    if isinstance(source, (str, os.PathLike)):
        where = str(source)
        try:
            rows = read_jsonl(source)
        except (OSError, DataError) as err:
            raise DataError(f"{where}: cannot read the {what} generations ({err})") from None
    else:
        where, rows = f"<{what} records>", list(source)
    by_id = {}
    for i, row in enumerate(rows):
        ids = row.get("response_ids") if isinstance(row, dict) else None
        if not isinstance(ids, list) or not all(isinstance(x, int) for x in ids) or "id" not in row:
            raise DataError(f"{where}: record {i + 1} has no 'id' or no integer list 'response_ids' (files "
                            "written by `evaluate_models` of minillm before 2026-11-29 lack the ids: delete "
                            "them to regenerate)")
        by_id[str(row["id"])] = row
    return by_id, where


def _as_rollout(items: list[dict], records: dict[str, dict], pad_token_id: int, where: str,
                vocab: int | None):
    batch = collate_prompts(items, pad_token_id)
    rows = []
    for it in items:
        rec = records.get(str(it["id"]))
        if rec is None:
            raise DataError(f"{where}: no generation for prompt id {it['id']!r} (generated with other data, "
                            "limit or max_prompt_length?)")
        if vocab is not None and any(not 0 <= x < vocab for x in rec["response_ids"]):
            raise DataError(f"{where}: the response to prompt id {it['id']!r} has token ids outside the "
                            f"{vocab} ids that both models score")
        rows.append(rec["response_ids"])
    width = max(1, max(len(r) for r in rows))
    response_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    response_mask = torch.zeros((len(rows), width))
    for i, r in enumerate(rows):
        response_ids[i, :len(r)] = torch.as_tensor(r, dtype=torch.long)
        response_mask[i, :len(r)] = 1.0
    rollout = SimpleNamespace(prompt_ids=batch["input_ids"], prompt_mask=batch["attention_mask"],
                              response_ids=response_ids, response_mask=response_mask)
    return rollout, [records[str(it["id"])] for it in items]


def _batches(dataset, batch_size: int, desc: str):
    """Lists of dataset items of at most `batch_size`, with a progress bar."""
    starts = range(0, len(dataset), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", dynamic_ncols=True, leave=False):
        yield [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]


@torch.no_grad()
def teacher_self_logprobs(teacher, tokenizer, examples, teacher_generations: dict[int, GenerationRecords], *,
                          template: str = "minillm", max_prompt_length: int = 256, batch_size: int = 8,
                          shared_vocab_size: int | None = None) -> dict[int, dict[str, float]]:
    """seed -> {prompt id: sum_t log p(y_t | y_<t, x)} of the teacher's own stored samples (one forward each).

    The first term of the forward KL; it does not depend on the student, so one call serves every student's
    `kl_from_generations(..., teacher_logprobs=...)`. `shared_vocab_size` must be the one those calls use.
    """
    dataset = PromptDataset(examples, tokenizer, template=template, max_prompt_length=max_prompt_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: dict[int, dict[str, float]] = {}
    for seed, source in teacher_generations.items():
        records, where = _records(source, f"teacher seed {seed}")
        scores = out[seed] = {}
        for items in _batches(dataset, batch_size, f"teacher log p, seed {seed}"):
            t, _ = _as_rollout(items, records, pad, where, shared_vocab_size)
            logp = (_score(teacher, t, shared_vocab_size) * t.response_mask).sum(1)
            scores.update((str(it["id"]), float(v)) for it, v in zip(items, logp.tolist()))
    return out


@torch.no_grad()
def kl_from_generations(student, teacher, tokenizer, examples,
                        student_generations: dict[int, GenerationRecords],
                        teacher_generations: dict[int, GenerationRecords], *, template: str = "minillm",
                        max_prompt_length: int = 256, batch_size: int = 8,
                        shared_vocab_size: int | None = None, name: str = "student",
                        teacher_logprobs: dict[int, dict[str, float]] | None = None) -> dict[str, dict]:
    """`compare_to_teacher`'s numbers from samples already drawn, e.g. by `evaluate_models`.

    `student_generations` / `teacher_generations` map seed -> that seed's generation records (an
    `evaluate_models` file `{model}/{set}/seed{seed}.jsonl` or its rows: "id", "response", "references",
    "response_ids" = the sampled tokens with the EOS when drawn). Each record's prompt is rebuilt from
    `examples` with `template` and `max_prompt_length` (what generated it), then scored by teacher-forced
    forward passes: reverse KL = sum_t log q(y_t) - log p(y_t) on the student's samples, forward KL =
    sum_t log p - log q on the teacher's. This replaces two generation passes per seed with scoring passes,
    and gives KL and Rouge-L on the same samples. Exact when the samples were drawn at temperature 1 with no
    truncation from the models passed here (same dtype); Rouge-L is recomputed from "response".
    `teacher_logprobs`: `teacher_self_logprobs` of the same teacher files (saves one teacher forward per
    batch when several students are scored); computed here when absent.

    Returns {name: ..., "teacher": ...} with the keys of `compare_to_teacher` ("length" counts the EOS).
    """
    seeds = list(student_generations)
    if not seeds or sorted(seeds) != sorted(teacher_generations):
        raise ValueError("student and teacher generations need the same non-empty seeds; got "
                         f"{sorted(seeds)} and {sorted(teacher_generations)}")
    if teacher_logprobs is None:
        teacher_logprobs = teacher_self_logprobs(teacher, tokenizer, examples, teacher_generations,
                                                 template=template, max_prompt_length=max_prompt_length,
                                                 batch_size=batch_size, shared_vocab_size=shared_vocab_size)
    dataset = PromptDataset(examples, tokenizer, template=template, max_prompt_length=max_prompt_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    runs = []
    responses: dict[str, dict[str, str]] = {name: {}, "teacher": {}}
    for seed in seeds:
        s_records, s_where = _records(student_generations[seed], f"{name} seed {seed}")
        t_records, t_where = _records(teacher_generations[seed], f"teacher seed {seed}")
        t_self = teacher_logprobs.get(seed, {})
        acc: dict[str, dict[str, list[float]]] = {name: {}, "teacher": {}}
        for items in _batches(dataset, batch_size, f"KL {name}, seed {seed}"):
            missing = [it["id"] for it in items if str(it["id"]) not in t_self]
            if missing:
                raise ValueError(f"teacher_logprobs has no seed-{seed} entry for prompt id "
                                 f"{missing[0]!r}; compute it with teacher_self_logprobs on the same teacher "
                                 "files, examples and settings")
            refs = [it["references"] for it in items]
            t, t_rows = _as_rollout(items, t_records, pad, t_where, shared_vocab_size)
            s, s_rows = _as_rollout(items, s_records, pad, s_where, shared_vocab_size)
            t_logp = torch.tensor([t_self[str(it["id"])] for it in items])
            fkl = t_logp - (_score(student, t, shared_vocab_size) * t.response_mask).sum(1)
            rkl = ((_score(student, s, shared_vocab_size) - _score(teacher, s, shared_vocab_size))
                   * s.response_mask).sum(1)
            t_texts = [r.get("response", "") for r in t_rows]
            s_texts = [r.get("response", "") for r in s_rows]
            if seed == seeds[0]:
                responses["teacher"].update((it["id"], x) for it, x in zip(items, t_texts))
                responses[name].update((it["id"], x) for it, x in zip(items, s_texts))
            rec = acc["teacher"]
            rec.setdefault("rougeL", []).extend(rouge_l(x, r) for x, r in zip(t_texts, refs))
            rec.setdefault("length", []).extend(t.response_mask.sum(1).tolist())
            _add_student(acc[name], s_texts, refs, s.response_mask.sum(1), rkl, fkl)
        runs.append(acc)
    return _summarise(runs, [dataset[i]["id"] for i in range(len(dataset))], responses)


def paired_difference(after: list[float], before: list[float]) -> tuple[float, float]:
    """Mean of the per-prompt differences (after - before) and its standard error (sample std / sqrt(n))."""
    if len(after) != len(before) or not after:
        raise ValueError(f"paired_difference needs two equally long, non-empty lists; got {len(after)} and "
                         f"{len(before)}")
    diffs = [a - b for a, b in zip(after, before)]
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    return sum(diffs) / len(diffs), se
