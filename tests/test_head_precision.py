"""The LM head runs in fp32 under bf16 autocast (only the model body runs in bf16).

Under autocast, `lm_head_fn(model)(hidden)` must give the fp32 logits (cast hidden, fp32 weight, autocast
off), and so must the fused loss's own projection (`LMHead.linear`). The check that matters for training:
given the same hidden states, the loss and its gradients (w.r.t. the hidden states and the head weight)
under autocast equal the fp32 ones to fp32 round-off, for `chunked_token_terms` and `fused_token_loss`,
with a trainable student head and a frozen teacher head. Everything after the body is then fp32, so
the only bf16 error left in an autocast update is the body's. The head as it was (bf16 logits under
autocast) misses the same check by orders of magnitude. Without autocast nothing changes: a bf16 model's
head still runs in bf16 on hidden states cast to bf16.
"""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from minillm import api
from minillm.config import TrainConfig, build_config
from minillm.losses import chunked_token_terms, fused_token_loss
from minillm.models import LMHead, final_hidden, lm_head_fn
from minillm.sampling import Decoder, SamplingConfig, generate_rollouts
from minillm.testing import tiny_gpt2, tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def scaled(model, factor: float = 50.0):
    """Larger head weights give logits of magnitude ~10-30, where bf16 rounding is ~0.1 (as in real models)"""
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(factor)
    return model


def hidden_states(model, tok, n_rows: int = 3):
    text = "the cat is on the tree and what is the capital of france"
    ids = torch.tensor(tok.encode(text)).repeat(n_rows, 1)
    with torch.no_grad():
        return final_hidden(model, ids, torch.ones_like(ids))


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2: tied to the input embedding
def test_head_is_fp32_under_autocast(tok, family):
    model = scaled((tiny_llama if family == "llama" else tiny_gpt2)(tok, seed=1))
    head = lm_head_fn(model)
    h = hidden_states(model, tok)
    want = head(h).detach()
    assert want.dtype == torch.float32 and float(want.abs().max()) > 10
    with autocast():
        for x in (h, h.to(torch.bfloat16)):
            got = head(x)
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, head(x.float()) if x.dtype != torch.float32 else want, rtol=1e-6,
                                       atol=1e-5)
        legacy = head.postprocess(head.module(h)).detach()  # what autocast does to the plain module call
    assert legacy.dtype == torch.bfloat16 and float((legacy.float() - want).abs().max()) > 1e-2
    # the fused path's projection: postprocess(linear(cast_input(h), weight, bias)) == head(h), also under
    # autocast
    weight, bias, post = head.linear_split()
    with autocast():
        torch.testing.assert_close(post(head.linear(head.cast_input(h), weight, bias)), want, rtol=1e-6,
                                   atol=1e-5)


def test_bf16_weights_under_autocast_and_without(tok):
    model = scaled(tiny_llama(tok, seed=2)).to(torch.bfloat16)
    head = lm_head_fn(model)
    h = hidden_states(model, tok).float()  # e.g. stored from a bf16 teacher in fp32
    weight = model.get_output_embeddings().weight
    with autocast():
        got = head(h)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.nn.functional.linear(h, weight.float()), rtol=1e-6, atol=1e-5)
    # no autocast: today's behaviour, the hidden states are cast to the weight's dtype
    plain = head(h)
    assert plain.dtype == torch.bfloat16
    assert torch.equal(plain, model.get_output_embeddings()(h.to(torch.bfloat16)))


def test_fp32_model_without_autocast_is_unchanged(tok):
    model = tiny_gpt2(tok, seed=3)
    head = lm_head_fn(model)
    h = hidden_states(model, tok)
    assert torch.equal(head(h), model.get_output_embeddings()(h))


class LegacyHead:
    """The head as it was under autocast: the module called as is, so autocast gives bf16 logits."""

    def __init__(self, head):
        self.head = head

    def __call__(self, hidden):
        assert torch.is_autocast_enabled("cpu")
        return self.head.postprocess(self.head.module(hidden))


