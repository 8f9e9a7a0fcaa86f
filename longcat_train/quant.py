"""Quantised frozen base for LoRA training: int8 weight-only (optimum-quanto) or fp8 weight-only (torchao).

Only the transformer blocks' projection layers are quantised (``architecture.BLOCK_LINEARS``: self- and
cross-attention, SwiGLU): they hold nearly all of the weights and are what LoRA adapts. The adaLN modulation layers stay in the base dtype
because the model runs them in fp32 straight from their weight tensor (the official numerics), which
quantised tensors do not support; embedders and the final layer are small and stay as they are.

LoRA trains on top: peft wraps a quanto ``QLinear`` (an ``nn.Linear`` subclass) with its default LoRA layer
and a torchao float8 weight with its torchao dispatcher; both pass gradients to the layer input, so every
LoRA factor below a quantised layer learns. Weight-only means each matmul dequantises the weight to the
activation dtype and runs in bf16: memory halves, arithmetic is unchanged. Quantise before or after LoRA
injection (adapter layers are never quantised), and before :func:`longcat_train.offload.apply_block_swap`.

:func:`use_fp8_matmuls` is the other way round: the matmuls of those same linears run in float8 (one
scale per row of each operand), the forward and the input gradient alike: arithmetic changes. Steps get
faster on GPUs with float8 tensor cores (compute capability 8.9 or newer, which it needs), and the LoRA
gradients stay as close to a float32 reference as bf16's are (``benchmarks/RESULTS.md`` has the
figures). Trainer option ``fp8_matmuls``; the trainer also stores the weights in float8 (quantised
once: half the memory), the sampler keeps them in bf16 for its LoRA merges.
"""

from __future__ import annotations

import importlib
import logging

import torch
from torch import nn

from longcat_train.config import BASE_PRECISIONS, ConfigError
from longcat_train.model import block_linears, transformer_of

logger = logging.getLogger(__name__)

# The first CUDA compute capability with float8 tensor cores (Ada, Hopper).
FP8_CAPABILITY = (8, 9)

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
    if precision not in BASE_PRECISIONS:
        raise ValueError(f"base_model_precision must be one of {BASE_PRECISIONS}, got {precision!r}")
    if precision == "no_change":
        return model
    if precision == "bf16":
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if t.is_floating_point() and "lora_" not in name:
                t.data = t.data.to(torch.bfloat16)
        return model

    lib = _import(precision)
    blocks = transformer_of(model).blocks
    count = 0
    for block in blocks:
        if device is not None:
            block.to(device)
        names = [path for path, _ in block_linears(block)]
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


# ---------------------------------------------------------------- float8 matmuls

_FP8 = torch.float8_e4m3fn
_FP8_MAX = torch.finfo(_FP8).max


def _rowwise_fp8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[rows, cols]`` -> its float8 values, each row scaled to the format's range, and the float32
    ``[rows, 1]`` factors that undo the scaling (what ``torch._scaled_mm`` takes)."""
    amax = t.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12)
    scale = _FP8_MAX / amax
    return (t.float() * scale).clamp(-_FP8_MAX, _FP8_MAX).to(_FP8), scale.reciprocal()


def _float8_rows(weight: torch.Tensor, scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A frozen weight's float8 rows and their factors: as stored (``scale`` given) or quantised now."""
    return (weight, scale) if scale is not None else _rowwise_fp8(weight)


