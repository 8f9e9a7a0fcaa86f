"""Attention kernels for LongCat-Video's video self-attention (package ``longcat_kernels``)."""

from .dispatch import (
    block_selection,
    block_sparse_attention,
    dense_attention,
    masked_attention,
    triton_unsupported,
)
from .selection import BlockLayout, block_layout

__all__ = [
    "BlockLayout",
    "block_layout",
    "block_selection",
    "block_sparse_attention",
    "dense_attention",
    "masked_attention",
    "triton_unsupported",
]
