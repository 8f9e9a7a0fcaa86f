"""How the DiT runs one block: under its activation-checkpointing mode, eagerly or compiled.

Not the architecture (``longcat_train.model``): every mode computes the same output and gradients, only
what backward keeps differs. ``full`` recomputes the whole block in backward; ``selective`` keeps the
self-attention outputs and recomputes the rest; ``none`` stores everything. :func:`block_step` is the
unit ``LongCatVideoTransformer.run_block`` calls and :func:`compile_block_step` compiles, so that the
checkpoint sits inside the compiled region (the order torch supports).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from longcat_train.attention import SAVED_OPS

CheckpointMode = Literal["none", "full", "selective"]


def keep_self_attention(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Selective checkpointing: keep self-attention outputs, recompute everything else.

    The attention ops are those the backends declare (``longcat_train.attention.SAVED_OPS``, matched by
    name: optional packages register some of them). Self-attention is recognised by shape, which works
    eagerly and under torch.compile: its queries are a subset of the video tokens and its keys all of them
    (keys >= queries), while cross-attention puts every noisy video token against at most
    ``text_max_length`` text keys. Saving is always correct; a cross-attention this rule also keeps (fewer
    video tokens than text tokens) only costs its small output.
    """
    tokens = SAVED_OPS.get(str(op))
    if tokens is not None and args[1].shape[tokens] >= args[0].shape[tokens]:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


_SELECTIVE_CONTEXT = functools.partial(create_selective_checkpoint_contexts, keep_self_attention)


def block_step(block: nn.Module, checkpointing: CheckpointMode, *args: Any) -> torch.Tensor:
    """``block(*args)`` under a checkpointing mode."""
    if checkpointing == "full":
        return checkpoint(block, *args, use_reentrant=False)
    if checkpointing == "selective":
        return checkpoint(block, *args, use_reentrant=False, context_fn=_SELECTIVE_CONTEXT)
    return block(*args)


def compile_block_step(tune: bool = False, **compile_kwargs: Any) -> Callable[..., torch.Tensor]:
    """:func:`block_step` through :func:`torch.compile`, checkpointing included.

    Fuses the elementwise fp32 work around the matmuls (modulation, norms, RoPE, gated residuals) that
    eager mode runs as separate memory passes. All blocks share one graph per checkpointing mode.
    ``tune`` adds inductor's coordinate-descent tuning of the fused kernels (longer compilation, cached;
    slightly faster steps). ``compile_kwargs`` go to :func:`torch.compile` (default ``fullgraph=True``).
    """
    if tune:
        compile_kwargs["options"] = {"coordinate_descent_tuning": True, **compile_kwargs.get("options", {})}
    return torch.compile(block_step, **{"fullgraph": True, **compile_kwargs})
