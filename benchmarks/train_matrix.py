"""Full LoRA training step: {dense, sparse} x {no swap, swap 20, swap 40} x {bf16, int8, fp8}, s/step and peak GB.

    python benchmarks/train_matrix.py --out FILE [--precision ...] [--swap ...] [--attention ...] [--no-cap]
    python benchmarks/train_matrix.py --quick          # CPU smoke run: tiny 8-block model
    python benchmarks/train_matrix.py --render A.json [B.json ...]   # one markdown table from saved runs

Full config with random bf16 weights at 480x832x93 (24 latent frames of 60x104, 37,440 tokens), image-to-
video (1 condition frame), text zero-padded to 512 tokens, rank-8 LoRA on the trainer's default targets
(``apply_lora``), AdamW, gradient checkpointing ``full`` (``--checkpointing``). One step = forward, loss,
backward, optimizer step; 1 warm-up step then 2 timed (``--steps``), CUDA-synchronised wall clock per step,
mean reported; peak = ``torch.cuda.max_memory_allocated`` over the timed steps.

Cells: attention ``sdpa`` (dense) or ``block_sparse`` (sparse: ``longcat_kernels``; reported as fallback
when it cannot run the Triton kernel); base ``bf16``, ``int8-quanto``, ``fp8-torchao``; the last
``--swap`` blocks streamed from pinned host memory. Extra cells: swap 40 + fp8 + activation offload + the
feed-forward in 4 frame groups under a 24 GB cap (``torch.cuda.set_per_process_memory_fraction``), the 24
GB-card target. Workers run with ``expandable_segments`` on, as ``longcat-train`` does.

Robustness: each group of cells that share a model (same precision, swap and cap; both attentions) runs in
a fresh process with a time limit; an OOM is a result (status ``oom``), so is a crash or a timeout. ``--out``
is rewritten after every group, and a rerun with the same ``--out`` skips the cells it already holds.
Prints the JSON document and a markdown table at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ATTENTION = {"dense": "sdpa", "sparse": "block_sparse"}
PRECISIONS = ("bf16", "int8-quanto", "fp8-torchao")
CAP_GB = 24.0
FFN_CHUNKS_24GB = 4  # feed-forward in 4 groups of 6 latent frames: the block's backward peak fits the cap
MARK = "CELL "  # prefix of the result lines a worker prints on stdout


@dataclass(frozen=True)
class Cell:
    attention: str  # dense | sparse
    swap: int  # blocks streamed from host memory
    precision: str  # bf16 | int8-quanto | fp8-torchao
    cap_gb: float | None = None  # memory-fraction cap, GB (1e9 bytes)
    offload_activations: bool = False
    feed_forward_chunks: int = 1

    @property
    def key(self) -> str:
        extra = f"/cap{self.cap_gb:g}" if self.cap_gb else ""
        extra += "/act-offload" if self.offload_activations else ""
        extra += f"/ffn{self.feed_forward_chunks}" if self.feed_forward_chunks > 1 else ""
        return f"{self.attention}/swap{self.swap}/{self.precision}{extra}"

    @property
    def group(self) -> tuple[Any, ...]:
        """Cells with the same group share one process and one model (attention switches in place)."""
        return (self.swap, self.precision, self.cap_gb, self.offload_activations, self.feed_forward_chunks)


@dataclass(frozen=True)
class Setup:
    quick: bool
    steps: int  # including the warm-up step
    checkpointing: str

    @property
    def device(self) -> torch.device:
        return torch.device("cpu" if self.quick else "cuda")

    @property
    def depth(self) -> int:
        return 8 if self.quick else 48

    def blocks_to_swap(self, swap: int) -> int:
        """Swap counts are for 48 blocks; the quick model's 8 swap the same fraction."""
        return round(swap * self.depth / 48)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        # 480x832x93 -> 24 latent frames of 60x104; quick: 9 frames of 64x64 -> 3 of 8x8.
        return (3, 8, 8) if self.quick else (24, 60, 104)


def matrix(args: argparse.Namespace) -> list[Cell]:
    cells = [
        Cell(attention, swap, precision)
        for precision in args.precision
        for swap in args.swap
        for attention in args.attention
    ]
    if args.cap and "fp8-torchao" in args.precision:
        cells += [
            Cell(a, 40, "fp8-torchao", CAP_GB, offload_activations=True, feed_forward_chunks=FFN_CHUNKS_24GB)
            for a in args.attention
        ]
    return cells


# ----------------------------------------------------------------------------------------- worker


