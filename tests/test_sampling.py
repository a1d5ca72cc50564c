"""Rollout engine: KV-cache decoding must reproduce full forwards, sampling must follow p~ exactly."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import DynamicCache, DynamicLayer

from minillm import sampling
from minillm.errors import ConfigError, DataError
from minillm.models import backbone, final_hidden, lm_head_fn, position_ids_from_mask
from minillm.sampling import (
    CausalLMAdapter,
    Decoder,
    GrowingLayer,
    Rollout,
    SamplingConfig,
    generate_rollouts,
    generate_texts,
    response_texts,
    sample_from_probs,
    teacher_forced_logprobs,
)
from minillm.sampling import adapter as adapter_module
from minillm.sampling import decoder as decoder_module
from minillm.sampling import draw as draw_module
from minillm.testing import tiny_gpt2, tiny_llama, tiny_tokenizer

PROMPTS = ["the cat is", "what is the capital of france and why is it paris", "one two"]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def left_pad(tok, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    encoded = [tok.encode(t, add_special_tokens=False) for t in texts]
    width = max(map(len, encoded))
    pad = tok.pad_token_id
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    return ids, mask


def reference_logprobs(model, rollout: Rollout, temperature: float,
                       vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-incremental forward over prompt + response: (log-probs of the response tokens [B, T],
    logits [B, T, V])."""
    ids, mask = rollout.full_sequence()
    prompt_len = rollout.prompt_ids.shape[1]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    logits = logits[:, prompt_len - 1:-1, :vocab].float() / temperature
    logprobs = logits.log_softmax(-1).gather(2, rollout.response_ids[..., None]).squeeze(-1)
    return logprobs * rollout.response_mask, logits


def eos_scripted_sampler(monkeypatch, script: torch.Tensor) -> None:
    """Replace the draw by a fixed token table [B, steps] so that EOS positions are known in advance."""
    step = iter(range(script.shape[1]))
    def scripted(probs, generator=None, *, rows=None, batch=None):
        column = script[:, next(step)]
        # compacted: its rows
        return (column if rows is None else column[rows.cpu()]).clone().to(probs.device)

    monkeypatch.setattr(draw_module, "sample_from_probs", scripted)


