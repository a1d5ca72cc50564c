"""The controlled world (issue 24): exact probabilities, sampling, tokenizer and measures against a model."""

from __future__ import annotations

import itertools
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from minillm.errors import ConfigError
from minillm.testing import tiny_llama
from minillm.world import TruthLM, World, WorldSpec, exact_kls, measure, model_log_probs, sample_model

TINY = dict(vocab=6, prompts=2, modes=2, mode_mass=(0.7, 0.3), length=2, max_length=4, branching=2,
            mode_tokens=3, prompt_length=2, seed=1)
EOS = 0


def tiny(noise: float = 0.0, **kw) -> World:
    return World(WorldSpec(**{**TINY, **kw, "noise": noise}))


def all_responses(world: World) -> list[list[int]]:
    """Every content sequence of at most max_length tokens, each followed by eos."""
    ids = world.content_ids.tolist()
    return [list(seq) + [EOS] for n in range(world.max_length + 1)
            for seq in itertools.product(ids, repeat=n)]


def reference_prob(world: World, i: int, y: list[int]) -> float:
    """p(y | i) by a plain loop over the chains' parameters (independent of the vectorised tables)."""
    spec, s, u = world.spec, world.stop, 1.0 / (world.spec.vocab + 1)
    content = set(world.content_ids.tolist())
    total = 0.0
    for w, ch in zip(world.weights[i], world.chains[i]):
        start = dict(zip(ch.start.tolist(), ch.start_probs.tolist()))
        succ = {a: dict(zip(ch.successors[j].tolist(), ch.successor_probs[j].tolist()))
                for j, a in enumerate(ch.tokens.tolist())}
        p, prev = w, None
        for t, tok in enumerate(y):
            if t == world.max_length:
                p *= float(tok == EOS)
            elif prev is None:
                clean = start.get(tok, 0.0)
            else:
                dist = succ.get(prev, start)
                clean = s if tok == EOS else (1 - s) * dist.get(tok, 0.0)
            if t < world.max_length:
                p *= (1 - spec.noise) * clean + (spec.noise * u if (tok in content or tok == EOS) else 0.0)
            if tok == EOS:
                p *= float(t == len(y) - 1)
                break
            prev = tok
        else:
            p = p  # a prefix: no end factor
        total += p
    return total


def chi_square_pvalue(counts: np.ndarray, expected: np.ndarray) -> float:
    """Pearson's chi-square p-value (bins with expected >= 5, the rest pooled) via the regularised gamma."""
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


# ---- the spec --------------------------------------------------------------------------------------------
def test_spec_round_trip_and_validation():
    spec = WorldSpec(**TINY)
    assert WorldSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert WorldSpec(modes=2, mode_mass=()).cap == 24
    for bad in (dict(modes=2), dict(mode_mass=(0.5, 0.6, -0.1)), dict(noise=1.0), dict(vocab=0),
                dict(mode_tokens=60), dict(branching=7), dict(length=1.5)):
        with pytest.raises(ConfigError):
            WorldSpec(**bad)
    with pytest.raises(ConfigError, match="unknown world key"):
        WorldSpec.from_dict({"vocabulary": 3})


def test_seeded_determinism():
    a, b = World(WorldSpec(seed=3)), World(WorldSpec(seed=3))
    assert a.prompt_ids(5) == b.prompt_ids(5)
    assert a.sample(5, 50, np.random.default_rng(1)) == b.sample(5, 50, np.random.default_rng(1))
    assert a.instruction_records(3, seed=2) == b.instruction_records(3, seed=2)
    other = World(WorldSpec(seed=4))
    assert other.sample(5, 50, np.random.default_rng(1)) != a.sample(5, 50, np.random.default_rng(1))
    # prompt i does not depend on how many prompts there are
    more = World(WorldSpec(seed=3, prompts=20))
    assert more.sample(5, 50, np.random.default_rng(1)) == a.sample(5, 50, np.random.default_rng(1))


# ---- exact probabilities ---------------------------------------------------------------------------------
@pytest.mark.parametrize("noise", [0.0, 0.1])
def test_log_prob_is_a_distribution_and_matches_a_reference(noise):
    world = tiny(noise)
    ys = all_responses(world)
    for i in range(world.spec.prompts):
        lp = world.log_prob(i, ys)
        assert abs(np.exp(lp).sum() - 1.0) < 1e-9
        ref = np.array([reference_prob(world, i, y) for y in ys])
        np.testing.assert_allclose(np.exp(lp), ref, rtol=1e-12, atol=1e-300)
        listed = world.enumerate(i, noisy=True)
        assert {y for y, _ in listed} == {tuple(y) for y, p in zip(ys, np.exp(lp)) if p > 0}
        assert abs(sum(p for _, p in listed) - 1.0) < 1e-9
        assert all(a[1] >= b[1] for a, b in zip(listed, listed[1:]))


