"""``longcat-prep inspect``: what a shard folder holds (counts, buckets, rejections) and a contact sheet
of its start frames with their captions, to eyeball crops and captions before training."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw, ImageFont

from longcat_data.config import InspectConfig
from longcat_data.manifest import CONTACT_SHEET, MANIFEST, read_manifest
from longcat_data.shards import COND_IMAGE, ShardSample


def contact_sheet(items: list[tuple[np.ndarray, str]], cell: int = 192, columns: int = 6) -> Image.Image:
    """A grid of start frames (fit into ``cell`` px squares) with their captions wrapped underneath."""
    font = ImageFont.load_default()
    text_lines, line_height = 4, 12
    rows = max(1, -(-len(items) // columns))
    sheet = Image.new("RGB", (columns * cell, rows * (cell + text_lines * line_height)), "white")
    draw = ImageDraw.Draw(sheet)
    for index, (image, caption) in enumerate(items):
        x, y = index % columns * cell, index // columns * (cell + text_lines * line_height)
        thumb = Image.fromarray(image)
        thumb.thumbnail((cell - 4, cell - 4))
        sheet.paste(thumb, (x + (cell - thumb.width) // 2, y + (cell - thumb.height) // 2))
        lines = textwrap.wrap(caption, width=cell // 6)[:text_lines]
        for n, line in enumerate(lines):
            draw.text((x + 2, y + cell + n * line_height), line, fill="black", font=font)
    return sheet


def start_frames(urls: list[str], limit: int) -> list[tuple[np.ndarray, str]]:
    """(start frame, "key: caption") of the first ``limit`` samples, in shard order."""
    items: list[tuple[np.ndarray, str]] = []
    if not urls:
        return items
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False).select(lambda s: COND_IMAGE in s)
    for members in dataset:
        sample = ShardSample.from_members(members)
        items.append((sample.cond_image, f"{sample.key}: {sample.caption}"))
        if len(items) >= limit:
            break
    return items


def run_inspect(cfg: InspectConfig) -> None:
    """Print the summary of ``cfg.out_dir`` and write its contact sheet."""
    out = Path(cfg.out_dir)
    manifest = read_manifest(out)
    if manifest is None:
        raise FileNotFoundError(f"{out}/{MANIFEST} not found: not a shard folder (or run longcat-prep merge)")
    total = sum(s["samples"] for s in manifest["shards"])
    size = sum(s["bytes"] for s in manifest["shards"])
    state = "complete" if manifest["complete"] else "INCOMPLETE"
    print(f"{out}: {total} samples in {len(manifest['shards'])} shards ({size / 1e6:.1f} MB), {state}")
    print(f"encoders: {manifest['encoders'].get('model')}  settings: {manifest['settings']}")
    print(f"{'bucket (HxWxF)':<20}{'samples':>8}")
    for bucket, count in manifest["buckets"].items():
        print(f"{bucket:<20}{count:>8}")
    if manifest["rejected"]:
        print(f"rejected {len(manifest['rejected'])}:")
        for entry in manifest["rejected"]:
            print(f"  {entry['source']}: {entry['reason']}")
    items = start_frames([str(out / s["name"]) for s in manifest["shards"]], cfg.max_images)
    sheet_path = Path(cfg.sheet) if cfg.sheet else out / CONTACT_SHEET
    contact_sheet(items).save(sheet_path)
    print(f"contact sheet: {sheet_path}")
