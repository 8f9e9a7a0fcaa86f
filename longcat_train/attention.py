"""One entry point for every attention call in the DiT: torch SDPA, xformers, or block-sparse.

The model calls :func:`attention` with ``[B, H, N, D]`` tensors and names an implementation; this module
picks the kernel. Optional backends are imported lazily and fall back to SDPA with a one-time warning, so a
config that asks for ``xformers`` or ``block_sparse`` still runs on a machine without them.
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

AttentionImplementation = Literal["sdpa", "xformers", "block_sparse"]
IMPLEMENTATIONS: tuple[str, ...] = ("sdpa", "xformers", "block_sparse")


@functools.cache
def _xformers_attention() -> Callable[..., torch.Tensor] | None:
    try:
        import xformers.ops
    except ImportError:
        log.warning("attention_implementation='xformers' but xformers is not installed: using torch SDPA")
        return None
    return xformers.ops.memory_efficient_attention


@functools.cache
def _block_sparse_attention() -> Callable[..., torch.Tensor] | None:
    # Imported by name so that longcat_train does not require the kernels package to be importable.
    try:
        kernels = importlib.import_module("longcat_kernels")
        return kernels.block_sparse_attention
    except (ImportError, AttributeError) as err:
        log.warning("attention_implementation='block_sparse' unavailable (%s): using torch SDPA", err)
        return None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    implementation: AttentionImplementation = "sdpa",
    latent_shape: tuple[int, int, int] | None = None,
    num_cond_latents: int = 0,
    attn_mask: torch.Tensor | None = None,
    block_sparse_params: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Softmax attention ``softmax(q k^T / sqrt(D)) v``.

    Args:
        q: ``[B, H, Nq, D]``; k, v: ``[B, H, Nk, D]``. Any strides with a contiguous last dimension; the
            model passes transposed views of ``[B, N, H, D]`` projections, which flash kernels read directly.
        implementation: ``sdpa`` (torch chooses flash / cuDNN / efficient / math), ``xformers``, or
            ``block_sparse`` (``longcat_kernels``).
        latent_shape: ``(T, H, W)`` patch grid of the keys when this is video self-attention; the queries are
            the last ``Nq / (H * W)`` latent frames of that grid. Block-sparse attention needs it; calls
            without it (text cross-attention) always run dense.
        num_cond_latents: leading latent frames of the key grid that are the clean condition.
        attn_mask: boolean ``[B, 1, 1, Nk]`` (True = attend) or additive float mask; only SDPA takes masks,
            so a masked call always runs through SDPA.
        block_sparse_params: keyword arguments for the block-sparse kernel (block shape, sparsity).

    Returns:
        ``[B, H, Nq, D]``.
    """
    if (
        implementation == "block_sparse"
        and latent_shape is not None
        and latent_shape[0] > 1
        and attn_mask is None
    ):
        # A single-frame grid (an image, or the condition frame alone) is too small to be worth sparsifying.
        kernel = _block_sparse_attention()
        if kernel is not None:
            return kernel(
                q,
                k,
                v,
                latent_shape=latent_shape,
                num_cond_latents=num_cond_latents,
                **(block_sparse_params or {}),
            )
    elif implementation == "xformers" and attn_mask is None:
        kernel = _xformers_attention()
        if kernel is not None:
            # xformers takes [B, N, H, D]: the transposes are views back to the projection layout.
            out = kernel(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            return out.transpose(1, 2)
    elif implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attention implementation {implementation!r}; choose one of {IMPLEMENTATIONS}"
        )
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
