"""The memory plan against the GPU: for each budget and attention, the flags ``longcat-train --plan`` would
print, run as the trainer runs them, predicted vs measured peak memory and step time.

    python benchmarks/plan_check.py [--budgets 24 48 80 141] [--attention dense sparse] [--out FILE]
    python benchmarks/plan_check.py --patterns full48 selective24+full24 none5+selective43 elementwise12+selective36
    python benchmarks/plan_check.py --quick      # CPU smoke run: tiny model, 64x64x9, budgets around it
    python benchmarks/plan_check.py --dry-run    # the cells' plans and predictions, nothing run
    python benchmarks/plan_check.py --repredict results/plan_check_h200.json   # old cells, current model

Full config with random bf16 weights at 480x832x93 (37,440 tokens), image-to-video, rank-8 LoRA, batch 1.
Each cell: ``memory_plan.fastest_plan`` for the budget (what ``--plan --gpu-memory BUDGET`` proposes),
then ``techniques.apply_techniques`` with those flags and the planned per-block checkpointing, under a cap
of the budget (``torch.cuda.set_per_process_memory_fraction``), and ``trainer.train_step`` for one untimed
step (compilation, allocator warm-up) and ``--steps`` timed ones. Peak = ``torch.cuda.max_memory_allocated``
over every step, the first (compiling) one included: a run has to live through it too (``steady_peak_gb``
leaves it out). Targets: peak within 10%, step within 15% of the prediction.

``--patterns`` measures given per-block modes instead (``none5+selective43``: the first 5 blocks without
checkpointing, the other 43 selective), with the flags the plan picks for the largest budget and no cap:
the probe the memory model's per-mode terms are calibrated on.

Cells whose flags agree but for the per-block modes share one process and one model (smallest budget
first, the cap raised between them, compiled graphs reused: a graph per mode); each group runs in a fresh
process with a time limit, an OOM or a crash is a result. Prints one JSON document (``--out`` also writes it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from _shared import created_on, save_report, write_report  # benchmarks/_shared.py

from longcat_train import memory_plan as mp
from longcat_train import planning
from longcat_train.config import TrainConfig
from longcat_train.dit_config import DiTConfig
from longcat_train.model import LongCatVideoTransformer

ATTENTION = {"dense": "sdpa", "sparse": "block_sparse"}
TARGETS = {"peak": 0.10, "step": 0.15}
MARK = "CELL "


def setup(quick: bool) -> tuple[DiTConfig, TrainConfig, tuple[int, int]]:
    """The model config, the trainer config the plan starts from, and the clip area."""
    if quick:
        return (
            DiTConfig.tiny(),
            TrainConfig(model="tiny", frames=9, area="64x64", mixed_precision="fp32"),
            (64, 64),
        )
    return DiTConfig.full(), TrainConfig(), (480, 832)


def model_terms(quick: bool) -> tuple[TrainConfig, mp.ModelShape, mp.Workload, mp.Calibration]:
    """What a prediction takes: the trainer config, the model's shape, the workload, the calibration."""
    config, cfg, area = setup(quick)
    shape = planning.model_shape(config, list(cfg.lora_targets))
    return cfg, shape, planning.workload(cfg, area), planning.calibration()


