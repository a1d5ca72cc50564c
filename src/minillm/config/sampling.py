"""How tokens are drawn (one definition for rollouts, validation, generation and evaluation) and the rules
that tie sampling to a method: one validator per rule."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError
from .options import option


@dataclass
class SamplingConfig:
    """How tokens are drawn. The MiniLLM rollout setting is the default: plain sampling at temperature 1."""

    max_new_tokens: int = option(256, "Maximum number of generated tokens per prompt (the first EOS "
                                      "included).")
    temperature: float = option(1.0, "Logits are divided by this before softmax, for the student and the "
                                     "teacher alike.")
    top_k: int = option(0, "Keep only the k most likely tokens; 0 disables. Refused when the teacher is "
                           "stepped while sampling (minillm, onpolicy).")
    top_p: float = option(1.0, "Nucleus sampling mass; 1.0 disables. Refused when the teacher is stepped "
                               "while sampling (minillm, onpolicy).")
    no_repeat_ngram_size: int = option(0, "Ban any n-gram of this size (prompt included) from repeating; "
                                          "0 disables.")
    greedy: bool = option(False, "Take the argmax of the sampling distribution instead of sampling.")
    draft_length: int = option(6, "Teacher-mixed sampling (minillm rollouts) by speculative decoding: the "
                                  "student drafts up to this many tokens, one teacher forward verifies them; "
                                  "the samples follow p~ = a*p + (1-a)*q exactly. 0 steps the teacher token "
                                  "by token (lockstep).")
    draft_adaptive: bool = option(True, "Each round drafts the length (at most draft_length) that gives the "
                                        "most tokens per unit of cost at the acceptance rate measured so far "
                                        "in the rollout; false: always draft_length. The samples' "
                                        "distribution is the same either way.")

    def __post_init__(self) -> None:
        checks = {
            "max_new_tokens": (self.max_new_tokens >= 1, "an integer >= 1"),
            "temperature": (math.isfinite(self.temperature) and self.temperature > 0,
                            "a number > 0 (use greedy=true for argmax decoding)"),
            "top_k": (self.top_k >= 0, "an integer >= 0 (0 disables top-k)"),
            "top_p": (0.0 < self.top_p <= 1.0, "a number in (0, 1] (1.0 disables top-p)"),
            "no_repeat_ngram_size": (self.no_repeat_ngram_size >= 0, "an integer >= 0 (0 disables it)"),
            "draft_length": (self.draft_length >= 0, "an integer >= 0 (0: lockstep teacher-mixed sampling)"),
        }
        for key, (ok, expected) in checks.items():
            if not ok:
                raise ConfigError(f"sampling.{key} = {getattr(self, key)!r} is invalid: it must be "
                                  f"{expected}.")


def validate_teacher_mix_alpha(alpha: float, key: str = "teacher_mix_alpha") -> None:
    """The one rule for the teacher's share of the sampling mixture: alpha in [0, 1)."""
    if not (0.0 <= alpha < 1.0):
        raise ConfigError(
            f"{key} = {alpha!r} is invalid: it must be in [0, 1). It is the teacher's share of the sampling "
            "mixture p~ = alpha*p + (1-alpha)*q; at alpha = 1 the student never samples, so every importance "
            "weight q/p~ is 0 and the policy gradient vanishes. The MiniLLM paper uses 0.2."
        )


def validate_untruncated_sampling(sampling: SamplingConfig, context: str) -> None:
    """The one rule for sampling with the teacher in the loop: no top-k / top-p truncation.

    `context` says who steps the teacher (e.g. "method=minillm"); it starts the message.
    """
    if sampling.top_k > 0 or sampling.top_p < 1.0:
        raise ConfigError(
            f"{context}: sampling.top_k = {sampling.top_k} / sampling.top_p = {sampling.top_p} cannot be "
            "used when the teacher is stepped during sampling (teacher-mixed rollouts or teacher log-probs "
            "for rewards). Top-k and top-p truncate each model's distribution to its *own* most likely "
            "tokens, so the two supports differ: a token the teacher contributes to p~ = alpha*p + "
            "(1-alpha)*q can lie outside the student's truncated support (log q_old = -inf, importance "
            "weight 0 and a -inf log-ratio in the reward), and a token the student samples can lie outside "
            "the teacher's (log p = -inf, reward -inf). This is the assertion failure of MiniLLM issue #287 "
            "(microsoft/LMOps). Set sampling.top_k = 0 and sampling.top_p = 1.0 for rollouts, as the paper "
            "does; temperature and no_repeat_ngram_size are fine (the n-gram ban removes the same tokens "
            "from both models)."
        )


PLAIN_SAMPLING = SamplingConfig()


def validate_plain_sampling(sampling: SamplingConfig, context: str) -> None:
    """The one rule for scoring generations as samples of the model: plain sampling at temperature 1.

    Temperature, top-k, top-p, the n-gram ban and greedy decoding all change the distribution the text is
    drawn from, so log q of the text would not be the log-probability of a sample of q.
    """
    keys = ("temperature", "top_k", "top_p", "no_repeat_ngram_size", "greedy")
    changed = {k: getattr(sampling, k) for k in keys if getattr(sampling, k) != getattr(PLAIN_SAMPLING, k)}
    if changed:
        raise ConfigError(f"{context} scores the generations as samples of the model, which needs plain "
                          f"sampling (sampling.temperature 1, top_k 0, top_p 1, no_repeat_ngram_size 0); "
                          f"these settings change the distribution: {changed}")
