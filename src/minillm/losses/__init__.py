"""Loss terms for MiniLLM and its baselines: pure tensor maths, no models, no files.

One module per concern:

* `divergences`: token-level divergences between the teacher p and the student q over the full
  vocabulary (`token_divergence`, `divergence_from_logprobs`).
* `chunked` and `fused`: the LM-head machinery. `chunked_token_terms` projects hidden states through
  the LM heads a chunk of positions at a time so that N x V logits never exist at once, not even in
  backward; `fused_token_loss` does the same for a loss that is a sum of per-chunk terms and computes
  its gradients during the forward pass, so that backward recomputes no head.
* `entry`: `token_loss`, the one entry point every method uses; it takes the fused path when the
  head allows it and the chunked one otherwise.
* `policy_gradient`: the policy-gradient pieces of MiniLLM (Gu et al., ICLR 2024, arXiv 2306.08543,
  "the paper"; the released code is microsoft/LMOps `minillm/`, "LMOps"): per-token rewards,
  returns/advantages, whitening, importance weights, the PPO clipped surrogate of the long-term term,
  the single-step term and the pre-training loss L_PT.

Conventions. p = teacher, q = student, q_old = the student that produced the rollout, p̃ = the
teacher-mixed sampling distribution α·p + (1-α)·q_old (paper Eq. 4). Per-token tensors are [B, T] (or
flattened [N]) and come with an explicit `mask` (1 = a real response token, 0 = padding); masks are
never derived from token ids. Maths runs in at least fp32: lower-precision inputs are upcast, fp64
inputs stay fp64 (the tests use that to compare against brute force at 1e-10).
"""

# (two lines for policy_gradient, not ruff's wrapped list: that list would repeat tests/test_losses.py's)
from .chunked import Head, TokenTerms, chunked_token_terms  # noqa: I001
from .divergences import DIVERGENCES, Divergence, divergence_from_logprobs, token_divergence
from .entry import chunk_share, token_loss
from .fused import FusedTerms, TokenLoss, can_fuse, fused_token_loss
from .policy_gradient import Reduction, advantages, masked_mean, per_token_rewards, ppo_clipped_loss
from .policy_gradient import prefix_importance_weights, pt_loss, single_step_loss, whiten

__all__ = [
    "DIVERGENCES",
    "Divergence",
    "FusedTerms",
    "Head",
    "Reduction",
    "TokenLoss",
    "TokenTerms",
    "advantages",
    "can_fuse",
    "chunk_share",
    "chunked_token_terms",
    "divergence_from_logprobs",
    "fused_token_loss",
    "masked_mean",
    "per_token_rewards",
    "ppo_clipped_loss",
    "prefix_importance_weights",
    "pt_loss",
    "single_step_loss",
    "token_divergence",
    "token_loss",
    "whiten",
]