def plan_cells(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One cell per budget and attention: the plan's flags and its prediction."""
    cfg, shape, work, cal = model_terms(args.quick)
    options = mp.Options(compile=False, fp8_matmuls=False, quantised=()) if args.quick else mp.Options()
    budgets = args.budgets
    if args.quick:  # budgets (bytes) spread from all-full checkpointing to all-none on the tiny model
        low = mp.predict(shape, work, mp.Flags(checkpointing=("full",) * shape.depth), cal).peak_bytes
        high = mp.predict(shape, work, mp.Flags(checkpointing=("none",) * shape.depth), cal).peak_bytes
        budgets = [cal.reserve * (low + (high - low) * f) / mp.GB for f in (0.0, 0.5, 1.0)]
    cells = []
    for budget in budgets:
        for attention in args.attention:
            start = replace(cfg, attention=ATTENTION[attention])
            found = mp.fastest_plan(
                shape,
                work,
                planning.flags_of(start, shape.depth),
                budget * mp.GB,
                allowed=lambda f, c=start: planning.allowed(c, f),
                cal=cal,
                options=options,
            )
            cell: dict[str, Any] = {"budget_gb": budget, "attention": attention}
            if found is None:
                cells.append({**cell, "status": "nothing fits"})
                continue
            flags, prediction = found
            cells.append({**cell, **predicted(flags, prediction)})
    return cells


def predicted(flags: mp.Flags, prediction: mp.Prediction) -> dict[str, Any]:
    """A cell's flags and what the model predicts for them."""
    return {
        "flags": asdict(flags),
        "modes": mp.mode_counts(flags.checkpointing),
        "predicted_peak_gb": prediction.peak_bytes / mp.GB,
        "predicted_step_s": prediction.step_seconds,
        "predicted_memory_gb": {k: v / mp.GB for k, v in prediction.memory.items()},
        "predicted_time_s": prediction.time,
    }


def parse_pattern(text: str, depth: int) -> tuple[str, ...]:
    """``none5+selective43`` -> the per-block modes, first blocks first; the counts must add up to depth."""
    modes: list[str] = []
    for part in text.split("+"):
        mode = part.rstrip("0123456789")
        count = part[len(mode) :]
        if mode not in mp.MODES or not count:
            raise ValueError(f"pattern {text!r}: parts are MODE+COUNT with MODE one of {', '.join(mp.MODES)}")
        modes += [mode] * int(count)
    if len(modes) != depth:
        raise ValueError(f"pattern {text!r} covers {len(modes)} blocks; the model has {depth}")
    return tuple(modes)


def pattern_cells(args: argparse.Namespace, planned: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The largest budget's plan per attention with its modes replaced by each of ``args.patterns``."""
    _, shape, work, cal = model_terms(args.quick)
    cells = []
    for attention in args.attention:
        found = [c for c in planned if c["attention"] == attention and "flags" in c]
        if not found:
            continue
        top = max(found, key=lambda c: c["budget_gb"])
        for text in args.patterns:
            flags = mp.Flags(**{**top["flags"], "checkpointing": parse_pattern(text, shape.depth)})
            cell = {"budget_gb": top["budget_gb"], "pattern": text, "attention": attention}
            cells.append({**cell, **predicted(flags, mp.predict(shape, work, flags, cal))})
    return cells


def cell_name(cell: dict[str, Any]) -> tuple[Any, ...]:
    return cell["budget_gb"], cell["attention"], cell.get("pattern")


def group_key(cell: dict[str, Any]) -> str:
    # The attention too: a compiled process that switched it would recompile every mode's graph again.
    flags = {k: v for k, v in cell["flags"].items() if k != "checkpointing"}
    return json.dumps(flags, sort_keys=True)


# ----------------------------------------------------------------------------------------- worker


def make_batch(config: DiTConfig, work: mp.Workload, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    T, h, w = 1 + (work.frames - 1) // 4, work.height // 8, work.width // 8
    latents = torch.randn(1, config.in_channels, T, h, w, generator=g, dtype=torch.bfloat16)
    return {
        "latents": latents.to(device),
        "cond_latents": latents[:, :, :1].clone().to(device),
        "embeds": torch.randn(1, 120, config.caption_channels, generator=g, dtype=torch.bfloat16).to(device),
        "embeds_mask": torch.ones(1, 120, dtype=torch.long, device=device),
    }


def worker(cells: list[dict[str, Any]], quick: bool, steps: int) -> None:
    from longcat_train import trainer
    from longcat_train.parallel import Dist
    from longcat_train.techniques import apply_techniques

    config, cfg, area = setup(quick)
    device = torch.device("cpu" if quick else "cuda")
    d = Dist(device=device)
    flags = mp.Flags(**{**cells[0]["flags"], "checkpointing": tuple(cells[0]["flags"]["checkpointing"])})
    run_cfg = planning.config_with(replace(cfg, attention=flags.attention), flags)
    start = time.perf_counter()
    torch.manual_seed(0)
    with created_on(device, trainer.weight_dtype(run_cfg, device)):
        base = LongCatVideoTransformer(config)
    train_model, _ = apply_techniques(base, run_cfg, d, checkpointing=flags.checkpointing)
    train_model.train()
    params = [p for p in train_model.parameters() if p.requires_grad]
    optimizer = trainer.build_optimizer(params, run_cfg, device)
    setup_s = time.perf_counter() - start
    work = planning.workload(run_cfg, area)
    batch = make_batch(config, work, device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
    for cell in sorted(cells, key=lambda c: c["budget_gb"]):
        result = {**cell, "setup_s": setup_s}
        base_model = train_model.get_base_model()
        base_model.attention_implementation = ATTENTION[cell["attention"]]
        base_model.gradient_checkpointing = tuple(cell["flags"]["checkpointing"])
        cell_cfg = replace(run_cfg, attention=ATTENTION[cell["attention"]])
        if cuda:
            index = torch.cuda.current_device()  # the cap wants an index, not a bare "cuda"
            total = torch.cuda.get_device_properties(index).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, cell["budget_gb"] * mp.GB / total), index)
        generator = torch.Generator(device).manual_seed(0)
        times: list[float] = []
        peaks: list[float] = []  # GB per step, reset before each
        reserved = 0.0
        try:
            for _ in range(1 + steps):
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                begin = time.perf_counter()
                out = trainer.train_step(
                    train_model, iter([batch]), optimizer, params, cell_cfg, generator, None, d
                )
                if cuda:
                    torch.cuda.synchronize()
                    peaks.append(torch.cuda.max_memory_allocated(device) / mp.GB)
                    reserved = max(reserved, torch.cuda.max_memory_reserved(device) / mp.GB)
                times.append(time.perf_counter() - begin)
            timed = times[1:]
            result.update(status="ok", step_s=times, measured_step_s=sum(timed) / len(timed), loss=out.loss)
        except torch.OutOfMemoryError as err:
            result.update(status="oom", step_s=times, error=str(err).splitlines()[0])
            if cuda:  # the step that ran out: as high as the cap let it go
                peaks.append(torch.cuda.max_memory_allocated(device) / mp.GB)
        if cuda:
            result["step_peak_gb"] = peaks
            result["measured_peak_gb"] = max(peaks)
            if len(peaks) > 1 and result["status"] == "ok":
                result["steady_peak_gb"] = max(peaks[1:])
            result["reserved_gb"] = max(reserved, torch.cuda.max_memory_reserved(device) / mp.GB)
            torch.cuda.empty_cache()
        optimizer.zero_grad(set_to_none=True)
        print(MARK + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------- driver


def run_group(cells: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    cmd = [sys.executable, __file__, "--worker", json.dumps(cells), "--steps", str(args.steps)]
    cmd += ["--quick"] if args.quick else []
    env = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", **os.environ}  # as longcat-train sets it
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
        stdout, stderr, status = proc.stdout, proc.stderr, f"crashed (exit {proc.returncode})"
    except subprocess.TimeoutExpired as err:
        stdout = err.stdout.decode() if isinstance(err.stdout, bytes) else err.stdout or ""
        stderr = err.stderr.decode() if isinstance(err.stderr, bytes) else err.stderr or ""
        status = f"timeout after {args.timeout:g} s"
    done = [json.loads(line[len(MARK) :]) for line in stdout.splitlines() if line.startswith(MARK)]
    seen = {cell_name(c) for c in done}
    tail = stderr.strip().splitlines()[-3:]
    missing = [{**c, "status": status, "error": tail} for c in cells if cell_name(c) not in seen]
    return done + missing


def errors(cell: dict[str, Any]) -> dict[str, Any]:
    """Relative errors of the prediction against the measurement, and whether each is within its target."""
    out: dict[str, Any] = {}
    for name, measured, predicted in (
        ("peak", cell.get("measured_peak_gb"), cell.get("predicted_peak_gb")),
        ("step", cell.get("measured_step_s"), cell.get("predicted_step_s")),
    ):
        if measured and predicted:
            error = predicted / measured - 1
            out[f"{name}_error"] = error
            out[f"{name}_within_target"] = abs(error) <= TARGETS[name]
    return out


def within_targets(cells: list[dict[str, Any]]) -> bool:
    """Whether some cell has an error to check and every checked error is within its target."""
    checked = [c for c in cells if "peak_within_target" in c or "step_within_target" in c]
    return bool(checked) and all(
        c.get("peak_within_target", True) and c.get("step_within_target", True) for c in checked
    )


def repredict(paths: list[Path]) -> dict[str, Any]:
    """The measured cells of earlier runs (their JSON) against the current model's predictions.

    A cell whose weights the code of its day stored otherwise than the current code would (its recorded
    prediction of them differs by more than 5%: float8 matmuls kept bf16 weights before they were
    stored in float8) measured a run that no longer exists: it is listed as superseded, not checked.
    """
    _, shape, work, cal = model_terms(False)
    cells, superseded = [], []
    for path in paths:
        for cell in json.loads(path.read_text())["cells"]:
            if cell.get("status") != "ok":
                continue
            # plan order: the first blocks least checkpointed (memory_plan.plan_checkpointing)
            modes = parse_pattern(cell["pattern"], shape.depth) if cell.get("pattern") else ()
            if not modes:
                modes = tuple(m for m in mp.MODES for _ in range(cell["modes"].get(m, 0)))
            prediction = mp.predict(shape, work, mp.Flags(**{**cell["flags"], "checkpointing": modes}), cal)
            then = cell.get("predicted_memory_gb", {}).get("weights")
            now = prediction.memory["weights"] / mp.GB
            if then is not None and abs(then / now - 1) > 0.05:
                why = f"weights stored as {then:.1f} GB then, {now:.1f} GB now"
                superseded.append({"from": path.name, "budget_gb": cell["budget_gb"], "why": why})
                continue
            again = {
                **{k: cell[k] for k in ("budget_gb", "attention", "modes", "measured_step_s") if k in cell},
                "pattern": cell.get("pattern"),
                "measured_peak_gb": cell["measured_peak_gb"],
                "predicted_peak_gb": prediction.peak_bytes / mp.GB,
                "predicted_step_s": prediction.step_seconds,
                "from": path.name,
            }
            cells.append({**again, **errors(again)})
    return {
        "repredicted": True,
        "targets": TARGETS,
        "cells": cells,
        "superseded": superseded,
        "all_within_targets": within_targets(cells),
    }


def report_of(results: list[dict[str, Any]], args: argparse.Namespace, start: float) -> dict[str, Any]:
    """The cells measured so far with their errors against the prediction, as one JSON document."""
    cells = []
    for cell in results:
        cell = {**cell, **errors(cell)}
        cell["flags"] = {k: v for k, v in cell.get("flags", {}).items() if k != "checkpointing"}
        cells.append(cell)
    cells.sort(key=lambda c: (c["attention"], c["budget_gb"], c.get("pattern") or ""))
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() and not args.quick else "cpu",
        "torch": torch.__version__,
        "quick": args.quick,
        "clip": "64x64x9" if args.quick else "480x832x93",
        "targets": TARGETS,
        "cells": cells,
        "all_within_targets": within_targets(cells),
        "wall_s": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: tiny model, budgets around it")
    parser.add_argument("--budgets", nargs="+", type=float, default=[24, 48, 80, 141], help="GB")
    parser.add_argument("--attention", nargs="+", choices=list(ATTENTION), default=list(ATTENTION))
    parser.add_argument(
        "--patterns",
        nargs="+",
        help="measure these per-block modes (e.g. full48 none5+selective43) with the largest budget's "
        "flags, uncapped, instead of the budgets' plans",
    )
    parser.add_argument("--steps", type=int, default=1, help="timed steps per cell, after one untimed")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per group of cells")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the cells' plans and predictions only (no device needed)",
    )
    parser.add_argument(
        "--repredict",
        nargs="+",
        type=Path,
        metavar="JSON",
        help="no run: the measured cells of these earlier outputs against the current model's predictions",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repredict:
        write_report(repredict(args.repredict), args.out)
        return 0
    if args.worker:
        worker(json.loads(args.worker), args.quick, args.steps)
        return 0
    cells = plan_cells(args)
    if args.patterns:
        try:
            cells = pattern_cells(args, cells)
        except ValueError as err:
            parser.error(str(err))
    if args.dry_run:
        write_report({"cells": cells}, args.out)
        return 0
    if not args.quick and not torch.cuda.is_available():
        print("no CUDA device: run with --quick for the CPU smoke run", file=sys.stderr)
        return 2
    start = time.perf_counter()
    groups: dict[str, list[dict[str, Any]]] = {}
    for cell in cells:
        if "flags" in cell:
            groups.setdefault(group_key(cell), []).append(cell)
    results = [c for c in cells if "flags" not in c]
    for group in groups.values():
        results += run_group(group, args)
        print(f"{len(results)}/{len(cells)} cells ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
        if args.out:  # what is measured so far survives a run cut short
            save_report(report_of(results, args, start), args.out)
    report = report_of(results, args, start)
    write_report(report, args.out)
    return 0 if all(c.get("status") in ("ok", "oom") for c in results) else 1


if __name__ == "__main__":
    sys.exit(main())
