"""`minillm generate`: answer every prompt of an instruction file with a model, resumably.

Used directly, for SeqKD's teacher data and for inspection. Each batch is sampled with its own
generator seeded by (seed, batch index), so an interrupted run continues where it stopped and gives
the same file as an uninterrupted one.

Resuming keeps only the leading records of `<output>.partial` that are complete, valid JSON and belong to
this job in order (the id of the example at that position, the same settings, the same model by content
fingerprint and the same prompts); a torn or foreign tail
(a kill or a full disk in the middle of a write, another run's records) is dropped, with a warning that
says how many records were dropped, and regenerated.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config.paths import check_output_file
from .data import PromptDataset, collate_prompts
from .errors import ConfigError
from .io import write_text
from .models.fingerprint import weights_fingerprint
from .ownership import file_lock
from .sampling import SamplingConfig, generate_rollouts, response_texts

logger = logging.getLogger("minillm")


def batch_generator(seed: int, batch_index: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + batch_index)


def _resumable_records(partial: Path, ids: list, settings: dict) -> tuple[list[str], int, str]:
    """The leading lines of `partial` that are whole records of this job, in order, and how many records
    after them were dropped (with the first reason). A record is kept only while every record before it was
    kept: it parses as a JSON object, has the id of the example at its position and this job's settings."""
    raw = partial.read_bytes().split(b"\n")
    lines = [ln for ln in raw if ln.strip()]
    kept: list[str] = []
    reason = ""
    for i, line in enumerate(lines):
        try:
            text = line.decode("utf-8")
            rec = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError):
            reason = f"record {i + 1} is torn or not valid JSON"
            break
        if not isinstance(rec, dict) or "response" not in rec:
            reason = f"record {i + 1} is not a generation record"
            break
        if i >= len(ids) or str(rec.get("id")) != str(ids[i]):
            reason = (f"record {i + 1} has id {rec.get('id')!r}, expected "
                      f"{ids[i] if i < len(ids) else 'no more records'!r}")
            break
        if rec.get("settings") != settings:
            reason = f"record {i + 1} was made with other settings ({rec.get('settings')})"
            break
        kept.append(text)
    return kept, len(lines) - len(kept), reason


def job_settings(model, dataset: PromptDataset, sampling: SamplingConfig, *, template: str, seed: int,
                 model_name: str, engine: str = "hf") -> dict:
    """What makes a generation file's records, recorded in each: the model (name and content fingerprint),
    the prompts (a hash), the template, the seed and the sampling settings, and the engine when it is not
    minillm's own (vLLM draws other samples from the same seed). A .partial is resumed, and a finished file
    reused (`finished_records`), only when they are the same."""
    prompts = hashlib.blake2b("\x00".join(dataset[i]["prompt"] for i in range(len(dataset))).encode(),
                              digest_size=16).hexdigest()
    return {"model": model_name, "model_fingerprint": weights_fingerprint(model), "prompts": prompts,
            "template": template, "seed": seed,
            "max_new_tokens": sampling.max_new_tokens, "temperature": sampling.temperature,
            "top_k": sampling.top_k, "top_p": sampling.top_p,
            "no_repeat_ngram_size": sampling.no_repeat_ngram_size, "greedy": sampling.greedy,
            **({"engine": engine} if engine != "hf" else {})}


def finished_records(path: Path, dataset: PromptDataset, settings: dict) -> tuple[bool, str]:
    """(True, "") when `path` holds exactly one valid record per prompt of `dataset`, in order, all made
    with `settings`; else (False, the first reason)."""
    ids = [dataset[i]["id"] for i in range(len(dataset))]
    lines, dropped, reason = _resumable_records(path, ids, settings)
    if dropped:
        return False, reason
    if len(lines) != len(ids):
        return False, f"it has {len(lines)} of the {len(ids)} records"
    return True, ""


@torch.no_grad()
def generate_file(model, tokenizer, examples, output: str | os.PathLike, *, template: str = "minillm",
                  max_prompt_length: int = 256, sampling: SamplingConfig | None = None, batch_size: int = 8,
                  seed: int = 0, model_name: str = "", desc: str = "generate", engine=None) -> Path:
    """Write one JSONL record per example: id, instruction, input, prompt, response, references, settings.

    `engine`: a `minillm.sampling.vllm_rollout.VLLMSampler` that samples instead of minillm's own sampler
    (it is started on `model`'s weights; each batch's rows get seeds from the batch's generator)."""
    sampling = sampling or SamplingConfig()
    out = Path(output)
    check_output_file(out, "output")  # a folder or an unwritable place: refused before any work
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"output={output}: cannot create the folder {out.parent} ({e.strerror}); choose "
                          "a writable output.") from None
    with file_lock(out.with_name(out.name + ".lock"), f"output={output}"):  # one writer per output
        return _generate_locked(model, tokenizer, examples, out, template, max_prompt_length, sampling,
                                batch_size, seed, model_name, desc, engine)


def _generate_locked(model, tokenizer, examples, out: Path, template: str, max_prompt_length: int,
                     sampling: SamplingConfig, batch_size: int, seed: int, model_name: str,
                     desc: str, engine) -> Path:
    partial = out.with_name(out.name + ".partial")
    dataset = PromptDataset(examples, tokenizer, template=template, max_prompt_length=max_prompt_length)
    settings = job_settings(model, dataset, sampling, template=template, seed=seed, model_name=model_name,
                            engine="vllm" if engine is not None else "hf")
    done = 0
    if partial.exists():
        ids = [dataset[i]["id"] for i in range(len(dataset))]
        lines, dropped, reason = _resumable_records(partial, ids, settings)
        if dropped:
            logger.warning("%s: dropped %d record(s) that cannot be resumed (%s); they are generated again",
                           partial, dropped, reason)
        done = len(lines) - len(lines) % batch_size  # restart the last (possibly incomplete) batch
        write_text(partial, "".join(ln + "\n" for ln in lines[:done]))
        logger.info("resuming %s after %d records", out, done)
    device = next(model.parameters()).device
    # the engine keeps the tokens; log q is only re-scored where a policy gradient needs it (training)
    sample = generate_rollouts if engine is None else functools.partial(engine.rollouts, rescore=False)
    n = len(dataset)
    progress = tqdm(total=n, initial=done, desc=desc, unit="prompt", dynamic_ncols=True)
    with open(partial, "a") as f, progress as bar:
        for start in range(done, n, batch_size):
            items = [dataset[i] for i in range(start, min(n, start + batch_size))]
            batch = collate_prompts(items, tokenizer.pad_token_id)
            r = sample(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
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
