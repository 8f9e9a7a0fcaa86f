"""The trainer's step, fed by the real shard loader, against the peer-style step and a naive one in the same run.

    LONGCAT_OFFICIAL_DIR=/path/to/LongCat-Video python benchmarks/train_step.py [--steps 5] [--warmup 2]
        [--checkpointing selective] [--no-naive] [--out FILE]
    python benchmarks/train_step.py --quick      # CPU smoke run: tiny model, 9 frames at 64x64
    python benchmarks/train_step.py --conditioning continuation   # 13 clean leading frames (4 latents)
    python benchmarks/train_step.py --trainer-defaults --no-naive  # ours as longcat-train's defaults set it up

Full config with random bf16 weights at 480x832x93 (24 latent frames of 60x104: 37,440 tokens), image-to-
video, rank-8 LoRA on the default targets, batch 1, fused AdamW, bf16 autocast. Data: a temporary shard of
random full-size samples (latents, start-frame latents, 120-token umT5-sized text embeddings) streamed
through ``ShardStream`` + ``DataLoader`` exactly as ``longcat-train`` reads it; ``data_wait`` is the time
``train_step`` spent blocked on ``next(loader)``.

Variants, one set of frozen weights, same batches:
- ``ours``: ``longcat_train.trainer.train_step`` as configured (``--checkpointing``, default ``selective``:
  self-attention outputs kept, the rest recomputed); frozen base weights get no weight gradients. With
  ``--trainer-defaults``: configured as ``longcat-train`` with its default flags is on this device
  (``planning.resolve_auto`` for a run of the default ``max_train_steps`` at this clip, with its per-block
  checkpointing plan; ``--compile`` / ``--fp8-matmuls`` / ``--checkpointing`` given count as typed flags);
  the JSON's ``config.trainer_defaults`` records what they resolved to.
- ``peer`` (the baseline, with ``LONGCAT_OFFICIAL_DIR``): what other LongCat trainers run: the official
  ``LongCatVideoTransformer3DModel`` on the same weight tensors, a peft LoRA on the same targets, its own
  diffusers gradient checkpointing, eager, its attention kernels (flash-attn / xformers where installed,
  else SDPA), fed as the official pipeline feeds it, through the same ``train_step`` (loss, clipping,
  AdamW). ``same_loss`` compares both models' loss on one batch and noise before training (LoRA B is zero,
  so they compute the same function); ``speedup_vs_peer`` is the ratio of the step times.
- ``naive``: ``full`` recompute and every base weight requiring a gradient (computed in backward, then
  freed by a post-accumulate hook so that both variants fit in memory; the optimizer still updates the
  LoRA only).

Warm-up steps are dropped; reported: mean/min/max seconds per step, peak allocated memory, data wait per
step (and as a fraction of the step). ``--profile`` adds one step of ours (and of the peer) under the
torch profiler: GPU time per kernel family (attention, GEMM, fused elementwise, copies), the 20
costliest kernels and every kernel of a millisecond or more, to say where a step goes. Prints one JSON
document (``--out`` also writes it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from _peer import base_state, build_peer  # benchmarks/_peer.py
from _shared import build_model, kernel_profile, write_report, write_shard  # benchmarks/_shared.py

from longcat_data.defaults import DEFAULT_MODEL, TINY
from longcat_data.stream import ShardStream, StreamConfig, make_loader
from longcat_train import trainer
from longcat_train.architecture import ATTENTION_BACKENDS, CHECKPOINT_MODES
from longcat_train.config import AUTO, TrainConfig
from longcat_train.dit_config import DiTConfig
from longcat_train.memory_plan import mode_counts
from longcat_train.parallel import Dist
from longcat_train.planning import device_gpu, resolve_auto
from longcat_train.techniques import apply_fast_paths


def profile_step(model, batches, optimizer, params, cfg: TrainConfig, d: Dist) -> dict:
    """One step under the torch profiler: GPU milliseconds per kernel family and the costliest kernels."""
    generator = torch.Generator(d.device).manual_seed(0)
    return kernel_profile(
        lambda: trainer.train_step(model, batches, optimizer, params, cfg, generator, None, d)
    )


def make_naive(model: torch.nn.Module) -> None:
    """Full recompute, and weight gradients for the frozen base (freed as soon as they are accumulated)."""
    model.get_base_model().gradient_checkpointing = "full"
    for name, p in model.named_parameters():
        if "lora_" not in name:
            p.requires_grad_(True)
            p.register_post_accumulate_grad_hook(lambda t: setattr(t, "grad", None))


def measure(
    name: str,
    model,
    batches,
    optimizer,
    params,
    cfg: TrainConfig,
    d: Dist,
    steps: int,
    warmup: int,
    checkpointing: str,
) -> dict:
    cuda = d.device.type == "cuda"
    generator = torch.Generator(d.device).manual_seed(0)
    times, waits, warmups = [], [], []
    for i in range(warmup + steps):
        if cuda and i == warmup:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = trainer.train_step(model, batches, optimizer, params, cfg, generator, None, d)
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
            waits.append(result.data_wait)
        else:  # the first one compiles, where compiled
            warmups.append(time.perf_counter() - start)
        print(
            f"{name} step {i + 1}/{warmup + steps}: {time.perf_counter() - start:.3f} s, loss {result.loss:.4f}",
            file=sys.stderr,
        )
    out = {
        "step_seconds_mean": statistics.mean(times),
        "step_seconds_min": min(times),
        "step_seconds_max": max(times),
        "data_wait_seconds_mean": statistics.mean(waits),
        "data_wait_fraction": sum(waits) / sum(times),
        "warmup_seconds": warmups,
        "checkpointing": checkpointing,
    }
    if cuda:
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(d.device) / 2**30
    return out


def compare_losses(ours, peer, batch: dict, cfg: TrainConfig, d: Dist) -> dict:
    """Both models' loss on one batch with the same noise and sigmas, before any update."""
    losses = {}
    for name, model in (("ours", ours), ("peer", peer)):
        generator = torch.Generator(d.device).manual_seed(0)
        autocast = torch.autocast("cuda", torch.bfloat16, enabled=d.device.type == "cuda")
        with torch.no_grad(), autocast:
            losses[name] = trainer.training_loss(model, batch, cfg, generator, None, d.device).item()
    losses["relative_difference"] = abs(losses["ours"] - losses["peer"]) / abs(losses["peer"])
    return losses


