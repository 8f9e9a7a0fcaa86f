"""Image-to-video sampling speed: seconds per video and peak memory, printed as JSON.

Default: the full 13.6B DiT with random bf16 weights at 480x832x93, 40 steps, guidance 4 (conditional
and unconditional passes batched), then a Wan2.1-sized VAE decode, on one GPU. Random weights cost the
same time as real ones and need no download. ``--quick`` runs the tiny model on the CPU at a small size,
to check the script itself (every mode has one).

Speed options (combine freely with the modes and ``--attention``): ``--fp8-matmuls`` and ``--compile``
(``techniques.apply_fast_paths``, as ``longcat-sample`` applies them) and ``--step-cache T`` (the
first-block cache). With ``--step-cache`` the same sample (seed, start frame, prompt) is made twice in
one run, without the cache and with it, and both are reported side by side: seconds and the cached
latents' relative error ``||cached - reference|| / ||reference||`` over the generated latent frames.
``--reference plain`` makes the reference without the speed options too (bf16, eager: their whole
cost in error); the default ``uncached`` keeps them (the cache's own cost). ``--model DIR`` times real
weights (an official checkpoint's ``dit/``) instead of random ones; the cache's hit rate depends on them.

Modes (combine freely with ``--attention`` and the speed options):

- ``--distill``: the distilled schedule, 16 steps without guidance (the distill LoRA's setting).
- ``--merged-loras N``: after the sample, N random LoRAs of rank ``--lora-rank`` are merged into the
  weights (``load_loras(merge=True)``) and the same sample is timed again in the same process.
- ``--refine``: the 720p refinement of a random 480p video, end to end (upsampling, VAE encoding,
  the steps below sigma 0.5, decoding), block-sparse attention unless ``--attention`` says otherwise;
  a 5-frame refinement first warms the kernels up.

    python benchmarks/sample.py                                         # the numbers for RESULTS.md
    python benchmarks/sample.py --fp8-matmuls --compile --step-cache 0.05   # uncached vs cached, 40 steps
    python benchmarks/sample.py --distill --attention block_sparse      # distilled, sparse
    python benchmarks/sample.py --distill --merged-loras 3              # three merged LoRAs
    python benchmarks/sample.py --refine                                # 720p refinement
    python benchmarks/sample.py --quick [--distill | --refine | ...]    # CPU smoke runs
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
from longcat_data.defaults import (
    DEFAULT_AREA,
    DEFAULT_FRAMES,
    DEFAULT_GUIDANCE,
    DEFAULT_REFINE_AREA,
    DEFAULT_STEPS,
    DISTILL_GUIDANCE,
    DISTILL_STEPS,
)
from longcat_data.encode import decode_latents, tiny_vae
from longcat_train.config import RefineSettings, TrainConfig
from longcat_train.dit_config import DiTConfig
from longcat_train.loading import load_dit
from longcat_train.lora import load_loras, matching_linears
from longcat_train.lowrank import LowRankDelta, LowRankPiece, LowRankSet
from longcat_train.model import LongCatVideoTransformer
from longcat_train.refine import refine_videos
from longcat_train.sampling import denoise
from longcat_train.step_cache import StepCache
from longcat_train.techniques import apply_fast_paths

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


def random_loras(model: LongCatVideoTransformer, count: int, rank: int) -> list[tuple[LowRankSet, float]]:
    """``count`` random rank-``rank`` LoRAs on every block linear, as ``load_loras`` takes them."""
    g = torch.Generator().manual_seed(1)
    linears = matching_linears(model, TrainConfig().lora_targets)
    loras = []
    for _ in range(count):
        deltas = {
            name: LowRankDelta(
                (
                    LowRankPiece(
                        torch.randn(rank, linear.in_features, generator=g) * 0.01,
                        torch.randn(linear.out_features, rank, generator=g) * 0.01,
                    ),
                ),
                1.0,
            )
            for name, linear in linears.items()
        }
        loras.append((LowRankSet(deltas, "random"), 1.0))
    return loras


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # ru_maxrss is in KiB on Linux: the process's peak resident memory, weights included.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def build_vae(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    with created_on(device, dtype):
        # AutoencoderKLWan's default config is the Wan2.1 VAE's.
        vae = tiny_vae() if args.quick else AutoencoderKLWan()
    return vae.eval().requires_grad_(False)


def device_of(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return device, torch.float32 if device.type == "cpu" else torch.bfloat16


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


def report_header(benchmark: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    """What every report of this script starts with: the run, the machine, the settings shared by modes."""
    return {
        "benchmark": benchmark,
        "mode": "quick" if args.quick else "full",
        "device": device_name(device),
        "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "attention": args.attention,
        "compile": args.compile,
    }


def build_sampling_dit(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype, *, fast: bool = True
) -> LongCatVideoTransformer:
    """The DiT of ``--model`` (random weights by default), ``--attention`` set; with
    ``fast`` the speed options applied (:func:`speed_up` applies them later otherwise)."""
    if args.model:
        model = load_dit(args.model, dtype=dtype, device=device).eval().requires_grad_(False)
    else:
        model = build_dit(DiTConfig.tiny() if args.quick else DiTConfig.full(), device, dtype)
    model.attention_implementation = args.attention
    if fast:
        speed_up(model, args, device)
    return model


def speed_up(model: LongCatVideoTransformer, args: argparse.Namespace, device: torch.device) -> None:
    # Per-block compile: one graph shared by 48 blocks, far quicker to build than the whole model's.
    apply_fast_paths(model, device, fp8_matmuls=args.fp8_matmuls, compile=args.compile)


def relative_error(latents: torch.Tensor, reference: torch.Tensor) -> float:
    """``||latents - reference|| / ||reference||`` over the generated frames (frame 0 is the start frame)."""
    diff = (latents[:, :, 1:].double() - reference[:, :, 1:].double()).norm()
    return float(diff / reference[:, :, 1:].double().norm())


def timed_sample(model, inputs: tuple, settings: dict, steps: int, threshold: float, device) -> dict:
    """One sample of ``steps`` steps, timed: its latents, seconds and, cached, what the cache did."""
    cache = StepCache(threshold)
    sync(device)
    start = time.perf_counter()
    latents = denoise(model, *inputs, steps=steps, step_cache=cache, **settings)
    sync(device)
    seconds = time.perf_counter() - start
    run = {"seconds_denoise": seconds, "seconds_per_step": seconds / steps, "latents": latents}
    if threshold > 0:
        run["reused_calls"] = len(cache.reused)
        run["first_block_changes"] = [None if c is None else round(c, 5) for c in cache.changes]
    return run


def speed_name(args: argparse.Namespace, step_cache: float, fast: bool = True) -> str:
    parts = [args.attention]
    parts += ["fp8_matmuls"] if fast and args.fp8_matmuls else []
    parts += ["compile"] if fast and args.compile else []
    parts += [f"step_cache {step_cache:g}"] if step_cache > 0 else []
    return " + ".join(parts)


def run(args: argparse.Namespace) -> dict:
    """The sample of ``args`` (and, with ``--step-cache``, its uncached reference first), then a decode."""
    device, dtype = device_of(args)
    plain_reference = args.step_cache > 0 and args.reference == "plain"
    model = build_sampling_dit(args, device, dtype, fast=not plain_reference)
    config = model.config
    latent_h, latent_w, latent_t = args.height // 8, args.width // 8, latent_frames(args.frames)

    g = torch.Generator().manual_seed(0)
    cond = torch.randn(1, 16, 1, latent_h, latent_w, generator=g)
    prompt = torch.randn(PROMPT_TOKENS, config.caption_channels, generator=g)
    negative = torch.randn(1, config.caption_channels, generator=g)
    inputs = (cond, [prompt], negative)
    settings = dict(
        frames=args.frames, guidance=args.guidance, seeds=[0], distill=args.distill, progress=not args.quiet
    )

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs: list[dict] = []
    if args.step_cache > 0:
        # Warm-up (kernel selection, compilation) is not part of the steady-state time.
        denoise(model, *inputs, steps=args.warmup_steps, **settings)
        runs.append({"name": speed_name(args, 0.0, fast=not plain_reference)})
        runs[-1].update(timed_sample(model, inputs, settings, args.steps, 0.0, device))
        if plain_reference:
            speed_up(model, args, device)
    denoise(model, *inputs, steps=args.warmup_steps, step_cache=args.step_cache, **settings)
    runs.append({"name": speed_name(args, args.step_cache)})
    runs[-1].update(timed_sample(model, inputs, settings, args.steps, args.step_cache, device))
    merged: dict = {}
    if args.merged_loras:
        # The headline sample again in this process once the LoRAs are merged: what merging costs per step.
        sync(device)
        start = time.perf_counter()
        load_loras(model, random_loras(model, args.merged_loras, args.lora_rank), merge=True, device=device)
        sync(device)
        merge_s = time.perf_counter() - start
        again = timed_sample(model, inputs, settings, args.steps, args.step_cache, device)
        merged = {
            "seconds_merge": merge_s,
            "seconds_denoise_merged": again["seconds_denoise"],
            "merged_over_base": again["seconds_denoise"] / runs[-1]["seconds_denoise"],
        }
    dit_peak = peak_memory_gb(device)
    for r in runs:
        r["latent_relative_error"] = relative_error(r["latents"], runs[0]["latents"])
    latents = runs[-1]["latents"]

    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    vae = build_vae(args, device, dtype)
    if args.vae_tiling:
        vae.enable_tiling()
    decode_latents(vae, latents[:, :, :2])  # warm-up on two latent frames
    sync(device)
    start = time.perf_counter()
    video = decode_latents(vae, latents)
    sync(device)
    decode_s = time.perf_counter() - start
    for r in runs:
        del r["latents"]
        r["seconds_per_video"] = r["seconds_denoise"] + decode_s
    headline = runs[-1]

    return {
        **report_header("sample_i2v", args, device, dtype),
        "weights": args.model or "random",
        "fp8_matmuls": args.fp8_matmuls,
        "step_cache": args.step_cache,
        "reference": args.reference if args.step_cache > 0 else None,
        "distill": args.distill,
        "merged_loras": args.merged_loras,
        "lora_rank": args.lora_rank if args.merged_loras else None,
        "size": [args.height, args.width, args.frames],
        "latent_shape": [16, latent_t, latent_h, latent_w],
        "video_shape": list(video.shape[1:]),
        "steps": args.steps,
        "guidance": args.guidance,
        "seconds_per_step": headline["seconds_per_step"],
        "seconds_denoise": headline["seconds_denoise"],
        "seconds_decode": decode_s,
        "seconds_per_video": headline["seconds_per_video"],
        **merged,
        "peak_memory_gb_dit": dit_peak,
        "peak_memory_gb_decode": peak_memory_gb(device),
        # Side by side, same seed and inputs: the reference first, its error 0.
        "runs": runs,
    }


def run_refine(args: argparse.Namespace) -> dict:
    """The 720p refinement of one random ``--height`` x ``--width`` x ``--frames`` video, timed end to end."""
    device, dtype = device_of(args)
    model = build_sampling_dit(args, device, dtype)
    vae = build_vae(args, device, dtype)
    if args.vae_tiling:
        vae.enable_tiling()
    g = torch.Generator().manual_seed(0)
    video = torch.randint(
        0, 256, (1, args.frames, args.height, args.width, 3), generator=g, dtype=torch.uint8
    )
    image = video[0, 0].numpy()
    prompt = [torch.randn(PROMPT_TOKENS, model.config.caption_channels, generator=g)]
    settings = RefineSettings(area=args.refine_area, temporal=args.refine_temporal, attention=args.attention)
    step_times: list[float] = []

    def refine(frames: int, on_step=None):
        return refine_videos(
            model,
            vae,
            video[:, :frames].numpy(),
            image,
            prompt,
            settings,
            on_step=on_step,
            progress=not args.quiet,
        )

    refine(5)  # warm-up: kernels and the VAE's convolutions at this size
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    refined = refine(args.frames, on_step=lambda i, n: (sync(device), step_times.append(time.perf_counter())))
    sync(device)
    total_s = time.perf_counter() - start
    steps = len(step_times)
    return {
        **report_header("refine_720p", args, device, dtype),
        "size": [args.height, args.width, args.frames],
        "refine_area": list(args.refine_area),
        "temporal": args.refine_temporal,
        "video_shape": list(refined.shape[1:]),
        "steps": steps,
        # The first step's time includes upsampling and encoding; the rest are DiT steps alone.
        "seconds_per_step": (step_times[-1] - step_times[0]) / max(steps - 1, 1),
        "seconds_upsample_encode_first_step": step_times[0] - start,
        "seconds_decode": start + total_s - step_times[-1],
        "seconds_per_video": total_s,
        "peak_memory_gb": peak_memory_gb(device),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny model on the CPU at 128x128x9, 4 steps (refine: 64x64 -> 128x128)",
    )
    parser.add_argument("--height", type=int, default=DEFAULT_AREA[0])
    parser.add_argument("--width", type=int, default=DEFAULT_AREA[1])
    parser.add_argument("--frames", type=int, default=DEFAULT_FRAMES)
    parser.add_argument("--steps", type=int, help=f"default {DEFAULT_STEPS}, {DISTILL_STEPS} with --distill")
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument(
        "--guidance", type=float, help=f"default {DEFAULT_GUIDANCE:g}, {DISTILL_GUIDANCE:g} with --distill"
    )
    parser.add_argument(
        "--distill", action="store_true", help="the distilled schedule (16 steps, no guidance)"
    )
    parser.add_argument(
        "--merged-loras", type=int, default=0, help="then merge N random LoRAs and time the sample again"
    )
    parser.add_argument("--lora-rank", type=int, default=128, help="rank of each merged LoRA")
    parser.add_argument("--refine", action="store_true", help="time the 720p refinement instead")
    parser.add_argument("--refine-temporal", action="store_true", help="refine to twice the frames too")
    parser.add_argument(
        "--attention",
        help="DiT attention implementation (sdpa, xformers, block_sparse); default sdpa, block_sparse with --refine",
    )
    parser.add_argument(
        "--compile", action="store_true", help="compile the DiT block step first (compile_blocks)"
    )
    parser.add_argument("--fp8-matmuls", action="store_true", help="float8 matmuls for the block linears")
    parser.add_argument(
        "--step-cache",
        type=float,
        default=0.0,
        metavar="T",
        help="first-block cache threshold; > 0 also makes the uncached reference sample first",
    )
    parser.add_argument(
        "--reference",
        choices=["uncached", "plain"],
        default="uncached",
        help="the --step-cache reference: the same speed options uncached, or plain (bf16, eager, uncached)",
    )
    parser.add_argument("--model", help="real DiT weights: a checkpoint directory or hub id (default random)")
    parser.add_argument("--vae-tiling", action="store_true", help="decode in spatial tiles (less memory)")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--output", help="also write the JSON to this file")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.refine and args.merged_loras:
        parser.error("--merged-loras times the I2V sample; leave it out with --refine")
    args.attention = args.attention or ("block_sparse" if args.refine else "sdpa")
    args.refine_area = DEFAULT_REFINE_AREA
    if args.quick:
        args.height, args.width, args.frames, args.warmup_steps = 128, 128, 9, 1
        args.steps, args.lora_rank = args.steps or 4, min(args.lora_rank, 8)
        if args.refine:
            args.height, args.width, args.frames, args.refine_area = 64, 64, 5, (128, 128)
        args.device = args.device or "cpu"
    if args.steps is None:
        args.steps = DISTILL_STEPS if args.distill else DEFAULT_STEPS
    if args.guidance is None:
        args.guidance = DISTILL_GUIDANCE if args.distill else DEFAULT_GUIDANCE
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    result = run_refine(args) if args.refine else run(args)
    write_report(result, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
