"""Quantised frozen base for LoRA training: int8 weight-only (optimum-quanto) or fp8 weight-only (torchao).

Only the transformer blocks' projection layers are quantised (self- and cross-attention, SwiGLU): they hold
nearly all of the 13.6B weights and are what LoRA adapts. The adaLN modulation layers stay in the base dtype
because the model runs them in fp32 straight from their weight tensor (the official numerics), which
quantised tensors do not support; embedders and the final layer are small and stay as they are.

LoRA trains on top: peft wraps a quanto ``QLinear`` (an ``nn.Linear`` subclass) with its default LoRA layer
and a torchao float8 weight with its torchao dispatcher; both pass gradients to the layer input, so every
LoRA factor below a quantised layer learns. Weight-only means each matmul dequantises the weight to the
activation dtype and runs in bf16: memory halves, arithmetic is unchanged. Quantise before or after LoRA
injection (adapter layers are never quantised), and before :func:`longcat_train.offload.apply_block_swap`.
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Iterator

import torch
from torch import nn

logger = logging.getLogger(__name__)

PRECISIONS: tuple[str, ...] = ("no_change", "bf16", "int8-quanto", "fp8-torchao")

# Block linears the model calls as modules (so a quantised weight's own matmul runs); relative to a block.
_QUANTISED = re.compile(
    r"^(attn\.(qkv|proj)|cross_attn\.(q_linear|kv_linear|proj)|ffn\.w[123])(\.base_layer)?$"
)

_PACKAGES = {"int8-quanto": ("optimum.quanto", "optimum-quanto"), "fp8-torchao": ("torchao", "torchao")}


def _import(precision: str):
    module, package = _PACKAGES[precision]
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"base_model_precision={precision!r} needs the {package} package: "
            f"pip install {package} (or the project's 'quant' extra)"
        ) from err


def _blocks(model: nn.Module) -> nn.ModuleList:
    found = [
        m
        for n, m in model.named_modules()
        if n.rsplit(".", 1)[-1] == "blocks" and isinstance(m, nn.ModuleList)
    ]
    if len(found) != 1:
        raise ValueError(f"expected one nn.ModuleList named 'blocks' in the model, found {len(found)}")
    return found[0]


def _targets(block: nn.Module) -> Iterator[str]:
    """Names (relative to `block`) of its linears to quantise, the peft base layer where LoRA wraps one."""
    for name, module in block.named_modules():
        if isinstance(module, nn.Linear) and _QUANTISED.match(name):
            yield name


def quantize_base(model: nn.Module, precision: str, *, device: torch.device | str | None = None) -> nn.Module:
    """Quantise the frozen base weights of `model` in place (see the module doc for which) and return it.

    Args:
        model: the DiT, bare or with LoRA already injected.
        precision: ``no_change`` (leave it), ``bf16`` (cast every non-LoRA floating tensor to bf16),
            ``int8-quanto`` (int8 weights, one scale per output channel) or ``fp8-torchao`` (float8 e4m3
            weights, one scale per output channel).
        device: quantise block by block on this device, where the blocks then stay (quantising on a GPU
            is far faster; one bf16 block at a time is there besides the quantised ones). None: in place.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"base_model_precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "no_change":
        return model
    if precision == "bf16":
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if t.is_floating_point() and "lora_" not in name:
                t.data = t.data.to(torch.bfloat16)
        return model

    lib = _import(precision)
    blocks = _blocks(model)
    count = 0
    for block in blocks:
        if device is not None:
            block.to(device)
        names = list(_targets(block))
        if precision == "int8-quanto":
            lib.quantize(block, weights=lib.qint8, include=names)
            lib.freeze(block)
        else:
            from torchao.quantization import Float8WeightOnlyConfig

            lib.quantize_(block, Float8WeightOnlyConfig(), filter_fn=lambda _, fqn, names=names: fqn in names)
        for name in names:
            # Quantised weights cannot be trained; quanto's freeze hands them back as trainable parameters.
            block.get_submodule(name).requires_grad_(False)
        count += len(names)
    logger.info("base_model_precision=%s: quantised %d linears in %d blocks", precision, count, len(blocks))
    return model
