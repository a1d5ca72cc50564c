"""Tests for minillm.data: loading, templates, tokenisation/masking, collators, packed corpus."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from minillm.data import (
    IGNORE_INDEX,
    InstructionExample,
    PackedCorpus,
    PromptDataset,
    SFTDataset,
    build_prompt,
    collate_prompts,
    collate_sft,
    encode_prompt,
    encode_sft,
    load_instructions,
)
from minillm.errors import ConfigError, DataError
from minillm.models import final_hidden, position_ids_from_mask
from minillm.testing import tiny_gpt2, tiny_tokenizer

SHARED_DATA = Path(__file__).parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def example(instruction="Name the capital of France.", input="", outputs=("Paris.",), id="ex0", **extra):
    return InstructionExample(instruction, input, list(outputs), id, dict(extra))


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


# ----------------------------------------------------------------------------------------- templates

def test_minillm_template_without_input_is_byte_exact():
    assert build_prompt(example(instruction="Name a colour.")) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nName a colour.\n\n### Response:\n"
    )


def test_minillm_template_with_input_is_byte_exact():
    assert build_prompt(example(instruction="Summarize.", input="Cats sleep a lot.")) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nSummarize.\n\n"
        "### Input:\nCats sleep a lot.\n\n### Response:\n"
    )


def test_raw_template():
    assert build_prompt(example(instruction="Q?"), "raw") == "Q?"
    assert build_prompt(example(instruction="Q?", input="ctx"), "raw") == "Q?\n\nctx"


def test_chat_template_uses_tokenizer(tok):
    chat_tok = tiny_tokenizer()
    chat_tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    prompt = build_prompt(example(instruction="Q?", input="ctx"), "chat", chat_tok)
    assert prompt == "<user>Q?\n\nctx\n<assistant>"


def test_chat_template_missing_is_a_clear_error(tok):
    with pytest.raises(DataError, match="chat template"):
        build_prompt(example(), "chat", tok)
    with pytest.raises(ConfigError, match="minillm"):
        build_prompt(example(), "alpaca")


# ----------------------------------------------------------------------------------------- loading

def test_load_alpaca_and_dolly_records(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"instruction": "a", "input": "b", "output": "c", "category": "qa"},
        "",  # blank lines are skipped
        {"instruction": "d", "context": "e", "response": "f", "id": 7},
        {"instruction": "g", "output": ["r1", "r2"], "task": "task1"},
    ])
    first, second, third = load_instructions(str(path))
    assert (first.instruction, first.input, first.outputs, first.id, first.extra) == ("a", "b", ["c"], "d-0",
                                                                                      {"category": "qa"})
    assert (second.input, second.outputs, second.id) == ("e", ["f"], "7")
    assert (third.input, third.outputs, third.extra) == ("", ["r1", "r2"], {"task": "task1"})
    assert [e.instruction for e in load_instructions(str(path), limit=2)] == ["a", "d"]


def test_load_json_array(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([{"instruction": "a", "input": "", "output": "b"}]))
    assert load_instructions(str(path))[0].outputs == ["b"]


@pytest.mark.parametrize("lines, message", [
    ([], r"empty\.jsonl: file is empty"),
    (['{"instruction": "a", "output": "b"}', '{"instruction": "a", "output": '], r"empty\.jsonl:2: not valid "
                                                                                 r"JSON"),
    (['{"input": "x", "output": "b"}'], r"empty\.jsonl:1: missing field 'instruction'"),
    (['{"instruction": "a"}', ], r"empty\.jsonl:1: missing field 'output'"),
    (['', '{"instruction": "a", "output": 42}'], r"empty\.jsonl:2: field 'output' must be a string or a "
                                                 r"non-empty list"),
    (['{"instruction": "a", "output": ["ok", 3]}'], r"empty\.jsonl:1: field 'output'"),
    (['{"instruction": 1, "output": "b"}'], r"empty\.jsonl:1: field 'instruction' must be a string"),
    (['{"instruction": "a", "context": 5, "output": "b"}'], r"empty\.jsonl:1: field 'context' must be a "
                                                            r"string"),
    (['["a", "b"]'], r"empty\.jsonl \(record 1\): expected a JSON object"),  # a JSON list -> array format
])
def test_malformed_files_name_file_line_and_field(tmp_path, lines, message):
    path = write_jsonl(tmp_path / "empty.jsonl", lines) if lines else tmp_path / "empty.jsonl"
    path.touch()
    with pytest.raises(DataError, match=message):
        load_instructions(str(path))


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_instructions(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="is a folder"):
        load_instructions(str(tmp_path))


def test_hub_dataset_offline_is_a_clear_error(monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"cannot load dataset 'someone/no-such-data'.*local \.jsonl"):
        load_instructions("someone/no-such-data")


@pytest.mark.skipif(not (SHARED_DATA / "dolly_dev1000.jsonl").exists(), reason="shared data folder absent")
def test_real_dolly_file(tok):
    examples = load_instructions(str(SHARED_DATA / "dolly_dev1000.jsonl"))
    assert len(examples) == 1000 and examples[0].id == "dolly_dev_0" and "source" in examples[0].extra
    assert sum(bool(e.input) for e in examples) > 0
    dataset = SFTDataset(examples[:50], tok, max_prompt_length=256, max_length=512)
    assert len(dataset) + dataset.num_dropped == 50


# ----------------------------------------------------------------------------------------- tokenisation

def test_encode_sft_masks_prompt_and_labels_response_and_eos(tok):
    prompt = build_prompt(example())
    item = encode_sft(tok, prompt, "Paris is red.")
    prompt_ids = tok.encode(prompt, add_special_tokens=False)
    n = len(prompt_ids)
    assert item["input_ids"][:n] == prompt_ids
    assert item["labels"][:n] == [IGNORE_INDEX] * n
    assert item["input_ids"][n:] == item["labels"][n:]
    assert item["input_ids"][-1] == tok.eos_token_id and item["labels"][-1] == tok.eos_token_id
    assert tok.decode(item["input_ids"][n:-1]) == "Paris is red."
    assert item["input_ids"] == tok.encode(prompt + "Paris is red.",
                                           add_special_tokens=False) + [tok.eos_token_id]


def test_encode_sft_response_boundary_from_joint_tokenisation(tok):
    # "the cat " ends in a lone space token that merges into " re" when the response follows.
    prompt, response = "the cat ", "red"
    prompt_ids = tok.encode(prompt, add_special_tokens=False)
    joint = tok.encode(prompt + response, add_special_tokens=False)
    assert joint[:len(prompt_ids)] != prompt_ids  # the case the fallback exists for
    item = encode_sft(tok, prompt, response)
    assert item["input_ids"] == prompt_ids + tok.encode(response,
                                                        add_special_tokens=False) + [tok.eos_token_id]
    assert item["labels"][:len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)


def test_encode_sft_truncation_and_dropping(tok):
    prompt = "the cat is on the tree. " * 3
    n = len(tok.encode(prompt, add_special_tokens=False))
    item = encode_sft(tok, prompt, "one two three four five six", max_prompt_length=n, max_length=n + 2)
    assert len(item["input_ids"]) == len(item["labels"]) == n + 2
    assert item["labels"][-1] != tok.eos_token_id  # EOS truncated away, as in MiniLLM
    assert encode_sft(tok, prompt, "x", max_prompt_length=n - 1) is None
    assert encode_sft(tok, prompt, "x", max_prompt_length=n, max_length=n) is None  # nothing left to learn
    assert encode_prompt(tok, prompt, max_prompt_length=n) == tok.encode(prompt, add_special_tokens=False)
    assert encode_prompt(tok, prompt, max_prompt_length=n - 1) is None


def test_unfinished_responses_are_trained_without_eos(tok):
    prompt = build_prompt(example())
    cut = encode_sft(tok, prompt, "Paris is", eos=False)
    whole = encode_sft(tok, prompt, "Paris is")
    assert cut["input_ids"] == whole["input_ids"][:-1] and cut["labels"] == whole["labels"][:-1]
    assert tok.eos_token_id not in cut["labels"]
    assert encode_sft(tok, prompt, "", eos=False) is None  # nothing to learn
    data = SFTDataset([example(id="a", finished=False), example(id="b", finished=True), example(id="c")], tok)
    ends = [item["labels"][-1] == tok.eos_token_id for item in data]
    assert ends == [False, True, True]
    seqkd = SFTDataset([example(id="g", gen_answer="Teacher says", gen_answer_finished=False)], tok,
                       response_field="gen_answer")
    assert seqkd[0]["labels"][-1] != tok.eos_token_id
    with pytest.raises(DataError, match="field 'finished' must be true or false"):
        SFTDataset([example(id="d", finished="no")], tok)


def test_sft_dataset_drops_and_logs(tok, caplog):
    examples = [example(), example(instruction="the cat " * 200, id="long"),
                example(id="gen", gen_answer=["Teacher says Paris."])]
    with caplog.at_level(logging.WARNING, logger="minillm"):
        dataset = SFTDataset(examples, tok, max_prompt_length=256)
    assert (len(dataset), dataset.num_dropped) == (2, 1)
    assert "dropped 1 of 3" in caplog.text
    seqkd = SFTDataset([examples[2]], tok, response_field="gen_answer")
    assert tok.decode(seqkd[0]["input_ids"]).endswith("### Response:\nTeacher says Paris.<|endoftext|>")
    with pytest.raises(DataError, match="response field 'gen_answer'"):
        SFTDataset([examples[0]], tok, response_field="gen_answer")


def test_prompt_dataset_items(tok):
    dataset = PromptDataset([example(outputs=("a", "b")), example(instruction="x " * 300, id="long")], tok,
                            max_prompt_length=256)
    assert (len(dataset), dataset.num_dropped) == (1, 1)
    item = dataset[0]
    assert item["prompt"] == build_prompt(example())
    assert item["prompt_ids"] == tok.encode(item["prompt"], add_special_tokens=False)
    assert (item["references"], item["id"]) == (["a", "b"], "ex0")


# ----------------------------------------------------------------------------------------- collators

def test_collate_sft_right_pads(tok):
    batch = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    out = collate_sft(batch, pad_token_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in out.values())


def test_collate_prompts_left_pads_and_keeps_eos_inside_prompt(tok):
    eos = tok.eos_token_id
    batch = [{"prompt_ids": [5, eos, 7], "prompt": "p1", "references": ["r1"], "id": "a"},
             {"prompt_ids": [8], "prompt": "p2", "references": ["r2", "r3"], "id": "b"}]
    out = collate_prompts(batch, pad_token_id=eos)
    assert out["input_ids"].tolist() == [[5, eos, 7], [eos, eos, 8]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]  # from lengths, not from ids != pad
    assert (out["prompt"], out["references"], out["id"]) == (["p1", "p2"], [["r1"], ["r2", "r3"]], ["a", "b"])
    assert position_ids_from_mask(out["attention_mask"]).tolist() == [[0, 1, 2], [0, 0, 0]]


def test_left_padded_gpt2_batch_matches_unpadded_prompts(tok):
    model = tiny_gpt2(tok)
    prompts = [build_prompt(example()), "the cat", build_prompt(example(input="the dog is blue."))]
    dataset = [{"prompt_ids": tok.encode(p, add_special_tokens=False), "prompt": p, "references": [],
                "id": str(i)}
               for i, p in enumerate(prompts)]
    batch = collate_prompts(dataset, tok.pad_token_id)
    with torch.no_grad():
        hidden = final_hidden(model, batch["input_ids"], batch["attention_mask"])
        for row, item in enumerate(dataset):
            ids = torch.tensor([item["prompt_ids"]])
            alone = final_hidden(model, ids, torch.ones_like(ids))
            torch.testing.assert_close(hidden[row, -1], alone[0, -1], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------- packed corpus

def test_packed_corpus_from_texts_chunks_exactly(tok):
    texts = ["the cat is red.", "", "two dogs and one bird.", "water fire earth air."]
    stream = []
    for text in texts:
        if text:
            stream += tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
    corpus = PackedCorpus.from_texts(texts, tok, seq_len=8)
    assert len(corpus) == len(stream) // 8
    assert torch.cat([corpus[i]["input_ids"]
                      for i in range(len(corpus))]).tolist() == stream[:len(corpus) * 8]
    assert corpus[0]["input_ids"].dtype == torch.long and corpus[0]["input_ids"].shape == (8,)


def test_packed_corpus_files(tmp_path, tok):
    txt = tmp_path / "c.txt"
    txt.write_text("the cat is red.\nit is good.\n\n  \nthe dog is blue.\n")
    jsonl = write_jsonl(tmp_path / "c.jsonl", [{"text": "the cat is red.\nit is good."},
                                               {"text": "the dog is blue."}])
    a, b = PackedCorpus(txt, tok, seq_len=4), PackedCorpus(jsonl, tok, seq_len=4)
    assert torch.equal(a.chunks, b.chunks)
    assert a.chunks.flatten().tolist().count(tok.eos_token_id) >= 1


@pytest.mark.parametrize("name, content, message", [
    ("e.txt", "\n\n  \n", "corpus is empty"),
    ("bad.jsonl", '{"text": "a"}\n{"txt": "b"}\n', r"bad\.jsonl:2: missing field 'text'"),
    ("bad.jsonl", '{"text": "a"}\n{"text": 3}\n', r"bad\.jsonl:2: field 'text' must be a string"),
    ("bad.jsonl", '{"text": "a"}\n{"text": \n', r"bad\.jsonl:2: not valid JSON"),
    ("c.csv", "text\na\n", "unsupported corpus format"),
    ("short.txt", "the cat", "fewer than seq_len=512"),
])
def test_packed_corpus_errors(tmp_path, tok, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        PackedCorpus(path, tok)


def test_packed_corpus_missing_file(tmp_path, tok):
    with pytest.raises(DataError, match="no such file"):
        PackedCorpus(tmp_path / "none.txt", tok)
