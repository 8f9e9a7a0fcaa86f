"""Attention entry points for the video self-attention: block-sparse (Triton or a dense masked
equivalent) and dense."""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .selection import BlockLayout, Shape3, block_layout, pool_tiles, select_blocks, selection_mask

Implementation = Literal["auto", "triton", "torch"]


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_supported(q: Tensor) -> bool:
    """Whether the Triton kernels run on this input: CUDA Ampere or newer, fp16/bf16, head dim 16..128."""
    return (
        q.is_cuda
        and _triton_available()
        and torch.cuda.get_device_capability(q.device) >= (8, 0)
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[-1] in (16, 32, 64, 128)
    )


def _check_grid(latent_shape: Shape3, q: Tensor, *others: Tensor) -> None:
    """q (and k, v) must be the self-attention of the whole grid: one shape, T * H * W tokens."""
    if any(x.shape != q.shape for x in others):
        # the kernels index k and v with q's token layout: one call covers the whole sequence
        shapes = ", ".join(str(tuple(x.shape)) for x in (q, *others))
        raise ValueError(f"q, k, v must have one shape, got {shapes}")
    if math.prod(latent_shape) != q.shape[2]:
        raise ValueError(
            f"latent_shape {latent_shape} has {math.prod(latent_shape)} tokens, q has {q.shape[2]}"
        )


def dense_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    latent_shape: Shape3,
    *,
    num_cond_latents: int = 0,
    scale: float | None = None,
) -> Tensor:
    """Full attention [B, H, N, D] through torch SDPA (flash / cuDNN / efficient kernels on CUDA).

    With ``num_cond_latents`` the condition tokens (a prefix of ``num_cond_latents * H * W`` tokens)
    attend to the condition tokens only, and the noisy tokens to everything.
    """
    _check_grid(latent_shape, q, k, v)
    cond = num_cond_latents * latent_shape[1] * latent_shape[2]
    if not cond:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    out_cond = F.scaled_dot_product_attention(q[:, :, :cond], k[:, :, :cond], v[:, :, :cond], scale=scale)
    out_noisy = F.scaled_dot_product_attention(q[:, :, cond:], k, v, scale=scale)
    return torch.cat([out_cond, out_noisy], dim=2)


def masked_attention(
    q: Tensor, k: Tensor, v: Tensor, layout: BlockLayout, indices: Tensor, counts: Tensor, scale: float
) -> Tensor:
    """Dense SDPA under the token mask of a block selection: the reference the kernels must match.
    Builds a [B, H, N, N] mask, so it is meant for CPU and small inputs."""
    tiles = selection_mask(indices, counts, layout.num_tiles)  # [B, H, n_tiles, n_tiles]
    token_tile = layout.token_tile
    mask = tiles[:, :, token_tile][:, :, :, token_tile]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def block_selection(
    q: Tensor,
    k: Tensor,
    latent_shape: Shape3,
    *,
    density: float = 1 / 16,
    block: Shape3 = (4, 4, 4),
    num_cond_latents: int = 0,
    use_triton: bool = False,
) -> tuple[BlockLayout, Tensor, Tensor]:
    """The layout and the selection (``indices`` [B, H, n_tiles, K], ``counts`` [B, H, n_tiles]) that
    ``block_sparse_attention`` uses for these q and k."""
    _check_grid(latent_shape, q, k)
    layout = block_layout(tuple(latent_shape), tuple(block), num_cond_latents, str(q.device))
    with torch.no_grad():
        if use_triton:
            from .block_sparse import pool_tiles_triton, select_blocks_triton

            indices, counts = select_blocks_triton(*pool_tiles_triton(q, k, layout), layout, density)
        else:
            indices, counts = select_blocks(pool_tiles(q, layout), pool_tiles(k, layout), layout, density)
    return layout, indices, counts


def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    latent_shape: Shape3,
    *,
    density: float = 1 / 16,
    block: Shape3 = (4, 4, 4),
    num_cond_latents: int = 0,
    scale: float | None = None,
    implementation: Implementation = "auto",
) -> Tensor:
    """Block-sparse self-attention over a video patch grid; q, k, v [B, H, N, D] in the model's token
    order (t, h, w), N = T * H * W of ``latent_shape``; returns [B, H, N, D].

    Tokens are grouped into ``block``-shaped tiles (partial at the grid's edges). Each query tile
    attends to the ``density`` fraction of key tiles with the highest pooled ``q . k`` score (at least
    one). With ``num_cond_latents`` (image-to-video) the condition frames are tiled apart, condition
    queries attend to all condition keys and nothing else, and every noisy query tile also keeps all
    condition tiles; so call this once with the full sequence, not once per part.

    ``implementation``: "triton" (CUDA, Ampere or newer), "torch" (dense SDPA under the same block
    mask: same result, any device, N x N memory) or "auto" (Triton where supported, else torch).
    """
    if implementation not in ("auto", "triton", "torch"):
        raise ValueError(f"unknown implementation {implementation!r}")
    _check_grid(latent_shape, q, k, v)
    use_triton = implementation == "triton" or (implementation == "auto" and triton_supported(q))
    if implementation == "triton" and not triton_supported(q):
        raise RuntimeError("the Triton kernel needs CUDA (sm80+), triton, fp16/bf16 and head dim 16..128")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    layout, indices, counts = block_selection(
        q,
        k,
        latent_shape,
        density=density,
        block=block,
        num_cond_latents=num_cond_latents,
        use_triton=use_triton,
    )
    if not use_triton:
        return masked_attention(q, k, v, layout, indices, counts, scale)
    from .block_sparse import CONFIGS, BlockSparseAttention

    return BlockSparseAttention.apply(q, k, v, layout, indices, counts, scale, CONFIGS)
