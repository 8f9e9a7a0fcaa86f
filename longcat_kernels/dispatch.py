"""Attention entry points for the video self-attention: block-sparse (Triton or a dense masked
equivalent) and dense."""

from __future__ import annotations

import functools
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .selection import (
    BlockLayout,
    Shape3,
    block_layout,
    layout_size,
    pool_tiles,
    select_blocks,
    selection_mask,
    selection_width,
)

Implementation = Literal["auto", "triton", "torch"]


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_unsupported(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why the Triton kernels cannot run on inputs of this device, dtype and head dim; None when they can
    (CUDA Ampere or newer, fp16/bf16, head dim 16..128)."""
    if device.type != "cuda":
        return f"the inputs are on {device.type}, the kernels run on CUDA"
    if not _triton_available():
        return "triton is not installed"
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 0):
        return f"GPU compute capability {capability[0]}.{capability[1]}, the kernels need 8.0 or newer"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"{str(dtype).removeprefix('torch.')} inputs, the kernels take float16 or bfloat16"
    if head_dim not in (16, 32, 64, 128):
        return f"head dim {head_dim}, the kernels take 16, 32, 64 or 128"
    return None


def triton_supported(q: Tensor) -> bool:
    """Whether the Triton kernels run on this input (:func:`triton_unsupported` names why not)."""
    return triton_unsupported(q.device, q.dtype, q.shape[-1]) is None


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


def _masked_attention_backward(
    grad: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    layout: BlockLayout,
    indices: Tensor,
    counts: Tensor,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`masked_attention` in float32, written out: a custom op's backward runs below
    autograd, so it cannot differentiate the forward again. N x N memory, like the forward."""
    tiles = selection_mask(indices, counts, layout.num_tiles)
    allowed = tiles[:, :, layout.token_tile][:, :, :, layout.token_tile]
    q32, k32, v32, do, o = (x.float() for x in (q, k, v, grad, out))
    # every query tile keeps at least one key tile, so no row is fully masked
    p = torch.softmax((q32 @ k32.transpose(-1, -2) * scale).masked_fill(~allowed, -math.inf), dim=-1)
    ds = p * (do @ v32.transpose(-1, -2) - (do * o).sum(-1, keepdim=True))
    dq, dk, dv = (ds @ k32) * scale, (ds.transpose(-1, -2) @ q32) * scale, p.transpose(-1, -2) @ do
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


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
    order (t, h, w), N = T * H * W of ``latent_shape``; returns [B, H, N, D] laid out as [B, N, H, D].

    Tokens are grouped into ``block``-shaped tiles (partial at the grid's edges). Each query tile
    attends to the ``density`` fraction of key tiles with the highest pooled ``q . k`` score (at least
    one). With ``num_cond_latents`` (image-to-video) the condition frames are tiled apart, condition
    queries attend to all condition keys and nothing else, and every noisy query tile also keeps all
    condition tiles; so call this once with the full sequence, not once per part.

    ``implementation``: "triton" (CUDA, Ampere or newer), "torch" (dense SDPA under the same block
    mask: same result, any device, N x N memory) or "auto" (Triton where supported, else torch).

    Runs as the custom op ``torch.ops.longcat.block_sparse_attention``, which torch.compile treats as
    one opaque call (selection and kernels included) and selective checkpointing can keep.
    """
    if implementation not in ("auto", "triton", "torch"):
        raise ValueError(f"unknown implementation {implementation!r}")
    out, *_ = _block_sparse_op(
        q, k, v, list(latent_shape), list(block), num_cond_latents, density, scale, implementation
    )
    return out


def _use_triton(q: Tensor, implementation: str) -> bool:
    if implementation == "triton" and not triton_supported(q):
        reason = triton_unsupported(q.device, q.dtype, q.shape[-1])
        raise RuntimeError(f"the Triton kernel cannot run here: {reason}")
    return implementation == "triton" or (implementation == "auto" and triton_supported(q))


def _rows_major(x: Tensor) -> Tensor:
    """``x`` [B, H, N, D] as a [B, H, N, D] view of [B, N, H, D] memory: the Triton output's layout, which
    the torch path copies so that both paths (and the fake) have one set of strides."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def _refuse_a_second_copy() -> None:
    """Registering a custom op a second time frees the first registration while the first copy of this
    module still calls it: later calls then read freed memory (errors such as ``vector::reserve`` or
    ``std::bad_alloc``, or a crash, far from the cause). A second copy is this file imported under
    another module name, as when a folder on ``sys.path`` shadows a package of the same name."""
    if hasattr(torch.ops.longcat, "block_sparse_attention"):
        raise ImportError(
            f"{__name__} ({__file__}): the custom op longcat::block_sparse_attention is already "
            "registered by another copy of longcat_kernels in this process; import it once, as "
            "longcat_kernels (is a second checkout, or a folder of that name, on sys.path?)"
        )


_refuse_a_second_copy()


# Outputs: the attention output and what the backward needs: the base-2 log-sum-exp per tile slot
# ([B, H, n_tiles, tile] float32; empty on the torch path, whose backward does not use it), and the
# selection (indices [B, H, n_tiles, K], counts [B, H, n_tiles], int32).
@torch.library.custom_op("longcat::block_sparse_attention", mutates_args=())
def _block_sparse_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    latent_shape: list[int],
    block: list[int],
    num_cond_latents: int,
    density: float,
    scale: float | None,
    implementation: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    use_triton = _use_triton(q, implementation)
    layout, indices, counts = block_selection(
        q,
        k,
        tuple(latent_shape),
        density=density,
        block=tuple(block),
        num_cond_latents=num_cond_latents,
        use_triton=use_triton,
    )
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if not use_triton:
        out = _rows_major(masked_attention(q, k, v, layout, indices, counts, scale))
        return out, q.new_empty(0, dtype=torch.float32), indices, counts
    from .block_sparse import CONFIGS, _rows_last, sparse_forward

    out, lse = sparse_forward(
        _rows_last(q), _rows_last(k), _rows_last(v), layout, indices, counts, scale, CONFIGS["fwd"]
    )
    return out, lse, indices, counts


@_block_sparse_op.register_fake
def _(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    latent_shape: list[int],
    block: list[int],
    num_cond_latents: int,
    density: float,
    scale: float | None,
    implementation: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_grid(tuple(latent_shape), q, k, v)
    batch, heads, tokens, dim = q.shape
    num_tiles, tile, num_cond_tiles = layout_size(tuple(latent_shape), tuple(block), num_cond_latents)
    width = selection_width(num_tiles, num_cond_tiles, density)
    out = q.new_empty(batch, tokens, heads, dim).transpose(1, 2)
    lse_shape = (batch, heads, num_tiles, tile) if _use_triton(q, implementation) else (0,)
    lse = q.new_empty(lse_shape, dtype=torch.float32)
    indices = q.new_empty(batch, heads, num_tiles, width, dtype=torch.int32)
    counts = q.new_empty(batch, heads, num_tiles, dtype=torch.int32)
    return out, lse, indices, counts


@torch.library.custom_op("longcat::block_sparse_attention_backward", mutates_args=())
def _block_sparse_backward_op(
    grad: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    indices: Tensor,
    counts: Tensor,
    latent_shape: list[int],
    block: list[int],
    num_cond_latents: int,
    scale: float | None,
    use_triton: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    layout = block_layout(tuple(latent_shape), tuple(block), num_cond_latents, str(q.device))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if not use_triton:
        return _masked_attention_backward(grad, q, k, v, out, layout, indices, counts, scale)
    from .block_sparse import CONFIGS, _rows_last, sparse_backward

    q, k, v = _rows_last(q), _rows_last(k), _rows_last(v)
    return sparse_backward(grad, q, k, v, out, lse, layout, indices, counts, scale, CONFIGS)


@_block_sparse_backward_op.register_fake
def _(
    grad: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    indices: Tensor,
    counts: Tensor,
    latent_shape: list[int],
    block: list[int],
    num_cond_latents: int,
    scale: float | None,
    use_triton: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    q, k, v, latent_shape, block, num_cond_latents, _, scale, implementation = inputs
    out, lse, indices, counts = output
    ctx.save_for_backward(q, k, v, out, lse, indices, counts)
    ctx.grid = (latent_shape, block, num_cond_latents, scale)
    ctx.use_triton = _use_triton(q, implementation)


def _backward(ctx: Any, grad: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
    q, k, v, out, lse, indices, counts = ctx.saved_tensors
    dq, dk, dv = _block_sparse_backward_op(
        grad, q, k, v, out, lse, indices, counts, *ctx.grid, ctx.use_triton
    )
    # the selection parameters get no gradient, and the selection itself is computed without one
    return dq, dk, dv, None, None, None, None, None, None


_block_sparse_op.register_autograd(_backward, setup_context=_setup_context)
