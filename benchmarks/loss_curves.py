"""Two ways to run the same LoRA training, loss curves side by side: dense vs block-sparse attention, or
bf16 vs float8 matmuls.

    python benchmarks/loss_curves.py --depth 12 --compile                          # GPU: the first 12 blocks
    python benchmarks/loss_curves.py --depth 12 --compile --compare fp8-matmuls    # block-sparse, bf16 vs fp8
    python benchmarks/loss_curves.py --compile                                     # GPU: full 48 blocks
    python benchmarks/loss_curves.py --quick                                       # CPU: tiny model

One model, trained twice from the same start: LoRA weights restored to their initial values, a fresh
AdamW, the same seed for the noise / sigma generator and the process RNGs, and a fresh loader over the same
shard with the same seed, so both runs see the same clips in the same order with the same noise and
sigma draws (checked: the clip keys and the generator state after every step must be equal, else the
script fails). The only difference, by ``--compare``:

- ``attention`` (default): ``attention_implementation`` ``sdpa`` (dense, the reference) in the first run,
  ``block_sparse`` (``longcat_kernels``, default density 1/16 of the key blocks, 4x4x4 blocks) in the second.
- ``fp8-matmuls``: block-sparse attention in both; the second run computes the frozen base linears in
  float8 (``longcat_train.quant.use_fp8_matmuls``, the trainer's ``fp8_matmuls``), the first in bf16.

Each step is the trainer's own ``trainer.train_step`` (bf16 autocast on CUDA, selective
checkpointing, gradient clipping 1.0, constant ``--lr``: 1e-4, the trainer's default; 1e-3 with ``--quick``,
where the tiny model's loss hardly moves at 1e-4 within 50 steps).

Model: the full config with random bf16 weights (``--depth`` keeps the first N of the 48 blocks), or
``--model`` (an official checkpoint directory or hub id, loaded with ``load_dit``, then cut to ``--depth``).
Random weights are the harsher test: their attention is nearly uniform, so keeping 1/16 of the key blocks
changes the output more than it does for the trained model, whose attention is peaked.
Data: a temporary shard of ``--samples`` structured synthetic clips (smooth random latent fields, see
``_shared.smooth_latents``; random umT5-sized text embeddings) at ``--size`` (default 480x832x93: 24
latent frames of 60x104, 37,440 tokens), image-to-video, streamed through ``ShardStream`` + ``DataLoader``
as ``longcat-train`` reads it. With a few clips repeated, the LoRA can fit them and the loss moves.

Step times and run lengths: ``benchmarks/RESULTS.md``; ``--depth`` shortens a run in proportion.
``--quick``: the tiny model on the CPU at 256x256x33 (2,304 tokens; 32 noisy 4x4x4 blocks, of which 2
are kept per query block). On the CPU ``block_sparse`` runs the torch path of ``longcat_kernels`` (SDPA
under the expanded block mask): the same masked math as the Triton kernel, so still a real comparison.

Writes to ``--out`` (default ``runs/loss_curves``): ``loss_curves.json`` (both per-step loss lists, their
differences, moving averages, grad norms, step times, the statistics below) and ``loss_curves.png``.
Statistics (reference = the first run, candidate = the second): ``noise`` = the step-to-step noise of one
reference loss, std(ref[i+1] - ref[i]) / sqrt(2) (each step draws its own sigma and noise, so single losses
scatter a lot); ``mean_abs_diff`` = mean over steps of |candidate - reference|; their ratio; the Pearson
correlation of the two curves; the largest gap between their moving averages (``--window`` steps) against
the noise of such an average, noise / sqrt(window). Verdict ``within_noise``: mean |candidate - reference|
< noise and the largest moving-average gap < 2 x noise / sqrt(window). Prints the JSON document.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import torch
from _shared import build_model, write_report, write_shard  # benchmarks/_shared.py

from longcat_data.stream import ShardStream, StreamConfig, make_loader
from longcat_train import lora, trainer
from longcat_train.config import TrainConfig
from longcat_train.dit_config import DiTConfig
from longcat_train.parallel import Dist
from longcat_train.quant import use_fp8_matmuls

# --compare -> (reference, candidate), each (label, attention, float8 matmuls).
COMPARISONS: dict[str, tuple[tuple[str, str, bool], tuple[str, str, bool]]] = {
    "attention": (("dense", "sdpa", False), ("sparse", "block_sparse", False)),
    "fp8-matmuls": (("bf16", "block_sparse", False), ("fp8", "block_sparse", True)),
}


def parse_size(text: str) -> tuple[int, int, int]:
    """``HxWxF`` pixels and frames -> latent ``(T, H, W)``: 4x time and 8x space strides, 2x2 patches."""
    try:
        h, w, frames = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size {text!r}: expected HxWxF, e.g. 480x832x93") from None
    if h % 16 or w % 16 or frames < 5 or (frames - 1) % 4:
        raise argparse.ArgumentTypeError(f"--size {text}: H and W must be multiples of 16, F = 4k+1 >= 5")
    return 1 + (frames - 1) // 4, h // 8, w // 8


def make_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    if args.model is None:
        config = DiTConfig.tiny() if args.quick else DiTConfig.full()
        if args.depth:
            config.depth = args.depth
        return build_model(config, device, dtype)
    from longcat_train.loading import load_dit

    base = load_dit(args.model, dtype=dtype, device=device)
    if args.depth and args.depth < len(base.blocks):
        del base.blocks[args.depth :]
        base.config.depth = args.depth
        if device.type == "cuda":
            torch.cuda.empty_cache()
    torch.manual_seed(0)
    return lora.apply_lora(base, rank=8, targets=TrainConfig().lora_targets)


def rng_digest(generator: torch.Generator) -> str:
    return hashlib.sha1(generator.get_state().numpy().tobytes()).hexdigest()[:16]


def train_run(
    name: str,
    attention: str,
    model: torch.nn.Module,
    initial: dict[str, torch.Tensor],
    shard: Path,
    cfg: TrainConfig,
    d: Dist,
    steps: int,
) -> dict:
    """``steps`` optimizer steps from the initial LoRA with ``attention``; the per-step record."""
    model.get_base_model().attention_implementation = attention
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(initial[n])
    trainer.seed_rngs(cfg.seed)
    optimizer = trainer.build_optimizer(list(params.values()), cfg, d.device)
    stream = ShardStream(
        [str(shard)], StreamConfig(seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer, resampled=True)
    )
    loader = iter(make_loader(stream, cfg.num_workers, pin_memory=d.device.type == "cuda"))
    keys: list[list[str]] = []

    def recorded(it):
        for batch in it:
            keys.append(batch["keys"])
            yield batch

    batches = recorded(loader)
    generator = torch.Generator(d.device).manual_seed(cfg.seed)
    cuda = d.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    losses, grad_norms, seconds, rng = [], [], [], []
    for i in range(steps):
        start = time.perf_counter()
        result = trainer.train_step(model, batches, optimizer, list(params.values()), cfg, generator, None, d)
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        losses.append(result.loss)
        grad_norms.append(result.grad_norm)
        rng.append(rng_digest(generator))
        print(
            f"{name} step {i + 1}/{steps}: loss {result.loss:.5f}, grad norm {result.grad_norm:.4f}, "
            f"{seconds[-1]:.2f} s",
            file=sys.stderr,
        )
    out = {
        "attention": attention,
        "losses": losses,
        "grad_norms": grad_norms,
        "step_seconds": seconds,
        # The first steps include compilation (and, for the first run, the loader's start).
        "step_seconds_median": statistics.median(seconds),
        "keys": keys[:steps],
        "rng": rng,
        "lora": {n: p.detach().float().cpu().clone() for n, p in params.items()},
    }
    if cuda:
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(d.device) / 2**30
    del optimizer, loader, batches
    return out


def moving_average(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last ``window`` steps (fewer at the start)."""
    c = np.cumsum(np.insert(x, 0, 0.0))
    i = np.arange(1, len(x) + 1)
    lo = np.maximum(0, i - window)
    return (c[i] - c[lo]) / (i - lo)


