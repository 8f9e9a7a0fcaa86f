"""``longcat-prep inspect``: what a shard folder holds (counts, buckets, rejections) and a contact sheet
of its start frames with their captions, to eyeball crops and captions before training. Every listed
shard is checked against the manifest (size and sample count); a mismatch is reported and, after the
summary, raised as a ShardError naming the shard and the fix."""

from __future__ import annotations

import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from longcat_data import storage
from longcat_data.config import InspectConfig
from longcat_data.files import OutputError
from longcat_data.manifest import CONTACT_SHEET, MANIFEST, read_manifest, repair_hint, verify_shards
from longcat_data.shards import COND_IMAGE, ShardError, ShardSample
from longcat_data.stream import SkipCounter, read_tars


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
    handler = SkipCounter()
    for members in read_tars((dict(url=u) for u in urls), handler):
        if COND_IMAGE not in members:
            continue
        try:
            sample = ShardSample.from_members(members)
        except (ValueError, KeyError, OSError) as err:
            handler(err)
            continue
        items.append((sample.cond_image, f"{sample.key}: {sample.caption}"))
        if len(items) >= limit:
            break
    return items


def save_sheet(sheet: Image.Image, location: str) -> None:
    """The sheet as a PNG at a local path or a URL (uploaded whole); OutputError naming it."""
    try:
        if storage.is_remote(location):
            parent, name = location.rstrip("/").rsplit("/", 1)
            storage.folder(parent).write_file_atomic(name, lambda path: sheet.save(path, format="PNG"))
        else:
            sheet.save(storage.local_path(location))
    except OSError as err:
        raise OutputError(storage.describe_error(err, location)) from err


def run_inspect(cfg: InspectConfig) -> None:
    """Print the summary of ``cfg.out_dir`` and write its contact sheet."""
    store = storage.folder(cfg.out_dir)
    out = store.url()
    manifest = read_manifest(store)
    if manifest is None:
        raise FileNotFoundError(f"{out}/{MANIFEST} not found: not a shard folder (or run longcat-prep merge)")
    shards, rejected = manifest.get("shards", []), manifest.get("rejected", [])
    total = sum(s.get("samples", 0) for s in shards)
    size = sum(s.get("bytes", 0) for s in shards)
    problems = verify_shards(store, shards, count_samples=True)
    state = "DAMAGED" if problems else "complete" if manifest.get("complete") else "INCOMPLETE"
    print(f"{out}: {total} samples in {len(shards)} shards ({size / 1e6:.1f} MB), {state}")
    print(f"encoders: {manifest.get('encoders', {}).get('model')}  settings: {manifest.get('settings')}")
    print(f"{'bucket (HxWxF)':<20}{'samples':>8}")
    for bucket, count in manifest.get("buckets", {}).items():
        print(f"{bucket:<20}{count:>8}")
    if rejected:
        print(f"rejected {len(rejected)}:")
        for entry in rejected:
            print(f"  {entry.get('source')}: {entry.get('reason')}")
    items = start_frames([store.url(s["name"]) for s in shards], cfg.max_images)
    sheet_path = cfg.sheet or store.url(CONTACT_SHEET)
    save_sheet(contact_sheet(items), sheet_path)
    print(f"contact sheet: {sheet_path}")
    for problem in problems:
        print(f"  {problem}")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ShardError(f"{problems[0]}{more}; {repair_hint(out)}")
