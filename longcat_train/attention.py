"""One entry point for every attention call in the DiT: torch SDPA, xformers, or block-sparse.

The model calls :func:`attention` with ``[B, H, N, D]`` tensors and names an implementation; this module
picks the kernel. Optional backends are imported lazily and fall back to SDPA with a one-time warning, so a
config that asks for ``xformers`` or ``block_sparse`` still runs on a machine without them.
"""

from __future__ import annotations

import functools
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


# Resolved at import, not on first call: torch.compile cannot trace an import (or a log call) inside the
# compiled block step, and the kernels package is optional, so a failed import only selects the fallback.
_BLOCK_SPARSE: Callable[..., torch.Tensor] | None
try:
    from longcat_kernels import block_sparse_attention as _BLOCK_SPARSE

    _BLOCK_SPARSE_MISSING = ""
except ImportError as err:
    _BLOCK_SPARSE = None
    _BLOCK_SPARSE_MISSING = str(err)


@functools.cache
def warn_if_unavailable(implementation: str) -> None:
    """Warn once that ``implementation`` falls back to SDPA here. Called eagerly by :func:`attention` and by
    ``LongCatVideoTransformer.compile_blocks`` (a compiled block cannot log)."""
    if implementation == "block_sparse" and _BLOCK_SPARSE is None:
        log.warning(
            "attention_implementation='block_sparse' unavailable (%s): using torch SDPA",
            _BLOCK_SPARSE_MISSING,
        )


def _dense(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, implementation: str, attn_mask: torch.Tensor | None
) -> torch.Tensor:
    if implementation == "xformers" and attn_mask is None:
        kernel = _xformers_attention()
        if kernel is not None:
            # xformers takes [B, N, H, D]: the transposes are views back to the projection layout.
            return kernel(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


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
    """Softmax attention ``softmax(q k^T / sqrt(D)) v``; for video self-attention, with the I2V rule.

    Args:
        q: ``[B, H, Nq, D]``; k, v: ``[B, H, Nk, D]``. Any strides with a contiguous last dimension; the
            model passes transposed views of ``[B, N, H, D]`` projections, which flash kernels read directly.
        implementation: ``sdpa`` (torch chooses flash / cuDNN / efficient / math), ``xformers``, or
            ``block_sparse`` (``longcat_kernels``; video self-attention over more than one frame only).
        latent_shape: ``(T, H, W)`` patch grid when this is video self-attention (q, k, v are all
            ``T * H * W`` tokens in (t, h, w) order). None for text cross-attention, which is always dense.
        num_cond_latents: with ``latent_shape``: the leading latent frames that are the clean condition.
            Their tokens attend only to condition tokens; noisy tokens attend to every token. The rule is
            applied here rather than by the caller because the block-sparse kernel tiles the whole
            sequence in one call.
        attn_mask: boolean ``[B, 1, 1, Nk]`` (True = attend); masked calls run through SDPA.
        block_sparse_params: keyword arguments for ``longcat_kernels.block_sparse_attention``
            (``density``, ``block``).

    Returns:
        ``[B, H, Nq, D]``; for video self-attention laid out in memory as ``[B, N, H, D]``, so that the
        caller's transpose-and-flatten to ``[B, N, H * D]`` is free.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attention implementation {implementation!r}; choose one of {IMPLEMENTATIONS}"
        )
    if latent_shape is None:
        return _dense(q, k, v, implementation, attn_mask)
    # The official model runs images (a single latent frame) densely even with block-sparse enabled.
    if implementation == "block_sparse" and latent_shape[0] > 1:
        if _BLOCK_SPARSE is None and not torch.compiler.is_compiling():
            warn_if_unavailable(implementation)
        if _BLOCK_SPARSE is not None:
            return _BLOCK_SPARSE(
                q,
                k,
                v,
                latent_shape=latent_shape,
                num_cond_latents=num_cond_latents,
                **(block_sparse_params or {}),
            )
    if not num_cond_latents:
        return _dense(q, k, v, implementation, None)
    n = num_cond_latents * latent_shape[1] * latent_shape[2]
    out_cond = _dense(q[:, :, :n], k[:, :, :n], v[:, :, :n], implementation, None)  # condition -> condition
    out_noisy = _dense(q[:, :, n:], k, v, implementation, None)  # noisy -> everything
    # Joined along tokens in [B, N, H, D] memory order, handed back as a [B, H, N, D] view.
    return torch.cat([out_cond.transpose(1, 2), out_noisy.transpose(1, 2)], dim=1).transpose(1, 2)
