"""Calibration of zero-shot classification with instruction prompts (paper Table 2: ECE on SST-2, BoolQ).

The paper's claim is that reverse-KL students stay better calibrated than forward-KL/SeqKD students:
a mode-seeking student should not spread probability over answers it does not believe. We measure it
the way the paper describes (no code was released): the model reads the instruction prompt, its
next-token distribution is restricted to the first tokens of the label words and renormalised, the
argmax is the prediction and its probability the confidence; ECE uses 10 equal-width bins.

Expected data format (one JSON object per line, the project's instruction schema plus `labels`)::

    {"instruction": "Classify the sentiment of the review as positive or negative.",
     "input": "a gorgeous, witty, seductive movie.",
     "output": "positive",
     "labels": ["negative", "positive"],
     "id": "sst2_0"}

`labels` lists the label words (the same list on every record of a file); `output` is the gold label
word, one of `labels` (compared case-insensitively after stripping). BoolQ: labels ["no", "yes"].
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from minillm.data import InstructionExample, build_prompt, encode_prompt
from minillm.errors import DataError, ModelError
from minillm.models import final_hidden, lm_head_fn, logit_width


def _bins(confidences: Tensor, correct: Tensor, n_bins: int) -> list[tuple[int, float, float]]:
    """(count, mean confidence, accuracy) per equal-width bin; bin i covers (i/n, (i+1)/n], bin 0 also 0."""
    if confidences.shape != correct.shape or confidences.dim() != 1:
        raise ValueError(f"confidences {tuple(confidences.shape)} and correct {tuple(correct.shape)} "
                         "must be 1-D and the same length")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    index = (torch.ceil(confidences * n_bins).long() - 1).clamp(0, n_bins - 1)
    out = []
    for b in range(n_bins):
        sel = index == b
        count = int(sel.sum())
        if count:
            out.append((count, float(confidences[sel].mean()), float(correct[sel].mean())))
        else:
            out.append((0, 0.0, 0.0))
    return out


def _as_tensors(confidences: Sequence[float] | Tensor,
                correct: Sequence[bool] | Tensor) -> tuple[Tensor, Tensor]:
    return (torch.as_tensor(confidences, dtype=torch.float64).flatten(),
            torch.as_tensor(correct, dtype=torch.float64).flatten())


def expected_calibration_error(confidences: Sequence[float] | Tensor, correct: Sequence[bool] | Tensor,
                               n_bins: int = 10) -> float:
    """ECE = Σ_bins |bin|/N · |accuracy(bin) − mean confidence(bin)|, on the 0–1 scale of Table 2."""
    conf, corr = _as_tensors(confidences, correct)
    if conf.numel() == 0:
        raise ValueError("expected_calibration_error needs at least one prediction")
    total = conf.numel()
    return sum(count / total * abs(acc - mean_conf) for count, mean_conf, acc in _bins(conf, corr, n_bins))


def reliability_diagram(confidences: Sequence[float] | Tensor, correct: Sequence[bool] | Tensor,
                        path: str | Path, n_bins: int = 10) -> Path:
    """Accuracy per confidence bin against the diagonal (perfect calibration), saved as a PNG."""
    # matplotlib only when plotting: it is optional for the rest and slow to import; Agg before pyplot.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conf, corr = _as_tensors(confidences, correct)
    stats = _bins(conf, corr, n_bins)
    width = 1.0 / n_bins
    lefts = [i * width for i in range(n_bins)]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.bar(lefts, [acc for _, _, acc in stats], width=width, align="edge", edgecolor="black",
           label="accuracy")
    ax.bar(lefts, [mc - acc if n else 0.0 for n, mc, acc in stats], bottom=[acc for _, _, acc in stats],
           width=width, align="edge", color="tab:red", alpha=0.3, label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"ECE = {expected_calibration_error(conf, corr, n_bins):.3f} (n = {conf.numel()})")
    ax.legend(loc="upper left")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def label_token_ids(tokenizer, label_words: Sequence[str]) -> list[int]:
    """First token id of each label word as it would start a response (no leading space).

    The MiniLLM template ends with "### Response:\\n", so the answer's first token is the word without
    a leading space. Two labels sharing a first token cannot be told apart by one next-token
    distribution, so that is an error rather than a silent tie.
    """
    ids = []
    for word in label_words:
        tokens = tokenizer.encode(word, add_special_tokens=False)
        if not tokens:
            raise DataError(f"label word {word!r} encodes to no tokens; use a non-empty label word")
        ids.append(tokens[0])
    if len(set(ids)) != len(ids):
        pieces = {w: tokenizer.convert_ids_to_tokens(i) for w, i in zip(label_words, ids)}
        raise DataError(f"label words {list(label_words)} share a first token ({pieces}); choose label "
                        "words whose first tokens differ (e.g. 'positive'/'negative', 'yes'/'no')")
    return ids


@torch.no_grad()
def label_word_probabilities(model, tokenizer, prompts: Sequence[str], label_words: Sequence[str], *,
                             batch_size: int = 8) -> Tensor:
    """P(label | prompt) [N, L]: next-token probabilities of the label words' first tokens, renormalised.

    Prompts are encoded without special tokens (as for generation) and left-padded, so the last
    position of every row is the one that predicts the answer.
    """
    ids = label_token_ids(tokenizer, label_words)
    if max(ids) >= logit_width(model):
        raise ModelError(f"label token id {max(ids)} is outside the model's {logit_width(model)} logits; the "
                         "tokenizer does not belong to this model")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for start in range(0, len(prompts), batch_size):
        encoded = [tokenizer.encode(p, add_special_tokens=False) for p in prompts[start:start + batch_size]]
        width = max(len(e) for e in encoded)
        input_ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=device)
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
        hidden = final_hidden(model, input_ids, mask)[:, -1]
        logits = lm_head_fn(model)(hidden).float()
        out.append(torch.softmax(logits[:, ids], dim=-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, len(ids))


def evaluate_calibration(model, tokenizer, examples: Sequence[InstructionExample],
                         label_words: Sequence[str] | None = None, *, template: str = "minillm",
                         batch_size: int = 8, max_prompt_length: int = 256, n_bins: int = 10) -> dict:
    """Accuracy and ECE of zero-shot classification over `examples`.

    `label_words` defaults to the records' `labels` field (see the module docstring for the format).
    Renormalising over the label set (rather than the whole vocabulary) is the usual zero-shot
    classification protocol: the confidence is the probability of the chosen label among the labels.
    Prompts longer than `max_prompt_length` tokens are dropped, as everywhere in minillm (`n_dropped`).
    Returns {"ece" (0-1), "accuracy" (0-100), "n", "n_dropped", "label_words", "ids", "confidences",
    "correct", "predictions"}.
    """
    if label_words is None:
        found = {tuple(ex.extra.get("labels") or ()) for ex in examples}
        if len(found) != 1 or not next(iter(found)):
            raise DataError(f"calibration data need the same non-empty `labels` list on every record "
                            f"(found {sorted(found)[:3]}); add it to the file or pass label_words")
        label_words = list(next(iter(found)))
    normalised = [w.strip().lower() for w in label_words]
    kept, prompts, gold = [], [], []
    for ex in examples:
        answer = ex.outputs[0].strip().lower()
        if answer not in normalised:
            raise DataError(f"record {ex.id}: gold output {ex.outputs[0]!r} is not one of the label words "
                            f"{list(label_words)}; the output must be exactly one label word")
        prompt = build_prompt(ex, template, tokenizer)
        if encode_prompt(tokenizer, prompt, max_prompt_length) is not None:
            kept.append(ex.id)
            prompts.append(prompt)
            gold.append(normalised.index(answer))
    if not prompts:
        raise DataError(f"no calibration example has a prompt within max_prompt_length={max_prompt_length} "
                        "tokens; raise max_prompt_length")
    probs = label_word_probabilities(model, tokenizer, prompts, label_words, batch_size=batch_size)
    confidences, predictions = probs.max(dim=-1)
    correct = predictions == torch.tensor(gold, dtype=torch.long)
    return {
        "ece": expected_calibration_error(confidences, correct, n_bins),
        "accuracy": 100.0 * float(correct.float().mean()),
        "n": len(gold),
        "n_dropped": len(examples) - len(gold),
        "label_words": list(label_words),
        "ids": kept,
        "confidences": confidences.tolist(),
        "correct": correct.tolist(),
        "predictions": [label_words[i] for i in predictions.tolist()],
    }
