"""Attention benchmark: dense SDPA vs longcat_kernels block-sparse vs the official LongCat-Video kernel.

    python benchmarks/attention.py [--sweep] [--out FILE]

One layer's self-attention at LongCat-Video's size (32 heads x 128, bf16, batch 1) on the 480x832x93
grid (24x30x52 = 37,440 tokens) and the 24x32x48 grid (36,864 tokens) that the official kernel accepts.
Forward and forward+backward, median of CUDA-event timings with the L2 cache flushed between runs
(triton.testing.do_bench). Ours includes the block selection (pooling, scores, top-k) and, in backward,
the transposed selection. With LONGCAT_OFFICIAL_DIR set to a checkout that holds `longcat_video/`, the
official kernel runs on the 36,864-token grid at the same density in the same process.

--sweep first times launch configurations of each Triton kernel and uses the fastest for the rest of
the run (copy them into `CONFIGS` in longcat_kernels/block_sparse.py); --sweep-cond-latents 1 sweeps
with the condition frame's keys in every selection, as image-to-video training runs. Prints one JSON
document; --out also writes it after every case, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from _shared import write_report  # benchmarks/_shared.py
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from longcat_kernels import block_selection, block_sparse_attention
from longcat_kernels.block_sparse import (
    CONFIGS,
    KernelConfig,
    sparse_backward,
    sparse_forward,
)

GRIDS = {"480x832x93": (24, 30, 52), "24x32x48": (24, 32, 48)}
HEADS, HEAD_DIM = 32, 128


def median_seconds(fn: Callable[[], object], inputs: list[Tensor]) -> float:
    return triton.testing.do_bench(fn, warmup=50, rep=300, grad_to_none=inputs, return_mode="median") / 1e3


def measure(attention: Callable[[Tensor, Tensor, Tensor], Tensor], q: Tensor, k: Tensor, v: Tensor) -> dict:
    inputs = [x.detach().requires_grad_() for x in (q, k, v)]
    grad = torch.randn_like(q)

    def forward() -> None:
        with torch.no_grad():
            attention(q, k, v)

    def forward_backward() -> None:
        attention(*inputs).backward(grad)

    forward_s = median_seconds(forward, [])
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    forward_backward_s = median_seconds(forward_backward, inputs)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    return {"fwd_s": forward_s, "fwd_bwd_s": forward_backward_s, "fwd_bwd_extra_peak_gib": round(peak, 3)}


def official_kernel() -> Callable | None:
    checkout = os.environ.get("LONGCAT_OFFICIAL_DIR")
    if not checkout:
        return None
    sys.path.insert(0, checkout)
    return importlib.import_module("longcat_video.block_sparse_attention.bsa_interface").flash_attn_bsa_3d


def candidate_configs() -> list[KernelConfig]:
    # 8 warps split a 64-row tile's matmuls too thin (measured 1.5-2x slower); stages 1 trades the
    # software pipeline for more programs per SM.
    return [KernelConfig(4, stages) for stages in (1, 2, 3, 4)]


def sweep(shape: tuple[int, int, int], density: float, cond_latents: int = 0) -> dict:
    """Time each kernel under each candidate configuration, with ``cond_latents`` condition frames (whose
    keys every query tile reads: image-to-video training has 1); return the fastest and all timings."""
    q, k, v = (
        torch.randn(1, HEADS, math.prod(shape), HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in "qkv"
    )
    layout, indices, counts = block_selection(
        q, k, shape, density=density, num_cond_latents=cond_latents, use_triton=True
    )
    scale = HEAD_DIM**-0.5
    out, lse = sparse_forward(q, k, v, layout, indices, counts, scale, CONFIGS["fwd"])
    grad = torch.randn_like(q)
    timings: dict[str, dict[str, float | str]] = {"fwd": {}, "dq": {}, "dkdv": {}}
    for cfg in candidate_configs():
        runs = {
            "fwd": lambda cfg=cfg: sparse_forward(q, k, v, layout, indices, counts, scale, cfg),
            "dq": lambda cfg=cfg: sparse_backward(
                grad, q, k, v, out, lse, layout, indices, counts, scale, {**CONFIGS, "dq": cfg}
            ),
            "dkdv": lambda cfg=cfg: sparse_backward(
                grad, q, k, v, out, lse, layout, indices, counts, scale, {**CONFIGS, "dkdv": cfg}
            ),
        }
        for name, run in runs.items():
            key = f"warps={cfg.num_warps},stages={cfg.num_stages}"
            try:
                timings[name][key] = median_seconds(run, [])
            except Exception as error:  # a configuration the compiler or the chip rejects is skipped
                timings[name][key] = f"failed: {type(error).__name__}"
    best = {}
    for name, results in timings.items():
        fastest = min((t, key) for key, t in results.items() if isinstance(t, float))[1]
        warps, stages = (int(part.split("=")[1]) for part in fastest.split(","))
        best[name] = KernelConfig(warps, stages)
    return {"best": {n: vars(c) for n, c in best.items()}, "timings_s": timings, "configs": best}


def relative_difference(a: Tensor, b: Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def same_selection_outputs(
    official: Callable, q: Tensor, k: Tensor, v: Tensor, shape: tuple[int, int, int], density: float
) -> tuple[Tensor, Tensor]:
    """Ours and the official forward kernel on one selection (ours; on a grid the 4x4x4 block divides,
    our tiles are numbered as the official blocks are: block-major t, h, w, and t, h, w inside)."""
    bsa = sys.modules[official.__module__]
    layout, indices, counts = block_selection(q, k, shape, density=density, use_triton=True)
    scale = HEAD_DIM**-0.5
    ours, _ = sparse_forward(q, k, v, layout, indices, counts, scale, CONFIGS["fwd"])
    grid = [n // 4 for n in shape]
    blocked = [bsa.rearrange_THW_to_3d_block(x, *grid, 4, 4, 4, HEAD_DIM) for x in (q, k, v)]
    theirs, _ = bsa.attn_fwd_bsa_varlen_triton(*blocked, scale, indices, counts, 64, 64, 1 - density)
    return ours, bsa.rearrange_3d_block_to_THW(theirs, *grid, 4, 4, 4, HEAD_DIM)


def bench_grid(
    grid_name: str, shape: tuple[int, int, int], density: float, official: Callable | None, record: Callable
) -> None:
    tokens = math.prod(shape)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, tokens, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in "qkv")

    def sdpa_flash(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)

    def ours(q: Tensor, k: Tensor, v: Tensor, cond: int = 0) -> Tensor:
        return block_sparse_attention(
            q, k, v, shape, density=density, num_cond_latents=cond, implementation="triton"
        )

    base = {"grid": grid_name, "tokens": tokens}
    record({**base, "name": "sdpa_flash", **measure(sdpa_flash, q, k, v)})
    # what torch picks by itself (cuDNN on Hopper with recent torch): the dense path the model runs
    record({**base, "name": "sdpa_default", **measure(F.scaled_dot_product_attention, q, k, v)})
    record({**base, "name": "ours", **measure(ours, q, k, v)})
    if shape[1] % 4:  # the bucket with partial blocks: also the image-to-video call
        record({**base, "name": "ours_i2v_cond1", **measure(lambda *x: ours(*x, cond=1), q, k, v)})
    selection_s = median_seconds(lambda: block_selection(q, k, shape, density=density, use_triton=True), [])
    record({**base, "name": "ours_selection_only", "fwd_s": selection_s})
    if official is None:
        return

    def theirs(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        blocks = [4, 4, 4]
        return official(
            q, k, v, shape, shape, sparsity=1 - density, chunk_3d_shape_q=blocks, chunk_3d_shape_k=blocks
        )

    case = {**base, "name": "official", **measure(theirs, q, k, v)}
    with torch.no_grad():
        # The official pools and scores in bf16, so its selection differs from ours where scores are
        # close; with our selection fed to its kernel the outputs must agree to bf16 rounding.
        case["rel_diff_ours_vs_official"] = relative_difference(ours(q, k, v), theirs(q, k, v))
        case["rel_diff_same_selection"] = relative_difference(
            *same_selection_outputs(official, q, k, v, shape, density)
        )
    record(case)
    # timed again after the official kernel: the spread of the two is the noise of the comparison
    record({**base, "name": "ours_repeat", **measure(ours, q, k, v)})


def profile(shape: tuple[int, int, int], density: float, official: Callable | None) -> dict:
    """Kernel-by-kernel device time of five forward+backward passes, and the host time of one forward
    (launch overhead: it is on the critical path when the device work is short)."""
    q, k, v = (
        torch.randn(
            1, HEADS, math.prod(shape), HEAD_DIM, device="cuda", dtype=torch.bfloat16
        ).requires_grad_()
        for _ in "qkv"
    )
    grad = torch.randn_like(q)
    runs = {"ours": lambda: block_sparse_attention(q, k, v, shape, density=density, implementation="triton")}
    if official is not None:
        blocks = [4, 4, 4]
        runs["official"] = lambda: official(
            q, k, v, shape, shape, sparsity=1 - density, chunk_3d_shape_q=blocks, chunk_3d_shape_k=blocks
        )
    result = {}
    for name, run in runs.items():
        for _ in range(3):
            run().backward(grad)
        torch.cuda.synchronize()
        with torch.no_grad():
            start = time.perf_counter()
            for _ in range(10):
                run()
            host_s = (time.perf_counter() - start) / 10
        torch.cuda.synchronize()
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(5):
                run().backward(grad)
            torch.cuda.synchronize()
        table = prof.key_averages().table(
            sort_by="self_device_time_total", row_limit=30, max_name_column_width=60
        )
        print(f"== {name}: host time of one forward {host_s * 1e3:.3f} ms\n{table}", file=sys.stderr)
        result[name] = {"host_s_per_forward": host_s, "table": table}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--density", type=float, default=1 / 16)
    parser.add_argument("--sweep", action="store_true", help="tune kernel launch configs first")
    parser.add_argument(
        "--sweep-cond-latents",
        type=int,
        default=0,
        help="condition latent frames in the sweep's selection (1: what image-to-video training runs)",
    )
    parser.add_argument("--out", type=Path, help="also write the JSON here, after every case")
    parser.add_argument("--profile", action="store_true", help="print a kernel profile of 24x32x48 first")
    args = parser.parse_args()

    report: dict = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "heads": HEADS,
        "head_dim": HEAD_DIM,
        "dtype": "bfloat16",
        "density": args.density,
        "cases": [],
    }

    def record(case: dict) -> None:
        report["cases"].append(case)
        print(json.dumps(case), file=sys.stderr, flush=True)
        if args.out:
            args.out.write_text(json.dumps(report, indent=1))

    official = official_kernel()
    if args.profile:
        report["profile"] = profile(GRIDS["24x32x48"], args.density, official)
    if args.sweep:
        tuned = sweep(GRIDS["480x832x93"], args.density, args.sweep_cond_latents)
        CONFIGS.update(tuned.pop("configs"))
        report["sweep"] = tuned
    report["configs"] = {name: vars(cfg) for name, cfg in CONFIGS.items()}

    for grid_name, shape in GRIDS.items():
        bench_grid(grid_name, shape, args.density, official if grid_name == "24x32x48" else None, record)

    by_name = {(c["grid"], c["name"]): c for c in report["cases"]}
    summary = {}
    for grid_name in GRIDS:
        mine, dense = by_name[(grid_name, "ours")], by_name[(grid_name, "sdpa_flash")]
        summary[grid_name] = {
            "speedup_vs_sdpa_fwd": dense["fwd_s"] / mine["fwd_s"],
            "speedup_vs_sdpa_fwd_bwd": dense["fwd_bwd_s"] / mine["fwd_bwd_s"],
        }
        if (grid_name, "official") in by_name:
            theirs_case, again = by_name[(grid_name, "official")], by_name[(grid_name, "ours_repeat")]
            for key in ("fwd", "fwd_bwd"):
                summary[grid_name][f"speedup_vs_official_{key}"] = [
                    theirs_case[f"{key}_s"] / run[f"{key}_s"] for run in (mine, again)
                ]
    report["summary"] = summary
    write_report(report, args.out)


if __name__ == "__main__":
    main()
