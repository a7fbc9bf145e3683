"""Tokenising corpus chunks in Ray tasks (jobs.context.parallel_chunk_map). A module of its own that imports
only numpy and HF `tokenizers`, so that a task's worker starts in a fraction of a second instead of importing
the stages' stack (torch, transformers, DeepSpeed: 10-15 s of CPU a worker)."""
from __future__ import annotations

import functools
import os

import numpy as np


def tokenize_chunk_at(texts: list[str], tokenizer_dir: str, eos_id: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """zebra.data.tokenize_chunk for the tokenizer.json of tokenizer_dir: (every document's ids then eos_id,
    concatenated, as dtype; each document's token count). One core: the tasks are the parallelism."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    encodings = _tokenizer(tokenizer_dir).encode_batch(texts, add_special_tokens=False)
    lengths = np.array([len(e.ids) + 1 for e in encodings], dtype=np.int64)
    flat = np.empty(int(lengths.sum()), dtype=dtype)
    pos = 0
    for e in encodings:
        n = len(e.ids)
        flat[pos : pos + n] = e.ids
        flat[pos + n] = eos_id
        pos += n + 1
    return flat, lengths


@functools.lru_cache(maxsize=2)
def _tokenizer(tokenizer_dir: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))
