"""One entry point for every attention call in the DiT, and the table of kernels it can run.

The model calls :func:`attention` with ``[B, H, N, D]`` tensors and names a backend of :data:`BACKENDS`
(the names of ``longcat_train.architecture.ATTENTION_BACKENDS``); the backend's functions compute it.
Optional backends are imported lazily and fall back to SDPA with a one-time warning, so a config that asks
for ``xformers`` or ``block_sparse`` still runs on a machine without them.

Each backend also names the dispatcher ops its kernels run as (:attr:`AttentionBackend.saved_ops`):
selective activation checkpointing (``longcat_train.block_step``) keeps the outputs of exactly these, so a
backend whose ops are not declared here would silently have its attention recomputed in backward.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from longcat_train.architecture import ATTENTION_BACKENDS

log = logging.getLogger(__name__)

# q, k, v [B, H, N, D] -> [B, H, Nq, D]: unmasked dense attention.
DenseKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# q, k, v, latent_shape, num_cond_latents, kernel keyword arguments -> [B, H, N, D]: video self-attention
# over the whole sequence with the image-to-video rule applied inside.
VideoKernel = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int, int], int, Mapping[str, Any]], torch.Tensor
]


@dataclass(frozen=True)
class AttentionBackend:
    """One attention kernel choice.

    Attributes:
        dense: unmasked dense attention (text cross-attention, and video self-attention in its two parts:
            condition -> condition, noisy -> everything).
        video: video self-attention over the whole token sequence at once, for a kernel that tiles it
            (None: :attr:`dense` runs the two parts). Images (one latent frame) always run densely, as in
            the official model.
        saved_ops: the forward ops the kernels dispatch to, as ``str(op)`` (``namespace.name.overload``),
            each with the dimension of its query and key arguments that counts tokens. Selective
            checkpointing keeps an op's outputs when its keys are at least as many as its queries: video
            self-attention (queries a subset of the video tokens, keys all of them), not the cross-
            attention of many video tokens against a short text.
    """

    dense: DenseKernel
    video: VideoKernel | None
    saved_ops: Mapping[str, int]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


# What F.scaled_dot_product_attention dispatches to on CUDA (flash, efficient, cuDNN) and on the CPU; masked
# calls and every fallback run through it, so every backend keeps these. q and k are [B, H, N, D].
_SDPA_OPS = {
    "aten._scaled_dot_product_flash_attention.default": -2,
    "aten._scaled_dot_product_efficient_attention.default": -2,
    "aten._scaled_dot_product_cudnn_attention.default": -2,
    "aten._scaled_dot_product_flash_attention_for_cpu.default": -2,
}


@functools.cache
def _xformers_attention() -> Callable[..., torch.Tensor] | None:
    try:
        import xformers.ops
    except ImportError:
        log.warning("attention_implementation='xformers' but xformers is not installed: using torch SDPA")
        return None
    return xformers.ops.memory_efficient_attention


def _xformers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    kernel = _xformers_attention()
    if kernel is None:
        return _sdpa(q, k, v)
    # xformers takes [B, N, H, D]: the transposes are views back to the projection layout.
    return kernel(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


# The forward ops xformers.ops.memory_efficient_attention dispatches to in training (its autograd function
# runs the chosen operator's OPERATOR), q and k [B, N, H, D]: FlashAttention-2 and -3 as xformers registers
# them, CUTLASS through PyTorch's own kernel (xformers 0.0.29 on) or xformers' build of it (before), and
# Composable Kernel on ROCm.
_XFORMERS_OPS = {
    "xformers_flash.flash_fwd.default": 1,
    "xformers_flash3.flash_fwd.default": 1,
    "aten._efficient_attention_forward.default": 1,
    "xformers.efficient_attention_forward_cutlass.default": 1,
    "xformers.efficient_attention_forward_ck.default": 1,
}

# Resolved at import, not on first call: torch.compile cannot trace an import (or a log call) inside the
# compiled block step, and the kernels package is optional, so a failed import only selects the fallback.
_BLOCK_SPARSE: Callable[..., torch.Tensor] | None
try:
    from longcat_kernels import block_sparse_attention as _BLOCK_SPARSE

    _BLOCK_SPARSE_MISSING = ""
except ImportError as err:
    _BLOCK_SPARSE = None
    _BLOCK_SPARSE_MISSING = str(err)


def block_sparse_kernel_missing(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why ``block_sparse`` would not run as its Triton kernel for attention on this device in this dtype
    (None: it would). Elsewhere it falls back to a path that is exact but takes N x N memory (or, without
    the package, to SDPA): fine for tests, not for a 720p video."""
    if _BLOCK_SPARSE is None:
        return f"longcat_kernels cannot be imported ({_BLOCK_SPARSE_MISSING})"
    from longcat_kernels import triton_unsupported

    return triton_unsupported(device, dtype, head_dim)


