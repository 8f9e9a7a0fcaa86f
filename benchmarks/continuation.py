"""Video continuation speed: seconds per segment with and without the condition cache, and a long video.

Default: the full 13.6B DiT with random bf16 weights, a 480x832x93 segment continuing 13 condition frames
(4 latent frames), 40 steps with the official continuation's high-frequency tail, guidance 4 (CFG-Zero*,
both passes batched), on one GPU; the Wan2.1-sized VAE encodes the condition and decodes the segment.
Random weights cost the same time as real ones and need no download.

A full segment runs minutes, so the DiT steps are timed over ``--timed-steps`` steps (after a warm-up
step) with the cache and without, and a segment's seconds are computed from them: the condition pass
(cached only) + all its steps + the VAE encode and decode, which are timed once. The image-to-video
sample of the same size (one condition latent frame: the start image) is timed the same way in the
same run, so that a cached segment can be set beside it: at the segment's steps, and at the I2V
sampler's own schedule (``--steps``, no tail). ``--profile`` adds one step of each mode under the torch
profiler (GPU milliseconds per kernel family and of the costliest kernels, ``_shared.kernel_profile``),
to say where a difference comes from. The long video (``--segments``, 5) is then run end to end, every
segment a continuation of the one before, at ``--long-steps`` distilled steps without guidance (the
chaining, encodes and decodes as they run), and also given at the full step count from the per-step
times. ``--quick`` runs the tiny model on the CPU at a
small size, to check the script itself.

    python benchmarks/continuation.py --output benchmarks/results/continuation.json   # GPU
    python benchmarks/continuation.py --quick                                          # CPU smoke run
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable

import numpy as np
import torch
from _shared import kernel_profile, write_report  # benchmarks/_shared.py
from sample import PROMPT_TOKENS, build_dit, build_vae, device_name, device_of, peak_memory_gb, sync

from longcat_data.buckets import latent_frames
from longcat_data.defaults import (
    DEFAULT_AREA,
    DEFAULT_COND_FRAMES,
    DEFAULT_FRAMES,
    DEFAULT_GUIDANCE,
    DEFAULT_SHIFT,
    DEFAULT_STEPS,
)
from longcat_data.encode import decode_latents, encode_video
from longcat_train.config import VideoSettings
from longcat_train.continuation import generate_long_video
from longcat_train.dit_config import DiTConfig
from longcat_train.kv_cache import cache_condition
from longcat_train.sampling import euler_loop, flow_scheduler, high_frequency_tail

log = logging.getLogger("benchmarks.continuation")


def timed(device: torch.device, work: Callable[[], object]) -> tuple[float, object]:
    sync(device)
    start = time.perf_counter()
    result = work()
    sync(device)
    return time.perf_counter() - start, result


def run(args: argparse.Namespace) -> dict:
    device, dtype = device_of(args)
    model = build_dit(DiTConfig.tiny() if args.quick else DiTConfig.full(), device, dtype)
    model.attention_implementation = args.attention
    vae = build_vae(args, device, dtype)
    h, w = args.height // 8, args.width // 8
    cond_latents = latent_frames(args.cond_frames)
    noisy_latents = latent_frames(args.frames) - cond_latents

    g = torch.Generator().manual_seed(0)
    cond = torch.randn(1, 16, cond_latents, h, w, generator=g).to(device)
    noise = torch.randn(1, 16, noisy_latents, h, w, generator=g).to(device)
    # image-to-video: the start image's latent frame, then the rest of the clip
    i2v_cond, i2v_noise = (
        cond[:, :, :1],
        torch.randn(1, 16, noisy_latents + cond_latents - 1, h, w, generator=g).to(device),
    )
    channels = model.config.caption_channels
    text = torch.randn(2, PROMPT_TOKENS, channels, generator=g).to(device)  # unconditional row first
    mask = torch.ones(2, PROMPT_TOKENS, dtype=torch.long, device=device)
    schedule = high_frequency_tail(flow_scheduler(args.steps, DEFAULT_SHIFT))
    segment_steps = len(schedule.timesteps)

    modes = {
        "uncached": (cond, noise, False),
        "kv_cache": (cond, noise, True),
        "i2v": (i2v_cond, i2v_noise, False),
    }

    def steps(count: int, mode: str) -> None:
        first, rest, kv_cache = modes[mode]
        scheduler = high_frequency_tail(flow_scheduler(args.steps, DEFAULT_SHIFT))
        scheduler.timesteps = scheduler.timesteps[:count]
        euler_loop(
            model, first, rest.clone(), text, mask, scheduler, guidance=args.guidance, kv_cache=kv_cache,
            progress=not args.quiet,
        )  # fmt: skip

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    per_step, profiles = {}, {}
    condition_s = 0.0
    for mode in modes:
        steps(1, mode)  # warm-up: kernel selection at these shapes
        seconds, _ = timed(device, lambda mode=mode: steps(1 + args.timed_steps, mode))
        if mode == "kv_cache":
            condition_s = timed(device, lambda: cache_condition(model, cond, text[1:], mask[1:]))[0]
        # The timed loop ran one step more than it counts and, cached, one condition pass.
        per_step[mode] = (seconds - (condition_s if mode == "kv_cache" else 0.0)) / (1 + args.timed_steps)
        if args.profile and device.type == "cuda":
            profiles[mode] = kernel_profile(lambda mode=mode: steps(1, mode), top=12)
    dit_peak = peak_memory_gb(device)

    pixels = torch.randint(
        0, 256, (1, args.cond_frames, args.height, args.width, 3), generator=g, dtype=torch.uint8
    )
    encode_video(vae, pixels)  # warm-up
    encode_s, _ = timed(device, lambda: encode_video(vae, pixels))
    latents = torch.cat([cond, noise], dim=2)
    decode_latents(vae, latents[:, :, :2])  # warm-up
    decode_s, _ = timed(device, lambda: decode_latents(vae, latents))
    vae_s = encode_s + decode_s

    segment = {
        "uncached": segment_steps * per_step["uncached"] + vae_s,
        "kv_cache": condition_s + segment_steps * per_step["kv_cache"] + vae_s,
    }
    # the I2V sample encodes one image frame instead of the condition clip: its VAE time is about the decode
    i2v = {
        "at_segment_steps": segment_steps * per_step["i2v"] + decode_s,
        "at_its_own_steps": args.steps * per_step["i2v"] + decode_s,
    }
    long_settings = VideoSettings(
        frames=args.frames, steps=args.long_steps, guidance=1.0, area=(args.height, args.width),
        distill=True, cond_frames=args.cond_frames, kv_cache=True,
    )  # fmt: skip
    video = pixels[0].numpy()
    prompts = [text[1, :PROMPT_TOKENS].cpu()] * args.segments
    long_s, long_video = timed(
        device,
        lambda: generate_long_video(
            model, vae, prompts, None, long_settings, video=video, progress=not args.quiet
        ),
    )
    assert isinstance(long_video, np.ndarray)
    return {
        "benchmark": "continuation",
        "mode": "quick" if args.quick else "full",
        "device": device_name(device),
        "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "attention": args.attention,
        "size": [args.height, args.width, args.frames],
        "cond_frames": args.cond_frames,
        "latent_frames": {"condition": cond_latents, "new": noisy_latents},
        "steps": args.steps,
        "steps_with_high_frequency_tail": segment_steps,
        "guidance": args.guidance,
        "timed_steps": args.timed_steps,
        "seconds_per_step": per_step,
        "seconds_condition_pass": condition_s,
        "seconds_vae_encode_condition": encode_s,
        "seconds_vae_decode_segment": decode_s,
        "seconds_per_segment": segment,
        "kv_cache_speedup": segment["uncached"] / segment["kv_cache"],
        "seconds_i2v_sample": i2v,
        # the bound: a cached segment costs no more than the I2V sample plus the condition pass
        "kv_cache_segment_over_i2v_plus_condition": segment["kv_cache"]
        / (i2v["at_segment_steps"] + condition_s),
        "peak_memory_gb_dit": dit_peak,
        "long_video": {
            "segments": args.segments,
            "frames": int(long_video.shape[0]),
            "frames_expected": args.frames + (args.segments - 1) * (args.frames - args.cond_frames),
            "measured_steps_per_segment": args.long_steps,
            "measured_seconds": long_s,
            "seconds_at_full_steps_kv_cache": args.segments * segment["kv_cache"],
        },
        **({"profile_one_step": profiles} if profiles else {}),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny model on the CPU at 64x64x17, 9 condition frames"
    )
    parser.add_argument("--height", type=int, default=DEFAULT_AREA[0])
    parser.add_argument("--width", type=int, default=DEFAULT_AREA[1])
    parser.add_argument("--frames", type=int, default=DEFAULT_FRAMES)
    parser.add_argument("--cond-frames", type=int, default=DEFAULT_COND_FRAMES)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="before the high-frequency tail")
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    parser.add_argument("--timed-steps", type=int, default=3, help="DiT steps timed per mode")
    parser.add_argument("--segments", type=int, default=5, help="segments of the long video")
    parser.add_argument("--long-steps", type=int, default=2, help="distilled steps per long-video segment")
    parser.add_argument("--attention", default="sdpa", help="DiT attention implementation")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--output", help="also write the JSON to this file")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--profile", action="store_true", help="one step of each mode under the torch profiler (CUDA)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.height, args.width, args.frames, args.cond_frames = 64, 64, 17, 9
        args.timed_steps, args.device = 1, args.device or "cpu"
    return args


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    arguments = parse_args()
    write_report(run(arguments), arguments.output)