@pytest.mark.parametrize("path", ["chunked", "fused"])
def test_loss_and_gradients_under_autocast_equal_fp32_given_the_same_hidden(tok, path):
    """Same hidden states in: a MiniLLM-style loss (-log q(y) + the single-step reverse KL against a frozen
    teacher head) and its gradients under autocast equal fp32 to fp32 round-off (fp32 teacher: a bf16
    teacher's head is bf16 in an fp32 run, by design, see test_bf16_weights_under_autocast_and_without)."""
    student = scaled(tiny_llama(tok, seed=4))
    teacher = scaled(tiny_gpt2(tok, seed=5, hidden_size=48)).requires_grad_(False)
    s_head, t_head = lm_head_fn(student), lm_head_fn(teacher)
    h0 = hidden_states(student, tok).reshape(-1, 32)
    teacher_h = hidden_states(teacher, tok).reshape(-1, 48)
    n = h0.shape[0]
    targets = torch.randint(0, len(tok), (n,), generator=torch.Generator().manual_seed(0))
    weight = student.get_output_embeddings().weight
    kw = dict(targets=targets, teacher_hidden=teacher_h, teacher_head=t_head, divergence="rkl", chunk_size=8)

    def run(head, use_autocast):
        hidden = h0.clone().requires_grad_(True)
        ctx = autocast() if use_autocast else torch.autocast("cpu", enabled=False)
        with ctx:
            if path == "chunked" or isinstance(head, LegacyHead):
                t = chunked_token_terms(hidden, head, **kw)
                loss = (t.divergence - t.logprobs).mean()
            else:
                loss = fused_token_loss(hidden, head, lambda lp, div, a, b: {"x": (div - lp).sum() / n},
                                        **kw).loss
        grads = torch.autograd.grad(loss, [hidden, weight])
        return loss.detach(), grads

    loss32, grads32 = run(s_head, False)
    loss16, grads16 = run(s_head, True)
    torch.testing.assert_close(loss16, loss32, rtol=1e-6, atol=1e-6)
    for g16, g32 in zip(grads16, grads32):
        assert g16.dtype == g32.dtype == torch.float32
        torch.testing.assert_close(g16, g32, rtol=1e-5, atol=1e-6 * float(g32.abs().max()))
    # before: bf16 logits (student and teacher head) under autocast put a visible error into the same loss
    kw["teacher_head"] = LegacyHead(t_head)
    loss_old, grads_old = run(LegacyHead(s_head), True)
    err_new = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(grads16, grads32))
    err_old = max(float((a.float() - b).abs().max() / b.abs().max()) for a, b in zip(grads_old, grads32))
    assert err_old > 100 * max(err_new, 1e-7), (err_old, err_new)
    assert abs(float(loss_old - loss32)) > 100 * abs(float(loss16 - loss32))


def test_decoder_under_autocast_bf16_teacher(tok):
    """The rollout decoder uses the same head: fp32 logits under autocast, also for a bf16 teacher."""
    student = tiny_llama(tok, seed=6)
    teacher = tiny_gpt2(tok, seed=7).to(torch.bfloat16)
    ids = torch.tensor([tok.encode("the cat is")])
    dec = Decoder(teacher)
    with torch.no_grad():
        logits, hidden = dec.step(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None])
    assert logits.dtype == torch.bfloat16  # no autocast: as before
    dec = Decoder(teacher)
    with torch.no_grad(), autocast():
        logits16, hidden16 = dec.step(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None])
    assert logits16.dtype == torch.float32
    weight = teacher.get_output_embeddings().weight
    want = torch.nn.functional.linear(hidden16.float(), weight.float())
    torch.testing.assert_close(logits16, want, rtol=1e-6, atol=1e-5)
    with autocast():
        rollout = generate_rollouts(student, ids, torch.ones_like(ids),
                                    config=SamplingConfig(max_new_tokens=4), eos_token_id=tok.eos_token_id,
                                    pad_token_id=tok.pad_token_id, teacher=teacher, teacher_mix_alpha=0.2,
                                    return_teacher_hidden=True, generator=torch.Generator().manual_seed(0))
    valid = rollout.response_mask.bool()
    assert torch.isfinite(rollout.teacher_logprobs[valid]).all()
    assert torch.isfinite(rollout.student_logprobs).all()


def test_bf16_training_step_uses_the_fp32_head_and_backward_without_autocast(tiny_dirs, instruction_file,
                                                                           tmp_path, monkeypatch):
    """precision=bf16 (Accelerate autocast on CPU), MiniLLM with the fused loss: the student and teacher heads
    produce fp32 logits inside the autocast region, and backward runs with autocast off (under it, the
    backward of the fp32 head would be recast to bf16)."""
    seen = {"head_autocast": [], "head_dtypes": set(), "backward_autocast": []}
    real_call, real_linear, real_backward = LMHead.__call__, LMHead.linear, Accelerator.backward

    def call(self, hidden):
        out = real_call(self, hidden)
        seen["head_autocast"].append(torch.is_autocast_enabled("cpu"))
        seen["head_dtypes"].add(out.dtype)
        return out

    def linear(self, x, weight, bias):
        out = real_linear(self, x, weight, bias)
        seen["head_autocast"].append(torch.is_autocast_enabled("cpu"))
        seen["head_dtypes"].add(out.dtype)
        return out

    def backward(self, loss, **kw):
        seen["backward_autocast"].append(torch.is_autocast_enabled("cpu"))
        return real_backward(self, loss, **kw)

    monkeypatch.setattr(LMHead, "__call__", call)
    monkeypatch.setattr(LMHead, "linear", linear)
    monkeypatch.setattr(Accelerator, "backward", backward)
    cfg = build_config(TrainConfig, None, dict(
        method="minillm", student=tiny_dirs["student"], teacher=tiny_dirs["teacher"],
        train_data=instruction_file, output_dir=str(tmp_path / "run"), precision="bf16", num_rollouts=4,
        batch_size=4, rollout_batch_size=4, ppo_epochs=1, max_new_tokens=6, max_steps=1, valid_fraction=0,
        max_prompt_length=160, seed=3))
    api.train(cfg)
    assert seen["backward_autocast"] == [False]
    assert any(seen["head_autocast"]), "no head call ran under autocast"
    assert seen["head_dtypes"] == {torch.float32}
