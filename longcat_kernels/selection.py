"""Block layout and block selection for block-sparse video self-attention.

The model hands attention its tokens in patch-grid order: token ``n = t * H * W + h * W + w`` of a
``[T, H, W]`` latent grid. Attention here works on *tiles*: 3D blocks of that grid. A tile is described
by the list of its token indices (``-1`` where a partial edge block has no token), so the kernels gather
rows directly from the caller's tensors; no permuted copy of q, k, v or the output is ever made, and grid
sizes that the block does not divide cost nothing but the padding slots of the edge tiles.

Image-to-video: the first ``num_cond_latents`` latent frames are the clean condition. They are tiled on
their own (a tile never mixes condition and noisy frames) and, because they are usually a single frame,
with a flatter block of about the same token count (``1x8x8`` instead of ``4x4x4``), so that keeping all
of them for every query wastes no tile slots on empty frames. Condition queries attend to the condition
keys only, all of them, as in the dense model; noisy queries attend to all condition tiles plus the top
``density`` fraction of the noisy tiles by pooled ``q . k`` score.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

Shape3 = tuple[int, int, int]


@dataclass(frozen=True)
class BlockLayout:
    """How the tokens of one latent grid are grouped into tiles; shared by every layer of a step."""

    tile_tokens: Tensor  # [n_tiles, tile] int32: token index of each slot, -1 for an empty slot
    token_tile: Tensor  # [num_tokens] int64: the tile that holds each token
    tile_counts: Tensor  # [n_tiles] float32: tokens per tile (the divisor of the pooled mean)
    num_cond_tiles: int  # the first num_cond_tiles tiles hold the condition frames

    @property
    def num_tiles(self) -> int:
        return self.tile_tokens.shape[0]

    @property
    def tile(self) -> int:
        return self.tile_tokens.shape[1]


def cond_block_shape(block: Shape3, num_cond_latents: int) -> Shape3:
    """Block for the condition frames: at most ``num_cond_latents`` deep, widened in h then w to keep
    about the token count of ``block`` (``(4, 4, 4)`` with one condition frame gives ``(1, 8, 8)``)."""
    bt, bh, bw = block
    depth = min(bt, num_cond_latents)
    # the power of two by which the block is shallower, split over h and w (h takes the odd factor)
    doublings = (bt // depth).bit_length() - 1
    return depth, bh << (doublings - doublings // 2), bw << (doublings // 2)


def _tile_segment(t0: int, t1: int, height: int, width: int, block: Shape3) -> Tensor:
    """Token indices [n_tiles, prod(block)] of frames [t0, t1) cut into ``block``s, -1 past the edges."""
    st, sh, sw = block
    nt, nh, nw = math.ceil((t1 - t0) / st), math.ceil(height / sh), math.ceil(width / sw)
    # [nt, nh, nw, st, sh, sw] coordinates of every slot of every tile
    t = t0 + (torch.arange(nt) * st).view(-1, 1, 1, 1, 1, 1) + torch.arange(st).view(1, 1, 1, -1, 1, 1)
    h = (torch.arange(nh) * sh).view(1, -1, 1, 1, 1, 1) + torch.arange(sh).view(1, 1, 1, 1, -1, 1)
    w = (torch.arange(nw) * sw).view(1, 1, -1, 1, 1, 1) + torch.arange(sw).view(1, 1, 1, 1, 1, -1)
    inside = (t < t1) & (h < height) & (w < width)
    tokens = torch.where(inside, (t * height + h) * width + w, -1)
    return tokens.reshape(nt * nh * nw, st * sh * sw)


def _segment_tiles(frames: int, height: int, width: int, block: Shape3) -> int:
    return math.ceil(frames / block[0]) * math.ceil(height / block[1]) * math.ceil(width / block[2])


def layout_size(latent_shape: Shape3, block: Shape3, num_cond_latents: int) -> tuple[int, int, int]:
    """``(num_tiles, tile, num_cond_tiles)`` of :func:`block_layout`, from the sizes alone: the custom op's
    fake implementation needs the output shapes without building (or, under fake tensors, being able to
    build) the index tables."""
    frames, height, width = latent_shape
    blocks = [tuple(block)]
    num_cond_tiles = 0
    if num_cond_latents:
        blocks.append(cond_block_shape(block, num_cond_latents))
        num_cond_tiles = _segment_tiles(num_cond_latents, height, width, blocks[-1])
    num_tiles = num_cond_tiles + _segment_tiles(frames - num_cond_latents, height, width, block)
    return num_tiles, 1 << (max(math.prod(b) for b in blocks) - 1).bit_length(), num_cond_tiles


@functools.lru_cache(maxsize=32)
def block_layout(
    latent_shape: Shape3, block: Shape3 = (4, 4, 4), num_cond_latents: int = 0, device: str = "cpu"
) -> BlockLayout:
    """Tiles of a ``latent_shape`` grid: condition frames first, then the noisy frames, each cut into
    blocks from its own first frame; edge blocks are partial. Cached: every layer asks for the same one."""
    frames, height, width = latent_shape
    if not 0 <= num_cond_latents < frames:
        raise ValueError(f"num_cond_latents={num_cond_latents} must be in [0, {frames})")
    segments = []
    if num_cond_latents:
        segments.append(
            _tile_segment(0, num_cond_latents, height, width, cond_block_shape(block, num_cond_latents))
        )
    segments.append(_tile_segment(num_cond_latents, frames, height, width, block))
    # The kernels need a power-of-two tile; unused slots are empty.
    tile = 1 << (max(s.shape[1] for s in segments) - 1).bit_length()
    tiles = torch.cat([torch.nn.functional.pad(s, (0, tile - s.shape[1]), value=-1) for s in segments])
    num_tokens = frames * height * width
    filled = tiles >= 0
    token_tile = torch.empty(num_tokens, dtype=torch.int64)
    token_tile[tiles[filled]] = torch.arange(tiles.shape[0]).unsqueeze(1).expand_as(tiles)[filled]
    num_cond_tiles = segments[0].shape[0] if num_cond_latents else 0
    return BlockLayout(
        tile_tokens=tiles.to(device=device, dtype=torch.int32),
        token_tile=token_tile.to(device),
        tile_counts=filled.sum(dim=1).to(device=device, dtype=torch.float32),
        num_cond_tiles=num_cond_tiles,
    )


def pool_tiles(x: Tensor, layout: BlockLayout) -> Tensor:
    """Mean of ``x`` [B, H, N, D] over the tokens of each tile -> [B, H, n_tiles, D] float32."""
    batch, heads, _, dim = x.shape
    sums = x.new_zeros(batch, heads, layout.num_tiles, dim, dtype=torch.float32)
    sums.index_add_(2, layout.token_tile, x.float())
    return sums / layout.tile_counts[:, None]


def num_selected(layout: BlockLayout, density: float) -> int:
    """Key tiles a noisy query tile attends to: the top ``density`` of the noisy tiles (at least one),
    plus every condition tile."""
    return selection_width(layout.num_tiles, layout.num_cond_tiles, density)


def selection_width(num_tiles: int, num_cond_tiles: int, density: float) -> int:
    """:func:`num_selected` from the tile counts alone (see :func:`layout_size`)."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    # floor, as the official kernel counts, so equal densities do equal work
    return num_cond_tiles + max(1, math.floor(density * (num_tiles - num_cond_tiles) + 1e-9))


