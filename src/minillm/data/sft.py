"""Tokenisation of instruction examples, datasets of SFT sequences and RL prompts, and collators.

Conventions (MiniLLM `process_data_dolly.py`): no special tokens are added (no BOS, even for
LLaMA); the response ends with EOS, which is a trained token; examples whose prompt is longer than
`max_prompt_length` tokens are dropped, not truncated, so no prompt ever loses its instruction.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from minillm.data.instructions import InstructionExample
from minillm.data.templates import build_prompt
from minillm.errors import DataError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value that cross-entropy (and our losses) skip


def encode_prompt(tokenizer, prompt: str, max_prompt_length: int = 256) -> list[int] | None:
    """Prompt token ids, or None when the prompt is longer than `max_prompt_length` tokens."""
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    return ids if len(ids) <= max_prompt_length else None


def encode_sft(tokenizer, prompt: str, response: str, max_prompt_length: int = 256,
               max_length: int = 512, eos: bool = True) -> dict[str, list[int]] | None:
    """Token ids of prompt + response + EOS with labels only on the response (and EOS).

    `eos=False` leaves the EOS out: for a response that was cut at a generation cap, which must not
    teach the model to stop there.

    The response tokens are taken from the joint tokenisation, `encode(prompt + response)`, because
    a BPE merge may cross the boundary: that is what the model sees at generation time and what
    MiniLLM trains on. In the rare case where the prompt's own tokens are not a prefix of the joint
    tokens (e.g. a prompt ending in a space that merges into the response's first word), the prompt
    tokens are kept as they are, so the prompt matches what `encode_prompt` gives at generation
    time, and the response is tokenised on its own.

    The sequence is truncated to `max_length` tokens. Returns None when the prompt exceeds
    `max_prompt_length` or when truncation leaves no response token to learn from.
    """
    prompt_ids = encode_prompt(tokenizer, prompt, max_prompt_length)
    if prompt_ids is None or len(prompt_ids) >= max_length:
        return None
    end = [tokenizer.eos_token_id] if eos else []
    full = tokenizer.encode(prompt + response, add_special_tokens=False) + end
    if full[:len(prompt_ids)] != prompt_ids:
        full = prompt_ids + tokenizer.encode(response, add_special_tokens=False) + end
    if len(full) == len(prompt_ids):
        return None
    labels = [IGNORE_INDEX] * len(prompt_ids) + full[len(prompt_ids):]
    return {"input_ids": full[:max_length], "labels": labels[:max_length]}


def _response_text(example: InstructionExample, response_field: str) -> str:
    """The training target: the first reference ("output"), or a named extra field such as a
    teacher's generated answer for SeqKD (a list there means: take its first entry)."""
    if response_field == "output":
        return example.outputs[0]
    value = example.extra.get(response_field)
    if isinstance(value, list) and value:
        value = value[0]
    if not isinstance(value, str):
        raise DataError(f"example '{example.id}': response field '{response_field}' is missing or not a "
                        "string "
                        f"(extra fields: {sorted(example.extra)}); use response_field='output' for the "
                        "reference")
    return value


def _finished(example: InstructionExample, response_field: str) -> bool:
    """Whether the training response ended on its own. A record may say `"finished": false` (as
    `minillm generate` writes for answers cut at max_new_tokens); such a response is trained without EOS."""
    key = "finished" if response_field == "output" else f"{response_field}_finished"
    value = example.extra.get(key, True)
    if not isinstance(value, bool):
        raise DataError(f"example '{example.id}': field '{key}' must be true or false, got {value!r}")
    return value


class SFTDataset(torch.utils.data.Dataset):
    """Prompt + response sequences for SFT / word-level KD; items {"input_ids", "labels"} (lists).

    Everything is tokenised up front, so a bad example fails at construction, not mid-training.
    """

    def __init__(self, examples: Sequence[InstructionExample], tokenizer, template: str = "minillm",
                 max_prompt_length: int = 256, max_length: int = 512, response_field: str = "output"):
        self.items: list[dict[str, list[int]]] = []
        for example in examples:
            prompt = build_prompt(example, template, tokenizer)
            item = encode_sft(tokenizer, prompt, _response_text(example, response_field),
                              max_prompt_length, max_length, eos=_finished(example, response_field))
            if item is not None:
                self.items.append(item)
        self.num_dropped = len(examples) - len(self.items)
        if self.num_dropped:
            log.warning("SFTDataset: dropped %d of %d examples whose prompt exceeds max_prompt_length=%d "
                        "tokens "
                        "(or leaves no response within max_length=%d)",
                        self.num_dropped, len(examples), max_prompt_length, max_length)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.items[index]


class PromptDataset(torch.utils.data.Dataset):
    """Prompts for rollouts and evaluation; items {"prompt_ids", "prompt", "references", "id", "example"}."""

    def __init__(self, examples: Sequence[InstructionExample], tokenizer, template: str = "minillm",
                 max_prompt_length: int = 256):
        self.items: list[dict[str, Any]] = []
        for example in examples:
            prompt = build_prompt(example, template, tokenizer)
            prompt_ids = encode_prompt(tokenizer, prompt, max_prompt_length)
            if prompt_ids is not None:
                self.items.append({"prompt_ids": prompt_ids, "prompt": prompt,
                                   "references": list(example.outputs), "id": example.id, "example": example})
        self.num_dropped = len(examples) - len(self.items)
        if self.num_dropped:
            log.warning("PromptDataset: dropped %d of %d examples whose prompt exceeds max_prompt_length=%d "
                        "tokens",
                        self.num_dropped, len(examples), max_prompt_length)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


def collate_sft(batch: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad SFT items: input_ids (pad), attention_mask (1 = real token), labels (-100 on padding).

    The mask is built from lengths, never from `ids != pad`: pad is EOS, and EOS is a real token.
    """
    width = max(len(item["input_ids"]) for item in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, item in enumerate(batch):
        n = len(item["input_ids"])
        input_ids[row, :n] = torch.as_tensor(item["input_ids"], dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.as_tensor(item["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_prompts(batch: Sequence[dict], pad_token_id: int) -> dict[str, Any]:
    """Left-pad prompts so generation appends to aligned right edges.

    Returns input_ids, attention_mask and the "prompt", "references", "id" lists. Callers pass
    `minillm.models.position_ids_from_mask(attention_mask)` so GPT-2 sees unshifted positions.
    """
    width = max(len(item["prompt_ids"]) for item in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, item in enumerate(batch):
        n = len(item["prompt_ids"])
        input_ids[row, width - n:] = torch.as_tensor(item["prompt_ids"], dtype=torch.long)
        attention_mask[row, width - n:] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "prompt": [item["prompt"] for item in batch], "references": [item["references"]
                                                                         for item in batch],
            "id": [item["id"] for item in batch]}
