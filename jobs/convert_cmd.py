"""`zebra convert`: teacher -> hybrid with no training, saved as a loadable HF folder, with init errors."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from zebra.convert import convert, full_rank_mla_config, hybrid_config, layer_init_errors
import itertools

from zebra.data import builtin_texts, pack, tokenize
from zebra.kv import kv_bytes_per_token, kv_fraction
from zebra.teacher import load_teacher

log = logging.getLogger(__name__)


def calibration_ids(tokenizer, n_tokens: int, seq_len: int = 256) -> torch.Tensor:
    """[n_tokens // seq_len, seq_len] tokens of the offline corpus (real English text shipped with Python)."""
    rows = itertools.islice(pack(tokenize(builtin_texts(), tokenizer), seq_len), max(1, n_tokens // seq_len))
    return torch.tensor(list(rows), dtype=torch.long)


def run_convert(teacher: str, mla_layers, kv_rank: int, qk_rope_dim: int, q_rank, out: str,
                calib_tokens: int = 2048, full_rank: bool = False) -> dict:
    model, tok = load_teacher(teacher)
    if full_rank:
        config = full_rank_mla_config(model.config)
    else:
        if mla_layers is None:
            raise ValueError("--mla-layers is required unless --full-rank is given")
        config = hybrid_config(model.config, mla_layers, kv_rank=kv_rank, qk_rope_dim=qk_rope_dim, q_rank=q_rank)
    calib = calibration_ids(tok, calib_tokens)
    student = convert(model, config, calib_ids=calib)
    errors = layer_init_errors(model, student, calib)
    Path(out).mkdir(parents=True, exist_ok=True)
    student.save_pretrained(out)
    tok.save_pretrained(out)
    return {
        "teacher": teacher,
        "out": str(out),
        "layers": [{"layer": i, "type": t, "init_error": e} for i, (t, e) in enumerate(zip(config.mixer_types, errors))],
        "teacher_kv_bytes_per_token": kv_bytes_per_token(model.config, torch.bfloat16),
        "student_kv_bytes_per_token": kv_bytes_per_token(config, torch.bfloat16),
        "kv_fraction": kv_fraction(config, model.config),
        "kv_dtype": "bfloat16",
    }
