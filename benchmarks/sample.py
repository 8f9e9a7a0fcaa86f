"""Image-to-video sampling speed: seconds per video and peak memory, printed as JSON.

Default: the full 13.6B DiT with random bf16 weights at 480x832x93, 40 steps, guidance 4 (conditional
and unconditional passes batched), then a Wan2.1-sized VAE decode, on one GPU. Random weights cost the
same time as real ones and need no download. ``--quick`` runs the tiny model on the CPU at a small size,
to check the script itself.

    python benchmarks/sample.py                 # H100: the numbers for RESULTS.md
    python benchmarks/sample.py --quick         # CPU smoke run
"""

from __future__ import annotations

import argparse
import logging
import platform
import resource
import sys
import time

import torch
from _shared import created_on, write_report  # benchmarks/_shared.py
from diffusers import AutoencoderKLWan

from longcat_data.buckets import latent_frames
from longcat_data.defaults import DEFAULT_AREA, DEFAULT_FRAMES, DEFAULT_GUIDANCE, DEFAULT_STEPS
from longcat_data.encode import decode_latents, tiny_vae
from longcat_train.model import DiTConfig, LongCatVideoTransformer
from longcat_train.sampling import denoise

log = logging.getLogger("benchmarks.sample")

# A typical prompt is 100-200 umT5 tokens; the empty negative prompt is one (</s>).
PROMPT_TOKENS = 160


def build_dit(config: DiTConfig, device: torch.device, dtype: torch.dtype) -> LongCatVideoTransformer:
    # Built directly on the device in the target dtype: an fp32 copy of the full model (54 GB) first
    # would not fit next to the bf16 one.
    torch.manual_seed(0)
    with created_on(device, dtype):
        model = LongCatVideoTransformer(config)
    return model.eval().requires_grad_(False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # ru_maxrss is in KiB on Linux: the process's peak resident memory, weights included.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    config = DiTConfig.tiny() if args.quick else DiTConfig.full()
    model = build_dit(config, device, dtype)
    model.attention_implementation = args.attention
    if args.compile:
        # Per-block compile: one graph shared by 48 blocks, far quicker to build than the whole model's.
        model.compile_blocks()
    latent_h, latent_w, latent_t = args.height // 8, args.width // 8, latent_frames(args.frames)

    g = torch.Generator().manual_seed(0)
    cond = torch.randn(1, 16, 1, latent_h, latent_w, generator=g)
    prompt = torch.randn(PROMPT_TOKENS, config.caption_channels, generator=g)
    negative = torch.randn(1, config.caption_channels, generator=g)
    settings = dict(frames=args.frames, guidance=args.guidance, seeds=[0], progress=not args.quiet)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # Warm-up (kernel selection, compilation) is not part of the steady-state time.
    denoise(model, cond, [prompt], negative, steps=args.warmup_steps, **settings)
    sync(device)
    start = time.perf_counter()
    latents = denoise(model, cond, [prompt], negative, steps=args.steps, **settings)
    sync(device)
    denoise_s = time.perf_counter() - start
    dit_peak = peak_memory_gb(device)

    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    with created_on(device, dtype):
        # AutoencoderKLWan's default config is the Wan2.1 VAE's.
        vae = tiny_vae() if args.quick else AutoencoderKLWan()
    vae.eval().requires_grad_(False)
    if args.vae_tiling:
        vae.enable_tiling()
    decode_latents(vae, latents[:, :, :2])  # warm-up on two latent frames
    sync(device)
    start = time.perf_counter()
    video = decode_latents(vae, latents)
    sync(device)
    decode_s = time.perf_counter() - start

    return {
        "benchmark": "sample_i2v",
        "mode": "quick" if args.quick else "full",
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "attention": args.attention,
        "compile": args.compile,
        "size": [args.height, args.width, args.frames],
        "latent_shape": [16, latent_t, latent_h, latent_w],
        "video_shape": list(video.shape[1:]),
        "steps": args.steps,
        "guidance": args.guidance,
        "seconds_per_step": denoise_s / args.steps,
        "seconds_denoise": denoise_s,
        "seconds_decode": decode_s,
        "seconds_per_video": denoise_s + decode_s,
        "peak_memory_gb_dit": dit_peak,
        "peak_memory_gb_decode": peak_memory_gb(device),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny model on the CPU at 128x128x9, 4 steps")
    parser.add_argument("--height", type=int, default=DEFAULT_AREA[0])
    parser.add_argument("--width", type=int, default=DEFAULT_AREA[1])
    parser.add_argument("--frames", type=int, default=DEFAULT_FRAMES)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    parser.add_argument(
        "--attention", default="sdpa", help="DiT attention implementation (sdpa, xformers, ...)"
    )
    parser.add_argument(
        "--compile", action="store_true", help="compile the DiT block step first (compile_blocks)"
    )
    parser.add_argument("--vae-tiling", action="store_true", help="decode in spatial tiles (less memory)")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--output", help="also write the JSON to this file")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.quick:
        args.height, args.width, args.frames, args.steps, args.warmup_steps = 128, 128, 9, 4, 1
        args.device = args.device or "cpu"
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    result = run(args)
    write_report(result, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
