"""First-block step cache for sampling: skip the DiT's later blocks when its first block barely changes.

Along a denoising loop the DiT's input moves a little per step, and so does what its blocks add to it.
The first block is a cheap probe of how much: when its residual (output minus input) differs from the
one of the last step that ran every block by less than ``threshold``, the other blocks' residual of
that step is added again instead of running them. This is the first-block cache of ParaAttention and
diffusers (TeaCache measures the change at the embedder instead); here it is written for this DiT.

Exactly, at each model call of one loop:

1. ``r1 = block_0(x) - x`` for the blocks' input ``x`` [B, N, C].
2. The change ``d_b = mean |r1_b - p_b| / mean |p_b|`` per batch row b, over the noisy tokens only
   (the condition latents' tokens, clean at every step, would dilute it), against ``p``, the ``r1`` of
   the last call that ran every block. Guidance batches the unconditional and conditional rows into one
   call: the call reuses only when every row's change is under the threshold, ``max_b d_b < threshold``.
3. Reuse: the output is ``block_0(x) + R`` with ``R`` the other blocks' residual (output minus
   ``block_0``'s output, fp32) of that last full call. Otherwise every block runs and ``p``, ``R`` are
   kept from this call.

The first call runs every block, and so does a call whose shape or condition frames differ from those
of the kept residuals. Reused calls do not move ``p``: the change is always measured against the last
computed step, so small changes cannot add up unchecked. The threshold trades speed for faithfulness;
``benchmarks/sample.py --step-cache T`` reports both (seconds, and the latents' relative error against
the uncached sample of the same seed). Off (``threshold`` 0) nothing here runs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from longcat_train.model import LongCatVideoTransformer

log = logging.getLogger(__name__)


@dataclass
class StepCache:
    """The state of one denoising loop's cache (see the module doc); ``changes`` holds every call's
    ``max_b d_b`` (None for calls without kept residuals), ``reused`` the indices of reused calls."""

    threshold: float
    changes: list[float | None] = field(default_factory=list)
    reused: list[int] = field(default_factory=list)
    _first_residual: torch.Tensor | None = None
    _rest_residual: torch.Tensor | None = None
    _key: tuple[Any, ...] | None = None

    def run_blocks(
        self,
        model: LongCatVideoTransformer,
        x: torch.Tensor,
        block_args: tuple,
        layers: Sequence[object],
    ) -> torch.Tensor:
        """What ``model``'s blocks make of ``x`` [B, N, C]: all of them, or the first plus the kept residual
        of the rest. ``block_args`` are the blocks' other arguments as ``LongCatBlock.forward`` takes them
        (``latent_shape`` and ``num_cond_latents`` last), ``layers`` each block's condition cache."""
        blocks = list(model.blocks)
        latent_shape, num_cond_latents = block_args[-2], block_args[-1]
        first = model.run_block(blocks[0], x, *block_args, layers[0])
        residual = first - x
        noisy_from = num_cond_latents * latent_shape[1] * latent_shape[2]
        key = (tuple(x.shape), x.dtype, x.device, latent_shape, num_cond_latents)
        change = self._change(residual[:, noisy_from:]) if key == self._key else None
        self.changes.append(change)
        if change is not None and change < self.threshold:
            self.reused.append(len(self.changes) - 1)
            return (first.float() + self._rest_residual).to(first.dtype)
        out = first
        for block, kv in zip(blocks[1:], layers[1:], strict=True):
            out = model.run_block(block, out, *block_args, kv)
        self._key = key
        self._first_residual = residual[:, noisy_from:]
        self._rest_residual = out.float() - first.float()
        return out

    def _change(self, residual: torch.Tensor) -> float:
        kept = self._first_residual
        rows = residual.shape[0]
        diff = (residual.float() - kept).abs().reshape(rows, -1).mean(dim=1)
        scale = kept.abs().reshape(rows, -1).mean(dim=1).clamp(min=torch.finfo(torch.float32).tiny)
        return float((diff / scale).max())


@contextmanager
def step_cache(model: nn.Module, threshold: float | StepCache) -> Iterator[StepCache | None]:
    """A :class:`StepCache` on the DiT inside ``model`` for the duration (one denoising loop): a fresh
    one of ``threshold``, or the one given (a caller that reads its record afterwards: one per loop);
    a threshold <= 0: none, the model runs every block."""
    cache = threshold if isinstance(threshold, StepCache) else StepCache(threshold)
    if cache.threshold <= 0:
        yield None
        return
    from longcat_train.model import transformer_of

    dit = transformer_of(model)
    if dit.step_cache is not None:
        raise RuntimeError("this DiT already runs under a step cache: one denoising loop at a time")
    if cache.changes:
        raise ValueError("this StepCache has run a denoising loop already: make one per loop")
    dit.step_cache = cache
    try:
        yield cache
    finally:
        dit.step_cache = None
        log.info(
            "step cache %g: the later blocks' residual reused at %d of %d model calls",
            cache.threshold,
            len(cache.reused),
            len(cache.changes),
        )
