"""The vLLM engine, for real: a vLLM 0.32 engine on this machine's CPU serving tiny random Llamas.

It runs in the separate vLLM environment (MINILLM_VLLM_PYTHON, or .venv-vllm at the repository root, as
the README's test command creates it); without one these tests are skipped. One engine is started for the
module (tiny model, fp32, eager, 1 GiB KV cache) and reused; the training run, the evaluation run and the
KV-cache failure start their own.

Tolerance: the engine's log-probs of its sampled tokens (vLLM's processed log-probs) agree with our own
teacher-forced forward within LOGPROB_TOL = 1e-4 nats in fp32 (measured: ~2e-6). Distributions: chi-square
goodness of fit against the exact distribution of the 1-2 token responses, p > 1e-3 (and the same test
rejects a wrong distribution with p < 1e-6, so it has power).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import make_instructions, write_jsonl
from minillm import api
from minillm.config import EvalConfig, SamplingConfig, TrainConfig, build_config
from minillm.config.engine import VLLMConfig
from minillm.data import load_instructions
from minillm.errors import EngineError, ModelError
from minillm.generation import generate_file
from minillm.sampling import generate_rollouts, teacher_forced_logprobs
from minillm.sampling.vllm_rollout import VLLMSampler
from minillm.testing import tiny_llama, tiny_tokenizer
from test_sampling import chi2_pvalue

ROOT = Path(__file__).resolve().parents[1]


def _vllm_python() -> str | None:
    configured = os.environ.get("MINILLM_VLLM_PYTHON")
    if configured:
        return configured
    conventional = ROOT / ".venv-vllm" / "bin" / "python"
    return str(conventional) if conventional.is_file() else None


VLLM_PYTHON = _vllm_python()
pytestmark = pytest.mark.skipif(VLLM_PYTHON is None, reason="no vLLM environment: set MINILLM_VLLM_PYTHON or "
                                                            "create .venv-vllm (the README's test command)")
OPTIONS = VLLMConfig(python=VLLM_PYTHON or "", cpu_kv_cache_gb=1, start_timeout=300, request_timeout=300)
LOGPROB_TOL = 1e-4
PROMPTS = ["the cat and the dog", "Tell me about paris france.", "one two", "write a poem about the river"]


def _model(tok, seed: int = 0, scale: float = 20.0):
    """A tiny Llama vLLM's CPU backend serves (head size 32: its smallest), peaked by scaling the head."""
    model = tiny_llama(tok, hidden_size=64, heads=2, kv_heads=1, layers=2, seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


def _left_pad(tok, texts):
    encoded = [tok.encode(t, add_special_tokens=False) for t in texts]
    width = max(map(len, encoded))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    return ids, mask


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def served(tok):
    model = _model(tok)
    sampler = VLLMSampler(OPTIONS, max_model_len=96)
    sampler.start(model, version=0)
    yield model, sampler
    sampler.close()


def _frequent_first_token(model, ids, mask, rank: int = 1) -> int:
    with torch.no_grad():
        logits = model(input_ids=ids[:1], attention_mask=mask[:1]).logits[0, -1]
    return int(logits.argsort(descending=True)[rank])


def _common_token(model, ids, mask, config, tok) -> int:
    """The token our sampler draws most often at the third step or later (an EOS that ends some rows)."""
    r = generate_rollouts(model, ids, mask, config=config, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, generator=torch.Generator().manual_seed(9))
    return int(torch.mode(r.response_ids[:, 2:].flatten()).values)


# ---------------------------------------------------------------------------------------------- (a) log-probs
@pytest.mark.parametrize("config", [SamplingConfig(max_new_tokens=12),
                                    SamplingConfig(max_new_tokens=12, temperature=0.7, top_k=20, top_p=0.9)],
                         ids=["untruncated", "temperature-topk-topp"])
def test_engine_logprobs_match_our_forward(served, tok, config):
    model, sampler = served
    ids, mask = _left_pad(tok, PROMPTS * 8)
    eos = [tok.eos_token_id, _common_token(model, ids, mask, config, tok)]  # some rows stop early
    r = sampler.rollouts(model, ids, mask, config=config, eos_token_id=eos, pad_token_id=tok.pad_token_id,
                         generator=torch.Generator().manual_seed(0))
    assert sampler.stats.logprob_max_abs_diff < LOGPROB_TOL
    ours, _ = teacher_forced_logprobs(model, r, temperature=config.temperature)
    if config.top_k == 0:  # the re-scored values are our forward's
        torch.testing.assert_close(r.student_logprobs, ours * r.response_mask, atol=1e-6, rtol=0)
    # the Rollout contract: EOS kept at the end of a finished row, pad and zeros after it
    stopped = r.lengths < config.max_new_tokens
    assert bool(stopped.any()) and len(set(r.lengths.tolist())) > 1
    last = r.response_ids.gather(1, (r.lengths - 1)[:, None])[:, 0]
    assert all(int(t) in eos for t in last[stopped])
    positions = torch.arange(r.response_ids.shape[1])[None]
    assert torch.equal(r.response_mask.bool(), positions < r.lengths[:, None])
    assert bool((r.response_ids[~r.response_mask.bool()] == tok.pad_token_id).all())
    assert bool((r.student_logprobs[~r.response_mask.bool()] == 0).all())
    assert r.teacher_logprobs is None and r.student_logprobs.dtype == torch.float32


def test_seeded_rollouts_repeat_and_teacher_fields_are_filled(served, tok):
    model, sampler = served
    ids, mask = _left_pad(tok, PROMPTS)
    kw = dict(config=SamplingConfig(max_new_tokens=6), eos_token_id=tok.eos_token_id,
              pad_token_id=tok.pad_token_id)
    a = sampler.rollouts(model, ids, mask, generator=torch.Generator().manual_seed(3), **kw)
    b = sampler.rollouts(model, ids, mask, generator=torch.Generator().manual_seed(3), **kw)
    c = sampler.rollouts(model, ids, mask, generator=torch.Generator().manual_seed(4), **kw)
    assert torch.equal(a.response_ids, b.response_ids) and not torch.equal(a.response_ids, c.response_ids)
    teacher = _model(tok, seed=9, scale=3.0)
    t = sampler.rollouts(model, ids, mask, generator=torch.Generator().manual_seed(3), teacher=teacher,
                         return_teacher_hidden=True, **kw)
    reference, _ = teacher_forced_logprobs(teacher, t)
    torch.testing.assert_close(t.teacher_logprobs, reference, atol=1e-5, rtol=0)
    assert t.teacher_hidden.shape == (*t.response_ids.shape, 64)
    assert torch.equal(t.mix_logprobs, t.student_logprobs)


# ---------------------------------------------------------------------------------------------- (b) samples
def _exact_two_token_distribution(model, ids, eos: list[int]) -> torch.Tensor:
    """P(response) for max_new_tokens = 2: cell a*(V+1)+V is the one-token response (a,) with a an EOS,
    cell a*(V+1)+b the two-token response (a, b)."""
    with torch.no_grad():
        first = model(input_ids=ids).logits[0, -1].double().softmax(-1)
        V = first.shape[0]
        extended = torch.cat([ids.expand(V, -1), torch.arange(V)[:, None]], dim=1)
        second = model(input_ids=extended).logits[:, -1].double().softmax(-1)
    probs = torch.zeros(V, V + 1, dtype=torch.float64)
    is_eos = torch.zeros(V, dtype=torch.bool)
    is_eos[eos] = True
    probs[:, :V] = first[:, None] * second * (~is_eos)[:, None]
    probs[:, V] = first * is_eos
    return probs.flatten()


def _cells(r, V: int) -> torch.Tensor:
    first, second = r.response_ids[:, 0], r.response_ids[:, 1]
    index = torch.where(r.lengths == 1, first * (V + 1) + V, first * (V + 1) + second)
    return torch.bincount(index, minlength=V * (V + 1))


def test_response_distribution_matches_the_exact_one_and_our_sampler(served, tok):
    model, sampler = served
    ids, mask = _left_pad(tok, ["the cat"])
    eos = [tok.eos_token_id, _frequent_first_token(model, ids, mask, rank=0)]
    exact = _exact_two_token_distribution(model, ids, eos)
    n = 3000
    batch_ids, batch_mask = ids.expand(n, -1).contiguous(), mask.expand(n, -1).contiguous()
    config = SamplingConfig(max_new_tokens=2)
    kw = dict(config=config, eos_token_id=eos, pad_token_id=tok.pad_token_id)
    engine = sampler.rollouts(model, batch_ids, batch_mask, generator=torch.Generator().manual_seed(1), **kw)
    ours = generate_rollouts(model, batch_ids, batch_mask, generator=torch.Generator().manual_seed(1), **kw)
    V = len(tok)
    assert 0.05 < float((engine.lengths == 1).float().mean()) < 0.95  # both kinds of response occur
    assert chi2_pvalue(_cells(engine, V), exact) > 1e-3
    assert chi2_pvalue(_cells(ours, V), exact) > 1e-3
    # power: the engine's samples are rejected against a neighbouring distribution (temperature 1.3)
    hotter = sampler.rollouts(model, batch_ids, batch_mask, generator=torch.Generator().manual_seed(2),
                              config=SamplingConfig(max_new_tokens=2, temperature=1.3), eos_token_id=eos,
                              pad_token_id=tok.pad_token_id, rescore=False)
    assert chi2_pvalue(_cells(hotter, V), exact) < 1e-6


# ---------------------------------------------------------------------------------------------- (c) weights
def test_updated_weights_reach_the_running_engine(served, tok):
    model, sampler = served
    ids, mask = _left_pad(tok, PROMPTS * 4)
    kw = dict(config=SamplingConfig(max_new_tokens=8), eos_token_id=tok.eos_token_id,
              pad_token_id=tok.pad_token_id, generator=torch.Generator().manual_seed(5))
    new = _model(tok)
    optimizer = torch.optim.SGD(new.parameters(), lr=0.5)  # one training step on a language-model loss
    batch_ids, _ = _left_pad(tok, ["the cat and the dog are good", "one two three four five"])
    new(input_ids=batch_ids, labels=batch_ids).loss.backward()
    optimizer.step()
    new.eval()
    syncs = sampler.stats.syncs
    try:
        r = sampler.rollouts(new, ids, mask, version=1, rescore=False, **kw)
        assert sampler.stats.syncs == syncs + 1
        engine_logprobs = r.student_logprobs
        new_lp, _ = teacher_forced_logprobs(new, r)
        old_lp, _ = teacher_forced_logprobs(model, r)
        valid = r.response_mask.bool()
        assert float((engine_logprobs - new_lp)[valid].abs().max()) < LOGPROB_TOL  # the new model's numbers
        assert float((engine_logprobs - old_lp)[valid].abs().max()) > 0.1  # not the old model's
        sampler.rollouts(new, ids, mask, version=1, **kw)
        assert sampler.stats.syncs == syncs + 1  # same version: nothing written
    finally:
        sampler.sync(model, version=0)  # the other tests' model again


def test_minillm_training_with_a_lora_student_samples_through_vllm(tmp_path, tok):
    """A real run (minillm, alpha = 0, LoRA student): after every optimiser round the new adapter reaches the
    engine (vLLM's LoRA path), so its log-probs keep matching the trained student's."""
    for name, seed in (("student", 0), ("teacher", 1)):
        _model(tok, seed=seed, scale=3.0).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    data = write_jsonl(tmp_path / "train.jsonl", make_instructions(24))
    cfg = build_config(TrainConfig, None, dict(
        method="minillm", student=str(tmp_path / "student"), teacher=str(tmp_path / "teacher"),
        train_data=str(data), output_dir=str(tmp_path / "run"), template="raw", max_prompt_length=48,
        max_length=64, max_new_tokens=8, teacher_mix_alpha=0.0, num_rollouts=8, batch_size=4,
        rollout_batch_size=8, ppo_epochs=1, max_steps=4, learning_rate=0.05, lora_r=4, lora_alpha=16,
        eval_num_prompts=4, report_to=["none"], rollout_engine="vllm", vllm=OPTIONS))
    api.train(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    engine = [r for r in records if "vllm/syncs" in r]
    # rounds at steps 0 and 2, then the final validation: a sync before each but the first
    assert len(engine) >= 3 and max(r["vllm/syncs"] for r in engine) >= 2
    assert all(r["vllm/logprob_max_abs_diff"] < LOGPROB_TOL for r in engine)
    assert (tmp_path / "run" / "final" / "config.json").is_file()
    assert (tmp_path / "run" / "vllm_engine.log").stat().st_size > 0  # the engine's log is kept with the run


DDP_DRIVER = """
import json, sys, torch
torch.set_num_threads(1)
from minillm import api
from minillm.config import TrainConfig, build_config
from minillm.config.engine import VLLMConfig
args = json.loads(open(sys.argv[1]).read())
args["vllm"] = VLLMConfig(**args["vllm"])
api.train(build_config(TrainConfig, None, args))
"""


def test_ddp_training_gives_each_process_its_own_engine(tmp_path, tok):
    """torchrun, 2 processes (DDP on gloo), minillm at alpha = 0 with a full-weight student: each process
    starts its own engine (its own log) and keeps it in step with the shared weights after every round."""
    import subprocess
    import sys

    for name, seed in (("student", 0), ("teacher", 1)):
        _model(tok, seed=seed, scale=3.0).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    data = write_jsonl(tmp_path / "train.jsonl", make_instructions(24))
    run = tmp_path / "run"
    args = dict(method="minillm", student=str(tmp_path / "student"), teacher=str(tmp_path / "teacher"),
                train_data=str(data), output_dir=str(run), template="raw", max_prompt_length=48,
                max_length=64, max_new_tokens=8, teacher_mix_alpha=0.0, num_rollouts=4, batch_size=2,
                rollout_batch_size=4, ppo_epochs=1, max_steps=4, learning_rate=0.05, eval_num_prompts=2,
                report_to=["none"], rollout_engine="vllm",
                vllm={"python": OPTIONS.python, "cpu_kv_cache_gb": 1, "start_timeout": 300,
                      "request_timeout": 300})
    (tmp_path / "args.json").write_text(json.dumps(args))
    (tmp_path / "driver.py").write_text(DDP_DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           "2", str(tmp_path / "driver.py"), str(tmp_path / "args.json")],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):
        log = run / f"vllm_engine.rank{rank}.log"
        assert log.is_file() and log.stat().st_size > 0, f"rank {rank} started no engine of its own"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    engine = [r for r in records if "vllm/syncs" in r]
    assert engine and max(r["vllm/syncs"] for r in engine) >= 1
    assert all(r["vllm/logprob_max_abs_diff"] < LOGPROB_TOL for r in engine)
    assert (run / "final" / "config.json").is_file()


# ---------------------------------------------------------------------------------------------- (d) files
def test_generate_file_through_the_engine(served, tok, tmp_path):
    model, sampler = served
    examples = load_instructions(str(write_jsonl(tmp_path / "d.jsonl", make_instructions(5))))
    kw = dict(template="raw", batch_size=2, seed=3, sampling=SamplingConfig(max_new_tokens=6), engine=sampler)
    out = generate_file(model, tok, examples, tmp_path / "gen.jsonl", **kw)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == [e.id for e in examples]
    assert all(r["settings"]["engine"] == "vllm" and 1 <= r["length"] <= 6 for r in records)
    again = generate_file(model, tok, examples, tmp_path / "again.jsonl", **kw)
    assert [json.loads(line)["response"] for line in again.read_text().splitlines()] == \
        [r["response"] for r in records]  # (seed, batch) -> the same rows


# ---------------------------------------------------------------------------------------------- (d) evaluate
def _files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}


