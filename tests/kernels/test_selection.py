"""Block layout and block selection on CPU, checked against brute force written from the definitions."""

import math

import pytest
import torch

from longcat_kernels.selection import (
    block_layout,
    cond_block_shape,
    num_selected,
    pool_tiles,
    select_blocks,
    selection_mask,
    tile_scores,
    transpose_selection,
)


def brute_tiles(shape, block, cond):
    """Tile index of every token, from the definition: condition frames cut by the condition block, the
    rest by `block` starting at frame `cond`; tiles numbered condition first, each part t, h, w major."""
    frames, height, width = shape
    cblock = cond_block_shape(block, cond) if cond else None
    keys = []
    for t in range(frames):
        for h in range(height):
            for w in range(width):
                if t < cond:
                    keys.append((0, t // cblock[0], h // cblock[1], w // cblock[2]))
                else:
                    keys.append((1, (t - cond) // block[0], h // block[1], w // block[2]))
    numbering = {key: i for i, key in enumerate(sorted(set(keys)))}
    return torch.tensor([numbering[key] for key in keys])


GRIDS = [
    ((24, 30, 52), (4, 4, 4), 0),
    ((24, 30, 52), (4, 4, 4), 1),
    ((5, 7, 9), (4, 4, 4), 2),
    ((3, 8, 8), (2, 4, 4), 0),
]


@pytest.mark.parametrize(("shape", "block", "cond"), GRIDS)
def test_layout_matches_definition(shape, block, cond):
    layout = block_layout(shape, block, cond)
    expected = brute_tiles(shape, block, cond)
    assert torch.equal(layout.token_tile, expected)
    assert layout.num_tiles == int(expected.max()) + 1
    filled = layout.tile_tokens >= 0
    # every token sits in exactly one slot
    assert torch.equal(
        layout.tile_tokens[filled].sort().values, torch.arange(math.prod(shape), dtype=torch.int32)
    )
    assert torch.equal(layout.tile_counts, filled.sum(1).float())
    assert layout.num_cond_tiles == (int(expected[cond * shape[1] * shape[2] - 1]) + 1 if cond else 0)


def test_partial_edge_blocks_of_480x832():
    layout = block_layout((24, 30, 52))  # 30 = 7 * 4 + 2 patch rows: the grid the official kernel refuses
    assert layout.num_tiles == 6 * 8 * 13 and layout.tile == 64
    counts = layout.tile_counts.view(6, 8, 13)
    assert (counts[:, :7] == 64).all() and (counts[:, 7] == 32).all()


def test_condition_tiles_are_flat_and_never_mix_frames():
    frames, height, width = 24, 30, 52
    layout = block_layout((frames, height, width), (4, 4, 4), 1)
    assert cond_block_shape((4, 4, 4), 1) == (1, 8, 8)
    assert layout.num_cond_tiles == 4 * 7
    frame_of = torch.where(layout.tile_tokens >= 0, layout.tile_tokens // (height * width), -1)
    cond_tiles = frame_of[: layout.num_cond_tiles]
    assert ((cond_tiles == 0) | (cond_tiles == -1)).all()
    assert (frame_of[layout.num_cond_tiles :] != 0).all()


def test_permutation_round_trip():
    layout = block_layout((5, 6, 7), (4, 4, 4), 1)
    x = torch.randn(2, 3, 5 * 6 * 7, 8)
    rows = layout.tile_tokens.long()
    tiled = x[:, :, rows.clamp(min=0)] * (rows >= 0)[..., None]  # [B, H, n_tiles, tile, D]
    back = torch.empty_like(x)
    back[:, :, rows[rows >= 0]] = tiled[:, :, rows >= 0]
    assert torch.equal(back, x)


def test_pooling_is_the_mean_of_each_tile():
    shape = (5, 6, 7)
    layout = block_layout(shape, (4, 4, 4), 1)
    x = torch.randn(2, 3, math.prod(shape), 8)
    tile_of = brute_tiles(shape, (4, 4, 4), 1)
    expected = torch.stack([x[:, :, tile_of == i].mean(2) for i in range(layout.num_tiles)], dim=2)
    torch.testing.assert_close(pool_tiles(x, layout), expected)


@pytest.mark.parametrize(("density", "expected"), [(1 / 16, 39), (1.0, 624), (1e-6, 1), (0.5, 312)])
def test_density_counts(density, expected):
    layout = block_layout((24, 30, 52))
    assert num_selected(layout, density) == expected
    layout = block_layout((24, 30, 52), (4, 4, 4), 1)
    assert num_selected(layout, density) == layout.num_cond_tiles + expected


@pytest.mark.parametrize("density", [0.0, 1.5])
def test_density_out_of_range(density):
    with pytest.raises(ValueError):
        num_selected(block_layout((4, 4, 4)), density)


@pytest.mark.parametrize("cond", [0, 1, 2])
def test_topk_matches_brute_force(cond):
    torch.manual_seed(cond)
    shape, density = (9, 10, 11), 0.2
    layout = block_layout(shape, (4, 4, 4), cond)
    q, k = torch.randn(2, 2, math.prod(shape), 16), torch.randn(2, 2, math.prod(shape), 16)
    pq, pk = pool_tiles(q, layout), pool_tiles(k, layout)
    indices, counts = select_blocks(pq, pk, layout, density)
    n_cond, n = layout.num_cond_tiles, layout.num_tiles
    top = max(1, math.floor(density * (n - n_cond)))
    for b in range(2):
        for h in range(2):
            for i in range(n):
                chosen = set(indices[b, h, i, : counts[b, h, i]].tolist())
                assert len(chosen) == counts[b, h, i]
                if i < n_cond:
                    assert chosen == set(range(n_cond))
                    continue
                scores = [float(pq[b, h, i] @ pk[b, h, j]) for j in range(n_cond, n)]
                best = sorted(range(n - n_cond), key=lambda j: -scores[j])[:top]
                assert chosen == set(range(n_cond)) | {n_cond + j for j in best}


def test_selection_mask_and_transpose():
    torch.manual_seed(0)
    layout = block_layout((9, 10, 11), (4, 4, 4), 1)
    n = layout.num_tiles
    pq, pk = torch.randn(2, 3, n, 8), torch.randn(2, 3, n, 8)
    indices, counts = select_blocks(pq, pk, layout, 0.3)
    mask = selection_mask(indices, counts, n)
    assert torch.equal(mask.sum(-1), counts.long())
    query_tiles, starts, lengths = transpose_selection(indices, counts, n)
    flat = mask.view(6, n, n)
    for g in range(6):
        for key in range(n):
            at = g * n + key
            listed = query_tiles[starts[at] : starts[at] + lengths[at]].tolist()
            assert listed == torch.nonzero(flat[g, :, key]).flatten().tolist()


def test_bad_cond_frames():
    with pytest.raises(ValueError):
        block_layout((4, 4, 4), (4, 4, 4), 4)


def test_tile_scores_stay_float32_under_bf16_autocast():
    g = torch.Generator().manual_seed(0)
    pooled_q, pooled_k = torch.randn(2, 1, 2, 30, 16, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = tile_scores(pooled_q, pooled_k)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, pooled_q @ pooled_k.transpose(-1, -2))
