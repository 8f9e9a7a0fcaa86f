"""Shared by the benchmarks: modules created in place (device and dtype), random prep encoders, a randomly
initialised DiT with its LoRA, and a shard of synthetic full-size samples in the layout ``longcat-prep shard`` writes (read back
through ``ShardStream``).

Imported as ``from _shared import ...``: ``python benchmarks/X.py`` puts ``benchmarks/`` on ``sys.path``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from transformers import UMT5Config, UMT5EncoderModel
from webdataset import TarWriter

from longcat_data import encode
from longcat_data.prep import Encoders
from longcat_data.shards import ShardSample
from longcat_train import lora
from longcat_train.config import TrainConfig
from longcat_train.dit_config import DiTConfig
from longcat_train.model import LongCatVideoTransformer

TEXT_TOKENS = 120

# umT5-XXL, the encoder half (what LongCat-Video's text_encoder/ holds).
UMT5_XXL = {
    "vocab_size": 256384,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "feed_forward_proj": "gated-gelu",
    "dropout_rate": 0.0,
}


@contextmanager
def created_on(device: torch.device | str, dtype: torch.dtype) -> Iterator[None]:
    """Modules built inside get their random weights on ``device`` in ``dtype`` directly: seconds for the
    13.6B DiT or umT5-XXL, where an fp32 host init and a copy take minutes (and twice the memory)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def prep_encoders(
    small: bool,
    text_encoder: str,
    cudnn_benchmark: bool,
    compile_backend: str | None,
    device: torch.device,
    dtype: torch.dtype,
) -> Encoders:
    """Random prep encoders (benchmarks/prep.py): the full Wan2.1 VAE config or the tiny VAE, and umT5
    ``full`` (XXL), ``tiny`` or ``none``, with the tiny tokenizer; the VAE encoder compiled with
    ``compile_backend`` unless None. Here rather than in prep.py so a Ray actor can import it (a function
    of ``__main__`` would travel by value)."""
    # Set where the encoders are built: a Ray actor is a process of its own.
    torch.backends.cudnn.benchmark = cudnn_benchmark
    tokenizer = encode.tiny_tokenizer()
    model = None
    with created_on(device, dtype):
        vae = (encode.tiny_vae() if small else AutoencoderKLWan()).eval().requires_grad_(False)
        if text_encoder != "none":
            tiny = dict(encode.TINY_TEXT_CONFIG, vocab_size=len(tokenizer))
            config = UMT5Config(**(tiny if text_encoder == "tiny" else UMT5_XXL))
            model = UMT5EncoderModel(config).eval().requires_grad_(False)
    if compile_backend is not None:
        encode.compile_vae_encoder(vae, backend=compile_backend)
    return Encoders(vae, tokenizer if model is not None else None, model, {"model": f"random-{text_encoder}"})


def build_model(
    config: DiTConfig, device: torch.device, dtype: torch.dtype, rank: int = 8
) -> torch.nn.Module:
    """Random base weights (seed 0) straight on ``device`` in ``dtype``, then a fresh rank-``rank`` LoRA."""
    torch.manual_seed(0)
    with created_on(device, dtype):
        model = LongCatVideoTransformer(config)
    return lora.apply_lora(model, rank=rank, targets=TrainConfig().lora_targets)