def test_evaluate_with_vllm_writes_the_files_hf_writes(tmp_path, tok):
    model_dir = tmp_path / "tiny"
    _model(tok, scale=3.0).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = write_jsonl(tmp_path / "set.jsonl", make_instructions(6))
    runs = {}
    for engine in ("hf", "vllm"):
        out = tmp_path / f"eval-{engine}"
        api.evaluate(build_config(EvalConfig, None, dict(
            models=[str(model_dir)], data=[str(data)], output_dir=str(out), seeds=[1, 2], max_new_tokens=8,
            engine=engine, vllm=OPTIONS, template="raw")))
        runs[engine] = _files(out)
    assert runs["hf"].keys() == runs["vllm"].keys()
    for name, path in runs["hf"].items():
        if name.endswith(".jsonl"):
            hf = [json.loads(line) for line in path.read_text().splitlines()]
            vl = [json.loads(line) for line in runs["vllm"][name].read_text().splitlines()]
            assert [r["id"] for r in hf] == [r["id"] for r in vl]
            assert [sorted(r) for r in hf] == [sorted(r) for r in vl]
            assert all(len(r["response_ids"]) <= 8 for r in vl)
    pinned = {e: json.loads(runs[e]["eval_config.json"].read_text())["settings"] for e in runs}
    assert pinned["vllm"].pop("engine") == "vllm" and pinned["vllm"] == pinned["hf"]
    results = {e: json.loads(runs[e]["results.json"].read_text())["results"] for e in runs}
    assert results["hf"].keys() == results["vllm"].keys()


# ---------------------------------------------------------------------------------------------- (e) errors
def test_unsupported_architecture_is_named(tok):
    model = _model(tok)  # exported with its config as it is: an architecture vLLM has never heard of
    model.config.architectures = ["MiniLLMToyForCausalLM"]
    with pytest.raises(ModelError, match="MiniLLMToyForCausalLM.*Use the hf engine"):
        with VLLMSampler(OPTIONS, max_model_len=64) as sampler:
            sampler.start(model)


def test_kv_cache_too_small_names_the_setting_and_quotes_vllm(tmp_path):
    """A model whose KV cache for max_model_len needs 2 GiB, with 1 GiB given."""
    config = LlamaConfig(vocab_size=64, hidden_size=1024, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=131072)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with pytest.raises(EngineError) as err:
        with VLLMSampler(OPTIONS, max_model_len=131072) as sampler:
            sampler.start(model)
    message = str(err.value)
    assert "KV cache" in message  # vLLM's own words
    assert "vllm.cpu_kv_cache_gb" in message and "vllm.max_model_len" in message