@pytest.mark.parametrize("family, alpha", [("llama", 0.3), ("gpt2", 0.3), ("llama", 0.0), ("gpt2", 0.0)])
def test_kv_cache_logprobs_and_hidden_match_full_forward(tok, family, alpha):
    """alpha > 0 steps the teacher in lockstep; alpha = 0 scores with one teacher forward: both must agree."""
    make = tiny_llama if family == "llama" else tiny_gpt2
    student = make(tok, seed=1)
    # A wider (padded) teacher vocabulary: both must be sliced to the shared width.
    teacher = make(tok, seed=2, hidden_size=48, vocab_size=len(tok) + 16)
    prompt_ids, prompt_mask = left_pad(tok, PROMPTS)
    config = SamplingConfig(max_new_tokens=10, temperature=0.7)
    rollout = generate_rollouts(student, prompt_ids, prompt_mask, config=config,
                                eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.pad_token_id, teacher=teacher, teacher_mix_alpha=alpha,
                                generator=torch.Generator().manual_seed(0), return_teacher_hidden=True)
    vocab = len(tok)
    if alpha == 0:
        torch.testing.assert_close(rollout.mix_logprobs, rollout.student_logprobs)
        assert torch.equal(rollout.importance_weights, rollout.response_mask)
    assert int(rollout.response_ids.max()) < vocab
    logq, _ = reference_logprobs(student, rollout, config.temperature, vocab)
    logp, _ = reference_logprobs(teacher, rollout, config.temperature, vocab)
    torch.testing.assert_close(rollout.student_logprobs, logq, atol=1e-5, rtol=0)
    torch.testing.assert_close(rollout.teacher_logprobs, logp, atol=1e-5, rtol=0)

    ids, mask = rollout.full_sequence()
    with torch.no_grad():
        hidden = final_hidden(teacher, ids, mask)[:, prompt_ids.shape[1] - 1:-1]
    torch.testing.assert_close(rollout.teacher_hidden, hidden * rollout.response_mask[..., None], atol=1e-5,
                               rtol=0)
    for tensor in (rollout.student_logprobs, rollout.teacher_logprobs, rollout.mix_logprobs,
                   rollout.importance_weights, rollout.teacher_hidden):
        assert tensor.dtype == torch.float32 and tensor.device.type == "cpu"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_single_forward_scoring_without_padding_matches_lockstep(tok, monkeypatch, family):
    """alpha = 0 scores with one teacher forward over each row's real tokens only (prompt left padding and
    response right padding packed away); teacher log-probs and hidden states must equal the lockstep
    decode's, for prompts of very different lengths and responses that end at different steps."""
    make = tiny_llama if family == "llama" else tiny_gpt2
    student = make(tok, seed=13)
    teacher = make(tok, seed=14, hidden_size=48, vocab_size=len(tok) + 16)
    prompts = ["one", " ".join(["the cat is on the tree and the dog is in the river"] * 4),
               "what is the capital",
               "two three four five six seven eight nine ten"]
    prompt_ids, prompt_mask = left_pad(tok, prompts)
    lp = prompt_mask.sum(1)
    assert int(lp.max()) > 10 * int(lp.min())
    eos, other, steps = tok.eos_token_id, 17, 9
    script = torch.full((4, steps), other)
    script[:, 1::2] = 23
    script[0, 1] = eos  # 2 tokens
    script[2, 0] = eos  # 1 token: only the EOS
    script[3, 5] = eos  # 6 tokens; row 1 (the longest prompt) runs to max_new_tokens
    config = SamplingConfig(max_new_tokens=steps, temperature=0.7)
    kwargs = dict(config=config, eos_token_id=eos, pad_token_id=eos, teacher=teacher,
                  return_teacher_hidden=True)

    widths = []
    real_hidden_states = CausalLMAdapter.hidden_states

    def spy(self, ids, *args, **kw):
        # a forward without a KV cache: the teacher's scoring pass
        if not args[2:] and kw.get("cache") is None:
            widths.append(ids.shape[1])
        return real_hidden_states(self, ids, *args, **kw)

    monkeypatch.setattr(CausalLMAdapter, "hidden_states", spy)
    eos_scripted_sampler(monkeypatch, script)
    single = generate_rollouts(student, prompt_ids, prompt_mask, teacher_mix_alpha=0.0, **kwargs)
    assert single.lengths.tolist() == [2, steps, 1, 6]
    # The teacher ran once, over max(prompt + response) - 1 positions, not P + T.
    n_real = lp + single.lengths
    assert widths == [int(n_real.max()) - 1] and widths[0] < prompt_ids.shape[1] + steps

    # The lockstep path (teacher stepped with its own KV cache) on the same tokens: a teacher share too
    # small to matter, with the scripted draw, records log p(y_t) and the teacher's hidden states as at alpha
    # = 0.
    eos_scripted_sampler(monkeypatch, script)
    lockstep_config = SamplingConfig(max_new_tokens=steps, temperature=0.7, draft_length=0)  # not speculative
    lockstep = generate_rollouts(student, prompt_ids, prompt_mask, teacher_mix_alpha=1e-9,
                                 **{**kwargs, "config": lockstep_config})
    assert torch.equal(lockstep.response_ids, single.response_ids)
    assert torch.equal(lockstep.response_mask, single.response_mask)
    torch.testing.assert_close(single.student_logprobs, lockstep.student_logprobs, atol=0, rtol=0)
    torch.testing.assert_close(single.teacher_logprobs, lockstep.teacher_logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(single.teacher_hidden, lockstep.teacher_hidden, atol=1e-5, rtol=0)
    off = single.response_mask == 0
    assert torch.all(single.teacher_logprobs[off] == 0) and torch.all(single.teacher_hidden[off] == 0)
    assert torch.all(single.teacher_logprobs[~off] != 0)
    # and both equal a plain padded forward over cat(prompt, response)
    logp, _ = reference_logprobs(teacher, single, config.temperature, len(tok))
    torch.testing.assert_close(single.teacher_logprobs, logp, atol=1e-5, rtol=0)


def test_response_hidden_equals_the_padded_forward(tok):
    """`response_hidden` (packed, no padding inside rows) vs the left-padded forward, bf16 model included."""
    for model in (tiny_gpt2(tok, seed=15), tiny_llama(tok, seed=16).to(torch.bfloat16)):
        prompt_ids, prompt_mask = left_pad(tok, ["a", "the cat is on the tree and the dog is in the river",
                                                 "two"])
        response_ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 0, 0, 0], [12, 0, 0, 0, 0]])
        response_mask = (response_ids != 0).float()
        with torch.no_grad():
            got = sampling.response_hidden(model, prompt_ids, prompt_mask, response_ids, response_mask)
            ids = torch.cat([prompt_ids, response_ids], 1)
            mask = torch.cat([prompt_mask, response_mask.long()], 1)
            P, T = prompt_ids.shape[1], response_ids.shape[1]
            want = final_hidden(model, ids, mask)[:, P - 1:P - 1 + T]
        valid = response_mask.bool()
        assert got.shape == want.shape and got.dtype == want.dtype
        tol = 1e-5 if model.dtype == torch.float32 else 3e-2
        torch.testing.assert_close(got[valid].float(), want[valid].float(), atol=tol, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_matches_hf_generate(tok, family):
    model = (tiny_llama if family == "llama" else tiny_gpt2)(tok, seed=3)
    prompt_ids, prompt_mask = left_pad(tok, PROMPTS)
    rollout = generate_rollouts(model, prompt_ids, prompt_mask, config=SamplingConfig(max_new_tokens=12,
                                                                                      greedy=True),
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    expected = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=False,
                              max_new_tokens=12,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    expected = expected[:, prompt_ids.shape[1]:]
    assert torch.equal(rollout.response_ids, expected[:, :rollout.response_ids.shape[1]])


def test_no_repeat_ngram_matches_hf_and_ignores_padding(tok):
    model = tiny_llama(tok, seed=4)
    config = SamplingConfig(max_new_tokens=16, greedy=True, no_repeat_ngram_size=2)
    kwargs = {"config": config, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    batch = generate_rollouts(model, *left_pad(tok, PROMPTS), **kwargs)
    for row, text in enumerate(PROMPTS):
        ids, mask = left_pad(tok, [text])
        alone = generate_rollouts(model, ids, mask, **kwargs)
        hf = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=16,
                            no_repeat_ngram_size=2, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id)
        n = int(alone.lengths[0])
        assert torch.equal(alone.response_ids[0, :n], hf[0, ids.shape[1]:ids.shape[1] + n])
        assert torch.equal(batch.response_ids[row, :n], alone.response_ids[0, :n])
        sequence = ids[0].tolist() + alone.response_ids[0, :n].tolist()
        bigrams = list(itertools.pairwise(sequence))
        for j in range(ids.shape[1] - 1, len(bigrams)):  # every bigram a generated token completes is new
            assert bigrams[j] not in bigrams[:j]


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit; bins with expected count < 5 are pooled into one."""
    expected = probs.double() * counts.sum()
    small = expected < 5
    obs = torch.cat([counts[~small].double(), counts[small].double().sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    df = int(keep.sum()) - 1
    return float(1 - torch.distributions.Chi2(torch.tensor(float(df), dtype=torch.float64)).cdf(stat))


def test_mixed_sampling_follows_the_mixture_and_weights(tok):
    student = tiny_llama(tok, seed=5)
    teacher = tiny_llama(tok, seed=6)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(8.0)  # a peaked teacher, far from the near-uniform student
    ids, mask = left_pad(tok, ["the"])  # a short prompt keeps the forward over all rows cheap
    n = 12_000
    ids, mask = ids.expand(n, -1).contiguous(), mask.expand(n, -1).contiguous()
    with torch.no_grad():
        q = student(input_ids=ids[:1], attention_mask=mask[:1]).logits[0, -1].softmax(-1)
        p = teacher(input_ids=ids[:1], attention_mask=mask[:1]).logits[0, -1].softmax(-1)
    samples = {}
    for alpha in (0.0, 0.2, 0.5):
        rollout = generate_rollouts(student, ids, mask, config=SamplingConfig(max_new_tokens=1),
                                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                    teacher=teacher,
                                    teacher_mix_alpha=alpha, generator=torch.Generator().manual_seed(123))
        y = rollout.response_ids[:, 0]
        counts = torch.bincount(y, minlength=len(tok))
        mix = alpha * p + (1 - alpha) * q
        assert chi2_pvalue(counts, mix) > 1e-3
        torch.testing.assert_close(rollout.importance_weights[:, 0], q[y] / mix[y], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rollout.mix_logprobs[:, 0], mix[y].log(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rollout.teacher_logprobs[:, 0], p[y].log(), atol=1e-5, rtol=1e-5)
        samples[alpha] = counts
    assert torch.all(generate_rollouts(student, ids[:4], mask[:4], config=SamplingConfig(max_new_tokens=3),
                                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                       teacher=teacher,
                                       ).importance_weights == 1)
    # The test has power: the alpha = 0.5 sample is rejected against the pure student distribution.
    assert chi2_pvalue(samples[0.5], q) < 1e-6


def test_sample_from_probs_never_draws_zero_probability_tokens(monkeypatch):
    probs = torch.zeros(4000, 7)
    probs[:, 2] = 0.3
    probs[:, 4] = 0.7 + 1e-7  # unnormalised on purpose
    draws = sample_from_probs(probs, torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {2, 4}
    assert abs((draws == 4).float().mean().item() - 0.7) < 0.03
    # A uniform that rounding pushes onto the CDF's end selects the last positive token, not index V - 1.
    ones = torch.ones
    monkeypatch.setattr(torch, "rand", lambda shape, generator=None, device=None: ones(shape, device=device))
    assert sample_from_probs(probs[:3]).tolist() == [4, 4, 4]


def test_eos_stopping_masks_and_padding(tok, monkeypatch):
    student, teacher = tiny_gpt2(tok, seed=7), tiny_gpt2(tok, seed=8)
    prompt_ids, prompt_mask = left_pad(tok, PROMPTS)
    eos, pad, other = tok.eos_token_id, 5, 17
    script = torch.full((3, 8), other)
    script[0, 2] = eos  # row 0: EOS is its 3rd token
    script[1, 4] = eos  # row 1: 5th token; row 2 never stops
    eos_scripted_sampler(monkeypatch, script)
    rollout = generate_rollouts(student, prompt_ids, prompt_mask, config=SamplingConfig(max_new_tokens=6),
                                eos_token_id=eos, pad_token_id=pad, teacher=teacher, teacher_mix_alpha=0.2,
                                return_teacher_hidden=True)
    assert rollout.lengths.tolist() == [3, 5, 6]
    assert rollout.response_ids.shape == (3, 6)
    expected_mask = (torch.arange(6)[None] < rollout.lengths[:, None]).float()
    assert torch.equal(rollout.response_mask, expected_mask)
    assert rollout.response_ids[0].tolist() == [other, other, eos, pad, pad, pad]
    assert rollout.response_ids[1].tolist() == [other] * 4 + [eos, pad]
    off = rollout.response_mask == 0
    for tensor in (rollout.student_logprobs, rollout.teacher_logprobs, rollout.mix_logprobs,
                   rollout.importance_weights):
        assert torch.all(tensor[off] == 0) and torch.all(tensor[~off] != 0)
    assert torch.all(rollout.teacher_hidden[off] == 0)
    # Rows that finished early keep decoding pads without disturbing the others' caches.
    logq, _ = reference_logprobs(student, rollout, 1.0, len(tok))
    torch.testing.assert_close(rollout.student_logprobs, logq, atol=1e-5, rtol=0)


def test_stops_when_all_sequences_finished_and_trims(tok, monkeypatch):
    model = tiny_llama(tok, seed=9)
    prompt_ids, prompt_mask = left_pad(tok, PROMPTS[:2])
    script = torch.tensor([[11, tok.eos_token_id, 0, 0], [tok.eos_token_id, 0, 0, 0]])
    eos_scripted_sampler(monkeypatch, script)
    calls = []
    monkeypatch.setattr(Decoder, "step", _counting(Decoder.step, calls))
    rollout = generate_rollouts(model, prompt_ids, prompt_mask, config=SamplingConfig(max_new_tokens=50),
                                eos_token_id=[tok.eos_token_id, 999], pad_token_id=tok.pad_token_id)
    assert rollout.lengths.tolist() == [2, 1]
    assert rollout.response_ids.shape == (2, 2)
    assert len(calls) == 2  # prompt forward + one decode step; no forward after everything finished
    assert rollout.teacher_logprobs is None and rollout.mix_logprobs is None
    assert rollout.teacher_hidden is None


def test_masked_positions_are_zero_even_when_the_pad_is_truncated_away(tok, monkeypatch):
    # With top-k the pad fed to a finished row can have log q = -inf; the buffer must hold 0, not NaN.
    model = tiny_llama(tok, seed=12)
    prompt_ids, prompt_mask = left_pad(tok, PROMPTS[:2])
    eos = tok.eos_token_id
    real_draw = draw_module.draw_next

    def draw_then_force_eos(*args, **kwargs):
        token, logq, logp, logmix = real_draw(*args, **kwargs)
        return token.index_fill(0, torch.tensor([1]), eos), logq.index_fill(0, torch.tensor([1]),
                                                                            -torch.inf), \
            logp, logmix

    monkeypatch.setattr(draw_module, "draw_next", draw_then_force_eos)
    # compact=False: with compaction the finished row is not fed at all (and the patch's row 1 would be gone).
    rollout = generate_rollouts(model, prompt_ids, prompt_mask, config=SamplingConfig(max_new_tokens=3,
                                                                                      top_k=1),
                                eos_token_id=eos, pad_token_id=eos, compact=False)
    assert rollout.lengths.tolist() == [3, 1]
    assert rollout.student_logprobs[1, 1:].tolist() == [0.0, 0.0]
    assert torch.isfinite(rollout.student_logprobs[0]).all()


def _counting(fn, calls):
    def wrapped(self, *args, **kwargs):
        calls.append(1)
        return fn(self, *args, **kwargs)
    return wrapped


def test_refuses_truncation_with_teacher_and_bad_alpha(tok):
    student, teacher = tiny_llama(tok, seed=1), tiny_llama(tok, seed=2)
    ids, mask = left_pad(tok, PROMPTS[:1])
    kwargs = {"eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    with pytest.raises(ConfigError, match="#287"):
        generate_rollouts(student, ids, mask, config=SamplingConfig(top_k=20), teacher=teacher,
                          teacher_mix_alpha=0.2, **kwargs)
    with pytest.raises(ConfigError, match="top_p"):
        generate_rollouts(student, ids, mask, config=SamplingConfig(top_p=0.9), teacher=teacher, **kwargs)
    for alpha in (1.0, -0.1):
        with pytest.raises(ConfigError, match=r"\[0, 1\)"):
            generate_rollouts(student, ids, mask, config=SamplingConfig(), teacher=teacher,
                              teacher_mix_alpha=alpha, **kwargs)
    with pytest.raises(ConfigError, match="needs a teacher"):
        generate_rollouts(student, ids, mask, config=SamplingConfig(), teacher_mix_alpha=0.2, **kwargs)
    with pytest.raises(ConfigError, match="sampling.top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ConfigError, match="sampling.temperature"):
        SamplingConfig(temperature=0.0)
    with pytest.raises(DataError, match="empty"):
        generate_rollouts(student, ids, torch.zeros_like(mask), config=SamplingConfig(), **kwargs)
    # Allowed: the n-gram ban removes the same tokens from both models; truncation without a teacher.
    rollout = generate_rollouts(student, ids, mask, config=SamplingConfig(max_new_tokens=4,
                                                                          no_repeat_ngram_size=2),
                                teacher=teacher, teacher_mix_alpha=0.2, **kwargs)
    assert torch.isfinite(rollout.importance_weights).all()
    rollout = generate_rollouts(student, ids, mask, config=SamplingConfig(max_new_tokens=4, top_k=5,
                                                                          top_p=0.9),
                                **kwargs)
    assert torch.isfinite(rollout.student_logprobs).all()


def test_top_k_top_p_logprobs_are_of_the_truncated_distribution(tok):
    model = tiny_llama(tok, seed=10)
    ids, mask = left_pad(tok, PROMPTS)
    config = SamplingConfig(max_new_tokens=6, top_k=12, top_p=0.5, temperature=0.5)
    rollout = generate_rollouts(model, ids, mask, config=config, eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.pad_token_id, generator=torch.Generator().manual_seed(1))
    untruncated, logits = reference_logprobs(model, rollout, config.temperature, len(tok))
    kth = logits.topk(12, dim=-1).values[..., -1:]
    logits = logits.masked_fill(logits < kth, float("-inf"))
    sorted_logits, order = logits.sort(dim=-1)
    removed = sorted_logits.softmax(-1).cumsum(-1) <= 1 - config.top_p
    removed[..., -1] = False
    logits = logits.masked_fill(removed.scatter(-1, order, removed), float("-inf"))
    expected = logits.log_softmax(-1).gather(2, rollout.response_ids[..., None]).squeeze(-1)
    expected = expected * rollout.response_mask
    torch.testing.assert_close(rollout.student_logprobs, expected, atol=1e-5, rtol=0)
    assert (rollout.student_logprobs > untruncated + 1.0).all()  # truncation really changed the distribution


def test_never_uses_multinomial_and_keeps_model_mode(tok, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("torch.multinomial called")

    monkeypatch.setattr(torch, "multinomial", forbidden)
    monkeypatch.setattr(torch.Tensor, "multinomial", forbidden)
    student, teacher = tiny_llama(tok, seed=1), tiny_llama(tok, seed=2)
    student.train()
    ids, mask = left_pad(tok, PROMPTS)
    generate_rollouts(student, ids, mask, config=SamplingConfig(max_new_tokens=4),
                      eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, teacher=teacher, teacher_mix_alpha=0.2)
    assert student.training and not teacher.training


def test_bf16_models(tok):
    student = tiny_llama(tok, seed=1).to(torch.bfloat16)
    teacher = tiny_gpt2(tok, seed=2).to(torch.bfloat16)
    ids, mask = left_pad(tok, PROMPTS)
    rollout = generate_rollouts(student, ids, mask, config=SamplingConfig(max_new_tokens=5),
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, teacher=teacher,
                                teacher_mix_alpha=0.2, return_teacher_hidden=True,
                                generator=torch.Generator().manual_seed(0))
    valid = rollout.response_mask.bool()
    assert rollout.teacher_hidden.dtype == torch.float32
    assert torch.isfinite(rollout.student_logprobs[valid]).all()
    assert torch.isfinite(rollout.teacher_logprobs).all()
    assert (rollout.importance_weights[valid] <= 1 / 0.8 + 1e-5).all()


def test_generate_texts(tok):
    model = tiny_llama(tok, seed=11)
    config = SamplingConfig(max_new_tokens=8)
    texts = generate_texts(model, tok, PROMPTS, config, batch_size=2, seed=3)
    assert len(texts) == len(PROMPTS) and all(isinstance(t, str) and t == t.strip() for t in texts)
    assert texts == generate_texts(model, tok, PROMPTS, config, batch_size=2, seed=3)
    greedy = generate_texts(model, tok, PROMPTS[:1], SamplingConfig(max_new_tokens=8, greedy=True))
    ids, mask = left_pad(tok, PROMPTS[:1])
    hf = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=8,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    assert greedy == [tok.decode(hf[0, ids.shape[1]:], skip_special_tokens=True).strip()]
    with pytest.raises(DataError, match="Prompt 1"):
        generate_texts(model, tok, ["the cat", ""], config)


@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_student_autocast_records_the_updates_numerics(tok, alpha):
    """With student_autocast=bf16 (precision=bf16 training), log q_old is what the update computes under
    autocast (bf16 body, fp32 head), so the PPO ratio is ~1 at theta_old; without it the rollout stays
    fp32."""
    student = tiny_llama(tok, seed=1)
    teacher = tiny_llama(tok, seed=2, hidden_size=48)
    prompt_ids, prompt_mask = left_pad(tok, PROMPTS)
    config = SamplingConfig(max_new_tokens=8)
    kw = dict(config=config, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, teacher=teacher,
              teacher_mix_alpha=alpha)
    r16 = generate_rollouts(student, prompt_ids, prompt_mask, generator=torch.Generator().manual_seed(0),
                            student_autocast=torch.bfloat16, **kw)
    ids, mask = r16.full_sequence()
    P = r16.prompt_ids.shape[1]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = lm_head_fn(student)(final_hidden(student, ids, mask))[:, P - 1:-1]
    assert logits.dtype == torch.float32
    ref16 = logits.log_softmax(-1).gather(2, r16.response_ids[..., None]).squeeze(-1) * r16.response_mask
    ref32, _ = reference_logprobs(student, r16, 1.0, len(tok))
    err16 = (r16.student_logprobs - ref16).abs().max()
    err32 = (r16.student_logprobs - ref32).abs().max()
    assert err16 < 0.05 and err32 > 2 * err16  # matches the autocast forward, not the fp32 one
    # the teacher's numbers do not depend on the student's autocast
    lp, _ = reference_logprobs(teacher, r16, 1.0, len(tok))
    torch.testing.assert_close(r16.teacher_logprobs, lp, atol=1e-5, rtol=0)


# ------------------------------------------------------------------ decode-loop speed-ups must not change the
# numbers


@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("family, unpadded", [("llama", True), ("gpt2", True), ("llama", False)])
def test_incremental_position_ids_equal_position_ids_from_mask(tok, monkeypatch, family, unpadded, compact):
    """Each decode step's position ids (last + active) are what position_ids_from_mask gives over the whole
    mask, for left-padded prompts and for rows that finish early (without compaction they keep feeding pads
    with mask 0; with it they are dropped from the decoded batch)."""
    monkeypatch.setattr(decoder_module, "UNPADDED_PREFILL_MAX_COST", 0.8 if unpadded else 0.0)
    model = (tiny_llama if family == "llama" else tiny_gpt2)(tok, seed=3)
    prompt_ids, prompt_mask = left_pad(tok, PROMPTS)
    eos = tok.eos_token_id
    script = torch.full((3, 7), 17)
    script[0, 1] = eos  # row 0 finishes at its 2nd token, row 1 at its 5th, row 2 runs to the end
    script[1, 4] = eos
    eos_scripted_sampler(monkeypatch, script)
    seen = []
    real_step = Decoder.step

    def recording_step(self, input_ids, attention_mask, position_ids):
        seen.append((attention_mask.clone(), position_ids.clone()))
        return real_step(self, input_ids, attention_mask, position_ids)

    prefills = []
    real_prefill = Decoder.prefill

    def recording_prefill(self, input_ids, attention_mask, position_ids, groups):
        prefills.append((attention_mask.clone(), position_ids.clone(), groups))
        n_seen = len(seen)
        out = real_prefill(self, input_ids, attention_mask, position_ids, groups)
        del seen[n_seen:]  # the batched prefill is a `step` call
        return out

    monkeypatch.setattr(Decoder, "step", recording_step)
    monkeypatch.setattr(Decoder, "prefill", recording_prefill)
    rollout = generate_rollouts(model, prompt_ids, prompt_mask, config=SamplingConfig(max_new_tokens=7),
                                eos_token_id=eos, pad_token_id=tok.pad_token_id, compact=compact)
    assert rollout.lengths.tolist() == [2, 5, 7]
    assert len(prefills) == 1 and len(seen) == 6  # the prompt forward and six decode steps
    assert (prefills[0][2] is not None) == unpadded
    assert torch.equal(prefills[0][0], prompt_mask)
    assert torch.equal(prefills[0][1], position_ids_from_mask(prompt_mask))
    full_mask = torch.cat([prompt_mask, rollout.response_mask.long()], dim=1)
    # compaction drops row 0 once it has fed its EOS (step 1) and row 1 after its EOS (step 4)
    decoded = [[0, 1, 2]] + [[1, 2]] * 3 + [[2]] * 2 if compact else [[0, 1, 2]] * 6
    for t, (mask, positions) in enumerate(seen):
        assert torch.equal(mask, full_mask[decoded[t], :prompt_mask.shape[1] + t + 1])
        assert torch.equal(positions, position_ids_from_mask(mask)[:, -1:])
    # the finished rows' positions stay at their last real token
    last = [prompt_mask[0].sum() + 1, prompt_mask[1].sum() + 4, prompt_mask[2].sum() + 5]
    assert seen[-1][1][:, 0].tolist() == [last[i] for i in decoded[-1]]


def test_growing_cache_layer_equals_dynamic_layer():
    """The preallocated KV layer hands attention the same keys/values as transformers' DynamicLayer,
    also when a step outgrows its buffer (one regrow)."""
    grown, plain = GrowingLayer(headroom=2), DynamicLayer()
    gen = torch.Generator().manual_seed(0)
    for length in (5, 1, 1, 1, 3, 1):  # prefill, steps, a 3-token chunk past the headroom, a step
        k, v = torch.randn(2, 3, length, 4, generator=gen), torch.randn(2, 3, length, 4, generator=gen)
        keys, values = grown.update(k, v)
        ref_keys, ref_values = plain.update(k, v)
        assert torch.equal(keys, ref_keys) and torch.equal(values, ref_values)
        assert grown.get_seq_length() == plain.get_seq_length()


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_sliced_head_projection_equals_the_lm_head(tok, monkeypatch, autocast):
    """The decoder's adapter (`project`) computes the head in weight slices (ragged last slice here); it must
    give the LM head's logits, with and without autocast (where LMHead runs the projection in fp32)."""
    monkeypatch.setattr(adapter_module, "HEAD_ROWS_PER_MATMUL", 7)
    model = tiny_llama(tok, seed=4)
    decoder = Decoder(model)
    assert decoder.model.head_split is not None and len(decoder.model.head_split[0]) > 2
    hidden = torch.randn(5, model.config.hidden_size)
    context = torch.autocast("cpu", dtype=autocast) if autocast else torch.autocast("cpu", enabled=False)
    with torch.no_grad(), context:
        logits, reference = decoder.model.project(hidden), lm_head_fn(model)(hidden)
    assert logits.dtype == reference.dtype == torch.float32
    torch.testing.assert_close(logits, reference, rtol=1e-6, atol=1e-6)


def test_decode_loop_matches_a_plain_reference_loop(tok, monkeypatch):
    """Preallocated cache and mask, incremental position ids and the sliced head against the straightforward
    loop (DynamicCache, torch.cat of the mask, position_ids_from_mask, one head matmul): same tokens, same
    log-probs."""
    model = tiny_llama(tok, seed=5)
    prompt_ids, prompt_mask = left_pad(tok, PROMPTS)
    eos = tok.eos_token_id
    monkeypatch.setattr(adapter_module, "HEAD_ROWS_PER_MATMUL", 13)
    rollout = generate_rollouts(model, prompt_ids, prompt_mask, config=SamplingConfig(max_new_tokens=12),
                                eos_token_id=eos, pad_token_id=tok.pad_token_id,
                                generator=torch.Generator().manual_seed(11))
    # the plain loop, drawing with the same generator stream
    generator = torch.Generator().manual_seed(11)
    cache, body, head = DynamicCache(config=model.config), backbone(model), lm_head_fn(model)
    cache_kwarg = Decoder(model).model.cache_kwarg  # `cache` or `past_key_values`, by transformers version
    mask, ids = prompt_mask.clone(), prompt_ids
    positions = position_ids_from_mask(mask)
    finished = torch.zeros(3, dtype=torch.bool)
    tokens, logqs = [], []
    with torch.no_grad():
        for _ in range(rollout.response_ids.shape[1]):
            hidden = body(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                          **{cache_kwarg: cache}).last_hidden_state[:, -1]
            logits = head(hidden).float()
            token = sample_from_probs((logits - logits.amax(-1, keepdim=True)).exp(), generator)
            logqs.append(logits.log_softmax(-1).gather(1, token[:, None])[:, 0])
            token = token.masked_fill(finished, tok.pad_token_id)
            tokens.append(token)
            mask = torch.cat([mask, (~finished).long()[:, None]], dim=1)
            positions = position_ids_from_mask(mask)[:, -1:]
            finished = finished | (token == eos)
            ids = token[:, None]
    assert torch.equal(rollout.response_ids, torch.stack(tokens, dim=1))
    logq = torch.stack(logqs, dim=1) * rollout.response_mask
    torch.testing.assert_close(rollout.student_logprobs, logq, rtol=0, atol=1e-6)


# ------------------------------------------------------------------ unpadded prompt prefill (CPU)

RAGGED_PROMPTS = ["one", " ".join(["the cat is on the tree and the dog is in the river"] * 4),
                  "what is the capital",
                  "two three four five six seven eight nine ten", "a b", "the dog is in the river"]


def test_prefill_groups_cover_the_batch_and_only_when_it_pays(monkeypatch):
    assert decoder_module.prefill_groups([5], 300) is None  # batch 1: nothing to save
    assert decoder_module.prefill_groups([7, 7, 7], 7) is None  # no padding
    assert decoder_module.prefill_groups([9] + [2] * 600, 9) is None  # too many rows for the planner
    assert decoder_module.prefill_groups([200, 195, 190, 180],
                                         200) is None  # little padding: one batched call
    lengths = [231, 42, 39, 53, 43, 36, 178, 155]
    groups = decoder_module.prefill_groups(lengths, 231)
    assert groups is not None and sorted(i for g in groups for i in g) == list(range(8))
    assert all(g == sorted(g) for g in groups)
    # each group is a run of rows of neighbouring lengths (rows sorted by length, longest first)
    order = sorted(range(8), key=lambda i: -lengths[i])
    assert [i for g in groups for i in sorted(g, key=lambda i: (-lengths[i], order.index(i)))] == order
    cost = sum(len(g) * max(lengths[i] for i in g) + decoder_module.PREFILL_CALL_COST for g in groups)
    assert cost <= decoder_module.UNPADDED_PREFILL_MAX_COST * (8 * 231 + decoder_module.PREFILL_CALL_COST)
    monkeypatch.setattr(decoder_module, "UNPADDED_PREFILL_MAX_COST", 0.0)
    assert decoder_module.prefill_groups(lengths, 231) is None


def _rollout_both_ways(monkeypatch, student, prompt_ids, prompt_mask, **kwargs):
    """(batched-prefill rollout, unpadded-prefill rollout, groups used) with the same generator seed."""
    used = []
    real_groups = decoder_module.prefill_groups

    def spy(lengths, width):
        used.append(real_groups(lengths, width))
        return used[-1]

    monkeypatch.setattr(decoder_module, "prefill_groups", spy)
    out = []
    for max_cost in (0.0, 0.8):
        monkeypatch.setattr(decoder_module, "UNPADDED_PREFILL_MAX_COST", max_cost)
        out.append(generate_rollouts(student, prompt_ids, prompt_mask,
                                     generator=torch.Generator().manual_seed(7),
                                     **kwargs))
    assert used[0] is None and used[1] is not None and len(used[1]) > 1
    return out[0], out[1], used[1]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("alpha, ngram", [(None, 0), (None, 3), (0.2, 0), (0.2, 3)])
def test_unpadded_prefill_gives_the_batched_rollout(tok, monkeypatch, family, alpha, ngram):
    """Prefilling each group of rows without the left padding (own cache, written into the padded layout)
    gives the batched prefill's rollout: float64 models, prompts of very different lengths, student alone or
    teacher-mixed."""
    make = tiny_llama if family == "llama" else tiny_gpt2
    student = make(tok, seed=21).double()
    teacher = make(tok, seed=22, hidden_size=48, vocab_size=len(tok) + 16).double() if alpha else None
    prompt_ids, prompt_mask = left_pad(tok, RAGGED_PROMPTS)
    lp = prompt_mask.sum(1)
    assert int(lp.max()) > 10 * int(lp.min())
    config = SamplingConfig(max_new_tokens=16, temperature=0.9, no_repeat_ngram_size=ngram)
    kwargs = dict(config=config, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if teacher is not None:
        kwargs.update(teacher=teacher, teacher_mix_alpha=alpha, return_teacher_hidden=True)
    batched, unpadded, _ = _rollout_both_ways(monkeypatch, student, prompt_ids, prompt_mask, **kwargs)
    assert torch.equal(unpadded.response_ids, batched.response_ids)
    assert torch.equal(unpadded.response_mask, batched.response_mask)
    assert int(batched.lengths.max()) > 3
    names = ["student_logprobs", "mix_logprobs", "teacher_logprobs", "importance_weights", "teacher_hidden"]
    for name in names[:1] if teacher is None else names:
        torch.testing.assert_close(getattr(unpadded, name), getattr(batched, name), atol=1e-6, rtol=0)
    if not ngram:  # and both are the log-probs of a plain forward over prompt + response
        logq, _ = reference_logprobs(student, unpadded, config.temperature, len(tok))
        torch.testing.assert_close(unpadded.student_logprobs, logq, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_unpadded_prefill_fp32_within_tolerance(tok, monkeypatch, family):
    """fp32 (the CPU rollout dtype): the same rollout up to round-off (log-probs within 1e-4)."""
    make = tiny_llama if family == "llama" else tiny_gpt2
    student, teacher = make(tok, seed=23), make(tok, seed=24, hidden_size=48)
    prompt_ids, prompt_mask = left_pad(tok, RAGGED_PROMPTS)
    config = SamplingConfig(max_new_tokens=16, no_repeat_ngram_size=2)
    batched, unpadded, _ = _rollout_both_ways(
        monkeypatch, student, prompt_ids, prompt_mask, config=config, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, teacher=teacher, teacher_mix_alpha=0.2, return_teacher_hidden=True)
    assert torch.equal(unpadded.response_ids, batched.response_ids)
    for name in ("student_logprobs", "teacher_logprobs", "mix_logprobs", "importance_weights",
                 "teacher_hidden"):
        torch.testing.assert_close(getattr(unpadded, name), getattr(batched, name), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_unpadded_prefill_cache_layout(tok, family):
    """The cache after an unpadded prefill: the batched prefill's [B, heads, P, d] left-padded layout, the
    same keys/values at every real position (RoPE / learned positions 0..n-1), zeros at the padding, the last
    real token's logits and hidden state per row; and the next decode step sees the same attention."""
    model = (tiny_llama if family == "llama" else tiny_gpt2)(tok, seed=25).double()
    prompt_ids, prompt_mask = left_pad(tok, RAGGED_PROMPTS)
    positions = position_ids_from_mask(prompt_mask)
    groups = [[1], [0, 4], [2, 3, 5]]
    with torch.no_grad():
        ref, dec = Decoder(model, max_new_tokens=4), Decoder(model, max_new_tokens=4)
        assert dec.can_prefill_unpadded()
        ref_out = ref.prefill(prompt_ids, prompt_mask, positions, None)
        out = dec.prefill(prompt_ids, prompt_mask, positions, groups)
        for a, b in zip(out, ref_out):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
        real = prompt_mask.bool()[:, None, :, None]
        assert dec.cache.get_seq_length() == ref.cache.get_seq_length() == prompt_ids.shape[1]
        for layer, ref_layer in zip(dec.cache.layers, ref.cache.layers, strict=True):
            assert isinstance(layer, GrowingLayer)
            for x, y in ((layer.keys, ref_layer.keys), (layer.values, ref_layer.values)):
                assert x.shape == y.shape
                torch.testing.assert_close(torch.where(real, x, 0), torch.where(real, y, 0), atol=1e-10,
                                           rtol=0)
                for rows in groups:  # no group computed the columns left of its longest prompt
                    start = prompt_ids.shape[1] - int(prompt_mask[rows].sum(1).max())
                    assert torch.all(x[rows, :, :start] == 0)
        token = torch.tensor([[17], [23], [17], [5], [9], [11]])
        mask = torch.cat([prompt_mask, torch.ones(6, 1, dtype=torch.long)], dim=1)
        step_positions = positions[:, -1:] + 1
        for a, b in zip(dec.step(token, mask, step_positions), ref.step(token, mask, step_positions)):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_unpadded_prefill_only_on_cpu_fp32_without_autocast(tok, monkeypatch):
    """GPU (or any non-CPU device), bf16 models and student autocast keep the one batched prefill,
    unchanged."""
    prompt_ids, prompt_mask = left_pad(tok, RAGGED_PROMPTS)
    model = tiny_llama(tok, seed=26)
    assert Decoder(model).can_prefill_unpadded()
    assert Decoder(model.double()).can_prefill_unpadded()
    assert not Decoder(tiny_llama(tok, seed=26).to(torch.bfloat16)).can_prefill_unpadded()
    assert not Decoder(tiny_llama(tok, seed=26), torch.bfloat16).can_prefill_unpadded()
    gpu = Decoder(tiny_llama(tok, seed=26))
    gpu.model.device = torch.device("cuda")  # what a model on a GPU reports; only the gate reads it here
    assert not gpu.can_prefill_unpadded()

    widths = []
    real_step = Decoder.step

    def recording_step(self, input_ids, attention_mask, position_ids):
        widths.append(input_ids.shape)
        return real_step(self, input_ids, attention_mask, position_ids)

    monkeypatch.setattr(Decoder, "step", recording_step)
    config = SamplingConfig(max_new_tokens=3)
    for student, autocast in ((tiny_llama(tok, seed=26).to(torch.bfloat16), None),
                              (tiny_llama(tok, seed=26), torch.bfloat16)):
        widths.clear()
        generate_rollouts(student, prompt_ids, prompt_mask, config=config, eos_token_id=-1,
                          pad_token_id=tok.pad_token_id, student_autocast=autocast)
        assert widths[0] == prompt_ids.shape and len(widths) == 3  # one padded batched prefill, two steps


# ------------------------------------------------------------------ batch compaction (finished rows leave the
# batch)

COMPACT_PROMPTS = RAGGED_PROMPTS + ["the cat", "paris is the capital of france"]


def _rows_per_step(monkeypatch) -> list[int]:
    """Spy on the decode steps: the number of rows each `Decoder.step` call is fed (prefill excluded)."""
    fed: list[int] = []
    real_step, real_prefill = Decoder.step, Decoder.prefill

    def step(self, input_ids, attention_mask, position_ids):
        fed.append(input_ids.shape[0])
        return real_step(self, input_ids, attention_mask, position_ids)

    def prefill(self, *args, **kwargs):
        n = len(fed)
        out = real_prefill(self, *args, **kwargs)
        del fed[n:]
        return out

    monkeypatch.setattr(Decoder, "step", step)
    monkeypatch.setattr(Decoder, "prefill", prefill)
    return fed


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("alpha", [None, 0.0, 0.2])
@pytest.mark.parametrize("greedy, ngram", [(False, 0), (False, 3), (True, 3)])
@pytest.mark.parametrize("draft", [0, 3])
def test_compaction_gives_the_uncompacted_rollout(tok, monkeypatch, family, alpha, greedy, ngram, draft):
    """Dropping finished rows from the decoded batch changes nothing but round-off: float64 models, ragged
    prompts, rows finishing at many different steps; same tokens and masks, log-probs and teacher hidden
    states within 1e-9, and the generator ends in the same state (uniforms are drawn for the whole batch every
    step)."""
    make = tiny_llama if family == "llama" else tiny_gpt2
    student = make(tok, seed=31).double()
    teacher = make(tok, seed=32, hidden_size=48,
                   vocab_size=len(tok) + 16).double() if alpha is not None else None
    prompt_ids, prompt_mask = left_pad(tok, COMPACT_PROMPTS)
    batch, steps = prompt_ids.shape[0], 20
    config = SamplingConfig(max_new_tokens=steps, temperature=0.8, no_repeat_ngram_size=ngram, greedy=greedy,
                            draft_length=draft)  # lockstep and speculative teacher-mixed sampling
    kwargs = dict(config=config, pad_token_id=tok.pad_token_id)
    if teacher is not None:
        kwargs.update(teacher=teacher, teacher_mix_alpha=alpha, return_teacher_hidden=True)

    def run(eos, compact):
        generator = torch.Generator().manual_seed(5)
        rollout = generate_rollouts(student, prompt_ids, prompt_mask, eos_token_id=eos, generator=generator,
                                    compact=compact, **kwargs)
        return rollout, generator.get_state()

    # Make EOS out of tokens the rows really produce, at different steps: a run that never stops tells which.
    free, _ = run(10**9, False)
    assert free.response_ids.shape == (batch, steps)
    eos = sorted({int(free.response_ids[r, (3 * r) % (steps - 2) + 1]) for r in range(0, batch - 1)})

    fed = _rows_per_step(monkeypatch)
    plain, plain_state = run(eos, False)
    assert fed and set(fed) == {batch}
    fed.clear()
    compacted, compacted_state = run(eos, True)
    lengths = plain.lengths.tolist()
    assert len(set(lengths)) >= 3 and min(lengths) < steps // 2  # rows finish at many different steps
    # compaction happened: the decoded batch shrank, never grew, and ended with the unfinished rows only
    assert fed == sorted(fed, reverse=True) and fed[0] <= batch and fed[-1] < batch
    assert torch.equal(compacted_state, plain_state)
    assert torch.equal(compacted.response_ids, plain.response_ids)
    assert torch.equal(compacted.response_mask, plain.response_mask)
    assert torch.equal(compacted.lengths, plain.lengths)
    names = ["student_logprobs", "importance_weights"]
    if teacher is not None:
        names += ["teacher_logprobs", "mix_logprobs", "teacher_hidden"]
    else:
        assert compacted.teacher_logprobs is None and compacted.teacher_hidden is None
    for name in names:
        torch.testing.assert_close(getattr(compacted, name), getattr(plain, name), atol=1e-9, rtol=0)
        off = compacted.response_mask == 0
        assert torch.all(getattr(compacted, name)[off] == 0)
    assert torch.all(compacted.response_ids[compacted.response_mask == 0] == tok.pad_token_id)


def test_compaction_only_when_a_quarter_of_the_rows_finished(tok, monkeypatch):
    """The threshold: at least a quarter of the decoded rows (and at least one) must have finished."""
    model = tiny_llama(tok, seed=3)
    prompt_ids, prompt_mask = left_pad(tok, PROMPTS * 3)  # 9 rows: compaction needs 3 finished rows
    eos = tok.eos_token_id
    script = torch.full((9, 8), 17)
    script[0, 0] = script[1, 1] = eos  # 2 rows finished: not yet
    script[2, 2] = eos  # 3 rows: compact to 6 rows (needs 2 finished next)
    script[3, 4] = eos  # 1 of 6: not yet
    script[4, 5] = eos  # 2 of 6: compact to 4
    eos_scripted_sampler(monkeypatch, script)
    fed = _rows_per_step(monkeypatch)
    rollout = generate_rollouts(model, prompt_ids, prompt_mask, config=SamplingConfig(max_new_tokens=8),
                                eos_token_id=eos, pad_token_id=tok.pad_token_id)
    assert rollout.lengths.tolist() == [1, 2, 3, 5, 6, 8, 8, 8, 8]
    assert fed == [9, 9, 6, 6, 6, 4, 4]
    assert rollout.response_ids[2].tolist() == [17, 17, eos] + [tok.pad_token_id] * 5


# ------------------------------------------------------------------ the one decoder and the one scorer


def test_response_texts_decode_each_rows_tokens(tok):
    """`response_texts` gives what every caller used to compute: the whole padded row decoded with special
    tokens skipped and stripped, equal to decoding the row's first `length` tokens."""
    model = tiny_llama(tok, seed=11)
    prompt_ids, prompt_mask = left_pad(tok, PROMPTS)
    rollout = generate_rollouts(model, prompt_ids, prompt_mask, config=SamplingConfig(max_new_tokens=10),
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                generator=torch.Generator().manual_seed(2))
    texts = response_texts(tok, rollout)
    padded = [t.strip() for t in tok.batch_decode(rollout.response_ids.tolist(), skip_special_tokens=True)]
    assert texts == padded
    assert texts == [tok.decode(ids[:n], skip_special_tokens=True).strip()
                     for ids, n in zip(rollout.response_ids, rollout.lengths.tolist())]


@pytest.mark.parametrize("chunk_size", [None, 3, 256])
def test_teacher_forced_logprobs_equal_the_full_forward(tok, chunk_size):
    """Both groupings of the head calls (one row, or `chunk_size` flattened positions) give the log-probs of
    a plain padded forward over prompt + response, 0 off the mask; with a temperature and a sliced vocab."""
    model = tiny_gpt2(tok, seed=17, vocab_size=len(tok) + 16)
    prompt_ids, prompt_mask = left_pad(tok, PROMPTS)
    rollout = generate_rollouts(tiny_llama(tok, seed=18), prompt_ids, prompt_mask,
                                config=SamplingConfig(max_new_tokens=9), eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.pad_token_id, generator=torch.Generator().manual_seed(4))
    logprobs, hidden = teacher_forced_logprobs(model, rollout, vocab_size=len(tok), temperature=0.7,
                                               chunk_size=chunk_size)
    expected, _ = reference_logprobs(model, rollout, 0.7, len(tok))
    assert logprobs.dtype == torch.float32 and hidden.shape[:2] == rollout.response_ids.shape
    torch.testing.assert_close(logprobs, expected, atol=1e-5, rtol=0)
    assert torch.all(logprobs[rollout.response_mask == 0] == 0)
    with pytest.raises(ValueError, match="exceeds"):
        teacher_forced_logprobs(model, rollout, vocab_size=len(tok) + 17)


def test_non_finite_probabilities_are_refused_with_the_rows():
    # NaN logits used to make inverse-CDF sampling return index V, and the next gather failed far away
    # (on a GPU as a device-side "index out of bounds" assert)
    from minillm.errors import ModelError
    from minillm.sampling.draw import sample_from_probs

    probs = torch.softmax(torch.randn(3, 7), dim=-1)
    probs[1, 2] = float("nan")
    with pytest.raises(ModelError, match=r"NaN, infinite or all zero in batch rows \[1\]"):
        sample_from_probs(probs)
    probs[1] = 0.0
    with pytest.raises(ModelError, match=r"rows \[1\]"):
        sample_from_probs(probs)
