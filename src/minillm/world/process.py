"""A controlled world: a known generative process over token sequences with exact probabilities (issue 24).

The process, for prompt i and a response y = y_1 .. y_L </s> (L content tokens, then the end token):

* Prompt i is the text "p{i}" followed by `prompt_length - 1` seeded content tokens (decoration); it
  selects K = `modes` modes whose masses w_k are `mode_mass` in a seeded random order (per prompt).
* Mode k of prompt i is a sparse Markov chain over its own `mode_tokens` content tokens (drawn
  independently per mode, so the modes of one prompt may share tokens): a start distribution over 2 of
  them and `branching` successors per token, every weight vector Dirichlet(1).
* After each content token the response ends with probability s = 1 / length (so L >= 1 and, below the
  cap, E[L] = length: geometric lengths); otherwise the next token follows the chain. After max_length
  content tokens the end token is forced (probability 1).
* Noise eps: every next-token distribution except the forced end is (1 - eps) * chain + eps * uniform over
  the `vocab` content tokens and the end token. A chain that sees a token outside its own set (only
  possible through noise) goes on as from its start distribution (and may stop, with s). With eps > 0
  every content sequence of at most max_length tokens has p > 0, the empty response included.
* p(y | i) = sum_k w_k P_k(y), computed exactly as a logsumexp over the modes of each chain's log-probability.

The *noise-free support* is the set of responses with p > 0 at eps = 0 (`in_support`, `mode_of`,
`enumerate`). Token ids (the tokenizer's): 0 = "</s>" (eos = pad = bos), 1 = "<unk>" (never produced),
2 .. vocab+1 = content tokens "t0" .. , then the prompt tokens "p0" ... Responses are lists of ids ending
with the eos id; a list WITHOUT a final eos is a *prefix*: `log_prob` gives log P(prefix) (the mass of all
responses that start with it). Everything is derived from `spec.seed` (numpy Generators), so two `World`s
of one spec are identical, and prompt i's chains do not depend on how many prompts there are.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from minillm.world import search
from minillm.world.spec import (
    ENUMERATE_LIMIT,
    EOS,
    EOS_ID,
    EXACT_ENTROPY_LIMIT,
    FIRST_CONTENT,
    UNK,
    UNK_ID,
    Chain,
    WorldSpec,
    log0,
    logsumexp,
)

_TAG_RECORDS, _TAG_ENTROPY = 1, 3  # seed-sequence domain tags: two uses of one seed never share samples


class World:
    """The generative process of `spec` with exact probabilities, a sampler and a word-level tokenizer."""

    def __init__(self, spec: WorldSpec):
        self.spec = spec
        self.max_length = spec.cap
        self.eos_id = EOS_ID
        self.content_ids = np.arange(FIRST_CONTENT, FIRST_CONTENT + spec.vocab)
        self.tokens = [EOS, UNK] + [f"t{j}" for j in range(spec.vocab)]
        self.tokens += [f"p{i}" for i in range(spec.prompts)]
        self.vocab_size = len(self.tokens)
        self.stop = 1.0 / spec.length
        mass = np.array(spec.mode_mass or [1.0 / spec.modes] * spec.modes, dtype=np.float64)
        mass /= mass.sum()
        self.weights, self.chains, self._prompts = [], [], []
        for i in range(spec.prompts):
            rng = np.random.default_rng(np.random.SeedSequence([spec.seed, i]))
            self.weights.append(mass[rng.permutation(spec.modes)])
            self.chains.append([self._draw_chain(rng) for _ in range(spec.modes)])
            deco = rng.choice(self.content_ids, size=spec.prompt_length - 1).tolist()
            self._prompts.append([FIRST_CONTENT + spec.vocab + i] + deco)
        self._tables: dict[tuple[int, bool], np.ndarray] = {}

    def _draw_chain(self, rng: np.random.Generator) -> Chain:
        s = self.spec
        tokens = rng.choice(self.content_ids, size=s.mode_tokens, replace=False)
        n_start = min(2, s.mode_tokens)
        succ = np.stack([rng.choice(tokens, size=s.branching, replace=False) for _ in tokens])
        return Chain(tokens=tokens, start=tokens[:n_start], start_probs=rng.dirichlet(np.ones(n_start)),
                     successors=succ, successor_probs=rng.dirichlet(np.ones(s.branching), size=s.mode_tokens))

    # ---- tables -------------------------------------------------------------------------------------------
    def _check_prompt(self, i: int) -> int:
        if not (0 <= int(i) < self.spec.prompts):
            raise IndexError(f"prompt index {i} is out of range: this world has {self.spec.prompts} prompts")
        return int(i)

    def transition_table(self, i: int, noisy: bool = True) -> np.ndarray:
        """log P_k(next | previous token) as [K, V + 1, V] float64; row V is the start state. Rows of
        eos / unk / prompt tokens are -inf (impossible states); the forced end at the cap is not in it."""
        key = (self._check_prompt(i), bool(noisy and self.spec.noise > 0))
        if key not in self._tables:
            if len(self._tables) >= 64:
                self._tables.pop(next(iter(self._tables)))
            self._tables[key] = log0(self._probability_table(*key))
        return self._tables[key]

    def _probability_table(self, i: int, noisy: bool) -> np.ndarray:
        V, K, s = self.vocab_size, self.spec.modes, self.stop
        table = np.zeros((K, V + 1, V))
        for k, ch in enumerate(self.chains[i]):
            start = np.zeros(V)
            start[ch.start] = ch.start_probs
            recover = (1 - s) * start
            recover[EOS_ID] = s
            table[k, self.content_ids] = recover  # a token outside the mode's set: restart (noise only)
            for j, a in enumerate(ch.tokens):
                row = np.zeros(V)
                row[ch.successors[j]] = (1 - s) * ch.successor_probs[j]
                row[EOS_ID] = s
                table[k, a] = row
            table[k, V] = start
        if noisy:
            uniform = np.zeros(V)
            uniform[self.content_ids] = uniform[EOS_ID] = 1.0 / (self.spec.vocab + 1)
            rows = np.append(self.content_ids, V)
            table[:, rows] = (1 - self.spec.noise) * table[:, rows] + self.spec.noise * uniform
        return table

    # ---- scoring ------------------------------------------------------------------------------------------
    def _pad(self, responses: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids [N, T] clipped into range, lengths [N], invalid [N]: a row holds an id outside the vocab)."""
        lengths = np.fromiter((len(r) for r in responses), dtype=np.int64, count=len(responses))
        width = max(int(lengths.max(initial=0)), 1)
        flat = np.fromiter(itertools.chain.from_iterable(responses), dtype=np.int64, count=int(lengths.sum()))
        ids = np.full((len(responses), width), EOS_ID, dtype=np.int64)
        valid = np.arange(width)[None, :] < lengths[:, None]
        ids[valid] = flat
        bad = (ids < 0) | (ids >= self.vocab_size)
        invalid = (bad & valid).any(axis=1)
        return np.where(bad, UNK_ID, ids), lengths, invalid

    def _token_log_probs(self, i: int, ids: np.ndarray, noisy: bool) -> np.ndarray:
        """log P_k(ids[n, t] | ids[n, :t]) as [K, N, T] (the cap included)."""
        table = self.transition_table(i, noisy)
        state = np.empty_like(ids)
        state[:, 0] = self.vocab_size
        state[:, 1:] = ids[:, :-1]
        lp = table[:, state, ids]
        cap = self.max_length
        if ids.shape[1] > cap:
            lp[:, :, cap] = np.where(ids[:, cap] == EOS_ID, 0.0, -np.inf)
            lp[:, :, cap + 1:] = -np.inf
        return lp

    def mode_log_probs(self, i: int, responses: Sequence[Sequence[int]], noisy: bool = True) -> np.ndarray:
        """[N, K] float64: log w_k + log P_k(y) (prefix semantics for a response without the final eos)."""
        i = self._check_prompt(i)
        if len(responses) == 0:
            return np.zeros((0, self.spec.modes))
        ids, lengths, invalid = self._pad(responses)
        lp = self._token_log_probs(i, ids, noisy)
        lp = np.where(np.arange(ids.shape[1])[None, None, :] < lengths[None, :, None], lp, 0.0)
        total = lp.sum(axis=-1).T + np.log(self.weights[i])[None, :]
        total[invalid] = -np.inf
        return total

    def log_prob(self, i: int, responses: Sequence[Sequence[int]], noisy: bool = True) -> np.ndarray:
        """Exact log p(y | prompt i) per response, float64 [N], end token included; -inf outside the support.

        A response without a final eos is a prefix: its value is log P(prefix) (the mass of every response
        that starts with it). `noisy=False` scores under the noise-free process.
        """
        return logsumexp(self.mode_log_probs(i, responses, noisy), axis=1)

    def next_token_tables(self, i: int, responses: Sequence[Sequence[int]],
                          noisy: bool = True) -> list[np.ndarray]:
        """Per response y, [len(y), V] float64: row t = log p(next | prompt, y[:t]) over the tokenizer's ids.

        A row whose prefix y[:t] is itself impossible is all -inf (the conditional is undefined there).
        """
        i = self._check_prompt(i)
        out = []
        for start in range(0, len(responses), 256):
            chunk = responses[start:start + 256]
            ids, lengths, invalid = self._pad(chunk)
            lp = self._token_log_probs(i, ids, noisy)                       # [K, N, T]
            prior = np.cumsum(np.concatenate([np.zeros(lp.shape[:2] + (1,)), lp[:, :, :-1]], axis=2), axis=2)
            prior = prior + np.log(self.weights[i])[:, None, None]          # log w_k P_k(y[:t])
            prior[:, invalid] = -np.inf
            state = np.empty_like(ids)
            state[:, 0] = self.vocab_size
            state[:, 1:] = ids[:, :-1]
            joint = prior[..., None] + self.transition_table(i, noisy)[:, state]  # [K, N, T, V]
            norm = logsumexp(prior, axis=0)[..., None]
            defined = np.isfinite(norm)
            rows = np.where(defined, logsumexp(joint, axis=0) - np.where(defined, norm, 0.0), -np.inf)
            if ids.shape[1] > self.max_length:
                forced = np.full(self.vocab_size, -np.inf)
                forced[EOS_ID] = 0.0
                alive = np.isfinite(norm[:, self.max_length, 0])
                rows[alive, self.max_length] = forced
            out += [rows[n, :length] for n, length in enumerate(lengths)]
        return out

    def next_token_logprobs(self, i: int, prefix: Sequence[int], noisy: bool = True) -> np.ndarray:
        """[V] float64: exact log p(next | prompt i, prefix) over the tokenizer's ids (-inf where impossible).

        Raises ValueError when the prefix itself has probability 0 (its conditional is undefined).
        """
        row = self.next_token_tables(i, [list(prefix) + [EOS_ID]], noisy)[0][len(prefix)]
        if not np.isfinite(row).any():
            raise ValueError(f"prefix {list(prefix)} has probability 0 under prompt {i}: the next-token "
                             "distribution is undefined (use a world with noise > 0 for full support)")
        return row

    # ---- support and modes --------------------------------------------------------------------------------
    def support_mask(self, i: int, responses: Sequence[Sequence[int]]) -> np.ndarray:
        """[N] bool: complete (exactly one eos, at the end) and p > 0 under the noise-free process."""
        complete = np.array([len(r) > 0 and r[-1] == EOS_ID for r in responses], dtype=bool)
        return complete & np.isfinite(self.log_prob(i, responses, noisy=False))

    def modes_of(self, i: int, responses: Sequence[Sequence[int]]) -> np.ndarray:
        """[N] int: the mode with the largest noise-free posterior, -1 where p = 0 without noise."""
        lp = self.mode_log_probs(i, responses, noisy=False)
        if lp.shape[0] == 0:
            return np.zeros(0, dtype=np.int64)
        return np.where(np.isfinite(lp).any(axis=1), np.argmax(lp, axis=1), -1)

    def in_support(self, i: int, response: Sequence[int]) -> bool:
        """True when `response` is a complete response (ending in eos) with p > 0 without noise."""
        return bool(self.support_mask(i, [response])[0])

    def mode_of(self, i: int, response: Sequence[int]) -> int | None:
        """The mode with the largest posterior under the noise-free process; None where p = 0 there.
        A response without a final eos is treated as a prefix (posterior given the prefix)."""
        k = int(self.modes_of(i, [response])[0])
        return None if k < 0 else k

    # ---- sampling -----------------------------------------------------------------------------------------
    def sample(self, i: int, n: int, rng: np.random.Generator) -> list[list[int]]:
        """n responses of prompt i (token ids, each ending with the eos id), drawn with `rng`."""
        i = self._check_prompt(i)
        cdf = np.cumsum(np.exp(self.transition_table(i, noisy=True)), axis=-1)
        modes = rng.choice(self.spec.modes, size=n, p=self.weights[i])
        out = np.full((n, self.max_length + 1), EOS_ID, dtype=np.int64)
        state = np.full(n, self.vocab_size)
        alive = np.ones(n, dtype=bool)
        for t in range(self.max_length):
            if not alive.any():
                break
            c = cdf[modes, state]
            tok = (c <= (rng.random(n) * c[:, -1])[:, None]).sum(axis=1)
            tok = np.where(alive, tok, EOS_ID)
            out[:, t] = tok
            alive &= tok != EOS_ID
            state = np.where(alive, tok, state)
        lengths = (out != EOS_ID).sum(axis=1)
        return [row[:m + 1].tolist() for row, m in zip(out, lengths)]

    # ---- exact enumeration and search ---------------------------------------------------------------------
    def enumerate(self, i: int, max_len: int | None = None, noisy: bool = False,
                  limit: int = ENUMERATE_LIMIT) -> list[tuple[tuple[int, ...], float]]:
        """Every response with p > 0 (at most `max_len` content tokens; default the cap) and its exact
        probability, most probable first. Noise-free process by default (only the support, so the
        probabilities sum to 1 without max_len); `noisy=True` lists the support of the process with its
        noise (every content sequence when noise > 0). ValueError beyond `limit` responses."""
        i = self._check_prompt(i)
        noisy = bool(noisy and self.spec.noise > 0)
        cols = self.content_ids if noisy else np.unique(np.concatenate([c.tokens for c in self.chains[i]]))
        last = self.max_length if max_len is None else min(int(max_len), self.max_length)
        try:
            return search.enumerate_responses(self.transition_table(i, noisy), np.log(self.weights[i]), cols,
                                              self.max_length, last, limit)
        except ValueError as e:
            raise ValueError(f"prompt {i}: {e}") from None

    def top_responses(self, i: int, k: int, max_pops: int = 2_000_000) -> list[tuple[tuple[int, ...], float]]:
        """The k most probable responses of prompt i under the process (its noise included), exactly."""
        i = self._check_prompt(i)
        return search.best_first(self.transition_table(i, noisy=True), np.log(self.weights[i]),
                                 self.max_length, k, max_pops)

    def entropy(self, i: int, samples: int = 4096, seed: int = 0) -> float:
        """Sequence entropy H(p(. | prompt i)) in nats: exact when the support (with noise) has at most
        EXACT_ENTROPY_LIMIT responses, else the Monte-Carlo estimate -mean log p(y) over `samples` draws
        (seeded by `seed`; standard error about std(log p) / sqrt(samples)). `entropy_is_exact` says which."""
        try:
            p = np.array([q for _, q in self.enumerate(i, noisy=True, limit=EXACT_ENTROPY_LIMIT)])
        except ValueError:
            rng = np.random.default_rng(np.random.SeedSequence([seed, i, _TAG_ENTROPY]))
            return float(-self.log_prob(i, self.sample(i, samples, rng)).mean())
        return float(-(p * np.log(p)).sum())

    def entropy_is_exact(self, i: int) -> bool:
        """Whether `entropy(i)` enumerates (True) or samples (False)."""
        try:
            self.enumerate(i, noisy=True, limit=EXACT_ENTROPY_LIMIT)
        except ValueError:
            return False
        return True

    def expected_length(self) -> float:
        """Exact E[number of content tokens] of a response (the stop probability does not depend on the mode
        or the state: eps / (vocab + 1) before the first token, (1 - eps) s + eps / (vocab + 1) after)."""
        u = self.spec.noise / (self.spec.vocab + 1)
        h = (1 - self.spec.noise) * self.stop + u
        return float((1 - u) * sum((1 - h) ** t for t in range(self.max_length)))

    # ---- text ---------------------------------------------------------------------------------------------
    def tokenizer(self):
        """A word-level `PreTrainedTokenizerFast` with this world's ids (eos = pad = bos = "</s>" = 0)."""
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.WordLevel(vocab={t: j for j, t in enumerate(self.tokens)}, unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS,
                                       unk_token=UNK, model_max_length=4096)
        fast.padding_side = "right"
        return fast

    def prompt_ids(self, i: int) -> list[int]:
        return list(self._prompts[self._check_prompt(i)])

    def prompt_text(self, i: int) -> str:
        return self.text(self.prompt_ids(i))

    def text(self, ids: Sequence[int]) -> str:
        """Space-joined token strings of `ids`, a final eos left out (how responses appear as text)."""
        ids = list(ids)
        if ids and ids[-1] == EOS_ID:
            ids = ids[:-1]
        return " ".join(self.tokens[j] for j in ids)

    def instruction_records(self, n_per_prompt: int, seed: int,
                            prompts: Sequence[int] | None = None) -> list[dict]:
        """Instruction-data records of responses sampled from the process (the output has no end token).

        Prompt i's samples depend only on (seed, i), so a record set for some prompts is a subset of the one
        for more prompts."""
        out = []
        for i in range(self.spec.prompts) if prompts is None else prompts:
            rng = np.random.default_rng(np.random.SeedSequence([seed, int(i), _TAG_RECORDS]))
            for j, y in enumerate(self.sample(i, n_per_prompt, rng)):
                out.append({"instruction": self.prompt_text(i), "input": "", "output": self.text(y),
                            "id": f"world-{i}-{j}", "source": "minillm.world", "prompt_index": int(i)})
        return out
