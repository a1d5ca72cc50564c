"""End to end: MiniLLM moves a student toward a teacher trained here on a small synthetic language.

Setting (measured when the test was written, CPU, fixed seeds): teacher = 2-layer Llama (h=64) trained
300 SFT steps on "the A and the B" -> "the A likes the B {yes|no|good}."; student = 2-layer Llama
(h=48) initialised by only 30 SFT steps, so it still rambles (~25 tokens where the teacher stops
after ~10). 30 MiniLLM steps (16 rollouts per round, 2 PPO epochs, lr 5e-3) took the held-out
sequence-level reverse KL (80 student samples scored by the teacher) from 105.7 to 52.0 nats
(standard error ~4-5); with `length_norm` off the mean response length fell to 11.5 tokens vs 15.8
with it on - the short-answer bias the paper's length normalisation removes (spec Table 4).
Thresholds leave a wide margin around those numbers: KL must fall by at least 25 % and the
unnormalised run must be at least 10 % shorter.
"""

from __future__ import annotations

import random

import pytest
import torch

from conftest import write_jsonl
from minillm import api
from minillm.config import TrainConfig, build_config
from minillm.data import PromptDataset, collate_prompts, load_instructions
from minillm.models import load_model, load_tokenizer
from minillm.sampling import SamplingConfig, generate_rollouts
from minillm.testing import tiny_llama, tiny_tokenizer

WORDS = "red green blue cat dog bird fish tree river city".split()
ENDINGS = ["yes", "no", "good"]


def _language(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.sample(WORDS, 2)
        rows.append({"instruction": f"the {a} and the {b}", "input": "",
                     "output": f"the {a} likes the {b} {rng.choice(ENDINGS)}.", "id": str(i)})
    return rows


def _heldout_reverse_kl(student_dir, teacher_dir, test_file) -> tuple[float, float, float]:
    tok = load_tokenizer(student_dir)
    student, teacher = load_model(student_dir), load_model(teacher_dir)
    prompts = PromptDataset(load_instructions(test_file), tok, template="raw", max_prompt_length=160)
    batch = collate_prompts([prompts[i] for i in range(len(prompts))] * 2, tok.pad_token_id)
    r = generate_rollouts(student, batch["input_ids"], batch["attention_mask"],
                          config=SamplingConfig(max_new_tokens=32), eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, teacher=teacher,
                          generator=torch.Generator().manual_seed(0))
    seq_kl = ((r.student_logprobs - r.teacher_logprobs) * r.response_mask).sum(1)
    return float(seq_kl.mean()), float(seq_kl.std() / len(seq_kl) ** 0.5), float(r.lengths.float().mean())


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    tok = tiny_tokenizer()
    for name, model in (("teacher0", tiny_llama(tok, hidden_size=64, layers=2, seed=1)),
                        ("student0", tiny_llama(tok, hidden_size=48, layers=2, seed=2))):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    write_jsonl(root / "train.jsonl", _language(300, 0))
    write_jsonl(root / "test.jsonl", _language(40, 1))
    common = dict(train_data=str(root / "train.jsonl"), max_length=200, max_prompt_length=160,
                  valid_fraction=0.1, template="raw", batch_size=8, learning_rate=3e-3)
    teacher = api.train(build_config(TrainConfig, None, dict(
        method="sft", student=str(root / "teacher0"), output_dir=str(root / "t"), max_steps=300, **common)))
    init = api.train(build_config(TrainConfig, None, dict(
        method="sft", student=str(root / "student0"), output_dir=str(root / "s"), max_steps=30, **common)))
    runs = {}
    for length_norm in (True, False):
        out = root / f"minillm_ln{length_norm}"
        cfg = dict(common, method="minillm", student=str(init), teacher=str(teacher), output_dir=str(out),
                   num_rollouts=16, rollout_batch_size=16, ppo_epochs=2, learning_rate=5e-3, max_steps=30,
                   max_new_tokens=32, length_norm=length_norm, eval_num_prompts=8)
        api.train(build_config(TrainConfig, None, cfg))
        runs[length_norm] = out / "final"
    test = str(root / "test.jsonl")
    return {"init": _heldout_reverse_kl(init, teacher, test),
            "on": _heldout_reverse_kl(runs[True], teacher, test),
            "off": _heldout_reverse_kl(runs[False], teacher, test)}


def test_minillm_lowers_heldout_sequence_reverse_kl(pipeline):
    before, se_before, _ = pipeline["init"]
    after, se_after, _ = pipeline["on"]
    assert after < 0.75 * before, pipeline
    assert before - after > 3 * (se_before ** 2 + se_after ** 2) ** 0.5, pipeline


def test_without_length_norm_responses_get_shorter(pipeline):
    assert pipeline["off"][2] < 0.9 * pipeline["on"][2], pipeline