def trainer_defaults(
    cfg: TrainConfig, args: argparse.Namespace, device: torch.device
) -> tuple[TrainConfig, str | tuple[str, ...], dict]:
    """``cfg`` as ``longcat-train`` resolves its defaults on ``device`` for this clip (the benchmark's
    flags that were given count as typed), the blocks' checkpointing and what the autos became."""
    typed = replace(
        cfg,
        compile=True if args.compile else None,
        fp8_matmuls=True if args.fp8_matmuls else None,
        gradient_checkpointing=args.checkpointing or AUTO,
    )
    height, width = (int(x) for x in cfg.area.split("x"))
    resolved = resolve_auto(typed, device_gpu(device), steps=typed.max_train_steps, area=(height, width))
    if resolved.problem:
        raise SystemExit(resolved.problem)
    for line in (resolved.line, resolved.plan, resolved.warning):
        if line:
            print(line, file=sys.stderr)
    out = resolved.cfg
    modes = resolved.checkpointing or out.gradient_checkpointing
    record = {
        "line": resolved.line,
        "planned_steps": typed.max_train_steps,
        "compile": out.compile,
        "fp8_matmuls": out.fp8_matmuls,
        "gradient_checkpointing": out.gradient_checkpointing,
        "memory_budget": out.memory_budget,
        "checkpointing_per_block": mode_counts(resolved.checkpointing) if resolved.checkpointing else None,
        "warning": resolved.warning,
    }
    return out, modes, record


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU smoke run with the tiny model")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    parser.add_argument(
        "--checkpointing",
        choices=CHECKPOINT_MODES,
        help="ours on every block (default: selective; with --trainer-defaults: the trainer's auto plan)",
    )
    parser.add_argument(
        "--trainer-defaults",
        action="store_true",
        help="ours as longcat-train's default flags resolve on this device (planning.resolve_auto)",
    )
    parser.add_argument("--attention", default="sdpa", choices=ATTENTION_BACKENDS)
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument(
        "--conditioning",
        default="i2v",
        choices=("i2v", "t2v", "continuation"),
        help="what the clips are conditioned on (the trainer's --conditioning)",
    )
    parser.add_argument(
        "--cond-frames",
        type=int,
        default=None,
        help="continuation: clean leading frames (default 13; 5 quick)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="compile our block step (the naive step runs after, compiled too)",
    )
    parser.add_argument(
        "--compile-tune",
        action="store_true",
        help="with --compile: coordinate-descent tuning of the fused kernels (the trainer's compile_tune)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="one more step of ours (and of the peer) under the torch profiler",
    )
    parser.add_argument("--no-naive", dest="naive", action="store_false", help="skip the naive step")
    parser.add_argument(
        "--peer",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the peer-style baseline (default: on where LONGCAT_OFFICIAL_DIR is set)",
    )
    parser.add_argument(
        "--fp8-matmuls",
        action="store_true",
        help="float8 matmuls for the frozen base linears (longcat_train.quant.use_fp8_matmuls); "
        "measures ours only",
    )
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)

    device = torch.device("cpu" if args.quick else "cuda")
    config = DiTConfig.tiny() if args.quick else DiTConfig.full()
    latent_shape = (3, 8, 8) if args.quick else (24, 60, 104)
    T, H, W = latent_shape
    cfg = TrainConfig(
        model=TINY if args.quick else DEFAULT_MODEL,  # its shape is what the memory plan reads
        frames=4 * (T - 1) + 1,
        area=f"{8 * H}x{8 * W}",
        gradient_checkpointing=args.checkpointing or "selective",
        compile=args.compile,
        fp8_matmuls=args.fp8_matmuls,
        num_workers=args.num_workers,
        mixed_precision="bf16",
        attention=args.attention,
        conditioning=args.conditioning,
        cond_frames=args.cond_frames or (5 if args.quick else 13),
    )
    d = Dist(device=device)
    checkpointing: str | tuple[str, ...] = cfg.gradient_checkpointing
    defaults = None
    if args.trainer_defaults:
        cfg, checkpointing, defaults = trainer_defaults(cfg, args, device)
    dtype = trainer.weight_dtype(cfg, device)

    model = build_model(config, device, dtype)
    if args.peer is None:
        args.peer = bool(os.environ.get("LONGCAT_OFFICIAL_DIR"))
    # The frozen bf16 tensors, shared with the peer model (ours may store float8 copies instead).
    state = base_state(model) if args.peer else None
    base = model.get_base_model()
    base.attention_implementation = args.attention
    base.gradient_checkpointing = checkpointing
    apply_fast_paths(
        model,
        device,
        fp8_matmuls=cfg.fp8_matmuls,
        compile=cfg.compile,
        tune=args.compile_tune,
        store_fp8=True,
    )
    if cfg.fp8_matmuls:
        args.naive = False  # the naive step's base weight gradients do not exist with float8 matmuls
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = trainer.build_optimizer(params, cfg, device)

    with tempfile.TemporaryDirectory() as tmp:
        total = 2 * (args.warmup + args.steps)
        shard = write_shard(Path(tmp) / "bench-000000.tar", config, latent_shape, samples=min(total, 16))
        stream = ShardStream([str(shard)], StreamConfig(shuffle_buffer=4, resampled=True))
        batches = iter(make_loader(stream, args.num_workers, pin_memory=device.type == "cuda"))
        mode = checkpointing if isinstance(checkpointing, str) else str(mode_counts(checkpointing))
        ours = measure("ours", model, batches, optimizer, params, cfg, d, args.steps, args.warmup, mode)
        if args.profile and device.type == "cuda":
            ours["profile"] = profile_step(model, batches, optimizer, params, cfg, d)
        peer = same_loss = None
        if args.peer:
            peer_model, kernel = build_peer(state, config, rank=8, targets=list(cfg.lora_targets))
            peer_model.train()
            same_loss = compare_losses(model, peer_model, next(batches), cfg, d)
            peer_params = [p for p in peer_model.parameters() if p.requires_grad]
            peer_optimizer = trainer.build_optimizer(peer_params, cfg, device)
            peer = measure(
                "peer",
                peer_model,
                batches,
                peer_optimizer,
                peer_params,
                cfg,
                d,
                args.steps,
                args.warmup,
                "full",
            )
            peer["attention_kernel"] = kernel
            if args.profile and device.type == "cuda":
                peer["profile"] = profile_step(peer_model, batches, peer_optimizer, peer_params, cfg, d)
            del peer_model, peer_optimizer, peer_params
        naive = None
        if args.naive:
            make_naive(model)
            naive = measure(
                "naive", model, batches, optimizer, params, cfg, d, args.steps, args.warmup, "full"
            )

    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "quick": args.quick,
        "config": {
            "dit": "tiny" if args.quick else "full",
            "latent_shape": [config.in_channels, T, H, W],
            "tokens": T * (H // 2) * (W // 2),
            "batch": 1,
            "lora_rank": 8,
            "attention": args.attention,
            "conditioning": args.conditioning,
            "cond_frames": cfg.cond_frames if args.conditioning == "continuation" else None,
            "weights": str(dtype).removeprefix("torch."),
            "num_workers": args.num_workers,
            "steps": args.steps,
            "warmup": args.warmup,
            "compiled": cfg.compile,
            "compile_tune": args.compile_tune,
            "fp8_matmuls": cfg.fp8_matmuls,
            "trainer_defaults": defaults,
        },
        "ours": ours,
    }
    if peer is not None:
        report["peer"] = peer
        report["speedup_vs_peer"] = peer["step_seconds_mean"] / ours["step_seconds_mean"]
        report["same_loss"] = same_loss
    if naive is not None:
        report["naive"] = naive
        report["speedup"] = naive["step_seconds_mean"] / ours["step_seconds_mean"]
    write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
