"""`protocol=minillm`: the MiniLLM paper's Table 1 evaluation, enforced rather than assumed.

Gu et al., ICLR 2024 (arXiv 2306.08543), as the released LMOps scripts run it (minillm_spec.md §4):
the five test sets DollyEval (500), SelfInst (252; 242 released), Vicuna (80), S-NI and UnNI (both the
≥ 11-word-reference subsets); one sampled response per prompt for each of the seeds 10, 20, 30, 40, 50;
temperature 1, no top-k / top-p truncation, at most 256 new tokens, prompts of at most 256 tokens, the
Alpaca-style MiniLLM template; Rouge-L F (Porter stemmer, max over references, ×100) averaged over
examples, then over seeds. No 6-gram ban: until LMOps' transformers fork was fixed in Sep 2024 its sampling
path ignored logits processors, so the published numbers were made without it.

A setting that contradicts the protocol is refused with a ConfigError naming the option, and each data
file must be recognisable as one of the five sets (`set` field, file stem, or `source` field). What the
protocol cannot check by settings (a set that is not the paper's split, prompts dropped as too long) is
reported as notes in results.md / results.json instead.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from minillm.errors import ConfigError, MiniLLMError
from minillm.evaluation.published import PAIRS, nearest_pair, published_block

PROTOCOLS = ("none", "minillm")
PUBLISHED_CHOICES = ("auto", "none", *PAIRS)

# option -> the paper's value (canonical names; callers map them to their spelling of the option)
SETTINGS: dict[str, object] = {
    "seeds": (10, 20, 30, 40, 50),
    "temperature": 1.0,
    "top_k": 0,
    "top_p": 1.0,
    "max_new_tokens": 256,
    "no_repeat_ngram_size": 0,
    "greedy": False,
    "template": "minillm",
    "max_prompt_length": 256,
    "limit": 0,
}

DESCRIPTION = ("minillm — the MiniLLM paper's Table 1 evaluation (Gu et al., ICLR 2024): one sampled "
               "response per prompt for each of the seeds 10, 20, 30, 40, 50; temperature 1, no top-k / "
               "top-p, no n-gram ban; at most 256 new tokens; prompts of at most 256 tokens; the MiniLLM "
               "(Alpaca-style) prompt template; Rouge-L F with stemming, max over references, ×100.")

_WHY = {
    "seeds": "the paper averages one sample per prompt over the 5 seeds 10, 20, 30, 40, 50",
    "temperature": "the paper samples at temperature 1",
    "top_k": "the paper samples without top-k truncation",
    "top_p": "the paper samples without nucleus truncation",
    "max_new_tokens": "the paper generates up to 256 new tokens (max_length 512 - 256 prompt tokens)",
    "no_repeat_ngram_size": ("the published numbers were sampled without the 6-gram ban (LMOps' fork "
                             "ignored it until Sep 2024)"),
    "greedy": "the paper samples",
    "template": "the paper prompts with its Alpaca-style template",
    "max_prompt_length": "the paper's prompts are at most 256 tokens",
    "limit": "the paper evaluates every example of each set",
}

# canonical set -> (title, sizes of the paper's file, reference words at least)
PAPER_SETS: dict[str, tuple[str, tuple[int, ...], int]] = {
    "dolly": ("DollyEval", (500,), 0),
    "selfinst": ("SelfInst", (252, 242), 0),
    "vicuna": ("Vicuna", (80,), 0),
    "sni": ("S-NI", (), 11),
    "unni": ("UnNI", (), 11),
}

# words that name a set: a whole word of the text, the whole text without punctuation ("S-NI"), a word's
# prefix (5+ letters), or, for 8+ letters, anywhere in the text without punctuation
# ("yizhongw/self-instruct" -> selfinstruct)
# (the provenance `source` of `minillm data prepare` names the upstream repository: databricks-dolly-15k,
# yizhongw/self-instruct, lm-sys/FastChat, allenai/natural-instructions, orhonovich/unnatural-instructions)
_SET_WORDS = {"dolly": ("dolly", "dollyeval", "databricks"), "vicuna": ("vicuna", "fastchat"),
              "selfinst": ("selfinst", "selfinstruct", "useroriented"),
              "sni": ("sni", "sinst", "superni", "supernatural", "allenai"),
              "unni": ("unni", "uinst", "unnatural", "orhonovich")}


def _normalise_value(key: str, value):
    if key == "seeds":
        return tuple(sorted(int(s) for s in value))
    if key == "limit":
        return int(value or 0)
    return value


def check_published(protocol: str, published: str) -> None:
    """A published Table 1 block is shown only beside an evaluation run by the paper's protocol."""
    if protocol == "none" and published not in ("auto", "none"):
        raise ConfigError(f"published={published} needs protocol=minillm: the paper's numbers are only "
                          "comparable with an evaluation run by the paper's protocol.")