def build(cell: Cell, setup: Setup):
    """The model with its LoRA adapter, placed (swapped or not), and the AdamW over the adapter."""
    from _shared import created_on  # benchmarks/_shared.py

    from longcat_train.config import DEFAULT_LORA_TARGETS
    from longcat_train.dit_config import DiTConfig
    from longcat_train.lora import apply_lora
    from longcat_train.model import LongCatVideoTransformer
    from longcat_train.offload import apply_activation_offload, apply_block_swap
    from longcat_train.quant import quantize_base

    # Quick: tiny width, 8 blocks, short text.
    quick = dataclasses.replace(DiTConfig.tiny(), depth=setup.depth, text_max_length=64)
    config = quick if setup.quick else DiTConfig.full()
    torch.manual_seed(0)
    with created_on(setup.device, torch.bfloat16):
        model = LongCatVideoTransformer(config)
    model.gradient_checkpointing = setup.checkpointing
    quantize_base(model, cell.precision)
    model = apply_lora(model, rank=8, targets=list(DEFAULT_LORA_TARGETS))
    # The model is already on the device: the swapped blocks go back to pinned host memory.
    apply_block_swap(model, setup.blocks_to_swap(cell.swap), "cpu", compute_device=setup.device)
    if cell.offload_activations:
        apply_activation_offload(model, compute_device=setup.device)
    model.get_base_model().feed_forward_chunks = cell.feed_forward_chunks
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    return model, optimizer, config


def make_batch(config, setup: Setup) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    T, H, W = setup.latent_shape
    latents = torch.randn(1, config.in_channels, T, H, W, generator=g)
    return {
        "latents": latents.to(setup.device, torch.bfloat16),
        "target": torch.randn(latents[:, :, 1:].shape, generator=g).to(setup.device),
        "timestep": torch.tensor([600.0], device=setup.device),
        "text": torch.randn(1, min(120, config.text_max_length), config.caption_channels, generator=g).to(
            setup.device, torch.bfloat16
        ),
    }


def train_step(model, optimizer, batch: dict[str, torch.Tensor]) -> float:
    out = model(batch["latents"], batch["timestep"], batch["text"], num_cond_latents=1)
    loss = (out[:, :, 1:] - batch["target"]).square().mean()  # the condition frame is not trained
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()  # also synchronises


def sparse_kernel(setup: Setup) -> str:
    if importlib.util.find_spec("longcat_kernels") is None:
        return "unavailable: dense SDPA fallback"
    if setup.device.type != "cuda":
        return "CPU: dense masked fallback"
    return "triton"


