"""How the DiT runs one block: under its activation-checkpointing mode, eagerly or compiled.

Not the architecture (``longcat_train.model``): every mode computes the same output and gradients, only
what backward keeps differs. ``full`` recomputes the whole block in backward; ``selective`` keeps the
self-attention outputs and recomputes the rest; ``elementwise`` keeps every attention and matmul output
and recomputes only the elementwise work between them (norms, RoPE, modulation, SwiGLU, residuals):
compiled, it saves most of selective's recompute for about half of what ``none`` keeps; ``none`` stores
everything. :func:`block_step` is the unit ``LongCatVideoTransformer.run_block`` calls and
:func:`compile_block_step` compiles, so that the checkpoint sits inside the compiled region (the order
torch supports).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from longcat_train.attention import SAVED_OPS

CheckpointMode = Literal["none", "elementwise", "selective", "full"]


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


# Matmul ops as they reach the checkpoint's dispatch mode (nn.Linear lowers to mm/addmm, the float8
# matmuls to _scaled_mm), with the argument that holds the left operand.
MATMUL_OPS = {
    "aten.mm.default": 0,
    "aten.bmm.default": 0,
    "aten.addmm.default": 1,
    "aten.baddbmm.default": 1,
    "aten._scaled_mm.default": 0,
}
# Below this contraction width a matmul is cheaper to recompute than its output is to keep: LoRA's
# up-projection contracts over the rank and writes a full-width output.
MIN_KEPT_CONTRACTION = 64


class KeepMatmuls:
    """``elementwise`` checkpointing's policy: keep every attention output and every matmul output that
    contracts over at least :data:`MIN_KEPT_CONTRACTION` channels; recompute the rest, which is
    elementwise.

    Under torch.compile it also keeps the sum LoRA adds to a linear's output (the first add after a
    narrower matmul: the up-projection), which is what backward reads (norms, RoPE, the SwiGLU). The
    partitioner saves only what backward reads, so the base output it no longer needs is dropped: the
    same bytes, and no up-projection recomputed. Eagerly every kept output is stored, so keeping the sum
    would keep both: there the up-projection and its add are recomputed instead. One instance per
    checkpointed call (it follows the ops in order).
    """

    def __init__(self) -> None:
        self._after_narrow_matmul = False

    def __call__(self, ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        name = str(op)
        if name in SAVED_OPS:
            return CheckpointPolicy.MUST_SAVE
        left = MATMUL_OPS.get(name)
        if left is not None:
            if args[left].shape[-1] >= MIN_KEPT_CONTRACTION:
                return CheckpointPolicy.MUST_SAVE
            self._after_narrow_matmul = torch.compiler.is_compiling()
        elif self._after_narrow_matmul and name == "aten.add.Tensor":
            self._after_narrow_matmul = False
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE


# The block step compiles a graph per checkpointing mode, grad mode (validation runs without) and
# condition length a run meets (mixed tasks, new bucket shapes): more than dynamo's default of 8, which
# fullgraph turns into an error mid-run.
RECOMPILE_LIMIT = 64

_CONTEXTS = {
    "selective": functools.partial(create_selective_checkpoint_contexts, keep_self_attention),
    "elementwise": lambda: create_selective_checkpoint_contexts(KeepMatmuls()),
}


def block_step(block: nn.Module, checkpointing: CheckpointMode, *args: Any) -> torch.Tensor:
    """``block(*args)`` under a checkpointing mode."""
    if checkpointing == "full":
        # context_fn left out: dynamo cannot trace torch's noop_context_fn passed explicitly
        return checkpoint(block, *args, use_reentrant=False)
    context = _CONTEXTS.get(checkpointing)
    if context is not None:
        return checkpoint(block, *args, use_reentrant=False, context_fn=context)
    return block(*args)


def compile_block_step(tune: bool = False, **compile_kwargs: Any) -> Callable[..., torch.Tensor]:
    """:func:`block_step` through :func:`torch.compile`, checkpointing included.

    Fuses the elementwise fp32 work around the matmuls (modulation, norms, RoPE, gated residuals) that
    eager mode runs as separate memory passes. All blocks share one graph per checkpointing mode.
    On GPUs inductor also builds the persistent variant of each wide row reduction (the float8 row
    scaling of 4,096- and 11,008-wide rows is past its 1,024-wide threshold for one) and keeps whichever
    runs faster on the first calls (``triton.multi_kernel``; ``benchmarks/RESULTS.md`` has the gain).
    ``tune`` adds inductor's coordinate-descent tuning of the fused kernels (longer compilation, cached;
    slightly faster steps). ``compile_kwargs`` go to :func:`torch.compile` (default ``fullgraph=True``).
    """
    # torch 2.11 keeps each multi-kernel choice in a file keyed by a hash of the kernels, which fails
    # (TypeError) for kernels a warm FX graph cache loads: a second run on a machine would crash. Without
    # that file each process benchmarks its choices again, on the first calls.
    os.environ.setdefault("TORCHINDUCTOR_DISABLE_MULTI_KERNEL_CACHE", "1")
    # Dynamo's limit is per code object, and this one is shared by every block.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    options = {"triton.multi_kernel": 1, **({"coordinate_descent_tuning": True} if tune else {})}
    compile_kwargs["options"] = {**options, **compile_kwargs.get("options", {})}
    return torch.compile(block_step, **{"fullgraph": True, **compile_kwargs})