class _FrozenFp8Matmul(torch.autograd.Function):
    """``x @ weight.T`` in float8 for a frozen weight: a bf16 one (``scale`` None: quantised in each
    pass, so that only the weight itself is kept for backward) or its float8 rows with their float32
    factors ``scale`` ``[out, 1]``. The backward computes the input gradient only (torchao's
    ``Float8Linear`` also computes a weight gradient, one more GEMM per layer for nothing).

    The input gradient multiplies by the same float8 weight the forward did: the weight's row factors
    move onto the gradient's columns before it is quantised, so the weight needs no second quantisation
    (per column), and a stored float8 weight is all either pass reads. Both GEMMs use the tensor cores'
    fast accumulation: faster, and the LoRA gradients' error against float32 barely moves with it
    (``benchmarks/RESULTS.md``), so precise accumulation buys nothing here.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:  # type: ignore[override]
        xq, x_scale = _rowwise_fp8(x)
        wq, w_scale = _float8_rows(weight, scale)
        ctx.save_for_backward(weight, scale)
        # _scaled_mm wants its second operand column-major: the transpose of a row-major weight is.
        return torch._scaled_mm(
            xq, wq.t(), scale_a=x_scale, scale_b=w_scale.t(), out_dtype=x.dtype, use_fast_accum=True
        )

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        wq, w_scale = _float8_rows(*ctx.saved_tensors)
        gq, g_scale = _rowwise_fp8(grad * w_scale.t())
        # grad @ wq needs wq column-major: a row-major copy of its transpose, one byte an element.
        ones = torch.ones((1, wq.shape[1]), dtype=torch.float32, device=wq.device)
        out = torch._scaled_mm(
            gq,
            wq.t().contiguous().t(),
            scale_a=g_scale,
            scale_b=ones,
            out_dtype=grad.dtype,
            use_fast_accum=True,
        )
        return out, None, None


class Fp8MatmulLinear(nn.Linear):
    """A frozen ``nn.Linear`` whose matmul runs in float8 with one scale per row of each operand; the
    parameters (and their names) are those of the layer it replaces.

    Its weight is quantised at each call, or once by :meth:`store_fp8`: then ``weight`` holds the float8
    rows (half the bytes) and the ``weight_scale`` buffer their factors, and the result is the same.
    """

    weight_scale: torch.Tensor | None

    @classmethod
    def replacing(cls, linear: nn.Linear) -> Fp8MatmulLinear:
        if linear.weight.requires_grad:
            raise ValueError("float8 matmuls are for frozen base weights: this linear's weight is trainable")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias
        new.register_buffer("weight_scale", None)
        return new

    @property
    def stores_fp8(self) -> bool:
        return self.weight.dtype == _FP8

    @torch.no_grad()
    def store_fp8(self, device: torch.device | str | None = None) -> None:
        """Replace the weight by its float8 rows (quantised on ``device``, kept where it was)."""
        if self.stores_fp8:
            return
        home = self.weight.device
        wq, w_scale = _rowwise_fp8(self.weight.to(device or home))
        self.weight = nn.Parameter(wq.to(home), requires_grad=False)
        self.weight_scale = w_scale.to(home)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _FrozenFp8Matmul.apply(x.reshape(-1, self.in_features), self.weight, self.weight_scale)
        out = out.view(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias


def check_fp8_matmuls(device: torch.device) -> None:
    """Raise ConfigError where float8 matmuls cannot run: CUDA GPUs before compute capability 8.9 (Ada,
    Hopper) have no float8 tensor cores. The CPU runs them (slowly), which the tests use."""
    if device.type != "cuda":
        return
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < FP8_CAPABILITY:
        raise ConfigError(
            f"fp8_matmuls needs float8 tensor cores (compute capability 8.9+); "
            f"{torch.cuda.get_device_name(device)} is {major}.{minor}: turn fp8_matmuls off"
        )


def use_fp8_matmuls(
    model: nn.Module, *, store: bool = False, device: torch.device | str | None = None
) -> int:
    """Run the frozen block linears of `model` (those :func:`quantize_base` would quantise) with float8
    matmuls, in place; LoRA layers stay as they are. Returns how many linears changed.

    ``store``: quantise their weights once (on ``device``) and keep only the float8 rows
    (:meth:`Fp8MatmulLinear.store_fp8`): the blocks hold half the bytes and no step quantises them
    again, but LoRAs can no longer be merged into them (``lora_apply`` refuses). Without it the bf16
    weights stay, for a sampler that merges and unmerges LoRAs.
    """
    blocks = transformer_of(model).blocks
    count = 0
    for block in blocks:
        for name, linear in list(block_linears(block)):
            if type(linear) is not nn.Linear:
                raise ValueError(
                    f"{name} is a {type(linear).__name__}: float8 matmuls need a bf16 base, not a quantised one"
                )
            fp8 = Fp8MatmulLinear.replacing(linear)
            if store:
                fp8.store_fp8(device)
            parent, _, attr = name.rpartition(".")
            setattr(block.get_submodule(parent), attr, fp8)
            count += 1
    logger.info(
        "float8 matmuls for %d frozen linears in %d blocks%s",
        count,
        len(blocks),
        ", weights stored in float8" if store else "",
    )
    return count