def run_cell(cell: Cell, model, optimizer, config, setup: Setup) -> dict[str, Any]:
    model.get_base_model().attention_implementation = ATTENTION[cell.attention]
    batch = make_batch(config, setup)
    cuda = setup.device.type == "cuda"
    result: dict[str, Any] = {"cell": cell.key, **dataclasses.asdict(cell)}
    result["blocks_swapped"] = setup.blocks_to_swap(cell.swap)
    if cell.attention == "sparse":
        result["sparse_kernel"] = sparse_kernel(setup)
    times: list[float] = []
    try:
        for step in range(setup.steps):
            if cuda and step == 1:
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            loss = train_step(model, optimizer, batch)
            times.append(time.perf_counter() - start)
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss}")
        timed = times[1:] or times
        result.update(status="ok", s_per_step=sum(timed) / len(timed), step_s=times, loss=loss)
    except torch.OutOfMemoryError as err:
        result.update(status="oom", step_s=times, error=str(err).splitlines()[0])
    if cuda:
        result["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
        result["reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9
    # An OOM leaves gradients of a half-done backward behind: drop them before the next cell.
    optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.empty_cache()
    return result


def worker(cells: list[Cell], setup: Setup) -> None:
    """Run one group of cells in this process, printing one result line per cell."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    cuda = setup.device.type == "cuda"
    start = time.perf_counter()
    model, optimizer, config = build(cells[0], setup)
    setup_s = time.perf_counter() - start
    cap = cells[0].cap_gb
    if cuda:
        torch.cuda.empty_cache()
        if cap:
            index = torch.cuda.current_device()  # the cap wants an index, not a bare "cuda"
            total = torch.cuda.get_device_properties(index).total_memory
            torch.cuda.set_per_process_memory_fraction(cap * 1e9 / total, index)
    for cell in cells:
        result = run_cell(cell, model, optimizer, config, setup)
        result["setup_s"] = setup_s
        print(MARK + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------- driver


def run_group(cells: list[Cell], setup: Setup, timeout: float) -> list[dict[str, Any]]:
    cmd = [sys.executable, __file__, "--worker", json.dumps([dataclasses.asdict(c) for c in cells])]
    cmd += ["--steps", str(setup.steps), "--checkpointing", setup.checkpointing]
    cmd += ["--quick"] if setup.quick else []
    try:
        # As longcat-train sets it: without expandable segments the allocator strands GBs under the cap.
        env = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", **os.environ}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        stdout, stderr, status = proc.stdout, proc.stderr, f"crashed (exit {proc.returncode})"
    except subprocess.TimeoutExpired as err:
        stdout = err.stdout.decode() if isinstance(err.stdout, bytes) else err.stdout or ""
        stderr = err.stderr.decode() if isinstance(err.stderr, bytes) else err.stderr or ""
        status = f"timeout after {timeout:g} s"
    results = {
        r["cell"]: r
        for r in (json.loads(line[len(MARK) :]) for line in stdout.splitlines() if line.startswith(MARK))
    }
    tail = stderr.strip().splitlines()[-3:]
    for cell in cells:
        if cell.key not in results:
            results[cell.key] = {
                "cell": cell.key,
                **dataclasses.asdict(cell),
                "status": status,
                "error": tail,
            }
    return [results[c.key] for c in cells]


def environment(setup: Setup) -> dict[str, Any]:
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "steps": setup.steps,
        "checkpointing": setup.checkpointing,
    }
    env["device"] = torch.cuda.get_device_name() if setup.device.type == "cuda" else "cpu (quick)"
    env["latent_shape"] = setup.latent_shape
    try:
        env["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        env["commit"] = "unknown"
    return env


def render(runs: list[dict[str, Any]]) -> str:
    """Markdown: one row per cell, with the step time relative to the same cell without swap or cap."""
    rows = [r for run in runs for r in run["results"]]
    base = {
        (r["attention"], r["precision"]): r.get("s_per_step")
        for r in rows
        if r["swap"] == 0 and not r.get("cap_gb") and r["status"] == "ok"
    }
    devices = sorted({run["environment"]["device"] for run in runs})
    shapes = sorted({"x".join(map(str, run["environment"]["latent_shape"])) for run in runs})
    commits = sorted({run["environment"]["commit"] for run in runs})
    lines = [
        f"Training step (LoRA rank 8), latents {', '.join(s + (' = 480x832x93' if s == '24x60x104' else '') for s in shapes)}"
        f", on {', '.join(devices)} (commit {', '.join(commits)}):",
        "",
        "| attention | swap | base | variant | s/step | vs no swap | peak GB | status |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        variant = " ".join(
            v
            for v in (
                f"cap {r['cap_gb']:g} GB" if r.get("cap_gb") else "",
                "act. offload" if r.get("offload_activations") else "",
                f"FFN in {r['feed_forward_chunks']}" if r.get("feed_forward_chunks", 1) > 1 else "",
            )
            if v
        )
        s = r.get("s_per_step")
        ref = base.get((r["attention"], r["precision"]))
        ratio = f"{s / ref:.2f}x" if s and ref else ""
        peak = f"{r['peak_gb']:.1f}" if "peak_gb" in r else ""
        kernel = f" ({r['sparse_kernel']})" if r.get("sparse_kernel", "triton") != "triton" else ""
        lines.append(
            f"| {r['attention']}{kernel} | {r['swap']} | {r['precision']} | {variant} | "
            f"{f'{s:.2f}' if s else ''} | {ratio} | {peak} | {r['status']} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="CPU smoke run: tiny width, 8 blocks (swap 20/40 -> 3/7), 3x8x8 latents",
    )
    parser.add_argument("--attention", nargs="+", choices=list(ATTENTION), default=list(ATTENTION))
    parser.add_argument("--swap", nargs="+", type=int, default=[0, 20, 40], help="blocks to swap")
    parser.add_argument("--precision", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--no-cap", dest="cap", action="store_false", help="skip the 24 GB cap cells")
    parser.add_argument("--steps", type=int, default=3, help="steps per cell, the first one untimed")
    parser.add_argument("--checkpointing", choices=["full", "selective"], default="full")
    parser.add_argument("--timeout", type=float, default=420.0, help="seconds per group of cells")
    parser.add_argument("--out", type=Path, help="JSON results, rewritten after every group; resumes")
    parser.add_argument("--render", nargs="+", type=Path, help="print the markdown table of saved runs")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        print(render([json.loads(p.read_text()) for p in args.render]))
        return 0
    setup = Setup(quick=args.quick, steps=args.steps, checkpointing=args.checkpointing)
    if args.worker:
        worker([Cell(**c) for c in json.loads(args.worker)], setup)
        return 0
    if not args.quick and not torch.cuda.is_available():
        print("no CUDA device: run with --quick for the CPU smoke run", file=sys.stderr)
        return 2

    doc: dict[str, Any] = {"environment": environment(setup), "results": []}
    if args.out and args.out.exists():
        doc["results"] = json.loads(args.out.read_text())["results"]
    done = {r["cell"] for r in doc["results"]}
    groups: dict[tuple[Any, ...], list[Cell]] = {}
    for cell in matrix(args):
        if cell.key not in done:
            groups.setdefault(cell.group, []).append(cell)
    for cells in groups.values():
        start = time.perf_counter()
        results = run_group(cells, setup, args.timeout)
        doc["results"] += results
        for r in results:
            print(
                f"{r['cell']}: {r['status']} {r.get('s_per_step', '')} ({time.perf_counter() - start:.0f} s)",
                file=sys.stderr,
            )
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc, indent=1))
    print(render([doc]))
    return 0 if all(r["status"] in ("ok", "oom") for r in doc["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