def compare(reference: list[float], candidate: list[float], window: int) -> dict:
    """Per-step differences and the "within noise" statistics (see the module docstring)."""
    a, b = np.asarray(reference, dtype=np.float64), np.asarray(candidate, dtype=np.float64)
    diff = b - a
    n = len(a)
    ma_a, ma_b = moving_average(a, window), moving_average(b, window)
    noise = float(np.std(np.diff(a), ddof=1) / math.sqrt(2)) if n > 2 else float("nan")
    mean_abs = float(np.mean(np.abs(diff)))
    ma_gap = float(np.max(np.abs(ma_b - ma_a)))
    ma_noise = noise / math.sqrt(min(window, n))
    corr = float(np.corrcoef(a, b)[0, 1]) if n > 1 and a.std() > 0 and b.std() > 0 else float("nan")
    return {
        "steps": n,
        "diff": diff.tolist(),
        "reference_moving_average": ma_a.tolist(),
        "candidate_moving_average": ma_b.tolist(),
        "window": window,
        "noise": noise,
        "mean_abs_diff": mean_abs,
        "max_abs_diff": float(np.max(np.abs(diff))),
        "mean_diff": float(np.mean(diff)),
        "mean_diff_stderr": float(np.std(diff, ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
        "mean_rel_diff": float(np.mean(np.abs(diff) / np.abs(a))),
        "mean_abs_diff_over_noise": mean_abs / noise,
        "correlation": corr,
        "max_moving_average_gap": ma_gap,
        "max_moving_average_gap_over_its_noise": ma_gap / ma_noise,
        "reference_first_last_window": [float(a[:window].mean()), float(a[-window:].mean())],
        "candidate_first_last_window": [float(b[:window].mean()), float(b[-window:].mean())],
        "within_noise": bool(mean_abs < noise and ma_gap < 2 * ma_noise),
    }


def lora_distance(initial: dict, reference: dict, candidate: dict) -> dict:
    """How far the two trained adapters are apart, relative to how far training moved them."""

    def norm(tensors):
        return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))

    moved = norm(reference[n] - initial[n].float().cpu() for n in reference)
    apart = norm(candidate[n] - reference[n] for n in reference)
    return {
        "reference_update_norm": moved,
        "candidate_minus_reference_norm": apart,
        "relative": apart / moved if moved > 0 else float("nan"),
    }


