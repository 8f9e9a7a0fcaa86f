"""The memory plan: a training step's peak memory and time, predicted from the model's shape, the clip and
the flags, and the fastest flags that fit a memory budget (checkpointing chosen per block).

Pure functions, no torch: ``longcat_train.planning`` measures the model (a meta-device DiT) and the GPU
and prints; ``techniques`` asks :func:`plan_checkpointing` for the per-block modes of ``--memory-budget``.

The model of a step (one GPU, LoRA, batch B of N tokens each):

- memory = weights (resident blocks at their stored size, two pool buffers under block swap) + LoRA state
  (fp32 parameter, gradient and two AdamW moments) + what each block keeps for backward (its mode) + the
  working set of the block whose backward runs + a fixed overhead. Backward frees a block's keepings once
  it is done, so the peak is the largest "keepings of blocks 0..i + working set of block i".
- time = per block: attention forward+backward, the rest of the block forward+backward, what its mode
  recomputes (full: the whole forward; selective: all but attention; elementwise: the elementwise work
  between the matmuls, a measured share of the rest; none: nothing), plus the costs of a
  quantised base, block swap, activation offload and feed-forward chunks.

Per-token byte counts per block (:data:`ACTIVATION_BYTES`) are the tensors autograd saves, counted from the
architecture (and checked against ``saved_tensors_hooks`` by a test); the seconds and the working-set
factor come from measurements: :data:`MEASURED` lists each with where it was measured, and
:func:`calibrate` derives the model's constants from them.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

GB = 1e9
# Every step anchor was measured at 480x832x93: 24 latent frames of 30x52 patches.
REFERENCE_TOKENS = 24 * 30 * 52
MODES = ("none", "elementwise", "selective", "full")  # architecture.CHECKPOINT_MODES, least recompute first
QUANTISED = ("int8-quanto", "fp8-torchao")
# The block linears' weights as float8 matmuls store them (quant.use_fp8_matmuls(store=True), what the
# trainer does on one GPU): one byte a weight and a float32 scale a row, like a quantised base.
FP8_STORED = "fp8-matmuls"
KEEPS_MATMULS = ("none", "elementwise")  # the modes whose backward recomputes no matmul
FEED_FORWARD_CHUNKS = (1, 2, 4, 8)


@dataclass(frozen=True)
class Measured:
    value: float
    unit: str
    source: str


_MATRIX = "benchmarks/RESULTS.md, Training matrix (H100 80GB, eager, full checkpointing)"
_STEP = "benchmarks/RESULTS.md, Training step (H100 80GB)"
_FORWARD = "benchmarks/RESULTS.md, DiT forward / backward (H100 80GB)"
_ATTENTION = "benchmarks/RESULTS.md, Attention (H100 80GB, 37,440 tokens)"
_ISSUE = "issue 17, measured on one H200 (train_step.py, 480x832x93 I2V)"
_PLAN_CHECK = "benchmarks/RESULTS.md, The memory plan against the GPU (H200, plan_check.py)"
_DEFAULTS = (
    "benchmarks/RESULTS.md, Training step with the default flags (H200, train_step.py --trainer-defaults)"
)

# Every number the model is calibrated on, with where it was measured.
MEASURED: dict[str, Measured] = {
    # step seconds, dense attention unless named
    "step_eager_full": Measured(18.00, "s", _ISSUE),
    "step_eager_selective": Measured(16.14, "s", _ISSUE),
    "step_compiled_selective": Measured(11.69, "s", _ISSUE),
    "step_compiled_fp8_selective": Measured(10.36, "s", _ISSUE),
    "step_compiled_fp8_selective_sparse": Measured(4.72, "s", _ISSUE),
    # the one-time compilation: the first step of a compiled run against its later ones, in a run whose
    # blocks used two checkpointing modes (two graphs)
    "first_step_compiled_two_graphs": Measured(73.87, "s", _DEFAULTS + ", float8 weights stored, first step"),
    "step_compiled_two_graphs": Measured(9.868, "s", _DEFAULTS + ", float8 weights stored"),
    "forward_compiled": Measured(3.36, "s", _ISSUE),
    "forward_eager": Measured(3.952, "s", _FORWARD),
    "attention_dense_fwd_bwd": Measured(0.1465, "s", _ATTENTION + ", SDPA cuDNN"),
    "attention_sparse_fwd": Measured(0.00838, "s", _ATTENTION + ", ours, I2V"),
    "attention_sparse_fwd_bwd": Measured(0.02753, "s", _ATTENTION + ", ours, I2V"),
    "matrix_bf16": Measured(19.13, "s", _MATRIX + ", bf16 swap 0 dense"),
    "matrix_int8": Measured(19.51, "s", _MATRIX + ", int8-quanto swap 0 dense"),
    "matrix_fp8_torchao": Measured(19.66, "s", _MATRIX + ", fp8-torchao swap 0 dense"),
    "matrix_bf16_swap40": Measured(19.26, "s", _MATRIX + ", bf16 swap 40 dense"),
    "matrix_fp8_torchao_swap40": Measured(19.69, "s", _MATRIX + ", fp8-torchao swap 40 dense"),
    "matrix_24gb_recipe": Measured(21.33, "s", _MATRIX + ", fp8-torchao swap 40, act. offload, FFN in 4"),
    # peak memory (torch.cuda.max_memory_allocated)
    "peak_eager_selective": Measured(67.9 * 2**30 / GB, "GB", _STEP + ", dense SDPA eager (67.9 GiB)"),
    "peak_24gb_recipe": Measured(15.5, "GB", _MATRIX + ", fp8-torchao swap 40, act. offload, FFN in 4"),
    "peak_forward_full_eager": Measured(51.1 * 2**30 / GB, "GB", _FORWARD + ", 48 blocks, full (51.1 GiB)"),
    "peak_forward_full_compiled": Measured(54.8 * 2**30 / GB, "GB", _FORWARD + ", compiled (54.8 GiB)"),
    # compiled float8 (its weights then kept in bf16), dense, no cap, by block modes (plan_check.py
    # --patterns): what a block without checkpointing keeps over a selective one, compiled
    "peak_compiled_fp8_selective48": Measured(70.2, "GB", _PLAN_CHECK + ", --patterns selective48"),
    "peak_compiled_fp8_none5_selective43": Measured(
        105.2, "GB", _PLAN_CHECK + ", --patterns none5+selective43"
    ),
    # compiled float8 with the weights stored in float8, elementwise checkpointing on the first 12 blocks
    # (plan_check.py --patterns, block-sparse, uncapped): its keepings over selective, and the step
    # beside selective x48 in the same run
    "peak_compiled_fp8_stored_selective48": Measured(
        58.87, "GB", _PLAN_CHECK + ", float8 weights stored, --patterns selective48"
    ),
    "peak_compiled_fp8_stored_elementwise12_selective36": Measured(
        104.19, "GB", _PLAN_CHECK + ", float8 weights stored, --patterns elementwise12+selective36"
    ),
    "step_compiled_fp8_selective48_sparse_run": Measured(
        4.627, "s", _PLAN_CHECK + ", float8 weights stored, --patterns selective48, block-sparse"
    ),
    "step_compiled_fp8_elementwise12_selective36_sparse": Measured(
        4.462,
        "s",
        _PLAN_CHECK + ", float8 weights stored, --patterns elementwise12+selective36, block-sparse",
    ),
    # eager steps of this code on the H200 (the eager anchors above are older code or the H100): the
    # 48 GB block-sparse plan, every block swapped, selective x30 + full x18
    "step_eager_swap48_sparse": Measured(9.49, "s", _PLAN_CHECK + ", the 48 GB block-sparse cell"),
    "reserved_over_allocated": Measured(
        17.98 / 15.53, "x", "benchmarks/results/m-fp8.json, the 24 GB cap cell"
    ),
    # not measured here: a PCIe 4/5 x16 pinned host-to-device copy rate, conservatively
    "host_to_device": Measured(25.0, "GB/s", "assumed (PCIe x16 pinned copies); not measured"),
}


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a DiT (``planning.model_shape`` reads it off a meta-device model)."""

    depth: int
    hidden: int
    heads: int
    ffn: int
    text_tokens: int
    patch: tuple[int, int]  # spatial patch size (h, w)
    block_params: int  # all parameters of one block
    block_linear_params: int  # those of its BLOCK_LINEARS: what a quantised base stores in 8 bits
    block_linear_rows: int  # their output rows: one scale each when quantised
    outer_params: int  # embedders and final layer
    lora_params_per_rank: tuple[int, int]  # LoRA parameters at rank 1: (per block, outside blocks)


