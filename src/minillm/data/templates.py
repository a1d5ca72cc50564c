"""Prompt templates: MiniLLM's Alpaca-style template (byte-exact), the tokenizer's chat template, or raw text.

The MiniLLM template is copied from LMOps `minillm/tools/process_data_dolly.py`; the no-input variant
is used when `input` is the empty string, as there. Reproducing paper numbers needs these exact bytes.
"""

from __future__ import annotations

from minillm.data.instructions import InstructionExample
from minillm.errors import ConfigError, DataError

TEMPLATES = ("minillm", "chat", "raw")

MINILLM_TEMPLATE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
MINILLM_TEMPLATE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def _user_message(example: InstructionExample) -> str:
    return example.instruction + ("\n\n" + example.input if example.input else "")


def build_prompt(example: InstructionExample, template: str = "minillm", tokenizer=None) -> str:
    """The prompt string the model continues; "chat" needs the tokenizer (its chat template)."""
    if template == "minillm":
        if example.input:
            return MINILLM_TEMPLATE_WITH_INPUT.format(instruction=example.instruction, input=example.input)
        return MINILLM_TEMPLATE.format(instruction=example.instruction)
    if template == "raw":
        return _user_message(example)
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            name = getattr(tokenizer, "name_or_path", None) or "the tokenizer"
            raise DataError(f"template 'chat' needs a tokenizer with a chat template, but {name} has none; "
                            "use template 'minillm' or 'raw', or an instruct model's tokenizer")
        messages = [{"role": "user", "content": _user_message(example)}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    raise ConfigError(f"unknown prompt template '{template}'; choose one of: {', '.join(TEMPLATES)}")
