"""Packed pre-training corpus (D_PT) for MiniLLM's language-modelling term L_PT.

As in MiniLLM `tools/process_data_pretrain.py`: each document is tokenised without special tokens and
followed by EOS, documents are concatenated into one stream, and the stream is cut into chunks of
exactly `seq_len` tokens (the incomplete tail is dropped). Chunks are trained with full-length LM loss,
so there is no padding and no attention mask.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import torch

from minillm.errors import DataError
from minillm.io import iter_jsonl

_BLANK_LINES = re.compile(r"\n[ \t]*\n")
_TOKENIZE_BATCH = 1000  # documents per call to the (fast, batched) tokenizer


def _read_txt(path: Path) -> list[str]:
    """Documents separated by blank lines."""
    documents = [doc.strip() for doc in _BLANK_LINES.split(path.read_text(encoding="utf-8"))]
    return [doc for doc in documents if doc]


def _read_jsonl(path: Path) -> list[str]:
    documents = []
    for where, record in iter_jsonl(path, shape='one JSON object like {"text": "..."}'):
        if not isinstance(record, dict) or "text" not in record:
            raise DataError(f'{where}: missing field \'text\'; each line must be a JSON object like '
                            f'{{"text": "..."}}')
        if not isinstance(record["text"], str):
            raise DataError(f"{where}: field 'text' must be a string, got {type(record['text']).__name__}")
        if record["text"].strip():
            documents.append(record["text"])
    return documents


class PackedCorpus(torch.utils.data.Dataset):
    """Fixed-length chunks of a tokenised text corpus; items {"input_ids": LongTensor[seq_len]}.

    Accepts a `.txt` file (documents separated by blank lines) or a `.jsonl` file with a `text`
    field; `PackedCorpus.from_texts` builds one from strings in memory. The chunk tensor is kept in
    memory, which suits corpora of up to a few hundred million tokens.
    """

    def __init__(self, path: str | Path, tokenizer, seq_len: int = 512):
        path = Path(path).expanduser()
        if not path.is_file():
            raise DataError(f"no such file: '{path}' (pre-training corpus; a .txt or .jsonl file)")
        readers = {".txt": _read_txt, ".jsonl": _read_jsonl}
        if path.suffix.lower() not in readers:
            raise DataError(f"{path}: unsupported corpus format '{path.suffix}'; use .txt (documents "
                            "separated by "
                            "blank lines) or .jsonl (one {\"text\": ...} object per line)")
        try:
            documents = readers[path.suffix.lower()](path)
        except UnicodeDecodeError as error:
            raise DataError(f"{path}: not a UTF-8 text file ({error.reason})") from error
        self._build(documents, tokenizer, seq_len, source=str(path))

    @classmethod
    def from_texts(cls, texts: Iterable[str], tokenizer, seq_len: int = 512) -> PackedCorpus:
        """A corpus from in-memory documents (tests, or text already loaded elsewhere)."""
        corpus = cls.__new__(cls)
        corpus._build([t for t in texts if t.strip()], tokenizer, seq_len, source="in-memory texts")
        return corpus

    def _build(self, documents: list[str], tokenizer, seq_len: int, source: str) -> None:
        if seq_len < 2:
            raise DataError(f"seq_len must be at least 2 (one input and one target token), got {seq_len}")
        if not documents:
            raise DataError(f"{source}: the corpus is empty (no non-blank documents)")
        # one int32 tensor per tokenizer batch: a Python int list of the whole stream is ~9x larger
        pieces = []
        for start in range(0, len(documents), _TOKENIZE_BATCH):
            batch = tokenizer(documents[start:start + _TOKENIZE_BATCH], add_special_tokens=False)["input_ids"]
            pieces.append(torch.tensor([t for ids in batch for t in (*ids, tokenizer.eos_token_id)],
                                       dtype=torch.int32))
        stream = torch.cat(pieces)
        num_chunks = len(stream) // seq_len
        if num_chunks == 0:
            raise DataError(f"{source}: the corpus has only {len(stream)} tokens, fewer than "
                            f"seq_len={seq_len}; "
                            "add text or lower seq_len")
        self.seq_len = seq_len
        self.num_tokens = len(stream)
        self.chunks = stream[:num_chunks * seq_len].view(num_chunks, seq_len)

    def __len__(self) -> int:
        return self.chunks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.chunks[index].long()}