def test_enumerate_noise_free_support_and_impossible_responses():
    world = tiny(0.05)
    listed = world.enumerate(0)  # noise-free support, noise-free probabilities
    assert abs(sum(p for _, p in listed) - 1.0) < 1e-9
    np.testing.assert_allclose(world.log_prob(0, [list(y) for y, _ in listed], noisy=False),
                               np.log([p for _, p in listed]), rtol=1e-12)
    assert all(world.in_support(0, list(y)) for y, _ in listed)
    top = world.top_responses(0, 5)
    best = sorted(((tuple(y), float(np.exp(v))) for y, v in
                   zip(all_responses(world), world.log_prob(0, all_responses(world)))), key=lambda x: -x[1])
    assert [y for y, _ in top] == [y for y, _ in best[:5]]
    np.testing.assert_allclose([p for _, p in top], [p for _, p in best[:5]], rtol=1e-12)
    clean = tiny(0.0)
    assert [y for y, _ in clean.top_responses(0, 4)] == [y for y, _ in clean.enumerate(0)[:4]]
    prompt_tok, unk = world.prompt_ids(0)[0], 1
    long = [int(world.content_ids[0])] * (world.max_length + 1) + [EOS]
    lp = world.log_prob(0, [[prompt_tok, EOS], [unk, EOS], long, [EOS, EOS], [10_000, EOS], [-1, EOS]])
    assert np.all(np.isneginf(lp))
    with pytest.raises(ValueError, match="more than"):
        World(WorldSpec(noise=0.1)).enumerate(0)


def test_prefix_log_prob_sums_continuations():
    world = tiny(0.1)
    ys = all_responses(world)
    p = np.exp(world.log_prob(0, ys))
    prefix = [int(world.chains[0][0].start[0])]
    mass = sum(q for y, q in zip(ys, p) if y[:1] == prefix)
    assert abs(np.exp(world.log_prob(0, [prefix])[0]) - mass) < 1e-12
    assert abs(world.log_prob(0, [[]])[0]) < 1e-12


@pytest.mark.parametrize("noise", [0.0, 0.1])
def test_next_token_logprobs_chain_rule(noise):
    world = tiny(noise)
    ys = world.sample(1, 40, np.random.default_rng(0))
    lp = world.log_prob(1, ys)
    for y, target in zip(ys, lp):
        total = sum(world.next_token_logprobs(1, y[:t])[y[t]] for t in range(len(y)))
        assert abs(total - target) < 1e-9
        rows = world.next_token_tables(1, [y])[0]
        assert rows.shape == (len(y), world.vocab_size)
        np.testing.assert_allclose(np.exp(rows).sum(axis=1), 1.0, atol=1e-12)
    at_cap = world.next_token_logprobs(1, [int(world.chains[1][0].start[0])] * world.max_length) \
        if noise else None
    if at_cap is not None:
        assert at_cap[EOS] == 0.0 and np.isneginf(np.delete(at_cap, EOS)).all()
    if noise == 0.0:
        with pytest.raises(ValueError, match="probability 0"):
            world.next_token_logprobs(1, [world.prompt_ids(1)[0]])


@pytest.mark.parametrize("noise", [0.0, 0.1])
def test_sample_frequencies_match_exact_probabilities(noise):
    """Pearson chi-square over the responses (expected count >= 5, the rest pooled), at level 1e-3."""
    world = tiny(noise)
    listed = world.enumerate(0, noisy=True)
    index = {y: j for j, (y, _) in enumerate(listed)}
    n = 20_000
    counts = np.zeros(len(listed))
    for y in world.sample(0, n, np.random.default_rng(7)):
        counts[index[tuple(y)]] += 1
    assert chi_square_pvalue(counts, n * np.array([p for _, p in listed])) > 1e-3
    mean_len = np.mean([len(y) - 1 for y in world.sample(0, n, np.random.default_rng(8))])
    assert abs(mean_len - world.expected_length()) < 0.05


