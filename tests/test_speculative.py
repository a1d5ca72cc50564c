"""The speculative mixed sampler (minillm.sampling.speculative) against brute force.

Exactness: on a 6-token vocabulary every response of up to 4 tokens is enumerated and its exact probability
under p~ = alpha * p + (1 - alpha) * q (token by token, after the same processors) computed from full
forwards of both models; the sampler's empirical distribution of whole responses, and of their lengths, must
pass a chi-square test at level 1e-3 for several alpha, draft lengths, temperatures and the n-gram ban. The
recorded log-probs, weights and teacher hidden states must equal a full forward of both models over the kept
tokens.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import NoRepeatNGramLogitsProcessor

from minillm.models import final_hidden
from minillm.sampling import SamplingConfig, generate_rollouts
from minillm.sampling.speculative import PRIOR_TOKENS, SpeculativeStats, _append_ragged, adaptive_draft_length
from minillm.testing import tiny_gpt2, tiny_llama, tiny_tokenizer
from test_sampling import PROMPTS, chi2_pvalue, left_pad, reference_logprobs

V, EOS, PAD = 6, 0, 0
PROMPT = [3, 2, 4, 3]
MAX_NEW = 4


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def small_models():
    student = tiny_llama(vocab_size=V, seed=11)
    teacher = tiny_llama(vocab_size=V, seed=12, hidden_size=48)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(6.0)  # a peaked teacher far from the flat student: many rejections
        student.lm_head.weight.mul_(2.0)
    return student, teacher


def _next_dist(model, prefixes: list[list[int]], temperature: float, ngram: int) -> torch.Tensor:
    """Processed next-token distributions [N, V] after prompt + each prefix (full forward, float64); the
    prefixes all have one length."""
    ids = torch.tensor([PROMPT + p for p in prefixes])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, -1].double() / temperature
    if ngram:
        logits = NoRepeatNGramLogitsProcessor(ngram)(ids, logits)
    return logits.softmax(-1)


def exact_responses(student, teacher, alpha: float, temperature: float, ngram: int = 0) -> dict:
    """Every response (a tuple of ids, ending at its first EOS or at MAX_NEW tokens) -> its probability."""
    mix, prefixes = {}, []
    for n in range(MAX_NEW):
        group = [list(p) for p in itertools.product(range(1, V), repeat=n)]
        q = _next_dist(student, group, temperature, ngram)
        p = _next_dist(teacher, group, temperature, ngram)
        mix.update({tuple(prefix): alpha * p[i] + (1 - alpha) * q[i] for i, prefix in enumerate(group)})
        prefixes += group
    out = {}
    for prefix in prefixes:
        prob = 1.0
        for t in range(len(prefix)):
            prob *= float(mix[tuple(prefix[:t])][prefix[t]])
        dist = mix[tuple(prefix)]
        out[tuple(prefix) + (EOS,)] = prob * float(dist[EOS])
        if len(prefix) == MAX_NEW - 1:
            for y in range(1, V):
                out[tuple(prefix) + (y,)] = prob * float(dist[y])
    total = sum(out.values())
    assert abs(total - 1) < 1e-9, total
    return out


def sample_responses(student, teacher, n: int, *, alpha: float, draft: int, temperature: float,
                     ngram: int = 0, seed: int = 0, stats=None, adaptive: bool = False):
    ids = torch.tensor([PROMPT]).expand(n, -1).contiguous()
    config = SamplingConfig(max_new_tokens=MAX_NEW, temperature=temperature, draft_length=draft,
                            no_repeat_ngram_size=ngram, draft_adaptive=adaptive)
    return generate_rollouts(student, ids, torch.ones_like(ids), config=config, eos_token_id=EOS,
                             pad_token_id=PAD, teacher=teacher, teacher_mix_alpha=alpha,
                             generator=torch.Generator().manual_seed(seed), stats=stats)


def _counts(rollout, support: list[tuple]) -> torch.Tensor:
    index = {r: i for i, r in enumerate(support)}
    counts = torch.zeros(len(support))
    for ids, n in zip(rollout.response_ids.tolist(), rollout.lengths.tolist()):
        counts[index[tuple(ids[:n])]] += 1
    return counts


@pytest.mark.parametrize("alpha, draft, temperature, ngram, adaptive", [
    (0.2, 1, 1.0, 0, False),   # the paper's alpha, the shortest draft
    (0.5, 3, 1.0, 0, False),   # as long as the budget allows: rejection at every index, bonus
    (0.5, 2, 0.7, 0, False),   # temperature applied to both models
    (0.5, 2, 1.0, 2, False),   # the n-gram ban applied to both models at each drafted prefix
    (0.0, 3, 1.0, 2, False),   # alpha = 0 with the n-gram ban (the speculative path; every draft is kept)
    (0.5, 3, 1.0, 0, True),    # the adaptive length: 2 from the prior, then 1 at the measured acceptance
])
def test_whole_responses_follow_the_exact_mixture(small_models, alpha, draft, temperature, ngram, adaptive):
    student, teacher = small_models
    exact = exact_responses(student, teacher, alpha, temperature, ngram)
    support = list(exact)
    probs = torch.tensor([exact[r] for r in support])
    stats = SpeculativeStats()
    rollout = sample_responses(student, teacher, 30_000, alpha=alpha, draft=draft, temperature=temperature,
                               ngram=ngram, stats=stats, adaptive=adaptive)
    if adaptive:
        assert len(set(stats.draft_lengths)) > 1, stats.draft_lengths  # the length did change between rounds
    counts = _counts(rollout, support)
    assert chi2_pvalue(counts, probs) > 1e-3
    # each token given its prefix: the second token after the most frequent first token
    first = rollout.response_ids[:, 0]
    y1 = int(torch.bincount(first[rollout.lengths > 1], minlength=V)[1:].argmax()) + 1
    rows = (first == y1) & (rollout.lengths > 1)
    second = torch.zeros(V).index_add_(0, rollout.response_ids[rows, 1], torch.ones(int(rows.sum())))
    cond = torch.zeros(V, dtype=torch.float64)
    for r, prob in exact.items():
        if len(r) > 1 and r[0] == y1:
            cond[r[1]] += prob
    assert chi2_pvalue(second, cond / cond.sum()) > 1e-3
    lengths = torch.tensor([len(r) for r in support])
    length_probs = torch.zeros(MAX_NEW + 1).index_add_(0, lengths, probs.float())
    assert chi2_pvalue(torch.bincount(rollout.lengths, minlength=MAX_NEW + 1).float(), length_probs) > 1e-3
    if alpha == 0:
        assert stats.accepted == stats.drafted > 0
    else:
        assert 1 - alpha <= stats.acceptance_rate < 1
        # every number of kept drafted tokens occurred: rejection at the first and at the last drafted
        # token, and whole drafts kept (the bonus token)
        assert all(c > 0 for c in stats.kept_counts[:max(stats.draft_lengths) + 1])


@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5])
@pytest.mark.parametrize("cost_ratio", [0.5, 2.0, 5.0])
def test_adaptive_draft_length_maximises_tokens_per_cost(alpha, cost_ratio):
    """Against brute force: expected tokens per round = sum over i <= k of a^i (a row keeps drafted token i
    only after keeping tokens 0..i-1, and always gains one more token), cost k + 1 + cost_ratio."""
    for accepted, rejected in [(0, 0), (10, 90), (80, 20), (400, 100), (990, 10), (10_000, 0)]:
        a = (accepted + PRIOR_TOKENS * (1 - alpha / 2)) / (accepted + rejected + PRIOR_TOKENS)
        values = [sum(a ** i for i in range(k + 1)) / (k + 1 + cost_ratio) for k in range(1, 9)]
        best = max(values)
        k = adaptive_draft_length(accepted, rejected, alpha=alpha, max_length=8, cost_ratio=cost_ratio)
        assert values[k - 1] >= best * (1 - 1e-12)
        assert all(v < best * (1 - 1e-12) for v in values[:k - 1])  # ties go to the shorter draft
    # more acceptance never shortens the draft; a sure acceptance drafts the most allowed
    lengths = [adaptive_draft_length(n, 1000 - n, alpha=0.2, max_length=12, cost_ratio=cost_ratio)
               for n in range(0, 1001, 50)]
    assert lengths == sorted(lengths)
    assert adaptive_draft_length(0, 0, alpha=0.0, max_length=7, cost_ratio=cost_ratio) == 7
    assert adaptive_draft_length(0, 10_000, alpha=0.5, max_length=7, cost_ratio=cost_ratio) == 1


def test_the_chi_square_test_has_power(small_models):
    """The same sample is rejected against the student's own distribution and against another alpha."""
    student, teacher = small_models
    rollout = sample_responses(student, teacher, 30_000, alpha=0.5, draft=3, temperature=1.0)
    for alpha in (0.0, 0.3):
        exact = exact_responses(student, teacher, alpha, 1.0)
        support = list(exact)
        assert chi2_pvalue(_counts(rollout, support), torch.tensor([exact[r] for r in support])) < 1e-6


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("draft", [1, 4])
def test_records_equal_a_full_forward_of_both_models(tok, family, draft):
    """log q, log p, log p~, the weights and the teacher hidden states of the kept tokens equal a full
    forward over prompt + response (float64 models: no round-off between the two computations)."""
    make = tiny_llama if family == "llama" else tiny_gpt2
    student = make(tok, seed=1).double()
    teacher = make(tok, seed=2, hidden_size=48, vocab_size=len(tok) + 16).double()  # wider: sliced
    prompt_ids, prompt_mask = left_pad(tok, PROMPTS * 3)
    config = SamplingConfig(max_new_tokens=14, temperature=0.8, draft_length=draft)
    rollout = generate_rollouts(student, prompt_ids, prompt_mask, config=config,
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, teacher=teacher,
                                teacher_mix_alpha=0.4,
                                generator=torch.Generator().manual_seed(3), return_teacher_hidden=True)
    vocab = len(tok)
    logq, _ = reference_logprobs(student, rollout, config.temperature, vocab)
    logp, _ = reference_logprobs(teacher, rollout, config.temperature, vocab)
    mask = rollout.response_mask
    torch.testing.assert_close(rollout.student_logprobs, logq.float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(rollout.teacher_logprobs, logp.float(), atol=1e-6, rtol=0)
    mix = torch.logaddexp(torch.log(torch.tensor(0.4)) + logp, torch.log(torch.tensor(0.6)) + logq) * mask
    torch.testing.assert_close(rollout.mix_logprobs, mix.float(), atol=1e-6, rtol=0)
    weights = (logq - mix).exp().float() * mask
    torch.testing.assert_close(rollout.importance_weights, weights, atol=1e-6, rtol=0)
    ids, full_mask = rollout.full_sequence()
    with torch.no_grad():
        hidden = final_hidden(teacher, ids, full_mask)[:, prompt_ids.shape[1] - 1:-1]
    torch.testing.assert_close(rollout.teacher_hidden, (hidden * mask[..., None]).float(), atol=1e-6, rtol=0)
    assert bool((rollout.lengths > 1).all()) and int(rollout.lengths.max()) <= config.max_new_tokens
    # EOS: a row's response ends at its first EOS; everything after is pad and zero
    for row, n in enumerate(rollout.lengths.tolist()):
        body = rollout.response_ids[row, :n].tolist()
        assert tok.eos_token_id not in body[:-1]
        assert n == config.max_new_tokens or body[-1] == tok.eos_token_id
        assert bool((rollout.response_ids[row, n:] == tok.pad_token_id).all())


def _both(student, teacher, prompt_ids, prompt_mask, tok, **kwargs):
    config = kwargs.pop("config")
    out = []
    for draft in (0, 3):
        out.append(generate_rollouts(student, prompt_ids, prompt_mask,
                                     config=SamplingConfig(**{**config, "draft_length": draft}),
                                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                     teacher=teacher, generator=torch.Generator().manual_seed(0), **kwargs))
    return out


@pytest.mark.parametrize("alpha, ngram", [(0.3, 0), (0.3, 2), (0.0, 2)])
def test_greedy_equals_lockstep_greedy(tok, alpha, ngram):
    """Greedy decoding is deterministic: the draft-and-verify loop must pick the lockstep argmax of p~."""
    student, teacher = tiny_llama(tok, seed=1), tiny_llama(tok, seed=2, hidden_size=48)
    prompt_ids, prompt_mask = left_pad(tok, PROMPTS)
    lockstep, speculative = _both(student, teacher, prompt_ids, prompt_mask, tok, teacher_mix_alpha=alpha,
                                  config=dict(max_new_tokens=12, greedy=True, no_repeat_ngram_size=ngram))
    assert torch.equal(lockstep.response_ids, speculative.response_ids)
    assert torch.equal(lockstep.lengths, speculative.lengths)
    for name in ("student_logprobs", "teacher_logprobs", "mix_logprobs", "importance_weights"):
        torch.testing.assert_close(getattr(speculative, name), getattr(lockstep, name), atol=1e-5, rtol=0)


def test_compaction_and_stopping(tok):
    """Dropping finished rows changes nothing (each row keeps its uniforms); rows stop at EOS or at the
    budget."""
    student, teacher = tiny_llama(tok, seed=1), tiny_llama(tok, seed=2, hidden_size=48)
    with torch.no_grad():  # EOS likely, so that rows finish at different rounds
        student.lm_head.weight[tok.eos_token_id] += 0.5 * student.model.norm.weight
        teacher.lm_head.weight[tok.eos_token_id] += 0.5 * teacher.model.norm.weight
    prompt_ids, prompt_mask = left_pad(tok, PROMPTS * 4)
    config = SamplingConfig(max_new_tokens=9, draft_length=3)
    runs = [generate_rollouts(student, prompt_ids, prompt_mask, config=config, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id, teacher=teacher, teacher_mix_alpha=0.2,
                              generator=torch.Generator().manual_seed(5), compact=compact)
            for compact in (True, False)]
    assert torch.equal(runs[0].response_ids, runs[1].response_ids)
    torch.testing.assert_close(runs[0].student_logprobs, runs[1].student_logprobs, atol=1e-5, rtol=0)
    lengths = runs[0].lengths
    assert len(set(lengths.tolist())) > 1 and int(lengths.max()) <= 9


def test_append_ragged_keeps_each_history_contiguous():
    history = torch.tensor([[9, 9, 1, 2], [9, 3, 4, 5]])
    tokens = torch.tensor([[6, 7, 8], [1, 0, 0]])
    out = _append_ragged(history, tokens, torch.tensor([2, 1]), 9)
    assert out.tolist() == [[9, 9, 9, 1, 2, 6, 7], [9, 9, 9, 3, 4, 5, 1]]
