"""experiments/table1/eos_drive.py: the EOS-logit push of MiniLLM's loss terms, against closed forms."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from minillm.testing import tiny_llama, tiny_tokenizer

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "table1" / "eos_drive.py"


@pytest.fixture(scope="module")
def eos_drive():
    spec = importlib.util.spec_from_file_location("eos_drive", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("clip_eps", [None, 0.2])
def test_logit_drives_match_the_closed_forms(eos_drive, clip_eps):
    """At theta = theta_old: PPO term -dL/dz[E] = A w (1[y=E] - q_E) / N unless the clip is active
    (A > 0 and w > 1+eps, or A < 0 and w < 1-eps: 0); single-step -dKL/dz[E] = -q_E (log q_E - log p_E - KL)
    / N."""
    g = torch.Generator().manual_seed(0)
    N, V, E = 40, 7, 3
    z_s, z_t = torch.randn(N, V, generator=g) * 2, torch.randn(N, V, generator=g) * 2
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::5] = E
    w = 0.5 + 0.75 * torch.rand(N, generator=g)  # in [0.5, 1.25], the range of q / (0.8 q + 0.2 p)
    adv = {"a": torch.randn(N, generator=g), "b": torch.randn(N, generator=g)}
    log_q, log_p = z_s.log_softmax(-1), z_t.log_softmax(-1)
    old = log_q.gather(1, targets[:, None]).squeeze(1)
    single, long_term = eos_drive.logit_drives(z_s, z_t, targets, old, w, adv, eos=E, clip_eps=clip_eps,
                                               scale=0.5)

    q = log_q.exp()
    kl = (q * (log_q - log_p)).sum(-1)
    expected_single = -q[:, E] * (log_q[:, E] - log_p[:, E] - kl) / N * 0.5
    assert torch.allclose(single, expected_single, atol=1e-6)
    for name, a in adv.items():
        expected = a * w * ((targets == E).float() - q[:, E]) / N * 0.5
        if clip_eps is not None:
            clipped = ((a > 0) & (w > 1 + clip_eps)) | ((a < 0) & (w < 1 - clip_eps))
            assert clipped.any() and (~clipped).any()  # the case is exercised both ways
            expected = torch.where(clipped, 0.0, expected)
        assert torch.allclose(long_term[name], expected, atol=1e-6), name


def test_eos_drive_runs_on_tiny_models(eos_drive):
    tok = tiny_tokenizer()
    student, teacher = tiny_llama(tok, seed=1), tiny_llama(tok, seed=2)
    prompts = [tok(f"question {i}: what is {i} plus {i}?")["input_ids"] for i in range(6)]
    res = eos_drive.eos_drive(student, teacher, tok, prompts, rollouts=5, max_new_tokens=6, batch_size=2,
                              seed=3)
    assert res["rollouts"] == 5 and res["tokens"] > 0 and 1 <= res["mean_length"] <= 6
    assert set(res["variants"]) == set(eos_drive.VARIANTS)
    for o in res["variants"].values():
        assert math.isclose(o["drive_long_term"], o["drive_eos_sampled"] + o["drive_continue"], abs_tol=1e-9)
        assert all(math.isfinite(o[k]) for k in ("drive_long_term", "other_advantage_mean"))
    assert math.isfinite(res["drive_single_step"]) and math.isfinite(res["reward_mean"])
