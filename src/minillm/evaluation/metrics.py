"""Text metrics of the MiniLLM evaluation protocol: Rouge-L, exact match, Dist-n.

The protocol is the paper's (Gu et al., arXiv 2306.08543) as the released LMOps code runs it.

Rouge-L is the headline number of every table in the paper, so it must be computed exactly as the
released `rouge_metric.py` does: Google's `rouge_score` RougeL F-measure with the Porter stemmer,
maximised over the references of an example, ×100. Anything else (another tokenizer, no stemming,
averaging over references) shifts numbers by points and makes them incomparable with the paper.
"""

from __future__ import annotations

import functools
import math
import re
import string
from collections.abc import Iterable, Sequence


@functools.lru_cache(maxsize=1)
def _rouge_l_scorer():
    """One scorer for the whole process: building it loads the stemmer, which is slow."""
    from rouge_score import rouge_scorer  # on use: 0.9 s to import (measured); the other metrics need none

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def _as_references(references: str | Sequence[str]) -> list[str]:
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ValueError("an example needs at least one reference")
    return refs


def rouge_l(prediction: str, references: str | Sequence[str]) -> float:
    """Rouge-L F-measure (×100) of `prediction`, best over `references` (S-NI items have several)."""
    return rouge_l_scores(prediction, references)[2]


def rouge_l_scores(prediction: str, references: str | Sequence[str]) -> tuple[float, float, float]:
    """(precision, recall, F) ×100 of Rouge-L against the reference with the best F (the one `rouge_l`
    scores).

    Precision and recall separate an answer that misses the reference's content (low recall) from one that
    has it but says much more (low precision), which F alone cannot.
    """
    scorer = _rouge_l_scorer()
    best = max((scorer.score(ref, prediction)["rougeL"] for ref in _as_references(references)),
               key=lambda s: s.fmeasure)
    return 100.0 * best.precision, 100.0 * best.recall, 100.0 * best.fmeasure


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD answer normalisation: lowercase, drop punctuation and English articles, squeeze spaces.

    Note: the S-NI/LMOps `compute_metrics` variant keeps articles; with SQuAD's rule "the Eiffel
    Tower" and "Eiffel Tower" match, which is what an exact-match score is meant to forgive.
    """
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, references: str | Sequence[str]) -> float:
    """100 if the normalised prediction equals any normalised reference, else 0."""
    pred = normalize_answer(prediction)
    return 100.0 * max(float(pred == normalize_answer(ref)) for ref in _as_references(references))


def distinct_n(texts: Iterable[str], n: int = 4) -> float:
    """Dist-n (×100): distinct word n-grams / all word n-grams, pooled over all `texts`.

    Pooling over responses (rather than averaging per response) measures diversity *across*
    answers, which is what Table 3 of the paper reports (mode collapse shows up as repeated
    n-grams between responses). Words are whitespace tokens; a text shorter than n adds nothing.
    Returns 0.0 when no text has n words.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    total = 0
    distinct: set[tuple[str, ...]] = set()
    for text in texts:
        words = text.split()
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        distinct.update(grams)
    return 100.0 * len(distinct) / total if total else 0.0


def mean_and_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0.0 for a single value) of per-seed scores."""
    if not values:
        raise ValueError("mean_and_std of an empty sequence")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var)
