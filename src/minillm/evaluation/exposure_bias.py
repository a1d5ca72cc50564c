"""Exposure bias as excess accumulated error, ExAccErr (Arora et al., 2022; MiniLLM spec §4.3, Fig. 6).

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


def plot_exposure_bias(curve: dict, path: str | Path, label: str | None = None) -> Path:
    """ExAccErr(l) against l (the paper's Figure 6 axes), saved as a PNG."""
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