def tile_scores(pooled_q: Tensor, pooled_k: Tensor) -> Tensor:
    """Pooled ``q . k`` of every (query tile, key tile) pair, [B, H, n_tiles, n_tiles] float32 even under
    autocast: the trainer runs in bf16 autocast, whose matmul would round scores (more ties in the top-k)
    and hand the Triton selection kernel a dtype it does not read."""
    with torch.autocast(pooled_q.device.type, enabled=False):
        return pooled_q.float() @ pooled_k.float().transpose(-1, -2)


def select_blocks(
    pooled_q: Tensor, pooled_k: Tensor, layout: BlockLayout, density: float
) -> tuple[Tensor, Tensor]:
    """Key tiles for every query tile from pooled q and k ([B, H, n_tiles, D]).

    Returns ``indices`` [B, H, n_tiles, K] int32 and ``counts`` [B, H, n_tiles] int32: query tile ``i``
    attends to key tiles ``indices[..., i, :counts[..., i]]`` (the rest of the row is unused). Condition
    query tiles keep exactly the condition key tiles; noisy query tiles keep the condition key tiles and
    the best-scoring noisy key tiles.
    """
    n_cond = layout.num_cond_tiles
    width = num_selected(layout, density)
    scores = tile_scores(pooled_q, pooled_k)
    if n_cond:
        scores[..., :, :n_cond] = math.inf  # condition keys: always kept
        scores[..., :n_cond, n_cond:] = -math.inf  # condition queries never see noisy keys
    # sorted=True puts the kept condition tiles first, so a condition row's valid prefix is exactly them
    indices = scores.topk(width, dim=-1, sorted=True).indices.to(torch.int32)
    counts = torch.full(indices.shape[:-1], width, dtype=torch.int32, device=indices.device)
    counts[..., :n_cond] = n_cond
    return indices, counts


def selection_mask(indices: Tensor, counts: Tensor, num_tiles: int) -> Tensor:
    """Boolean block mask [B, H, n_tiles, n_tiles] of a selection (True = query tile sees key tile)."""
    width = indices.shape[-1]
    used = torch.arange(width, device=indices.device) < counts.unsqueeze(-1)
    # unused entries land in an extra column that is cut off
    target = torch.where(used, indices.long(), num_tiles)
    mask = torch.zeros(*indices.shape[:-1], num_tiles + 1, dtype=torch.bool, device=indices.device)
    mask.scatter_(-1, target, True)
    return mask[..., :num_tiles]


def transpose_selection(indices: Tensor, counts: Tensor, num_tiles: int) -> tuple[Tensor, Tensor, Tensor]:
    """For each key tile, the query tiles that selected it (the backward pass walks it to build dk, dv).

    Returns CSR arrays over the flattened (batch * head, key tile) axis: ``query_tiles`` int32 (query
    tiles grouped by key tile, ascending within a group), ``starts`` and ``lengths`` int32
    [B * H * n_tiles]. One stable sort of int32 keys and a binary search; no host synchronisation.
    """
    batch, heads, n_query, width = indices.shape
    groups = batch * heads * num_tiles
    used = torch.arange(width, device=indices.device, dtype=torch.int32) < counts.unsqueeze(-1)
    head = torch.arange(batch * heads, device=indices.device, dtype=torch.int32).view(batch, heads, 1, 1)
    # unused entries get the key `groups`, which sorts after every real group
    key = torch.where(used, head * num_tiles + indices, groups).flatten()
    key, order = torch.sort(key, stable=True)
    bounds = torch.searchsorted(
        key, torch.arange(groups + 1, device=key.device, dtype=torch.int32), out_int32=True
    )
    # an entry's position in `indices` is ((b * H + h) * n_query + query) * width + slot
    query_tiles = (order // width % n_query).to(torch.int32)
    return query_tiles, bounds[:-1], bounds[1:] - bounds[:-1]