def test_support_and_modes():
    world = tiny(0.1)
    ch = world.chains[0][1]
    a = int(ch.start[0])
    path = [a, int(ch.successors[list(ch.tokens).index(a)][0]), EOS]
    assert world.in_support(0, path)
    assert world.mode_of(0, path) is not None
    only_mode_1 = [y for y, _ in world.enumerate(0)
                   if np.isneginf(world.mode_log_probs(0, [list(y)], noisy=False)[0, 0])]
    assert only_mode_1 and all(world.mode_of(0, list(y)) == 1 for y in only_mode_1)
    ys = all_responses(world)
    noise_only = [y for y, lp in zip(ys, world.log_prob(0, ys, noisy=False)) if np.isneginf(lp)]
    assert noise_only and np.isfinite(world.log_prob(0, noise_only)).all()  # possible only through the noise
    assert not any(world.in_support(0, y) for y in noise_only)
    assert all(world.mode_of(0, y) is None for y in noise_only)
    assert not world.in_support(0, path[:-1])           # a prefix is not a complete response
    assert not world.in_support(0, [a, EOS, a, EOS])    # eos inside
    assert world.modes_of(0, [path, noise_only[0]]).tolist()[1] == -1


# ---- text ------------------------------------------------------------------------------------------------
def test_tokenizer_round_trip(tmp_path):
    world = World(WorldSpec())
    world.tokenizer().save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.eos_token_id == tok.pad_token_id == world.eos_id == 0
    assert len(tok) == world.vocab_size and tok.padding_side == "right"
    for i in (0, 7):
        assert tok.encode(world.prompt_text(i), add_special_tokens=False) == world.prompt_ids(i)
    for y in world.sample(3, 20, np.random.default_rng(0)):
        assert tok.encode(world.text(y), add_special_tokens=False) + [tok.eos_token_id] == y
        assert tok.decode(y, skip_special_tokens=True) == world.text(y)
    records = world.instruction_records(2, seed=5, prompts=[1, 4])
    assert len(records) == 4 and records[0]["id"] == "world-1-0" and records[2]["prompt_index"] == 4
    assert records[0]["instruction"] == world.prompt_text(1) and records[0]["input"] == ""
    assert world.instruction_records(2, seed=5, prompts=[4]) == records[2:]
    assert tok.encode("hello t0", add_special_tokens=False)[0] == tok.unk_token_id != tok.eos_token_id


# ---- measures against a model ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_world():
    world = tiny(0.1)
    return world, tiny_llama(world.tokenizer(), hidden_size=16, layers=1, seed=3)


def test_model_log_probs_matches_a_token_loop(llama_world):
    world, model = llama_world
    ys = world.sample(1, 5, np.random.default_rng(0)) + [[EOS], [5, 3]]
    got = model_log_probs(model, world, 1, ys, batch_size=3)
    prompt = world.prompt_ids(1)
    for y, value in zip(ys, got):
        want = 0.0
        for t in range(len(y)):
            with torch.no_grad():
                logits = model(torch.tensor([prompt + y[:t]])).logits[0, -1]
            want += torch.log_softmax(logits.double(), -1)[y[t]].item()
        assert abs(value - want) < 1e-4


def test_sample_model_is_seeded_and_cache_free_equal(llama_world):
    world, model = llama_world
    a = sample_model(model, world, 0, 24, seed=5)
    assert a == sample_model(model, world, 0, 24, seed=5, batch_size=7)
    assert a != sample_model(model, world, 0, 24, seed=6)
    assert all((y[-1] == EOS and EOS not in y[:-1]) or len(y) == world.max_length + 1 for y in a)

    class NoCache(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, **_):
            return SimpleNamespace(logits=self.inner(input_ids=input_ids, use_cache=False).logits)

    assert sample_model(NoCache(model), world, 0, 24, seed=5) == a


def test_measure_on_a_random_llama(llama_world):
    world, model = llama_world
    out = measure(model, world, n_samples=16, seed=0)
    json.dumps(out)
    for key in ("reverse_kl", "reverse_kl_support", "forward_kl", "precision", "outside_support",
                "mode_coverage", "mode_mass_l1", "length", "truth_length", "exacc_err", "per_prompt"):
        assert key in out
    assert math.isfinite(out["forward_kl"]) and out["forward_kl"] > 0
    assert 0.0 <= out["outside_support"] <= 1.0 and 0.0 <= out["mode_coverage"] <= 1.0
    assert 0.0 <= out["mode_mass_l1"] <= 2.0 and len(out["per_prompt"]) == world.spec.prompts
    assert out["reverse_kl"] > 0
    assert json.dumps(measure(model, world, n_samples=16, seed=0)) == json.dumps(out)


