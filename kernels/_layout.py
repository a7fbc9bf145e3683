"""Layout helpers the row-wise kernels share (norm, kd_loss, token_l2): rows with unit stride, and the tile that
holds whole rows."""
from __future__ import annotations

import torch
import triton

ROW_TILE = 4096  # elements per [BLOCK_M, BLOCK_N] tile of the whole-row kernels


def unit_stride_rows(t: torch.Tensor) -> torch.Tensor:
    """t [m, dim] with unit stride along dim (a copy only when t lacks it); any row stride is kept."""
    return t if t.stride(-1) == 1 else t.contiguous()


def row_blocks(dim: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of a tile of whole rows of `dim` elements: BLOCK_N = next_power_of_2(dim), and as many
    rows (1 to 32) as ROW_TILE elements hold."""
    block_n = triton.next_power_of_2(dim)
    return max(1, min(32, ROW_TILE // block_n)), block_n
