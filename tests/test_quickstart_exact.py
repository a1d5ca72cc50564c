"""The quickstart's exact stage: exact enumeration of sequence-level probabilities, and KD vs MiniLLM in
the tiny world (MiniLLM ends with the lower exact reverse KL, KD with the lower exact forward KL)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from minillm.quickstart_exact import EXACT_SPEC, exact_section, exact_stage
from minillm.testing import tiny_llama
from minillm.world import World
from minillm.world.exact import enumerate_model, enumerate_truth, sequence_kls


@pytest.fixture(scope="module")
def world():
    return World(EXACT_SPEC)


def test_enumeration_is_a_distribution_and_matches_a_token_by_token_score(world):
    model = tiny_llama(world.tokenizer(), hidden_size=16, layers=1, seed=4)
    e = enumerate_model(model, world, 1)
    assert len(e.responses) == sum(6 ** n for n in range(5))  # every response of 0..4 content tokens
    assert 0 < e.other < 1 and math.isclose(e.probs.sum() + e.other, 1.0, abs_tol=1e-12)
    for j in (0, 7, 300, len(e.responses) - 1):  # brute force: one full forward over prompt + response + eos
        ids = torch.tensor([world.prompt_ids(1) + list(e.responses[j]) + [world.eos_id]])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids).logits.double(), -1)[0]
        start = len(world.prompt_ids(1))
        brute = sum(lp[t - 1, ids[0, t]].item() for t in range(start, ids.shape[1]))
        assert math.isclose(math.log(e.probs[j]), brute, rel_tol=1e-9, abs_tol=1e-9)


def test_truth_enumeration_and_the_kls(world):
    truth = enumerate_truth(world, 0)
    assert math.isclose(truth.probs.sum(), 1.0, abs_tol=1e-12) and truth.other == 0.0
    same = sequence_kls(truth, truth)
    assert same["reverse_kl"] == 0.0 and same["forward_kl"] == 0.0
    model = enumerate_model(tiny_llama(world.tokenizer(), hidden_size=16, layers=1, seed=5), world, 0)
    kls = sequence_kls(model, truth)  # the model puts mass outside the truth's support: reverse KL is inf
    assert kls["reverse_kl"] == math.inf
    a, b = model.with_other(), truth.with_other()  # forward KL by its definition over the same outcomes
    keep = b > 0
    assert math.isclose(kls["forward_kl"], float(np.sum(b[keep] * np.log(b[keep] / a[keep]))), rel_tol=1e-12)


@pytest.mark.slow
def test_exact_stage_shows_mode_seeking(tmp_path):
    results = exact_stage(tmp_path / "exact", "tiny")
    m = results["mean"]
    assert m["minillm"]["reverse_kl"] < m["kd"]["reverse_kl"]  # MiniLLM wins the divergence it minimises
    assert m["kd"]["forward_kl"] < m["minillm"]["forward_kl"]  # and KD wins forward KL
    assert json.loads((tmp_path / "exact" / "results.json").read_text())["mean"] == m
    assert (tmp_path / "exact" / "distributions.png").stat().st_size > 10_000
    text = "\n".join(exact_section(results, 60.0))
    assert f"{m['minillm']['reverse_kl']:.3f}" in text and "MiniLLM ends with the lower reverse KL" in text
