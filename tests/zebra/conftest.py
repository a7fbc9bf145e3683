"""Fixtures of the zebra tests."""
import pytest
import torch

from zebra.convert import convert, hybrid_config


@pytest.fixture
def hybrid(teacher64):
    """teacher64's hybrid with MLA layers 1 and 2, Mamba2 layers 0 and 3 (a module that needs another layout
    defines its own `hybrid`)."""
    cfg = hybrid_config(teacher64.config, [1, 2], kv_rank=24, qk_rope_dim=8, chunk_size=4)
    return convert(teacher64, cfg, calib_ids=torch.randint(0, 256, (2, 16)))
