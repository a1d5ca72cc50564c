"""Exact sequence-level distributions of causal LMs over a tiny world's responses, by enumeration.

For prompt i, the outcomes are every response of at most `cap` content tokens followed by the end token,
plus one lumped outcome "other" (anything else: no end token after `cap` content tokens, or a token that
is not a content token). A model's probability of each outcome is exact: one batched forward over every
prefix of at most `cap` content tokens gives every next-token distribution, and a response's log q is the
sum along its prefixes (float64). With V content tokens there are sum_{L<=cap} V^L prefixes (V = 6,
cap = 4: 1,555), so this is for the quickstart's and the tests' tiny worlds.

`sequence_kls(q, p)` is then the exact KL between two such distributions - the sequence-level reverse
KL(q || p) that MiniLLM minimises (Eq. 1 of the paper) and the forward KL(p || q) that word-level KD
minimises token by token - over this partition of all outcomes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from minillm.world.process import World

__all__ = ["Enumeration", "enumerate_model", "enumerate_truth", "sequence_kls", "ENUMERATION_LIMIT"]

ENUMERATION_LIMIT = 200_000  # prefixes scored per prompt


@dataclass
class Enumeration:
    """Every response (content ids, end token left out) of at most `cap` tokens and its probability; the
    probability of "other" is 1 - probs.sum()."""

    responses: list[tuple[int, ...]]
    probs: np.ndarray  # float64

    @property
    def other(self) -> float:
        return float(max(0.0, 1.0 - self.probs.sum()))

    def with_other(self) -> np.ndarray:
        return np.append(self.probs, self.other)


def _prefixes(content: list[int], cap: int) -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = []
    for length in range(cap + 1):
        out.extend(itertools.product(content, repeat=length))
    return out


@torch.no_grad()
def enumerate_model(model, world: World, i: int, batch_size: int = 2048) -> Enumeration:
    """Exact probabilities of `model` (an HF causal LM over the world's tokenizer) for every response of
    prompt i of at most world.max_length content tokens."""
    content = [int(c) for c in world.content_ids]
    cap = world.max_length
    prefixes = _prefixes(content, cap)
    if len(prefixes) > ENUMERATION_LIMIT:
        raise ValueError(f"enumerating {len(prefixes):,} prefixes (vocab {len(content)}, max_length {cap}) "
                         f"is more than {ENUMERATION_LIMIT:,}: use a smaller world")
    prompt = world.prompt_ids(i)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    next_lp: dict[tuple[int, ...], np.ndarray] = {}
    for start in range(0, len(prefixes), batch_size):
        chunk = prefixes[start:start + batch_size]
        width = len(prompt) + max(len(x) for x in chunk)
        ids = torch.full((len(chunk), width), world.eos_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, x in enumerate(chunk):  # right-padded: the last real position gives the next-token logits
            ids[r, :len(prompt) + len(x)] = torch.tensor(prompt + list(x))
            mask[r, :len(prompt) + len(x)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.double()
        last = mask.sum(1) - 1
        lp = torch.log_softmax(logits[torch.arange(len(chunk)), last.to(device)], dim=-1).cpu().numpy()
        for r, x in enumerate(chunk):
            next_lp[x] = lp[r]
    model.train(was_training)
    prefix_lp = {(): 0.0}
    for x in prefixes[1:]:  # prefixes are in order of length: a prefix's parent is already there
        prefix_lp[x] = prefix_lp[x[:-1]] + next_lp[x[:-1]][x[-1]]
    responses = prefixes
    logq = np.array([prefix_lp[x] + next_lp[x][world.eos_id] for x in responses])
    return Enumeration(responses, np.exp(logq))


def enumerate_truth(world: World, i: int) -> Enumeration:
    """The same outcomes under the world's process (its responses never exceed max_length: other = 0)."""
    responses = _prefixes([int(c) for c in world.content_ids], world.max_length)
    logp = world.log_prob(i, [list(x) + [world.eos_id] for x in responses])
    return Enumeration(responses, np.exp(logp))


def _kl(a: np.ndarray, b: np.ndarray) -> float:
    keep = a > 0
    if np.any(b[keep] <= 0):
        return float("inf")
    return float(np.sum(a[keep] * (np.log(a[keep]) - np.log(b[keep]))))


def sequence_kls(q: Enumeration, p: Enumeration) -> dict:
    """Exact sequence-level KLs between a student q and a teacher p over the same outcomes:
    reverse_kl = KL(q || p) (MiniLLM's objective), forward_kl = KL(p || q) (what KD / SFT minimise)."""
    if q.responses != p.responses:
        raise ValueError("the two enumerations cover different responses")
    qa, pa = q.with_other(), p.with_other()
    return {"reverse_kl": _kl(qa, pa), "forward_kl": _kl(pa, qa), "q_other": q.other, "p_other": p.other}
