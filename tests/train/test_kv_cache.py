"""The condition cache (``longcat_train.kv_cache``): the cached DiT forward equals the uncached one."""

from __future__ import annotations

import pytest
import torch

from longcat_train.kv_cache import cache_condition


def _inputs(batch: int = 2, frames: int = 5) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, 16, frames, 8, 12, generator=g)
    text = torch.randn(batch, 7, 64, generator=g)
    mask = (torch.arange(7)[None] < torch.tensor([7, 4])[:batch, None]).long()
    return latents, text, mask, torch.tensor([700.0, 300.0])[:batch]


@pytest.mark.parametrize("implementation", ["sdpa", "block_sparse"])
def test_cached_forward_equals_the_uncached_one(implementation: str) -> None:
    from longcat_train.loading import tiny_dit

    model = tiny_dit().eval()
    latents, text, mask, t = _inputs()
    model.attention_implementation = implementation
    model.block_sparse_params = {"density": 0.5, "block": (2, 2, 2)}  # sparse at the tiny grid
    with torch.no_grad():
        full = model(latents, t, text, mask, num_cond_latents=3)
        cache = cache_condition(model, latents[:, :, :3], text, mask)
        noisy = model(latents[:, :, 3:], t, text, mask, num_cond_latents=3, cond_cache=cache)
        # Guidance doubles the batch; the cache of B rows serves both halves.
        doubled = model(
            torch.cat([latents[:, :, 3:]] * 2),
            torch.cat([t, t]),
            torch.cat([text, text]),
            torch.cat([mask, mask]),
            num_cond_latents=3,
            cond_cache=cache,
        )
    assert cache.filled and len(cache.layers) == len(model.blocks)
    assert noisy.shape == (2, 16, 2, 8, 12)
    torch.testing.assert_close(noisy, full[:, :, 3:], atol=2e-6, rtol=0)
    torch.testing.assert_close(doubled, torch.cat([noisy, noisy]), atol=2e-6, rtol=0)


@pytest.mark.gpu
def test_cached_block_sparse_attention_equals_the_whole_sequence_on_the_gpu() -> None:
    """The Triton kernel at the real head size: noisy queries' outputs do not depend on the condition
    queries, which the cached call replaces by placeholders."""
    from longcat_train.attention import attention
    from longcat_train.kv_cache import LayerKV

    g = torch.Generator(device="cuda").manual_seed(0)
    grid, cond = (8, 16, 16), 2
    n_cond = cond * grid[1] * grid[2]
    q, k, v = (
        torch.randn(2, 4, grid[0] * grid[1] * grid[2], 128, generator=g, device="cuda", dtype=torch.bfloat16)
        for _ in range(3)
    )
    params = {"density": 1 / 16, "block": (4, 4, 4)}
    whole = attention(
        q,
        k,
        v,
        implementation="block_sparse",
        latent_shape=grid,
        num_cond_latents=cond,
        block_sparse_params=params,
    )
    layer = LayerKV((cond, grid[1], grid[2]), k[:, :, :n_cond], v[:, :, :n_cond])
    cached = layer.attend(
        q[:, :, n_cond:],
        k[:, :, n_cond:],
        v[:, :, n_cond:],
        implementation="block_sparse",
        block_sparse_params=params,
    )
    torch.testing.assert_close(cached, whole[:, :, n_cond:], atol=1e-2, rtol=0)
