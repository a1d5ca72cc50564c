"""Instruction data and pre-training corpora -> token ids, masks and batches."""

from minillm.data.corpus import PackedCorpus
from minillm.data.instructions import InstructionExample, load_instructions
from minillm.data.sft import (
    IGNORE_INDEX,
    PromptDataset,
    SFTDataset,
    collate_prompts,
    collate_sft,
    encode_prompt,
    encode_sft,
)
from minillm.data.templates import MINILLM_TEMPLATE, MINILLM_TEMPLATE_WITH_INPUT, TEMPLATES, build_prompt
from minillm.io import read_jsonl  # the one JSONL reader, re-exported (old import path)

__all__ = [
    "IGNORE_INDEX", "MINILLM_TEMPLATE", "MINILLM_TEMPLATE_WITH_INPUT", "TEMPLATES",
    "InstructionExample", "PackedCorpus", "PromptDataset", "SFTDataset",
    "build_prompt", "collate_prompts", "collate_sft", "encode_prompt", "encode_sft", "load_instructions",
    "read_jsonl",
]