# ---------------------------------------------------------------- figure


def plot(
    path: Path, stats: dict, ref: list[float], cand: list[float], labels: tuple[str, str], title: str
) -> str:
    """Two panels: both loss curves (raw and moving average), and candidate - reference with the +-noise band.
    matplotlib when installed, else a PIL line drawing. Returns which one drew it."""
    try:
        import matplotlib
    except ImportError:
        _plot_pil(path, stats, ref, cand, labels, title)
        return "pil"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.arange(1, len(ref) + 1)
    a, b = labels
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True, height_ratios=(2, 1))
    for losses, run, label, color in (
        (ref, "reference", a, "tab:blue"),
        (cand, "candidate", b, "tab:orange"),
    ):
        top.plot(steps, losses, color=color, lw=0.8, alpha=0.5, label=label)
        mean = stats[f"{run}_moving_average"]
        top.plot(steps, mean, color=color, lw=2.2, label=f"{label}, {stats['window']}-step mean")
    top.set_ylabel("loss")
    top.set_title(textwrap.fill(title, 110), fontsize=9)
    top.legend(fontsize=8)
    bottom.axhspan(-stats["noise"], stats["noise"], color="0.85", label=f"+- step noise of one {a} loss")
    bottom.plot(steps, stats["diff"], color="tab:red", lw=1.2, marker=".", label=f"{b} - {a}")
    bottom.axhline(0, color="k", lw=0.6)
    bottom.set_xlabel("step")
    bottom.set_ylabel("difference")
    bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return "matplotlib"


