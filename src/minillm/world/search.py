"""Exact enumeration and best-first search over a world's responses, from its transition tables.

Both work on one prompt's tables: `table` = log P_k(next | state) as [K, V + 1, V] (row V = the start
state), `logw` = log mode masses [K], `cap` = the most content tokens (the end token is forced after them).
"""

from __future__ import annotations

import heapq
import itertools

import numpy as np

from minillm.world.spec import EOS_ID, logsumexp

_CHUNK = 16384  # prefixes extended at once (bounds the [chunk, tokens, K] scratch array)


def _extend(table: np.ndarray, seqs: np.ndarray, lps: np.ndarray, state: np.ndarray, cols: np.ndarray,
            budget: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Every one-token extension (by a token of `cols`) of the prefixes `seqs` that some mode can make;
    None as soon as there are more than `budget`."""
    grow_seqs, grow_lps, count = [], [], 0
    for c in range(0, len(seqs), _CHUNK):
        ext = lps[c:c + _CHUNK, None, :] + table[:, state[c:c + _CHUNK]][:, :, cols].transpose(1, 2, 0)
        rows, which = np.nonzero(np.isfinite(ext).any(axis=2))
        count += len(rows)
        if count > budget:
            return None
        grow_seqs.append(np.concatenate([seqs[c:c + _CHUNK][rows], cols[which][:, None]], axis=1))
        grow_lps.append(ext[rows, which])
    return np.concatenate(grow_seqs), np.concatenate(grow_lps)


def enumerate_responses(table: np.ndarray, logw: np.ndarray, cols: np.ndarray, cap: int, last: int,
                        limit: int) -> list[tuple[tuple[int, ...], float]]:
    """Every response of at most `last` content tokens (drawn from `cols`) with p > 0 and its exact
    probability, most probable first; ValueError when more than `limit` responses or prefixes arise.

    Breadth first: the prefixes of length t carry their per-mode log-probabilities; each ends (eos) or
    grows by one token. Probabilities are mixed over the modes in log space (logsumexp).
    """
    start_state = table.shape[1] - 1
    seqs, lps = np.zeros((1, 0), dtype=np.int64), np.zeros((1, len(logw)))
    found_seqs, found_lp, count = [], [], 0
    for t in range(last + 1):
        state = np.full(len(seqs), start_state) if t == 0 else seqs[:, -1]
        stop = np.zeros_like(lps) if t == cap else table[:, state, EOS_ID].T
        total = logsumexp(lps + stop + logw, axis=1)
        done = np.isfinite(total)
        found_seqs.append(seqs[done])
        found_lp.append(total[done])
        count += int(done.sum())
        if t == last or len(seqs) == 0:
            break
        grown = _extend(table, seqs, lps, state, cols, limit - count)
        if grown is None:
            raise ValueError(f"more than {limit} responses with p > 0 (up to {last} tokens): enumerate only "
                             "tiny worlds (small max_length / branching / mode_tokens, or noise 0), or pass "
                             "max_len")
        seqs, lps = grown
    probs = np.exp(np.concatenate(found_lp))
    rows = [tuple(s) + (EOS_ID,) for block in found_seqs for s in block.tolist()]
    order = np.argsort(-probs, kind="stable")
    return [(rows[j], float(probs[j])) for j in order]


def best_first(table: np.ndarray, logw: np.ndarray, cap: int, k: int,
               max_pops: int) -> list[tuple[tuple[int, ...], float]]:
    """The k most probable responses, exactly: best-first search over prefixes. A prefix's probability
    bounds every completion's, so complete responses leave the queue in order of probability."""
    start_state = table.shape[1] - 1
    heap = [(-0.0, 0, (), np.zeros(len(logw)), False)]
    out, counter = [], itertools.count(1)
    for _ in range(max_pops):
        if not heap or len(out) >= k:
            return out
        neg, _, seq, lpk, complete = heapq.heappop(heap)
        if complete:
            out.append((seq, float(np.exp(-neg))))
            continue
        if len(seq) == cap:
            heapq.heappush(heap, (neg, next(counter), seq + (EOS_ID,), lpk, True))
            continue
        new = lpk[:, None] + table[:, seq[-1] if seq else start_state]    # [K, V]
        mix = logsumexp(new + logw[:, None], axis=0)
        for v in np.flatnonzero(np.isfinite(mix)):
            heapq.heappush(heap, (-mix[v], next(counter), seq + (int(v),), new[:, v], v == EOS_ID))
    raise ValueError(f"the search for the top {k} responses did not finish within {max_pops} expansions")
