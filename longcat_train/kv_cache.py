"""Keys and values of the condition tokens, computed once and reused at every denoising step.

Condition tokens (the clean leading latent frames of a continuation, timestep 0) attend only to each other
and take no text, so their hidden states, and with them each block's keys and values, are the same at
every step: the official pipeline's ``use_kv_cache``. :func:`cache_condition` runs the DiT once over the
condition frames alone and keeps every block's (RoPE-rotated) keys and values; a forward given the filled
:class:`ConditionCache` then takes only the noisy frames, whose queries attend to the cached condition
keys and their own. The result equals the uncached forward over the whole sequence (tested).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from longcat_train.attention import attention, backend


@dataclass
class LayerKV:
    """One block's condition keys and values ``[B, H, N_cond, D]`` (None until the condition pass)."""

    grid: tuple[int, int, int]  # (condition latent frames, h, w) of the patch grid
    key: torch.Tensor | None = None
    value: torch.Tensor | None = None

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        implementation: str,
        block_sparse_params: dict[str, Any] | None,
    ) -> torch.Tensor:
        """Self-attention ``[B, H, N, D]`` of this block. In the condition pass (q, k, v: condition tokens)
        the keys and values are kept and every token attends to all of them, densely, as condition queries
        do in the whole sequence. Afterwards (q, k, v: noisy tokens) the queries attend to the kept keys
        and their own, with the condition ones first."""
        if self.key is None:
            self.key, self.value = k, v
            return attention(q, k, v, implementation=implementation)
        repeat = q.shape[0] // self.key.shape[0]  # guidance runs the unconditional rows in the same batch
        cond_k, cond_v = self.key.repeat(repeat, 1, 1, 1), self.value.repeat(repeat, 1, 1, 1)
        keys, values = torch.cat([cond_k, k], dim=2), torch.cat([cond_v, v], dim=2)
        frames, h, w = self.grid
        grid = (frames + q.shape[2] // (h * w), h, w)
        if backend(implementation).video is None or grid[0] == 1:
            return attention(q, keys, values, implementation=implementation)
        # A kernel that tiles the whole sequence (block-sparse) gets it whole; its condition queries are
        # placeholders whose outputs are dropped, and noisy queries choose key blocks from their own values.
        padded = torch.cat([torch.zeros_like(cond_k), q], dim=2)
        out = attention(
            padded,
            keys,
            values,
            implementation=implementation,
            latent_shape=grid,
            num_cond_latents=frames,
            block_sparse_params=block_sparse_params,
        )
        return out[:, :, cond_k.shape[2] :]


@dataclass
class ConditionCache:
    """Every block's :class:`LayerKV` for ``num_latents`` condition latent frames of a ``h x w`` patch grid."""

    num_latents: int
    layers: list[LayerKV] = field(default_factory=list)

    @property
    def filled(self) -> bool:
        return bool(self.layers) and self.layers[0].key is not None


def block_caches(
    cache: ConditionCache | None, num_cond_latents: int, frames: int, depth: int, grid_hw: tuple[int, int]
) -> tuple[int, list[LayerKV | None]]:
    """For a DiT forward over ``frames`` latent frames of a ``grid_hw`` patch grid with ``depth`` blocks:
    the condition frames the cache holds instead of the input (0 when the input holds them all), and each
    block's entry (None without a cache; empty ones, made here, for the condition pass)."""
    if cache is None:
        if not 0 <= num_cond_latents < frames:
            raise ValueError(
                f"num_cond_latents={num_cond_latents} must be in [0, {frames}) for {frames} latent frames"
            )
        return 0, [None] * depth
    filled = cache.filled
    if num_cond_latents != cache.num_latents or not (filled or frames == num_cond_latents):
        raise ValueError(
            f"a condition cache of {cache.num_latents} latent frames takes num_cond_latents={cache.num_latents} "
            f"and, to be filled, those frames alone; got num_cond_latents={num_cond_latents}, {frames} frames"
        )
    if not cache.layers:
        cache.layers = [LayerKV((num_cond_latents, *grid_hw)) for _ in range(depth)]
    if len(cache.layers) != depth or cache.layers[0].grid[1:] != grid_hw:
        raise ValueError(
            f"this condition cache holds {len(cache.layers)} blocks of a {cache.layers[0].grid[1:]} grid, "
            f"the forward has {depth} blocks of {grid_hw}"
        )
    return (num_cond_latents if filled else 0), cache.layers


@torch.no_grad()
def cache_condition(
    model: torch.nn.Module, cond: torch.Tensor, text: torch.Tensor, mask: torch.Tensor | None
) -> ConditionCache:
    """The DiT's condition pass over ``cond`` [B, 16, C, h, w] (timestep 0): a filled cache for C frames.

    ``text``/``mask`` only satisfy the call (condition tokens take no cross-attention): any B rows."""
    cache = ConditionCache(cond.shape[2])
    model(
        hidden_states=cond,
        timestep=torch.zeros(cond.shape[0], device=cond.device),
        encoder_hidden_states=text[: cond.shape[0]],
        encoder_attention_mask=None if mask is None else mask[: cond.shape[0]],
        num_cond_latents=cache.num_latents,
        cond_cache=cache,
    )
    return cache
