"""Generation-based evaluation over seeds: the protocol behind Table 1 of the MiniLLM paper (arXiv
2306.08543).

For every model × test set × seed the runner samples one response per prompt, scores it against the
references (Rouge-L, exact match), and writes the generations; `results.json` / `results.md` then
aggregate the per-seed averages as mean ± std over seeds.

Protocol defaults (all overridable): seeds 10, 20, 30, 40, 50; temperature 1, top-k 0, top-p 1
(pure sampling); ≤ 256 new tokens; prompts ≤ 256 tokens; the MiniLLM prompt template.

`no_repeat_ngram_size` defaults to 0. The released LMOps scripts pass 6, but until the fix of
2024-09-30 to LMOps' transformers fork its non-model-parallel sampling path silently ignored logits
*processors*, so every number in the paper was produced WITHOUT the 6-gram block. 0 reproduces the
published protocol; pass 6 to match the post-Sep-2024 scripts. The value is recorded in results.json.

`protocol="minillm"` (`minillm evaluate --protocol minillm`) makes these defaults binding: a contradicting
setting is refused, each data file must be one of the paper's five sets, and the paper's published Table 1
numbers (`minillm.evaluation.published`) are shown beside ours, marked as published.

Runs are resumable at the granularity of one (model, set, seed) file: each file is written atomically
(`minillm.io`: temporary file + os.replace), and a re-run skips every file that is complete for the same
examples.
Settings that change generations are pinned in `eval_config.json`; re-running into the same output
directory with different settings is refused instead of mixing incomparable files.

Sampling uses one torch.Generator per (model, set, seed), seeded with the seed and consumed batch
after batch, so a (seed, batch_size) pair reproduces the same generations on the same device.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from minillm.config.commands import model_labels
from minillm.config.engine import VLLMConfig, validate_engine_sampling
from minillm.data import PromptDataset, collate_prompts, load_instructions
from minillm.errors import ConfigError, DataError
from minillm.evaluation.metrics import distinct_n, exact_match, mean_and_std, rouge_l
from minillm.evaluation.protocol import (
    DESCRIPTION,
    PAPER_SETS,
    PROTOCOLS,
    PUBLISHED_CHOICES,
    SETTINGS,
    check_published,
    check_settings,
    choose_published,
    data_notes,
    recognise_set,
)
from minillm.evaluation.report import results_markdown
from minillm.io import file_hash, read_jsonl, write_json, write_jsonl, write_text
from minillm.models import load_model, load_tokenizer
from minillm.models.fingerprint import source_fingerprint, weights_fingerprint
from minillm.ownership import file_lock
from minillm.preflight import check_context, check_embeddings, generation_length
from minillm.sampling import SamplingConfig, generate_rollouts, response_texts
from minillm.sampling.vllm_rollout import engine_sampler

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    ModelSpec = str | os.PathLike | tuple[PreTrainedModel, PreTrainedTokenizerBase]

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]*$")


@dataclass
class _Job:
    """One (model, set, seed) unit: the file it writes and the prompts it needs."""

    set_name: str
    seed: int
    path: Path
    dataset: PromptDataset
    num_batches: int


def _read_complete(path: Path, ids: list[str]) -> list[dict] | None:
    """The records of a finished generation file, or None if it is missing or not for exactly `ids`."""
    if not path.is_file():
        return None
    try:
        records = read_jsonl(path)
    except DataError:
        return None
    return records if [str(r.get("id")) for r in records] == ids else None


def check_names(models: dict, data_files: Sequence[str], protocol: str = "none") -> dict[str, str]:
    """Validate model labels (used as folder names) and map set name -> data file.

    The set name is the file stem; under protocol="minillm" it is the paper set the file holds (dolly,
    selfinst, vicuna, sni, unni: `protocol.recognise_set`), in Table 1's order.

    Labels are the keys of `models`, so they are unique here; a list of paths is labelled by
    `minillm.config.commands.model_labels` (unique labels, never a model dropped) before it gets here.
    """
    if not isinstance(models, dict):
        raise ConfigError(f"evaluate_models takes {{label: model}}, got a {type(models).__name__}; label a "
                          "list of paths with minillm.config.commands.model_labels(paths)")
    if not models:
        raise ConfigError("evaluate_models needs at least one model ({name: path or (model, tokenizer)})")
    for name, spec in models.items():
        if not _SAFE_NAME.match(name):
            raise ConfigError(f"model name {name!r} cannot be used as a folder name; use letters, digits and "
                              "._=+- only (e.g. 'gpt2-sft')")
        if not isinstance(spec, (str, os.PathLike, tuple)):
            raise ConfigError(f"model {name!r}: pass a path / hub id / built-in name, or a (model, "
                              f"tokenizer) pair, not a bare {type(spec).__name__} (its tokenizer is needed "
                              "to decode)")
    sets: dict[str, str] = {}
    for source in data_files:
        stem = recognise_set(str(source)) if protocol == "minillm" else Path(str(source)).stem
        if stem in sets:
            what = "the paper's set" if protocol == "minillm" else "the same set name"
            raise ConfigError(f"data files {sets[stem]!r} and {source!r} are both {what} {stem!r}; pass one "
                              "of them (or rename one) so their results do not overwrite each other")
        sets[stem] = str(source)
    if not sets:
        raise ConfigError("evaluate_models needs at least one data file")
    if protocol == "minillm":
        sets = {name: sets[name] for name in PAPER_SETS if name in sets}
    return sets


def _pin_settings(out_dir: Path, settings: dict, sources: dict[str, dict]) -> None:
    """Record the generation settings and each model's source and content fingerprint; refuse to mix with
    files made differently (other settings, or another model under the same label, e.g. one retrained at
    the same path)."""
    path = out_dir / "eval_config.json"
    pinned = {"settings": settings, "models": sources}
    if path.is_file():
        old = json.loads(path.read_text())
        changed = [f"{k}: {old['settings'].get(k)!r} -> {v!r}" for k, v in settings.items()
                   if old["settings"].get(k) != v]
        for m, s in sources.items():
            before = old["models"].get(m)
            if before is None or before == s:
                continue
            if isinstance(before, dict) and before.get("source") == s["source"]:
                changed.append(f"model {m}: the model at {s['source']} is not the one that made the "
                               f"generations (content fingerprint {before.get('fingerprint')} -> "
                               f"{s['fingerprint']}; retrained or replaced)")
            else:
                changed.append(f"model {m}: {before!r} -> {s!r}")
        if changed:
            raise ConfigError(f"{out_dir} holds generations made with other settings or models "
                              f"({'; '.join(changed)}); use a new output directory, or delete the old one "
                              "(or that model's folder in it) to regenerate")
        pinned["models"] = {**old["models"], **sources}
    write_json(path, pinned, indent=2)


def _response_texts(rollout, tokenizer, eos_ids: set[int]) -> tuple[list[str], list[int], list[list[int]]]:
    """Decoded responses, their lengths in tokens (both without the terminating EOS) and the sampled ids.

    Decoding is `minillm.sampling.response_texts` (special tokens skipped, stripped), as in validation.
    The ids are the generated tokens as sampled, the EOS included when one was
    drawn (what sequence-level KL scores: `minillm.evaluation.sequence_kl.kl_from_generations`).
    """
    sampled = [ids[:n] for ids, n in zip(rollout.response_ids.tolist(), rollout.lengths.tolist())]
    lengths = [len(ids) - 1 if ids and ids[-1] in eos_ids else len(ids) for ids in sampled]
    return response_texts(tokenizer, rollout), lengths, sampled


@torch.no_grad()
def _generate_job(job: _Job, model, tokenizer, sampling: SamplingConfig, batch_size: int, bar: tqdm,
                  engine=None) -> None:
    """Sample (minillm's sampler, or the vLLM `engine`), score and atomically write the generation file of
    one (model, set, seed)."""
    device = next(model.parameters()).device
    sample = generate_rollouts if engine is None else functools.partial(engine.rollouts, rescore=False)
    generator = torch.Generator(device=device).manual_seed(job.seed)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    records = []
    for start in range(0, len(job.dataset), batch_size):
        items = [job.dataset[i] for i in range(start, min(len(job.dataset), start + batch_size))]
        batch = collate_prompts(items, pad)
        rollout = sample(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                         config=sampling, eos_token_id=eos, pad_token_id=pad, generator=generator)
        texts, lengths, sampled = _response_texts(rollout, tokenizer, {eos})
        for item, text, length, ids in zip(items, texts, lengths, sampled):
            refs = list(item["references"])
            records.append({"id": item["id"], "prompt": item["prompt"], "response": text, "references": refs,
                            "rougeL": rouge_l(text, refs), "exact_match": exact_match(text, refs),
                            "length": length, "response_ids": ids})
        bar.update(1)
    write_jsonl(job.path, records)


def _summary(values: Iterable[float]) -> dict:
    values = list(values)
    mean, std = mean_and_std(values)
    return {"mean": mean, "std": std, "per_seed": values}


def _aggregate(per_seed: dict[int, list[dict]], num_dropped: int) -> dict:
    """Per-set numbers: mean ± std over seeds of the per-seed averages (Dist-4 pooled within a seed)."""
    seeds = sorted(per_seed)
    n = len(per_seed[seeds[0]])

    def avg(key: str, seed: int) -> float:
        records = per_seed[seed]
        return sum(r[key] for r in records) / len(records) if records else 0.0

    return {
        "n": n,
        "n_dropped": num_dropped,
        "seeds": seeds,
        "rougeL": _summary(avg("rougeL", s) for s in seeds),
        "exact_match": _summary(avg("exact_match", s) for s in seeds),
        "length": _summary(avg("length", s) for s in seeds),
        "dist4": _summary(distinct_n((r["response"] for r in per_seed[s]), 4) for s in seeds),
    }


def _run_jobs(jobs: dict[str, list[_Job]], models: dict, tokenizers: dict, sampling: SamplingConfig,
              batch_size: int, dtype: str, device: str, engine: str = "hf",
              vllm: VLLMConfig | None = None) -> dict[tuple[str, str, int], list[dict]]:
    """Generate every unfinished job, one model in memory at a time; (model, set, seed) -> its records.
    With engine="vllm" each model gets a vLLM engine for its jobs (the model itself stays on the CPU).

    One progress bar (batches, with ETA) over all jobs; finished files found on a resume count as its
    starting point, so the rate and ETA reflect only the batches generated now.
    """
    records: dict[tuple[str, str, int], list[dict]] = {}
    pending: dict[str, list[tuple[_Job, list[str]]]] = {}
    done_batches = 0
    for name, model_jobs in jobs.items():
        for job in model_jobs:
            ids = [str(job.dataset[i]["id"]) for i in range(len(job.dataset))]
            done = _read_complete(job.path, ids)
            if done is None:
                pending.setdefault(name, []).append((job, ids))
            else:
                records[name, job.set_name, job.seed] = done
                done_batches += job.num_batches
    total = sum(job.num_batches for js in jobs.values() for job in js)
    with tqdm(total=total, initial=done_batches, unit="batch", desc="evaluate", dynamic_ncols=True) as bar:
        for name, todo in pending.items():
            spec = models[name]
            where = "cpu" if engine == "vllm" else device
            model = spec[0] if isinstance(spec, tuple) else load_model(str(spec), dtype=dtype).to(where)
            check_embeddings(model, tokenizers[name], f"evaluated ({name})")
            prompt = max(len(item["prompt_ids"]) for job, _ in todo for item in job.dataset.items)
            check_context(model, f"evaluated ({name})",
                          generation_length("the longest prompt", prompt, sampling.max_new_tokens))
            with engine_sampler(engine, vllm, dtype=dtype, max_model_len=prompt + sampling.max_new_tokens) \
                    as sampler:
                for job, ids in todo:
                    bar.set_description(f"{name}/{job.set_name}/seed{job.seed}")
                    _generate_job(job, model, tokenizers[name], sampling, batch_size, bar, sampler)
                    records[name, job.set_name, job.seed] = _read_complete(job.path, ids)
            del model
    return records


def evaluate_models(models: dict[str, ModelSpec], data_files: list[str], out_dir: str | os.PathLike, *,
                    seeds: Sequence[int] = (10, 20, 30, 40, 50), max_new_tokens: int = 256,
                    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                    no_repeat_ngram_size: int = 0, batch_size: int = 8, limit: int | None = None,
                    template: str = "minillm", max_prompt_length: int = 256, dtype: str = "float32",
                    device: str | None = None, protocol: str = "none", published: str = "auto",
                    engine: str = "hf", vllm: VLLMConfig | None = None) -> dict:
    """Evaluate every model on every data file for every seed; write generations and aggregates.

    Args:
        models: label -> model path / hub id / built-in name (loaded with minillm.models, one at a time,
            only when it has unfinished work), or a (model, tokenizer) pair already in memory. Labels
            name the output folders. A list of paths (`name=path` or `path`) is labelled by
            `model_labels`: folder names, with parent folders prefixed until unique.
        data_files: instruction JSONL files or hub names; the set name is the file stem.
        out_dir: receives `{model}/{set}/seed{seed}.jsonl` (id, prompt, response, references, rougeL,
            exact_match, length, response_ids), `results.json`, `results.md` and `eval_config.json`.
        limit: only the first `limit` examples of each set (None or 0: all).
        max_prompt_length: prompts longer than this many tokens are dropped (counted in `n_dropped`).
        dtype, device: for models loaded from a path (device default: CUDA when available).
        protocol: "minillm" enforces the paper's Table 1 evaluation (`minillm.evaluation.protocol`):
            contradicting settings are refused, every data file must be one of the paper's five sets
            (named dolly, selfinst, vicuna, sni, unni in the outputs), and the published numbers are shown
            beside ours. "none": any settings and data.
        published: under protocol="minillm", which published Table 1 block to show: "auto" (the student
            size nearest to the smallest model evaluated), "none", or a key of `published.PAIRS`.
        engine: "hf" (minillm's sampler) or "vllm" (a vLLM engine per model, options `vllm`; the same files,
            other samples for the same seeds, so "engine" is pinned in the settings).

    Returns the content of results.json: {"settings": ..., "protocol": {"name", ...}, "published": the
    Table 1 block or None, "results": {model: {set: {"n", "n_dropped", "seeds", "rougeL", "exact_match",
    "length", "dist4"}}}}, each metric {"mean", "std", "per_seed"}.
    """
    if isinstance(models, (list, tuple)) and all(isinstance(m, (str, os.PathLike)) for m in models):
        models = model_labels(models)
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds must be a non-empty list of distinct integers, got {seeds}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    values = {"seeds": seeds, "temperature": temperature, "top_k": top_k, "top_p": top_p,
              "max_new_tokens": max_new_tokens, "no_repeat_ngram_size": no_repeat_ngram_size,
              "template": template, "max_prompt_length": max_prompt_length, "limit": limit}
    info, block = _protocol(models, protocol, published, values)
    sets = check_names(models, data_files, protocol)
    if info:
        info["sets"] = dict(sets)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                              top_p=top_p, no_repeat_ngram_size=no_repeat_ngram_size)
    validate_engine_sampling(engine, sampling, "engine")
    # Everything that changes generations; pinned against the files already in out_dir.
    settings = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p,
                "no_repeat_ngram_size": no_repeat_ngram_size, "batch_size": batch_size,
                "limit": limit or None, "template": template, "max_prompt_length": max_prompt_length,
                "dtype": dtype,
                # the prompts themselves: generations of an edited data file are not reused
                "data": {name: file_hash(source) or str(source) for name, source in sets.items()},
                **({"engine": engine} if engine != "hf" else {})}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with file_lock(out / ".minillm.lock", f"output_dir={out}"):  # one evaluation per output folder
        return _evaluate_locked(models, sets, out, seeds, settings, sampling, limit, template,
                                max_prompt_length, batch_size, dtype, device, info, block, (engine, vllm))


def _protocol(models: dict, protocol: str, published: str, values: dict) -> tuple[dict | None, dict | None]:
    """Check `values` (the settings) against `protocol`; its description for results.json (None for
    protocol="none") and the published Table 1 block to show (None for none)."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if published not in PUBLISHED_CHOICES:
        raise ConfigError(f"published must be one of {', '.join(PUBLISHED_CHOICES)}, got {published!r}")
    check_published(protocol, published)
    if protocol == "none":
        return None, None
    check_settings(values)
    info = {"name": protocol, "description": DESCRIPTION, "notes": [],
            "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in SETTINGS.items()}}
    return info, choose_published(models, published)


def _evaluate_locked(models: dict, sets: dict[str, str], out: Path, seeds: list[int], settings: dict,
                     sampling: SamplingConfig, limit, template: str, max_prompt_length: int, batch_size: int,
                     dtype: str, device: str | None, info: dict | None, block: dict | None,
                     engine: tuple[str, VLLMConfig | None] = ("hf", None)) -> dict:
    sources = {name: {"source": "<in-memory model>", "fingerprint": weights_fingerprint(spec[0])}
               if isinstance(spec, tuple) else {"source": str(spec), "fingerprint": source_fingerprint(spec)}
               for name, spec in models.items()}
    _pin_settings(out, settings, sources)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")

    examples = {name: load_instructions(source, limit=limit or None) for name, source in sets.items()}
    if info:
        info["notes"] = [n for set_name, exs in examples.items() for n in data_notes(set_name, exs)]
    tokenizers = {name: spec[1] if isinstance(spec, tuple) else load_tokenizer(str(spec))
                  for name, spec in models.items()}
    jobs: dict[str, list[_Job]] = {}
    dropped: dict[tuple[str, str], int] = {}
    for name, tokenizer in tokenizers.items():
        jobs[name] = []
        for set_name, exs in examples.items():
            dataset = PromptDataset(exs, tokenizer, template=template, max_prompt_length=max_prompt_length)
            if not len(dataset):
                raise DataError(f"{sets[set_name]}: all {len(exs)} prompts are longer than max_prompt_length="
                                f"{max_prompt_length} tokens for model {name!r}'s tokenizer; raise "
                                "max_prompt_length")
            dropped[name, set_name] = dataset.num_dropped
            if info and dataset.num_dropped:
                info["notes"].append(f"{name}/{set_name}: {dataset.num_dropped} prompts longer than "
                                     f"{max_prompt_length} tokens were dropped (the paper truncated them)")
            batches = -(-len(dataset) // batch_size)
            jobs[name] += [_Job(set_name, seed, out / name / set_name / f"seed{seed}.jsonl", dataset, batches)
                           for seed in seeds]

    records = _run_jobs(jobs, models, tokenizers, sampling, batch_size, dtype, device, *engine)
    results = {name: {set_name: _aggregate({s: records[name, set_name, s] for s in seeds},
                                           dropped[name, set_name])
                      for set_name in sets}
               for name in models}
    summary = {"settings": settings, "protocol": info or {"name": "none"}, "published": block,
               "results": results}
    write_json(out / "results.json", summary, indent=2)
    write_text(out / "results.md", results_markdown(results, settings, info, block))
    return summary
