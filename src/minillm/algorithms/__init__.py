"""Training recipes. Each maps one method of the paper (or a baseline) onto the shared trainer."""

from __future__ import annotations

from ..errors import ConfigError
from .base import Algorithm, LossOutput, TrainingContext
from .minillm import MiniLLM
from .onpolicy import OnPolicy
from .supervised import Supervised

__all__ = [
    "Algorithm",
    "LossOutput",
    "MiniLLM",
    "OnPolicy",
    "Supervised",
    "TrainingContext",
    "build_algorithm",
]

DIVERGENCE_METHODS = ("rkl", "jsd", "tvd", "skl", "srkl")


def build_algorithm(method: str, train_examples, valid_examples, cfg) -> Algorithm:
    """The recipe of `method` (sft, kd, seqkd, the divergence menu, onpolicy, minillm)."""
    if method in ("sft", "seqkd"):  # seqkd: the examples already hold the teacher's responses (see api.train)
        return Supervised(cfg, train_examples, valid_examples)
    if method == "kd":
        return Supervised(cfg, train_examples, valid_examples, divergence="fkl")
    if method in DIVERGENCE_METHODS:
        return Supervised(cfg, train_examples, valid_examples, divergence=method)
    if method == "onpolicy":
        return OnPolicy(cfg, train_examples, valid_examples)
    if method == "minillm":
        return MiniLLM(cfg, train_examples, valid_examples)
    raise ConfigError(f"unknown method {method!r}")