def check_settings(values: dict[str, object], names: dict[str, str] | None = None) -> None:
    """Refuse every value of `values` (canonical keys of SETTINGS) that differs from the paper's.

    `names` maps a canonical key to the option's name as the caller spells it (`sampling.temperature`).
    """
    names = names or {}
    wrong = []
    for key, value in values.items():
        expected = SETTINGS[key]
        got = _normalise_value(key, value)
        same = math.isclose(got, expected) if isinstance(expected, float) else got == expected
        if not same:
            shown = list(expected) if key == "seeds" else expected
            wrong.append(f"`{names.get(key, key)}` = {value!r} (the protocol needs {shown!r}: {_WHY[key]})")
    if wrong:
        raise ConfigError("protocol=minillm evaluates exactly as the MiniLLM paper does, so its numbers can "
                          "stand beside the published ones; these settings contradict it: "
                          + "; ".join(wrong) + ". Remove them, or use protocol=none for a custom evaluation.")


def _match(text: str) -> str | None:
    """The one paper set that `text` (a file stem, a `set` or `source` field) names, or None."""
    low = text.lower()
    words = {w for w in re.split(r"[^a-z0-9]+", low) if w}
    compact = re.sub(r"[^a-z0-9]+", "", low)

    def names(key: str) -> bool:
        return (key in words or key == compact or (len(key) >= 5 and any(w.startswith(key) for w in words))
                or (len(key) >= 8 and key in compact))

    found = {name for name, keys in _SET_WORDS.items() if any(names(k) for k in keys)}
    return found.pop() if len(found) == 1 else None


def _first_record(source: str) -> dict:
    path = Path(source).expanduser()
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8", errors="replace") as f:
        head = f.read(1 << 16).lstrip()
    if head.startswith("["):
        return {}
    try:
        record = json.loads(head.split("\n", 1)[0])
    except json.JSONDecodeError:
        return {}
    return record if isinstance(record, dict) else {}


def recognise_set(source: str) -> str:
    """The paper set a data file holds: its records' `set` field, else its file stem, else their `source`
    field (a provenance such as `.../dolly/valid.jsonl`). Refused when none names exactly one set."""
    record = _first_record(str(source))
    candidates = [("`set` field", record.get("set")), ("file name", Path(str(source)).stem),
                  ("`source` field", record.get("source"))]
    for _, text in candidates:
        if isinstance(text, str) and (name := _match(text)):
            return name
    raise ConfigError(f"protocol=minillm: cannot tell which of the paper's test sets {source!r} is (looked "
                      f"at its {', '.join(w for w, _ in candidates)}); name the file after the set "
                      f"({', '.join(f'{s}.jsonl' for s in PAPER_SETS)}) or give its records a `set` field "
                      "(`minillm data prepare` writes such files), or use protocol=none for other data.")


def data_notes(set_name: str, examples: list) -> list[str]:
    """What keeps a set from being the paper's: another size, or references shorter than the paper's
    subset allows. Empty when nothing is known to differ."""
    title, sizes, min_words = PAPER_SETS[set_name]
    notes = []
    if sizes and len(examples) not in sizes:
        notes.append(f"{set_name}: {len(examples)} examples, the paper's {title} has "
                     f"{' or '.join(map(str, sizes))}: not the paper's test set, so its numbers are not "
                     "comparable with the published ones")
    if not min_words:
        return notes
    buckets = {str(ex.extra["bucket"]) for ex in examples if "bucket" in ex.extra}
    if buckets:  # written by `minillm data prepare` (lengths in the tokenizer's tokens, or words)
        if buckets != {"11_"}:
            notes.append(f"{set_name}: length bucket(s) {', '.join(sorted(buckets))}; the paper's {title} "
                         "column uses the 11_ bucket (references of >= 11 tokens)")
        return notes
    short = sum(1 for ex in examples if max(len(o.split()) for o in ex.outputs) < min_words)
    if short:
        notes.append(f"{set_name}: {short} of {len(examples)} examples have references shorter than "
                     f"{min_words} words; the paper's {title} column uses the >= {min_words}-word subset")
    return notes


def _model_size(spec) -> tuple[int, str | None]:
    """(parameters, transformers model_type) of a model path / name (built on the meta device, no weights
    read) or of a (model, tokenizer) pair."""
    if isinstance(spec, tuple):
        model = spec[0]
        return sum(p.numel() for p in model.parameters()), getattr(model.config, "model_type", None)
    from minillm.plan_shapes import model_shape  # on use: builds the model on the meta device

    shape = model_shape(str(spec))
    return shape.params, shape.model_type


def choose_published(models: dict, published: str) -> dict | None:
    """The published Table 1 block to show: `published` names it, "none" shows none, "auto" takes the
    block whose student is nearest in parameter count to the smallest model evaluated (the student; a
    teacher evaluated alongside is larger)."""
    if published == "none":
        return None
    if published != "auto":
        return published_block(published, f"name (published={published})")
    sizes = {}
    for name, spec in models.items():
        try:
            sizes[name] = _model_size(spec)
        except MiniLLMError as e:
            raise ConfigError(f"published=auto: cannot count the parameters of model {name!r} ({e}); name "
                              f"the Table 1 block instead: published=one of {', '.join(PAIRS)}") from None
    name = min(sizes, key=lambda n: sizes[n][0])
    params, model_type = sizes[name]
    return published_block(nearest_pair(params, model_type),
                           f"auto: the student size nearest to {name}, {params:,} parameters, the smallest "
                           "model evaluated")