def smooth_latents(
    channels: int,
    latent_shape: tuple[int, int, int],
    generator: torch.Generator,
    scale: tuple[int, int, int] = (4, 8, 8),
    white: float = 0.1,
) -> torch.Tensor:
    """A smooth random field [channels, T, H, W]: coarse Gaussian noise (one value per ``scale`` cell)
    upsampled trilinearly, unit std per channel, plus a little white noise. Unlike pure noise it has
    structure a model can learn (neighbouring tokens and frames are correlated), so a loss can move."""
    T, H, W = latent_shape
    coarse = torch.randn(
        1, channels, *(-(-n // s) + 1 for n, s in zip(latent_shape, scale, strict=True)), generator=generator
    )
    field = F.interpolate(coarse, size=(T, H, W), mode="trilinear", align_corners=True)[0]
    field = field / field.flatten(1).std(dim=1).view(-1, 1, 1, 1)
    return field + white * torch.randn(field.shape, generator=generator)


def write_shard(
    path: Path,
    config: DiTConfig,
    latent_shape: tuple[int, int, int],
    samples: int,
    *,
    structured: bool = False,
    seed: int = 0,
) -> Path:
    """``samples`` clips of ``latent_shape`` latents (i.i.d. Gaussian, or smooth fields with ``structured``),
    start-frame latents (= latent frame 0), a black start frame and ``TEXT_TOKENS`` random umT5-sized text
    embeddings."""
    g = torch.Generator().manual_seed(seed)
    T, H, W = latent_shape
    start_frame = np.zeros((8 * H, 8 * W, 3), np.uint8)
    with TarWriter(str(path), encoder=False) as tar:
        for i in range(samples):
            if structured:
                latents = smooth_latents(config.in_channels, latent_shape, g).to(torch.bfloat16)
            else:
                latents = torch.randn(config.in_channels, T, H, W, generator=g).to(torch.bfloat16)
            embeds = torch.randn(TEXT_TOKENS, config.caption_channels, generator=g).to(torch.bfloat16)
            sample = ShardSample(
                key=f"bench{i:04d}",
                latents=latents,
                cond_latents=latents[:, :1].clone(),
                cond_image=start_frame,
                caption="benchmark clip",
                meta={"bucket": [8 * H, 8 * W, 1 + 4 * (T - 1)]},
                text_embeds=embeds,
            )
            tar.write(sample.to_members())
    return path


def write_report(report: dict, out: str | Path | None = None) -> None:
    """Print ``report`` as JSON on stdout and, with ``out``, write the same text there."""
    print(json.dumps(report, indent=2))
    sys.stdout.flush()
    if out:
        save_report(report, out)


def save_report(report: dict, out: str | Path) -> None:
    """``report`` as JSON in ``out``, replaced whole (a run cut short mid-write leaves the previous one)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    partial.write_text(json.dumps(report, indent=2) + "\n")
    partial.replace(out)


# Kernel-name fragments per family, first match wins (cuDNN/flash/our Triton attention, cuBLAS/CUTLASS GEMMs).
KERNEL_FAMILIES = (
    # inductor names a fused kernel after every op in it: "amax" marks the float8 row scaling, wherever
    # it was fused
    ("fp8_scaling", ("amax",)),
    (
        "attention",
        (
            "attn",
            "flash",
            "fmha",
            "sdpa",
            "_bsa_",
            "block_sparse",
            "cudnn_generated",
            "_fwd_kernel",
            "_dq_kernel",
            "_dkdv_kernel",
        ),
    ),
    ("gemm", ("gemm", "sm90_xmma", "cutlass", "nvjet", "matmul", "splitk")),
    ("copy", ("memcpy", "memset", "copy_", "cat")),
    ("elementwise", ("triton", "elementwise", "reduce", "vectorized", "norm", "softmax")),
)


def kernel_family(name: str) -> str:
    lowered = name.lower()
    return next((family for family, keys in KERNEL_FAMILIES if any(k in lowered for k in keys)), "other")


def kernel_profile(work: Callable[[], object], top: int = 20) -> dict:
    """One call of ``work`` on the GPU under the torch profiler: GPU milliseconds per kernel family, the
    ``top`` costliest kernels by name, and every kernel of at least a millisecond in all (its name in
    full, so that fused kernels of one family can be told apart)."""
    from torch.autograd.profiler_util import FunctionEventAvg
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        work()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_time_total > 0]
    families: dict[str, float] = {}
    for e in kernels:
        family = kernel_family(e.key)
        families[family] = families.get(family, 0.0) + e.device_time_total / 1e3
    by_time = sorted(kernels, key=lambda e: e.device_time_total, reverse=True)

    def described(e: FunctionEventAvg, name_chars: int | None) -> dict:
        return {
            "name": e.key[:name_chars],
            "family": kernel_family(e.key),
            "ms": round(e.device_time_total / 1e3, 1),
            "calls": e.count,
        }

    return {
        "gpu_ms_by_family": {k: round(v, 1) for k, v in sorted(families.items(), key=lambda kv: -kv[1])},
        "gpu_ms_total": round(sum(families.values()), 1),
        "top_kernels": [described(e, 120) for e in by_time[:top]],
        "kernels_over_1ms": [described(e, None) for e in by_time if e.device_time_total >= 1e3],
    }
