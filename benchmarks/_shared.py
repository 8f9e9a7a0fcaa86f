"""Shared by the benchmarks: modules created in place (device and dtype), a randomly initialised DiT with its
LoRA, and a shard of synthetic full-size samples in the layout ``longcat-prep shard`` writes (read back
through ``ShardStream``).

Imported as ``from _shared import ...``: ``python benchmarks/X.py`` puts ``benchmarks/`` on ``sys.path``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from webdataset import TarWriter

from longcat_data.shards import ShardSample
from longcat_train import lora
from longcat_train.config import TrainConfig
from longcat_train.model import DiTConfig, LongCatVideoTransformer

TEXT_TOKENS = 120


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
    text = json.dumps(report, indent=2)
    print(text)
    sys.stdout.flush()
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
