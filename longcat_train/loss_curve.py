"""The training loss per step as a PNG (``validation/loss_curve.png``), drawn with Pillow from the run's
``metrics.jsonl``: what a run on the random tiny model shows changing, where its videos are noise."""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from longcat_data.files import write_atomic
from longcat_train.runs import METRICS_FILE

log = logging.getLogger(__name__)

LOSS_CURVE_FILE = "validation/loss_curve.png"


def read_losses(metrics: Path) -> list[tuple[int, float]]:
    """(step, loss) of every finite loss line of a ``metrics.jsonl``; unreadable lines are skipped."""
    points = []
    for line in metrics.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
            step, loss = int(record["step"]), float(record["loss"])
        except (ValueError, KeyError, TypeError):
            continue
        if math.isfinite(loss):
            points.append((step, loss))
    return sorted(dict(points).items())


def draw_loss_curve(
    points: Sequence[tuple[int, float]], title: str, size: tuple[int, int] = (640, 360)
) -> Image.Image:
    """A line chart of ``points`` (at least one) with the step and loss ranges written on its axes."""
    width, height = size
    left, right, top, bottom = 56, 16, 28, 32
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    steps, losses = [p[0] for p in points], [p[1] for p in points]
    low, high = min(losses), max(losses)
    span_loss, span_step = (high - low) or 1.0, (steps[-1] - steps[0]) or 1

    def at(step: int, loss: float) -> tuple[float, float]:
        x = left + (step - steps[0]) / span_step * (width - left - right)
        y = top + (high - loss) / span_loss * (height - top - bottom)
        return x, y

    draw.rectangle((left, top, width - right, height - bottom), outline="gray")
    draw.line(
        [at(s, v) for s, v in points] if len(points) > 1 else [at(*points[0])] * 2, fill="royalblue", width=2
    )
    draw.text((4, 6), title, fill="black")
    draw.text((4, top), f"{high:.4g}", fill="black")
    draw.text((4, height - bottom - 10), f"{low:.4g}", fill="black")
    draw.text((left, height - bottom + 6), f"step {steps[0]}", fill="black")
    draw.text((width - right - 70, height - bottom + 6), f"step {steps[-1]}", fill="black")
    return image


def write_loss_curve(output_dir: str | Path) -> Path | None:
    """``output_dir/validation/loss_curve.png`` from its ``metrics.jsonl``; None when it has no loss yet."""
    out = Path(output_dir)
    metrics = out / METRICS_FILE
    points = read_losses(metrics) if metrics.is_file() else []
    if not points:
        return None
    image = draw_loss_curve(points, f"train loss per step ({out.name})")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    path = out / LOSS_CURVE_FILE
    write_atomic(path, buffer.getvalue())
    return path