@dataclass(frozen=True)
class Workload:
    """What the plan cannot change: the clip, the batch, the LoRA, the compute dtype."""

    frames: int
    height: int
    width: int
    batch: int = 1
    lora_rank: int = 8
    activation_bytes: int = 2  # and weight bytes: bf16 weights and autocast; 4 in fp32

    def tokens(self, shape: ModelShape) -> int:
        latent_frames = 1 + (self.frames - 1) // 4
        return latent_frames * (self.height // (8 * shape.patch[0])) * (self.width // (8 * shape.patch[1]))


@dataclass(frozen=True)
class Flags:
    """The training settings the plan chooses (``TrainConfig`` fields, checkpointing one mode per block)."""

    checkpointing: tuple[str, ...]
    attention: str = "sdpa"
    compile: bool = False
    fp8_matmuls: bool = False
    base_model_precision: str = "no_change"
    block_swap: int = 0
    offload_activations: bool = False
    feed_forward_chunks: int = 1


@dataclass(frozen=True)
class Prediction:
    peak_bytes: float
    step_seconds: float
    memory: dict[str, float] = field(default_factory=dict)  # term -> bytes (the peak's parts)
    time: dict[str, float] = field(default_factory=dict)  # term -> seconds


# ------------------------------------------------------------------------------------------ activations


@dataclass(frozen=True)
class ActivationBytes:
    """Bytes per token (bf16 activations) one block keeps for backward, as multiples of the hidden width C
    and the feed-forward width F: ``c * C + f * F``."""

    c: float
    f: float = 0.0

    def per_token(self, shape: ModelShape) -> float:
        return self.c * shape.hidden + self.f * shape.ffn


# What one block saves, by part (counted from model.py under bf16 autocast: fp32 norm inputs, qkv, q/k,
# the attention inputs and outputs, the linears' inputs, SwiGLU's three F-wide tensors, ...).
ACTIVATION_BYTES = {
    "input": ActivationBytes(2),  # the block input: all that full checkpointing keeps
    "attention_output": ActivationBytes(2),  # what selective keeps besides (plus 4 bytes per head: lse)
    "attention_part": ActivationBytes(32),  # adaLN-modulated self-attention and cross-attention
    "feed_forward_part": ActivationBytes(12, 8),  # modulation, SwiGLU, gated residual
    "feed_forward_chunk_input": ActivationBytes(2),  # what a chunked feed-forward keeps instead
    # what elementwise checkpointing keeps besides the input and the self-attention output: the matmul
    # outputs (qkv, projection, cross-attention query, output and projection, w2; w1 and w3 F-wide)
    "matmul_outputs": ActivationBytes(16, 4),
}
# Cross-attention keeps its key/value projections per text token (C-wide multiples) in "none" mode; the
# key and value outputs alone in "elementwise" mode.
TEXT_BYTES_PER_TOKEN = {"none": ActivationBytes(13), "elementwise": ActivationBytes(4)}


def feed_forward_share(shape: ModelShape) -> float:
    """The feed-forward's part of a block's linear FLOPs (3 C x F matmuls against 6 C x C)."""
    ffn = 3 * shape.hidden * shape.ffn
    return ffn / (ffn + 6 * shape.hidden**2)


def working_bytes_per_token(shape: ModelShape, chunks: int) -> float:
    """A block's intermediates, recomputed for its backward: the feed-forward's a chunk at a time."""
    ab = ACTIVATION_BYTES
    return ab["attention_part"].per_token(shape) + ab["feed_forward_part"].per_token(shape) / chunks


def kept_bytes(shape: ModelShape, work: Workload, mode: str, chunks: int) -> float:
    """What one block in ``mode`` keeps from its forward to its backward, for the whole batch."""
    ab, n = ACTIVATION_BYTES, work.tokens(shape) * work.batch
    scale = work.activation_bytes / 2
    if mode == "full":
        return scale * n * ab["input"].per_token(shape)
    selective = ab["input"].per_token(shape) + ab["attention_output"].per_token(shape) + 4 * shape.heads
    if mode == "selective":
        return scale * n * selective
    if mode == "elementwise":
        per_token = selective + ab["matmul_outputs"].per_token(shape)
    else:
        ffn = ab["feed_forward_part"] if chunks == 1 else ab["feed_forward_chunk_input"]
        per_token = ab["attention_part"].per_token(shape) + ffn.per_token(shape)
    text = work.batch * shape.text_tokens * TEXT_BYTES_PER_TOKEN[mode].per_token(shape)
    return scale * (n * per_token + text)


def offloaded_bytes(shape: ModelShape, work: Workload, mode: str, chunks: int) -> float:
    """The part of :func:`kept_bytes` activation offload moves to host memory: what autograd saves outside
    the checkpoints (a checkpointed block's input; everything of a block without checkpointing)."""
    if mode == "none":
        return kept_bytes(shape, work, mode, chunks)
    return kept_bytes(shape, work, "full", chunks)


# ------------------------------------------------------------------------------------------ calibration


@dataclass(frozen=True)
class Calibration:
    """Seconds per block at the reference clip (480x832x93), and the memory model's two fitted numbers."""

    attention_fwd: dict[str, float]  # "dense" | "sparse" -> forward
    attention_fwd_bwd: dict[str, float]
    rest_fwd: dict[tuple[bool, bool], float]  # (compiled, fp8 matmuls) -> the block but attention, forward
    rest_bwd: dict[tuple[bool, bool], float]
    dequantise_pass: dict[str, float]  # quantised base -> seconds per pass over a block's linears
    swap_per_block: float
    offload_per_gb: float
    working_factor: float  # the backward working set over the saved intermediates it recomputes
    overhead_bytes: float  # per token and hidden channel: the embedders', final layer's and loss's tensors
    compiled_full_extra_bytes: float  # compiled full checkpointing's larger working set (same unit)
    # compiled: the share of what a block without checkpointing keeps beyond a selective one, against
    # the eager count (inductor's fused kernels save fewer intermediates)
    compiled_none_share: float
    # the same for elementwise checkpointing, against its count (the matmul and attention outputs)
    compiled_elementwise_share: float
    # the share of a block's forward but attention that elementwise checkpointing recomputes, compiled
    elementwise_recompute: float
    reserve: float  # reserved over allocated: the budget a plan may fill is budget / reserve
    host_to_device: float  # bytes per second
    # seconds compile_blocks takes once per graph (a checkpointing mode), untuned (compile_tune takes
    # longer: it is never an auto choice)
    compile_seconds: float
    derived: tuple[str, ...]  # paths with no step measured of their own


def _weights(shape: ModelShape, precision: str, resident: int, pooled: int, weight_bytes: int = 2) -> float:
    block = block_bytes(shape, precision, weight_bytes)
    return (resident + pooled) * block + shape.outer_params * weight_bytes


def stored_precision(flags: Flags) -> str:
    """How ``flags`` store the block linears' weights: a base precision, or :data:`FP8_STORED`."""
    return FP8_STORED if flags.fp8_matmuls else flags.base_model_precision


def block_bytes(shape: ModelShape, precision: str, weight_bytes: int = 2) -> float:
    """One block's frozen weights as stored: quantised linears at one byte plus a float32 scale a row."""
    if precision in (*QUANTISED, FP8_STORED):
        rest = shape.block_params - shape.block_linear_params
        return shape.block_linear_params + 4 * shape.block_linear_rows + weight_bytes * rest
    return weight_bytes * shape.block_params


def lora_bytes(shape: ModelShape, work: Workload) -> float:
    """fp32 LoRA parameters, their gradients and AdamW's two moments."""
    per_block, outer = shape.lora_params_per_rank
    return 16 * work.lora_rank * (per_block * shape.depth + outer)


def calibrate(shape: ModelShape, measured: dict[str, Measured] = MEASURED) -> Calibration:
    """The model's constants from ``measured``; ``shape`` is the model they were measured on (the full
    DiT: 48 blocks), all at 480x832x93, batch 1, LoRA rank 8."""
    m = {name: entry.value for name, entry in measured.items()}
    depth = shape.depth
    attn_f = (m["step_eager_full"] - m["step_eager_selective"]) / depth
    attn_fb = m["attention_dense_fwd_bwd"]
    rest_f = {
        (False, False): m["forward_eager"] / depth - attn_f,
        (True, False): m["forward_compiled"] / depth - attn_f,
    }
    rest_b = {
        key: m[step] / depth - attn_fb - 2 * rest_f[key]
        for key, step in (
            ((False, False), "step_eager_selective"),
            ((True, False), "step_compiled_selective"),
        )
    }
    # float8 compiled: its measured rest split like the compiled bf16 one; eager float8 by the same ratio.
    compiled_rest = 2 * rest_f[True, False] + rest_b[True, False]
    fp8_rest = m["step_compiled_fp8_selective"] / depth - attn_fb
    ratio = fp8_rest / compiled_rest
    for compiled in (True, False):
        rest_f[compiled, True] = rest_f[compiled, False] * ratio
        rest_b[compiled, True] = rest_b[compiled, False] * ratio
    sparse_fb = m["step_compiled_fp8_selective_sparse"] / depth - fp8_rest
    sparse_f = sparse_fb * m["attention_sparse_fwd"] / m["attention_sparse_fwd_bwd"]
    passes = 3  # the matrix ran full checkpointing: forward, recompute, backward
    dequantise = {
        "int8-quanto": (m["matrix_int8"] - m["matrix_bf16"]) / depth / passes,
        "fp8-torchao": (m["matrix_fp8_torchao"] - m["matrix_bf16"]) / depth / passes,
    }
    swap = (m["matrix_bf16_swap40"] - m["matrix_bf16"]) / 40
    ffn_extra = depth * feed_forward_share(shape) * rest_f[False, False]
    offload_s = m["matrix_24gb_recipe"] - m["matrix_fp8_torchao_swap40"] - ffn_extra
    reference = Workload(93, 480, 832)
    offload_gb = depth * kept_bytes(shape, reference, "full", 1) / GB
    # The working factor and the overhead from two peaks: the trainer's selective step, the 24 GB recipe.
    lora = lora_bytes(shape, reference)
    n = REFERENCE_TOKENS
    inputs = depth * kept_bytes(shape, reference, "full", 1)
    selective_fixed = (
        _weights(shape, "no_change", depth, 0) + lora + depth * kept_bytes(shape, reference, "selective", 1)
    )
    recipe_fixed = _weights(shape, "fp8-torchao", depth - 40, 2) + lora + 2 * inputs / depth
    w1, w4 = n * working_bytes_per_token(shape, 1), n * working_bytes_per_token(shape, 4)
    p1, p4 = m["peak_eager_selective"] * GB - selective_fixed, m["peak_24gb_recipe"] * GB - recipe_fixed
    factor = (p1 - p4) / (w1 - w4)
    compiled_none_share = (
        (m["peak_compiled_fp8_none5_selective43"] - m["peak_compiled_fp8_selective48"])
        * GB
        / 5
        / (kept_bytes(shape, reference, "none", 1) - kept_bytes(shape, reference, "selective", 1))
    )
    elementwise_extra = kept_bytes(shape, reference, "elementwise", 1) - kept_bytes(
        shape, reference, "selective", 1
    )
    compiled_elementwise_share = (
        (m["peak_compiled_fp8_stored_elementwise12_selective36"] - m["peak_compiled_fp8_stored_selective48"])
        * GB
        / 12
        / elementwise_extra
    )
    # Both steps of one run, so that the machine's speed cancels: what a block saves going selective ->
    # elementwise is the part of its forward recompute that elementwise checkpointing does not redo.
    saved_per_block = (
        m["step_compiled_fp8_selective48_sparse_run"]
        - m["step_compiled_fp8_elementwise12_selective36_sparse"]
    ) / 12
    elementwise_recompute = max(0.0, 1.0 - saved_per_block / rest_f[True, True])
    cal = Calibration(
        attention_fwd={"dense": attn_f, "sparse": sparse_f},
        attention_fwd_bwd={"dense": attn_fb, "sparse": sparse_fb},
        rest_fwd=rest_f,
        rest_bwd=rest_b,
        dequantise_pass=dequantise,
        swap_per_block=swap,
        offload_per_gb=offload_s / offload_gb,
        working_factor=factor,
        overhead_bytes=(p1 - factor * w1) / (n * shape.hidden),
        compiled_full_extra_bytes=(m["peak_forward_full_compiled"] - m["peak_forward_full_eager"])
        * GB
        / (n * shape.hidden),
        reserve=m["reserved_over_allocated"],
        host_to_device=m["host_to_device"] * GB,
        compiled_none_share=compiled_none_share,
        compiled_elementwise_share=compiled_elementwise_share,
        elementwise_recompute=elementwise_recompute,
        compile_seconds=(m["first_step_compiled_two_graphs"] - m["step_compiled_two_graphs"]) / 2,
        derived=("fp8 matmuls without compile: scaled from the compiled float8 step",),
    )
    return _eager_rest_from_step(shape, reference, cal, m["step_eager_swap48_sparse"])


def _eager_rest_from_step(
    shape: ModelShape, reference: Workload, cal: Calibration, measured: float
) -> Calibration:
    """``cal`` with the eager blocks' work but attention scaled so that the eager step measured on this
    code (the 48 GB block-sparse plan: every block swapped, selective x30 + full x18) comes out as
    measured; the other terms of that step stay as ``cal`` has them."""
    depth = shape.depth
    modes = ("selective",) * 30 + ("full",) * 18
    flags = Flags(checkpointing=modes, attention="block_sparse", block_swap=depth)
    terms = step_time(shape, reference, flags, cal)
    rest = depth * (cal.rest_fwd[False, False] * 2 + cal.rest_bwd[False, False])
    scale = (measured - (sum(terms.values()) - rest)) / rest
    return replace(
        cal,
        rest_fwd={k: v * (scale if not k[0] else 1.0) for k, v in cal.rest_fwd.items()},
        rest_bwd={k: v * (scale if not k[0] else 1.0) for k, v in cal.rest_bwd.items()},
    )


# ------------------------------------------------------------------------------------------ prediction


def _attention_kind(flags: Flags) -> str:
    return "sparse" if flags.attention == "block_sparse" else "dense"


def predict(shape: ModelShape, work: Workload, flags: Flags, cal: Calibration) -> Prediction:
    """Peak memory (bytes, as ``torch.cuda.max_memory_allocated`` reads it) and seconds of one step."""
    depth, modes, chunks = shape.depth, flags.checkpointing, flags.feed_forward_chunks
    swapped = min(flags.block_swap, depth)
    weights = _weights(
        shape, stored_precision(flags), depth - swapped, min(swapped, 2), work.activation_bytes
    )
    lora = lora_bytes(shape, work)
    kept = [kept_bytes(shape, work, mode, chunks) for mode in modes]
    if flags.compile:
        selective = kept_bytes(shape, work, "selective", chunks)
        shares = {"none": cal.compiled_none_share, "elementwise": cal.compiled_elementwise_share}
        kept = [
            selective + shares[mode] * (k - selective) if mode in shares else k
            for k, mode in zip(kept, modes, strict=True)
        ]
    if flags.offload_activations:
        kept = [k - offloaded_bytes(shape, work, mode, chunks) for k, mode in zip(kept, modes, strict=True)]
    n = work.tokens(shape) * work.batch
    scale = work.activation_bytes / 2
    working = cal.working_factor * scale * n * working_bytes_per_token(shape, chunks)
    prefetch = 2 * kept_bytes(shape, work, "full", chunks) if flags.offload_activations else 0.0
    # Backward runs from the last block down, freeing each block's keepings when it is done.
    activations, held = 0.0, 0.0
    for i, mode in enumerate(modes):
        held += kept[i]
        # Without recompute of its matmuls a block's backward works on what it kept.
        own = kept[i] if mode in KEEPS_MATMULS and not flags.offload_activations else 0.0
        activations = max(activations, held + max(working - own, 0.0))
    overhead = cal.overhead_bytes + (
        cal.compiled_full_extra_bytes if flags.compile and "full" in modes else 0.0
    )
    memory = {
        "weights": weights,
        "lora_and_optimizer": lora,
        "activations": activations + prefetch,
        "overhead": overhead * scale * n * shape.hidden,
    }
    time = step_time(shape, work, flags, cal)
    return Prediction(sum(memory.values()), sum(time.values()), memory, time)


def step_time(shape: ModelShape, work: Workload, flags: Flags, cal: Calibration) -> dict[str, float]:
    """Seconds of one step by term: attention and the rest of the blocks' work scale with the tokens
    (attention with their square), the overheads with the blocks that pay them."""
    kind = _attention_kind(flags)
    n = work.tokens(shape) * work.batch
    linear = n / REFERENCE_TOKENS
    quadratic = (work.tokens(shape) / REFERENCE_TOKENS) ** 2 * work.batch
    path = (flags.compile, flags.fp8_matmuls)
    attn_f, attn_fb = cal.attention_fwd[kind] * quadratic, cal.attention_fwd_bwd[kind] * quadratic
    rest_f, rest_b = cal.rest_fwd[path] * linear, cal.rest_bwd[path] * linear
    recompute = {
        "full": attn_f + rest_f,
        "selective": rest_f,
        "elementwise": cal.elementwise_recompute * rest_f,
        "none": 0.0,
    }
    modes = flags.checkpointing
    terms = {
        "attention": len(modes) * attn_fb,
        "blocks": len(modes) * (rest_f + rest_b),
        "recompute": sum(recompute[m] for m in modes),
    }
    if flags.base_model_precision in QUANTISED:
        passes = sum(2 + (m not in KEEPS_MATMULS) for m in modes)
        terms["dequantise"] = passes * cal.dequantise_pass[flags.base_model_precision] * linear
    if flags.feed_forward_chunks > 1:
        terms["feed_forward_chunks"] = len(modes) * feed_forward_share(shape) * rest_f
    swapped = min(flags.block_swap, shape.depth)
    if swapped:
        # A swapped block's copy hides behind the block before it, unless the copy takes longer.
        copy = block_bytes(shape, stored_precision(flags), work.activation_bytes) / cal.host_to_device
        exposed = max(0.0, copy - (attn_f + rest_f))
        terms["block_swap"] = swapped * (cal.swap_per_block + 2 * exposed)
    if flags.offload_activations:
        moved = sum(offloaded_bytes(shape, work, m, flags.feed_forward_chunks) for m in modes)
        terms["activation_offload"] = moved / GB * cal.offload_per_gb
    return terms


# ------------------------------------------------------------------------------------------ planning


@dataclass(frozen=True)
class Options:
    """What the search may choose from: techniques the machine can run (packages, GPU)."""

    fp8_matmuls: bool = True
    quantised: tuple[str, ...] = QUANTISED
    compile: bool = True
    swap_step: int = 2
    # Also propose paths without a step measured of their own (Calibration.derived): off, so that what
    # the plan proposes rests on measurements; their predictions are still given for the current flags.
    derived_paths: bool = False


def floor_mode(flags: Flags) -> str:
    """The mode of most recompute ``flags`` can train under: selective for compiled float8 matmuls, whose
    full checkpointing ran out of memory where it should have needed least (techniques.RULES refuses
    it); full otherwise."""
    return "selective" if flags.compile and flags.fp8_matmuls else "full"


def plan_checkpointing(
    shape: ModelShape, work: Workload, flags: Flags, budget_bytes: float, cal: Calibration
) -> tuple[str, ...] | None:
    """Per-block modes for ``flags`` (its other settings as they are) that fit ``budget_bytes`` and
    recompute least; None when not even :func:`floor_mode` everywhere fits.

    Selective on as many blocks as fit (full -> selective saves an attention forward for one attention
    output kept: the most time per byte), then, once every block is selective, blocks that keep their
    matmul outputs on as many resident blocks as fit: compiled, elementwise first (it saves nearly all of a
    block's recompute for about half of what none keeps), and once every resident block is elementwise,
    none on as many of them as fit; eager, none (elementwise's recompute is measured compiled only).
    Swapped blocks stay checkpointed (block swap refills their weights before backward); with activation
    offload every block keeps its recompute (its whole forward would cross to host). The blocks changed
    first are the first ones: their keepings are freed last, so the choice of blocks does not change the
    peak.
    """
    depth, limit = shape.depth, budget_bytes / cal.reserve
    floor = floor_mode(flags)

    def modes(selective: int, kept: int = 0, none: int = 0) -> tuple[str, ...]:
        """The first ``kept`` blocks keep their matmul outputs (the first ``none`` of them everything),
        the rest up to ``selective`` are selective, the others ``floor``."""
        return (
            ("none",) * none
            + ("elementwise",) * (kept - none)
            + ("selective",) * (selective - kept)
            + (floor,) * (depth - selective)
        )

    def fits(candidate: tuple[str, ...]) -> bool:
        return predict(shape, work, replace(flags, checkpointing=candidate), cal).peak_bytes <= limit

    if not fits(modes(0)):
        return None
    selective = depth if floor == "selective" else _most(lambda k: fits(modes(k)), depth)
    if selective < depth or flags.offload_activations:
        return modes(selective)
    resident = depth - min(flags.block_swap, depth)
    if not flags.compile:
        none = _most(lambda k: fits(modes(depth, k, k)), resident)
        return modes(depth, none, none)
    kept = _most(lambda k: fits(modes(depth, k)), resident)
    if kept < resident:
        return modes(depth, kept)
    return modes(depth, kept, _most(lambda k: fits(modes(depth, kept, k)), kept))


def _most(fits, high: int) -> int:
    """The largest k in [0, high] with fits(k), for fits true at 0 and monotone (true, then false)."""
    low = 0
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def candidate_flags(base: Flags, shape: ModelShape, options: Options) -> Iterable[Flags]:
    """Every combination of the techniques the search varies (attention stays as given: dense and sparse
    are different computations, not a memory setting)."""
    swaps = range(0, shape.depth + 1, options.swap_step)
    precisions = ("no_change", *options.quantised)
    for compile_, fp8, precision, swap, offload, chunks in itertools.product(
        (False, True) if options.compile else (False,),
        (False, True) if options.fp8_matmuls else (False,),
        precisions,
        swaps,
        (False, True),
        FEED_FORWARD_CHUNKS,
    ):
        if fp8 and not compile_ and not options.derived_paths:
            continue
        yield replace(
            base,
            compile=compile_,
            fp8_matmuls=fp8,
            base_model_precision=precision,
            block_swap=swap,
            offload_activations=offload,
            feed_forward_chunks=chunks,
        )


def fastest_plan(
    shape: ModelShape,
    work: Workload,
    base: Flags,
    budget_bytes: float,
    *,
    allowed: Callable[[Flags], bool],
    cal: Calibration,
    options: Options = Options(),
) -> tuple[Flags, Prediction] | None:
    """The fastest flags (with per-block checkpointing) predicted to fit ``budget_bytes``; ``allowed(flags)``
    says whether a combination is accepted (``techniques.RULES``). None when nothing fits."""
    best: tuple[Flags, Prediction] | None = None
    for flags in candidate_flags(base, shape, options):
        if not allowed(replace(flags, checkpointing=(floor_mode(flags),) * shape.depth)):
            continue
        modes = plan_checkpointing(shape, work, flags, budget_bytes, cal)
        if modes is None:
            continue
        planned = replace(flags, checkpointing=modes)
        if not allowed(planned):
            continue
        prediction = predict(shape, work, planned, cal)
        if best is None or prediction.step_seconds < best[1].step_seconds - 1e-9:
            best = planned, prediction
    return best


def compile_cost(modes: Sequence[str], cal: Calibration) -> float:
    """Seconds ``compile_blocks`` spends once: a graph per checkpointing mode the blocks use."""
    return cal.compile_seconds * len(set(modes))


def mode_counts(modes: Sequence[str]) -> dict[str, int]:
    """``{"none": 5, "selective": 43}``: how many blocks take each mode."""
    return {mode: modes.count(mode) for mode in MODES if modes.count(mode)}