@pytest.mark.parametrize("noise", [0.0, 0.1])
def test_truth_as_model_scores_zero(noise):
    world = tiny(noise)
    truth = TruthLM(world)
    out = measure(truth, world, n_samples=32, seed=1)
    assert abs(out["forward_kl"]) < 1e-9 and abs(out["reverse_kl"]) < 1e-9
    assert max(out["exacc_err_curve"]["R"]) < 1e-9 and max(out["exacc_err_curve"]["epsilon"]) < 1e-9
    if noise == 0.0:
        assert out["outside_support"] == 0.0 and out["mode_coverage"] == 1.0
    exact = exact_kls(truth, world, 0)
    assert abs(exact["forward_kl"]) < 1e-9 and abs(exact["reverse_kl"]) < 1e-9
    assert exact["mass_outside"] < 1e-12


def test_reference_measures_against_the_truth_and_the_model_itself(llama_world):
    """With the truth as the reference the reference columns equal the truth columns on the same samples
    (the model: the same process at another noise level, so every divergence is finite); with the model
    itself as the reference both are exactly 0."""
    world = tiny(0.1)
    model = TruthLM(tiny(0.3))
    out = measure(model, world, n_samples=16, seed=3, reference=TruthLM(world))
    assert math.isfinite(out["reverse_kl"]) and out["reverse_kl"] > 0.01
    assert abs(out["reverse_kl_ref"] - out["reverse_kl"]) < 1e-9
    assert math.isfinite(out["forward_kl_ref"]) and out["forward_kl_ref"] > 0.01
    _, llama = llama_world
    own = measure(llama, world, n_samples=16, seed=3, reference=llama)
    assert own["reverse_kl_ref"] == 0.0 and own["forward_kl_ref"] == 0.0
    plain = measure(llama, world, n_samples=16, seed=3)
    assert plain["forward_kl"] == own["forward_kl"]  # the reference changes no other column
    assert "reverse_kl_ref" not in plain


def test_exact_kls_against_manual_enumeration(llama_world):
    world, model = llama_world
    for world_ in (world, tiny(0.0)):
        ys = all_responses(world_)
        logp = world_.log_prob(0, ys)
        logq = model_log_probs(model, world_, 0, ys)
        inside = np.isfinite(logp)
        p, q = np.exp(logp[inside]), np.exp(logq[inside])
        mass = q.sum()
        qs = q / mass
        out = exact_kls(model, world_, 0)
        assert out["support_size"] == int(inside.sum())
        assert abs(out["forward_kl"] - (p * (logp[inside] - logq[inside])).sum()) < 1e-9
        assert abs(out["reverse_kl_support"] - (qs * np.log(qs / p)).sum()) < 1e-9
        assert abs(out["mass_outside"] - (1 - mass)) < 1e-12 and out["reverse_kl"] == math.inf
        assert out["forward_kl"] > 0 and out["reverse_kl_support"] > 0


def test_sample_model_frequencies_match_model_log_probs(llama_world):
    """Two-token samples (KV-cache step included) against exact q, Pearson chi-square at level 1e-3."""
    world, model = llama_world
    n, width = 6000, len(world.tokens)
    outcomes = [[EOS]] + [[a, b] for a in range(1, width) for b in range(width)]
    q = np.exp(model_log_probs(model, world, 0, outcomes, batch_size=128))
    assert abs(q.sum() - 1.0) < 1e-5
    index = {tuple(o): j for j, o in enumerate(outcomes)}
    counts = np.zeros(len(outcomes))
    for y in sample_model(model, world, 0, n, seed=11, max_new_tokens=2):
        counts[index[tuple(y)]] += 1
    assert chi_square_pvalue(counts, n * q) > 1e-3


def test_measure_without_noise_cuts_exposure_errors_outside_the_support():
    world = tiny(0.0)
    model = tiny_llama(world.tokenizer(), hidden_size=16, layers=1, seed=4)
    out = measure(model, world, n_samples=16, seed=2, prompts=[1])
    assert out["reverse_kl"] == math.inf and out["outside_support"] > 0
    assert 0 < out["exacc_err_cut_share"] <= 1 and math.isfinite(out["forward_kl"])
    assert out["prompts"] == [1] and len(out["per_prompt"]) == 1
