"""Teacher/student compatibility: one shared id space, and the logit width both models can score."""

from __future__ import annotations

import logging

from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from minillm.errors import ModelError

__all__ = ["check_compatibility", "logit_width", "slice_vocab"]

log = logging.getLogger("minillm.models")

_SPECIAL_TOKENS = ("eos", "bos", "unk")
_PROBE_STRINGS = (
    "Hello, world! The capital of France is Paris.",
    "  leading spaces,\ttabs,\n\nblank lines and trailing space ",
    "naïve café — Zürich, 東京, Москва, ☃ 😀",
    "def f(x):\n    return x ** 2  # squares\n",
    "3.14159 1,000,000 2024-11-28 0x1F -42",
    "### Instruction:\nList three colours.\n\n### Response:\n",
)


def logit_width(model: PreTrainedModel) -> int:
    """Rows of the output embedding = size of the model's logit vectors (may exceed len(tokenizer))."""
    head = model.get_output_embeddings()
    if head is None:
        raise ModelError(f"{type(model).__name__} has no output embedding (LM head); use a causal LM")
    return int(head.weight.shape[0])


def _first_vocab_difference(teacher: dict[str, int], student: dict[str, int]) -> str | None:
    by_id_t = {i: t for t, i in teacher.items()}
    by_id_s = {i: t for t, i in student.items()}
    for token_id in sorted(by_id_t.keys() | by_id_s.keys()):
        t, s = by_id_t.get(token_id), by_id_s.get(token_id)
        if t != s:
            def show(token: str | None) -> str:
                return "missing" if token is None else repr(token)
            return (f"id {token_id} is {show(t)} in the teacher tokenizer but {show(s)} in the student "
                    "tokenizer")
    return None


def check_compatibility(teacher_tok: PreTrainedTokenizerBase, student_tok: PreTrainedTokenizerBase,
                        teacher_model: PreTrainedModel | None = None,
                        student_model: PreTrainedModel | None = None) -> int:
    """Check that teacher and student share one id space; return the shared vocab (logit) size.

    MiniLLM feeds the student's token ids to the teacher verbatim and compares distributions id by
    id, so the vocabularies, the special tokens and the tokenisation itself must agree. Logit widths
    may differ (Qwen2.5-7B pads its head to 152,064 rows, 1.5B to 151,936): the returned size is the
    smaller width, and every place where logits meet slices both to it. A tokenizer token beyond that
    width could be sampled but never scored, so that is an error.
    """
    fix = "teacher and student must use the same tokenizer (same family and vocabulary)"
    for name in _SPECIAL_TOKENS:
        t_pair = (getattr(teacher_tok, f"{name}_token"), getattr(teacher_tok, f"{name}_token_id"))
        s_pair = (getattr(student_tok, f"{name}_token"), getattr(student_tok, f"{name}_token_id"))
        if t_pair != s_pair:
            raise ModelError(f"tokenizers differ in the {name} token: teacher {t_pair[0]!r} "
                             f"(id {t_pair[1]}), "
                             f"student {s_pair[0]!r} (id {s_pair[1]}); {fix}")
    if (teacher_tok.pad_token_id, teacher_tok.pad_token) != (student_tok.pad_token_id, student_tok.pad_token):
        # Harmless: masks are explicit and only the student's tokenizer pads batches.
        log.info("teacher pad token %r differs from student pad token %r; using the student's",
                 teacher_tok.pad_token, student_tok.pad_token)

    teacher_vocab, student_vocab = teacher_tok.get_vocab(), student_tok.get_vocab()
    if teacher_vocab != student_vocab:
        difference = _first_vocab_difference(teacher_vocab, student_vocab)
        raise ModelError(f"tokenizer vocabularies differ: {difference}; "
                         f"{fix}")
    for text in (*_PROBE_STRINGS, student_tok.eos_token):
        t_ids = teacher_tok.encode(text, add_special_tokens=False)
        s_ids = student_tok.encode(text, add_special_tokens=False)
        if t_ids != s_ids:
            raise ModelError(f"tokenizers split {text!r} differently: teacher {t_ids}, student {s_ids}; "
                             f"{fix}")

    widths = {role: logit_width(m) for role, m in (("teacher", teacher_model), ("student", student_model))
              if m is not None}
    num_ids = max(student_vocab.values()) + 1
    shared = min(widths.values(), default=num_ids)
    for role, width in widths.items():
        if num_ids > width:
            top_id = num_ids - 1
            top = student_tok.convert_ids_to_tokens(top_id)
            raise ModelError(f"the tokenizer has ids up to {top_id} ({top!r}) but the {role} model only has "
                             f"{width} logits, so that token could never be scored; resize the {role}'s "
                             "embeddings or use a model trained with this tokenizer")
    return shared


def slice_vocab(logits: Tensor, vocab_size: int) -> Tensor:
    """Restrict logits [..., V] to the shared vocabulary (a view; no copy when already that wide)."""
    return logits if logits.shape[-1] == vocab_size else logits[..., :vocab_size]
