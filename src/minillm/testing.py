"""Tiny tokenizers and models built in code, for tests, benchmarks and examples (no downloads).

The tokenizer is a real byte-level BPE (Hugging Face `tokenizers`) trained on a small built-in corpus,
wrapped as a `PreTrainedTokenizerFast`, so every string encodes and the special-token handling is the
same as for real models. The models are randomly initialised `LlamaForCausalLM` (RoPE) and
`GPT2LMHeadModel` (absolute positions) of a few thousand parameters.
"""

from __future__ import annotations

import functools

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

EOS = "<|endoftext|>"

_WORDS = (
    "the a an of to in and is are was were be been it this that these those with for on at by from "
    "what which who when where why how answer question response instruction input write explain list "
    "give describe summarize classify name tell me about please following text story poem paris france "
    "capital city river mountain water fire earth air cat dog bird fish tree flower red green blue "
    "one two three four five six seven eight nine ten first second third yes no true false good bad "
    "below task request appropriately completes context provides further paired describes"
).split()


def _corpus() -> list[str]:
    gen = torch.Generator().manual_seed(0)
    lines = []
    for _ in range(400):
        n = int(torch.randint(3, 14, (1,), generator=gen))
        idx = torch.randint(0, len(_WORDS), (n,), generator=gen).tolist()
        lines.append(" ".join(_WORDS[i] for i in idx) + ".")
    lines.append("### Instruction:\n### Input:\n### Response:\n")
    return lines


@functools.lru_cache(maxsize=4)
def _tokenizer_json(vocab_size: int) -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer with `vocab_size` entries; eos = pad = bos = '<|endoftext|>'."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)),
        eos_token=EOS,
        bos_token=EOS,
        unk_token=EOS,
        pad_token=EOS,
    )
    tok.padding_side = "right"
    return tok


def tiny_llama(tokenizer=None, *, vocab_size: int | None = None, hidden_size: int = 32, layers: int = 2,
               heads: int = 4, kv_heads: int = 2, seed: int = 0, tie_word_embeddings: bool = False):
    """A random `LlamaForCausalLM` (RoPE positions) sized for unit tests."""
    vocab = vocab_size if vocab_size is not None else len(tokenizer)
    eos = tokenizer.eos_token_id if tokenizer is not None else 0
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=1024, tie_word_embeddings=tie_word_embeddings,
        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.eval()
    return model


def tiny_gpt2(tokenizer=None, *, vocab_size: int | None = None, hidden_size: int = 32, layers: int = 2,
              heads: int = 4, seed: int = 0):
    """A random `GPT2LMHeadModel` (absolute learned positions) sized for unit tests."""
    vocab = vocab_size if vocab_size is not None else len(tokenizer)
    eos = tokenizer.eos_token_id if tokenizer is not None else 0
    cfg = GPT2Config(
        vocab_size=vocab, n_embd=hidden_size, n_layer=layers, n_head=heads, n_positions=1024,
        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg)
    model.eval()
    return model
