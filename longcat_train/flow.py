"""Flow-matching math for LongCat-Video training: sigmas, noising, target, loss.

Pure tensor functions, no model and no I/O. Conventions (those of the official LongCat-Video code):
``x_t = (1 - s) * x0 + s * eps`` with sigma ``s`` in [0, 1], timestep ``1000 * s``, and the DiT's raw
output is trained towards ``x0 - eps``. With a condition (image-to-video: one latent frame; video
continuation: several) the first latent frames of ``x_t`` are the clean condition latents and are left
out of the loss.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

SigmaMode = Literal["logit_normal", "uniform"]


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Move sigmas towards 1 (more noise): ``s' = shift * s / (1 + (shift - 1) * s)``.

    High-resolution video needs more steps at high noise; shift 12 is the official 480p value.
    """
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sample_sigmas(
    batch: int,
    *,
    mode: SigmaMode = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    shift: float = 12.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Draw one training sigma per sample, then shift it. Returns float32 [batch] in (0, 1)."""
    if mode == "logit_normal":
        u = torch.randn(batch, generator=generator, device=device) * logit_std + logit_mean
        sigmas = torch.sigmoid(u)
    elif mode == "uniform":
        sigmas = torch.rand(batch, generator=generator, device=device)
    else:
        raise ValueError(f"unknown sigma sampling mode {mode!r} (logit_normal or uniform)")
    return shift_sigmas(sigmas, shift)


def _per_sample(sigmas: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # [B] -> [B, 1, 1, ...] so a per-sample sigma broadcasts over channels, frames and pixels.
    return sigmas.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - s) * x0 + s * eps`` per sample."""
    s = _per_sample(sigmas, x0)
    return (1 - s) * x0 + s * noise


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What the raw DiT output should equal: ``x0 - eps`` (the sampler negates it for its Euler step)."""
    return x0 - noise


def replace_condition_frames(x_t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """Put the clean condition latents [B, C, n, h, w] in the first n latent frames of x_t [B, C, T, h, w]."""
    n = cond.shape[2]
    return torch.cat([cond.to(x_t.dtype), x_t[:, :, n:]], dim=2)


def flow_loss(pred: torch.Tensor, target: torch.Tensor, num_cond_latents: int = 0) -> torch.Tensor:
    """Mean squared error over the noisy latent frames only (the first ``num_cond_latents`` are given)."""
    if num_cond_latents >= pred.shape[2]:
        raise ValueError(f"{num_cond_latents} condition frames leave no noisy frame of {pred.shape[2]}")
    return F.mse_loss(pred[:, :, num_cond_latents:].float(), target[:, :, num_cond_latents:].float())


def drop_captions(
    embeds: torch.Tensor,
    mask: torch.Tensor,
    empty_embeds: torch.Tensor,
    probability: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each sample's text with the empty prompt with the given probability (for CFG).

    embeds [B, L, D] and mask [B, L] are padded real-token embeddings; empty_embeds [L0, D] are the real
    tokens of the empty prompt. Returns embeds and mask padded to max(L, L0).
    """
    if probability <= 0:
        return embeds, mask
    batch, length, _ = embeds.shape
    drop = (
        torch.rand(batch, generator=generator, device=generator.device if generator else "cpu") < probability
    )
    if not bool(drop.any()):
        return embeds, mask
    length = max(length, empty_embeds.shape[0])
    embeds = F.pad(embeds, (0, 0, 0, length - embeds.shape[1]))
    mask = F.pad(mask, (0, length - mask.shape[1]))
    empty = torch.zeros_like(embeds[0])
    empty[: empty_embeds.shape[0]] = empty_embeds.to(embeds.dtype)
    empty_mask = torch.zeros_like(mask[0])
    empty_mask[: empty_embeds.shape[0]] = 1
    drop = drop.to(embeds.device)
    embeds = torch.where(drop.view(-1, 1, 1), empty.unsqueeze(0), embeds)
    mask = torch.where(drop.view(-1, 1), empty_mask.unsqueeze(0), mask)
    return embeds, mask


def noisy_inputs(
    x0: torch.Tensor,
    cond: torch.Tensor | None,
    *,
    mode: SigmaMode = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    shift: float = 12.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """One training example set from clean latents x0 [B, C, T, h, w] (float32).

    Returns (x_t, timestep [B] in [0, 1000], target, num_cond_latents). With ``cond`` [B, C, n, h, w]
    (image-to-video: n = 1; continuation: the clip's own first n latents) the first n latent frames of
    x_t are the clean condition and num_cond_latents is n; with ``cond=None`` (text-to-video) every
    frame is noised. Sigmas are drawn before the noise, so a
    seeded generator gives the same pair on every run.
    """
    sigmas = sample_sigmas(
        x0.shape[0],
        mode=mode,
        logit_mean=logit_mean,
        logit_std=logit_std,
        shift=shift,
        generator=generator,
        device=x0.device,
    )
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = add_noise(x0, noise, sigmas)
    num_cond = 0
    if cond is not None:
        x_t = replace_condition_frames(x_t, cond)
        num_cond = cond.shape[2]
    return x_t, sigmas * 1000, flow_target(x0, noise), num_cond
