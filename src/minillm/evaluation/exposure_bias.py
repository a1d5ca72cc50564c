"""Exposure bias as excess accumulated error, ExAccErr (Arora et al., 2022), as in the MiniLLM paper.

Gu et al., arXiv 2306.08543, the exposure-bias analysis (ExAccErr against generation length); LMOps
`minillm/evaluate_exposure_bias.py` is the reference implementation.

A student trained with teacher forcing only ever saw *teacher-quality* prefixes; at inference it
conditions on its own samples, and its errors compound. ExAccErr quantifies this: the forward KL
e_t = KL(p(·|prefix) ‖ q(·|prefix)) accumulated along the student's own free-running prefixes (R)
versus along the teacher's prefixes (ε, the error the student makes even with oracle context):

    R(l)  = Σ_{t≤l} mean_{samples alive at t} e_t   (prefixes sampled from the student)
    ε(l)  = Σ_{t≤l} mean_{samples alive at t} e_t   (prefixes sampled from the teacher)
    ExAccErr(l) = (R(l) − ε(l)) / ε(l) × 100 %

The paper's finding: for SFT/KD/SeqKD students ExAccErr grows with l; MiniLLM's stays low, because
reverse-KL training already conditions on the student's own samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from minillm.data import encode_prompt
from minillm.errors import DataError
from minillm.losses import token_divergence
from minillm.models import final_hidden, lm_head_fn, logit_width
from minillm.sampling import Rollout, SamplingConfig, generate_rollouts


def _cumulative_mean_error(per_sample: Sequence[Tensor], length: int) -> tuple[Tensor, Tensor]:
    """Cumulative sum over t of the mean of e_t over samples still alive at t, and the alive counts."""
    sums = torch.zeros(length, dtype=torch.float64)
    alive = torch.zeros(length, dtype=torch.float64)
    for errors in per_sample:
        n = min(len(errors), length)
        sums[:n] += errors[:n].detach().to(torch.float64).cpu()
        alive[:n] += 1
    return torch.cumsum(sums / alive, dim=0), alive


def exacc_err_curve(student_prefix_kl: Sequence[Tensor], teacher_prefix_kl: Sequence[Tensor]) -> dict:
    """ExAccErr(l) for l = 1..L from per-sample per-position forward KLs (one 1-D tensor per sample).

    All samples are pooled (over prompts and repeats) before averaging per position; per-prompt
    ratios would let a prompt with tiny ε dominate. L is the longest length at which both the
    student-prefix and the teacher-prefix sets still have a live sample, so every point is defined.
    Where ε(l) = 0 the ratio is defined as 0 if R(l) = 0 too (identical models: no error at all)
    and +inf otherwise.

    Returns lists (JSON-ready): "length" (1..L), "R", "epsilon", "exacc_err" (percent),
    "student_alive", "teacher_alive" (number of samples still generating at each position).
    """
    if not student_prefix_kl or not teacher_prefix_kl:
        raise ValueError("exacc_err_curve needs at least one student-prefix and one teacher-prefix sample")
    length = min(max(len(e) for e in student_prefix_kl), max(len(e) for e in teacher_prefix_kl))
    r, student_alive = _cumulative_mean_error(student_prefix_kl, length)
    eps, teacher_alive = _cumulative_mean_error(teacher_prefix_kl, length)
    ratio = torch.where(eps > 0, (r - eps) / eps.clamp(min=torch.finfo(torch.float64).tiny),
                        torch.where(r > 0, torch.inf, 0.0))
    return {
        "length": list(range(1, length + 1)),
        "R": r.tolist(),
        "epsilon": eps.tolist(),
        "exacc_err": (100.0 * ratio).tolist(),
        "student_alive": student_alive.long().tolist(),
        "teacher_alive": teacher_alive.long().tolist(),
    }


@torch.no_grad()
def prefix_forward_kl(student, teacher, rollout: Rollout, *, shared_vocab_size: int,
                      chunk_size: int = 512) -> list[Tensor]:
    """e_t = KL(p ‖ q) at every response position of `rollout`, one 1-D CPU tensor per sample.

    One forward of each model over prompt + response gives the hidden state that predicts each
    response token; logits are formed a chunk of positions at a time (never B x T x V) and the KL is
    exact over the shared vocabulary, in fp32.
    """
    ids, mask = rollout.full_sequence()
    start = rollout.prompt_ids.shape[1] - 1  # index of the position that predicts response token 0
    span = slice(start, start + rollout.response_ids.shape[1])
    alive = rollout.response_mask.bool()
    per_position = torch.zeros(alive.shape, dtype=torch.float32)
    hidden = {}
    for role, model in (("student", student), ("teacher", teacher)):
        device = next(model.parameters()).device
        h = final_hidden(model, ids.to(device), mask.to(device))[:, span]
        hidden[role] = h[alive.to(device)]
    student_head, teacher_head = lm_head_fn(student), lm_head_fn(teacher)
    values = []
    for i in range(0, hidden["student"].shape[0], chunk_size):
        q_logits = student_head(hidden["student"][i:i + chunk_size])
        p_logits = teacher_head(hidden["teacher"][i:i + chunk_size]).to(q_logits.device)
        values.append(token_divergence(q_logits, p_logits, "fkl", vocab_size=shared_vocab_size).float().cpu())
    per_position[alive] = torch.cat(values) if values else torch.zeros(0)
    return [row[:n] for row, n in zip(per_position, rollout.lengths.tolist())]


def _sample_and_score(generator_model, student, teacher, prompt_ids: list[list[int]], *, pad_token_id: int,
                      eos_token_id: int, config: SamplingConfig, seed: int, shared_vocab_size: int,
                      batch_size: int, desc: str = "exposure bias") -> list[Tensor]:
    """Sample responses from `generator_model` and score every prefix: per-sample e_t lists."""
    device = next(generator_model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    errors = []
    starts = range(0, len(prompt_ids), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", dynamic_ncols=True):
        batch = prompt_ids[start:start + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad_token_id] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        rollout = generate_rollouts(generator_model, ids, mask, config=config, eos_token_id=eos_token_id,
                                    pad_token_id=pad_token_id, shared_vocab_size=shared_vocab_size,
                                    generator=generator)
        errors += prefix_forward_kl(student, teacher, rollout, shared_vocab_size=shared_vocab_size)
    return errors


def measure_exposure_bias(student, teacher, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 256,
                          samples_per_prompt: int = 1, seed: int = 10, shared_vocab_size: int | None = None,
                          batch_size: int = 8, max_prompt_length: int = 256) -> dict:
    """ExAccErr curve of `student` against `teacher` on `prompts` (already formatted prompt strings).

    Each prompt is answered `samples_per_prompt` times by the student and by the teacher, by pure
    sampling at temperature 1 (the paper uses 10 samples per prompt on DollyEval); both sets of
    prefixes are then scored by both models. Prompts longer than `max_prompt_length` tokens are
    dropped. `shared_vocab_size` defaults to the smaller logit width (see
    minillm.models.check_compatibility). Returns the :func:`exacc_err_curve` dict plus "num_prompts",
    "num_dropped" and "samples_per_prompt".
    """
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
    encoded = [encode_prompt(tokenizer, p, max_prompt_length) for p in prompts]
    kept = [ids for ids in encoded if ids]
    if not kept:
        raise DataError(f"none of the {len(prompts)} prompts is non-empty and within max_prompt_length="
                        f"{max_prompt_length} tokens; pass shorter prompts or raise max_prompt_length")
    repeated = [ids for ids in kept for _ in range(samples_per_prompt)]
    vocab = shared_vocab_size or min(logit_width(student), logit_width(teacher))
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    config = SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0)
    common = {"pad_token_id": pad, "eos_token_id": eos, "config": config, "seed": seed,
              "shared_vocab_size": vocab, "batch_size": batch_size}
    student_prefix_kl = _sample_and_score(student, student, teacher, repeated,
                                          desc="exposure bias: student samples", **common)
    teacher_prefix_kl = _sample_and_score(teacher, student, teacher, repeated,
                                          desc="exposure bias: teacher samples", **common)
    curve = exacc_err_curve(student_prefix_kl, teacher_prefix_kl)
    return {**curve, "num_prompts": len(kept), "num_dropped": len(prompts) - len(kept),
            "samples_per_prompt": samples_per_prompt}


def plot_exposure_bias(curve: dict, path: str | Path, label: str | None = None) -> Path:
    """ExAccErr(l) against l (the paper's Figure 6 axes), saved as a PNG."""
    # matplotlib only when plotting: it is optional for the rest and slow to import; Agg before pyplot.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.plot(curve["length"], curve["exacc_err"], label=label)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel("generation length l")
    ax.set_ylabel("ExAccErr(l) (%)")
    ax.set_title("Excess accumulated error")
    if label:
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