@functools.cache
def warn_if_unavailable(implementation: str) -> None:
    """Warn once that ``implementation`` falls back to SDPA here. Called eagerly by :func:`attention` and by
    ``LongCatVideoTransformer.compile_blocks`` (a compiled block cannot log)."""
    if implementation == "block_sparse" and _BLOCK_SPARSE is None:
        log.warning(
            "attention_implementation='block_sparse' unavailable (%s): using torch SDPA",
            _BLOCK_SPARSE_MISSING,
        )


def _block_sparse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    latent_shape: tuple[int, int, int],
    num_cond_latents: int,
    params: Mapping[str, Any],
) -> torch.Tensor:
    if _BLOCK_SPARSE is None:
        if not torch.compiler.is_compiling():
            warn_if_unavailable("block_sparse")
        return _condition_split(_sdpa, q, k, v, latent_shape, num_cond_latents)
    return _BLOCK_SPARSE(q, k, v, latent_shape=latent_shape, num_cond_latents=num_cond_latents, **params)


BACKENDS: dict[str, AttentionBackend] = {
    "sdpa": AttentionBackend(dense=_sdpa, video=None, saved_ops=_SDPA_OPS),
    "xformers": AttentionBackend(dense=_xformers, video=None, saved_ops={**_SDPA_OPS, **_XFORMERS_OPS}),
    # longcat_kernels runs as one custom op (selection and kernels inside), q and k [B, H, N, D].
    "block_sparse": AttentionBackend(
        dense=_sdpa,
        video=_block_sparse,
        saved_ops={**_SDPA_OPS, "longcat.block_sparse_attention.default": -2},
    ),
}

if tuple(BACKENDS) != ATTENTION_BACKENDS:
    raise RuntimeError(
        f"longcat_train.attention implements {tuple(BACKENDS)} but longcat_train.architecture.ATTENTION_BACKENDS "
        f"names {ATTENTION_BACKENDS}: make them the same"
    )

# Every backend's ops together: only the backend in use dispatches its own, so selective checkpointing
# can match against all of them without knowing which one runs.
SAVED_OPS: dict[str, int] = {name: dim for b in BACKENDS.values() for name, dim in b.saved_ops.items()}


def backend(implementation: str) -> AttentionBackend:
    """The backend named ``implementation``; ValueError naming the choices for any other name."""
    try:
        return BACKENDS[implementation]
    except KeyError:
        raise ValueError(
            f"unknown attention implementation {implementation!r}; choose one of {tuple(BACKENDS)}"
        ) from None


def _condition_split(
    dense: DenseKernel,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    latent_shape: tuple[int, int, int],
    num_cond_latents: int,
) -> torch.Tensor:
    """Video self-attention with the image-to-video rule, as dense calls."""
    if not num_cond_latents:
        return dense(q, k, v)
    n = num_cond_latents * latent_shape[1] * latent_shape[2]
    out_cond = dense(q[:, :, :n], k[:, :, :n], v[:, :, :n])  # condition -> condition
    out_noisy = dense(q[:, :, n:], k, v)  # noisy -> everything
    # Joined along tokens in [B, N, H, D] memory order, handed back as a [B, H, N, D] view.
    return torch.cat([out_cond.transpose(1, 2), out_noisy.transpose(1, 2)], dim=1).transpose(1, 2)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    implementation: str = "sdpa",
    latent_shape: tuple[int, int, int] | None = None,
    num_cond_latents: int = 0,
    attn_mask: torch.Tensor | None = None,
    block_sparse_params: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """Softmax attention ``softmax(q k^T / sqrt(D)) v``; for video self-attention, with the I2V rule.

    Args:
        q: ``[B, H, Nq, D]``; k, v: ``[B, H, Nk, D]``. Any strides with a contiguous last dimension; the
            model passes transposed views of ``[B, N, H, D]`` projections, which flash kernels read directly.
        implementation: a name of :data:`BACKENDS`: ``sdpa`` (torch chooses flash / cuDNN / efficient /
            math), ``xformers``, or ``block_sparse`` (``longcat_kernels``; video self-attention over more
            than one frame only).
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
    chosen = backend(implementation)
    if attn_mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    if latent_shape is None:
        return chosen.dense(q, k, v)
    # The official model runs images (a single latent frame) densely even with block-sparse enabled.
    if chosen.video is not None and latent_shape[0] > 1:
        return chosen.video(q, k, v, latent_shape, num_cond_latents, block_sparse_params or {})
    return _condition_split(chosen.dense, q, k, v, latent_shape, num_cond_latents)