def _plot_pil(
    path: Path, stats: dict, ref: list[float], cand: list[float], labels: tuple[str, str], title: str
) -> None:
    from PIL import Image, ImageDraw, ImageFont

    W, H, left, right = 1100, 760, 90, 30
    font = ImageFont.load_default(size=14)
    small = ImageFont.load_default(size=12)
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    blue, orange, red, grey = (31, 119, 180), (255, 127, 14), (214, 39, 40), (225, 225, 225)
    light_blue, light_orange = (165, 200, 228), (255, 200, 150)
    n = len(ref)
    a, b = labels
    draw.text((left, 8), title, fill="black", font=font)

    def panel(top: int, bottom: int, lo: float, hi: float, ylabel: str):
        pad = 0.05 * (hi - lo or 1.0)
        lo, hi = lo - pad, hi + pad

        def xy(i: int, v: float) -> tuple[float, float]:
            x = left + (W - left - right) * (i / max(1, n - 1))
            return x, bottom - (bottom - top) * (v - lo) / (hi - lo)

        draw.rectangle((left, top, W - right, bottom), outline="black")
        for k in range(5):
            v = lo + (hi - lo) * k / 4
            _, y = xy(0, v)
            draw.line((left - 5, y, left, y), fill="black")
            draw.text((left - 8, y), f"{v:.4g}", fill="black", font=small, anchor="rm")
        draw.text((left, top - 4), ylabel, fill="black", font=font, anchor="lb")
        return xy

    def line(xy, values, color, width):
        draw.line([xy(i, v) for i, v in enumerate(values)], fill=color, width=width, joint="curve")

    # Top: losses.
    values = [*ref, *cand]
    xy = panel(58, 470, min(values), max(values), "loss")
    line(xy, ref, light_blue, 1)
    line(xy, cand, light_orange, 1)
    line(xy, stats["reference_moving_average"], blue, 3)
    line(xy, stats["candidate_moving_average"], orange, 3)
    legend = [
        (light_blue, f"{a}, per step"),
        (light_orange, f"{b}, per step"),
        (blue, f"{a}, {stats['window']}-step mean"),
        (orange, f"{b}, {stats['window']}-step mean"),
    ]
    for k, (color, text) in enumerate(legend):
        y = 70 + 18 * k
        draw.line((W - right - 300, y, W - right - 270, y), fill=color, width=3)
        draw.text((W - right - 262, y), text, fill="black", font=small, anchor="lm")

    # Bottom: the difference, inside the band of one reference loss's step noise.
    diff, noise = stats["diff"], stats["noise"]
    span = max(noise, *(abs(v) for v in diff))
    xy = panel(510, 700, -span, span, f"{b} - {a}")
    (x0, y_hi), (x1, y_lo) = xy(0, noise), xy(n - 1, -noise)
    draw.rectangle((x0, y_hi, x1, y_lo), fill=grey)
    draw.line((*xy(0, 0.0), *xy(n - 1, 0.0)), fill="black")
    line(xy, diff, red, 2)
    for i, v in enumerate(diff):
        x, y = xy(i, v)
        draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=red)
    draw.text(
        (left + 8, 516),
        f"grey: +-{noise:.4g}, the step-to-step noise of one {a} loss; red: {b} - {a} "
        f"(max |diff| {max(abs(v) for v in diff):.3g})",
        fill="black",
        font=small,
    )

    for i in range(0, n, max(1, round(n / 10))):
        x, _ = xy(i, 0.0)
        draw.line((x, 700, x, 705), fill="black")
        draw.text((x, 708), str(i + 1), fill="black", font=small, anchor="mt")
    draw.text((W / 2, 730), "step", fill="black", font=font, anchor="mt")
    img.save(path)


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU run with the tiny model at 256x256x33")
    parser.add_argument(
        "--compare",
        choices=tuple(COMPARISONS),
        default="attention",
        help="attention: dense vs block-sparse; fp8-matmuls: bf16 vs float8 base matmuls (block-sparse)",
    )
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps per run")
    parser.add_argument("--depth", type=int, default=0, help="keep the first N DiT blocks (0: all)")
    parser.add_argument("--size", type=parse_size, default=None, help="HxWxF clip size (default 480x832x93)")
    parser.add_argument("--samples", type=int, default=8, help="clips in the synthetic shard")
    parser.add_argument(
        "--model", default=None, help="load these weights (checkpoint dir or hub id) instead of random"
    )
    parser.add_argument("--compile", action="store_true", help="compile the block step (compile_blocks)")
    parser.add_argument(
        "--lr", type=float, default=None, help="constant learning rate (default 1e-4, --quick 1e-3)"
    )
    parser.add_argument("--seed", type=int, default=0, help="noise, sigma, LoRA and data-order seed")
    parser.add_argument("--window", type=int, default=5, help="moving-average window in steps")
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--out", type=Path, default=Path("runs/loss_curves"), help="output directory")
    args = parser.parse_args(argv)
    if args.steps < 3:
        parser.error("--steps must be at least 3")
    if args.lr is None:
        # The tiny model needs the larger rate for its loss to move visibly within 50 steps.
        args.lr = 1e-3 if args.quick else 1e-4

    device = torch.device("cpu" if args.quick else "cuda")
    latent_shape = args.size or ((9, 32, 32) if args.quick else (24, 60, 104))
    cfg = TrainConfig(
        model="benchmark",
        seed=args.seed,
        learning_rate=args.lr,
        gradient_checkpointing="selective",
        mixed_precision="bf16",
        num_workers=args.num_workers,
        shuffle_buffer=4,
        compile=args.compile,
    )
    d = Dist(device=device)
    dtype = trainer.weight_dtype(cfg, device)

    model = make_model(args, device, dtype)
    base = model.get_base_model()
    base.gradient_checkpointing = cfg.gradient_checkpointing
    if args.compile:
        base.compile_blocks()
    model.train()
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        shard = write_shard(
            Path(tmp) / "curves-000000.tar",
            base.config,
            latent_shape,
            args.samples,
            structured=True,
            seed=args.seed,
        )
        for label, attention, fp8 in COMPARISONS[args.compare]:
            if fp8:
                # Last in its comparison: float8 matmuls replace the base linears for good.
                use_fp8_matmuls(model)
            runs[label] = train_run(label, attention, model, initial, shard, cfg, d, args.steps)
    (a, ref), (b, cand) = runs.items()
    if ref["keys"] != cand["keys"] or ref["rng"] != cand["rng"]:
        raise SystemExit("the two runs did not see the same data or noise: the comparison is void")

    stats = compare(ref["losses"], cand["losses"], args.window)
    T, H, W = latent_shape
    tokens = T * (H // 2) * (W // 2)
    size = f"{8 * H}x{8 * W}x{1 + 4 * (T - 1)}"
    bsp = base.block_sparse_params or {}
    config = {
        "model": args.model or ("tiny, random" if args.quick else "full config, random bf16"),
        "depth": len(base.blocks),
        "size": size,
        "latent_shape": [base.config.in_channels, T, H, W],
        "tokens": tokens,
        "samples": args.samples,
        "steps": args.steps,
        "lr": args.lr,
        "seed": args.seed,
        "lora_rank": 8,
        "weights": str(dtype).removeprefix("torch."),
        "compiled": args.compile,
        "density": bsp.get("density", 1 / 16),
        "block": list(bsp.get("block", (4, 4, 4))),
        "sparse_path": "triton" if device.type == "cuda" else "torch (CPU fallback)",
    }
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "quick": args.quick,
        "config": config,
        "compare": args.compare,
        "reference": a,
        "candidate": b,
        "runs": {
            label: {k: v for k, v in run.items() if k not in ("lora", "keys", "rng")}
            for label, run in runs.items()
        },
        "same_data_and_noise": True,
        "data_order": [k[0] for k in ref["keys"]],
        "lora_distance": lora_distance(initial, ref["lora"], cand["lora"]),
        "comparison": stats,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    what = {
        "attention": f"dense vs block-sparse (density {config['density']:.4g})",
        "fp8-matmuls": "bf16 vs float8 base matmuls, block-sparse attention,",
    }[args.compare]
    title = (
        f"{what} LoRA training, {config['model']}, "
        f"depth {config['depth']}, {size} ({tokens} tokens), {report['device']}: "
        f"mean|diff|/noise {stats['mean_abs_diff_over_noise']:.3f}, corr {stats['correlation']:.4f}"
    )
    report["figure"] = {
        "path": str(args.out / "loss_curves.png"),
        "drawn_with": plot(args.out / "loss_curves.png", stats, ref["losses"], cand["losses"], (a, b), title),
    }
    write_report(report, args.out / "loss_curves.json")
    return report


if __name__ == "__main__":
    main()
