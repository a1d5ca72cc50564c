"""Training recipes. Each maps one method of the paper (or a baseline) onto the shared trainer."""

from __future__ import annotations

from ..errors import ConfigError


def build_algorithm(method: str, train_examples, valid_examples, cfg):
    from .minillm import MiniLLM
    from .onpolicy import OnPolicy
    from .supervised import Supervised

    if method == "sft":
        return Supervised(train_examples, valid_examples)
    if method == "seqkd":  # the examples already hold the teacher's responses (see api.train)
        return Supervised(train_examples, valid_examples)
    if method == "kd":
        return Supervised(train_examples, valid_examples, divergence="fkl")
    if method in ("rkl", "jsd", "tvd", "skl", "srkl"):
        return Supervised(train_examples, valid_examples, divergence=method)
    if method == "onpolicy":
        return OnPolicy(train_examples, valid_examples, divergence=cfg.divergence)
    if method == "minillm":
        return MiniLLM(train_examples, valid_examples)
    raise ConfigError(f"unknown method {method!r}")
