"""``longcat-prep shard --simpletuner FILE``: the video datasets of a SimpleTuner dataloader config, each
prepped into shards, and the config rewritten to point at them.

A SimpleTuner dataset names its videos (``instance_data_dir``), captions (``caption_strategy``: textfile,
filename, instanceprompt, parquet with its ``parquet`` table, a parquet or JSONL file), size
(``resolution`` + ``resolution_type``), clip length (``video.num_frames``) and start frames
(``conditioning_data``: a ``conditioning`` dataset of images named like the videos). Each becomes one
``PrepConfig`` (``OUT/<id>/``); ``OUT/multidatabackend.json`` lists the same datasets with
``instance_data_dir`` set to their shards, so ``longcat-train --config config.json`` (its
``data_backend_config`` pointing there) trains on them. Every key not used is named.

Sizes, as SimpleTuner computes them (its ``MultiaspectImage`` and dataset config), mapped to our
``--area`` (the pixel count of the buckets; each video gets the bucket of that count nearest its aspect):

- ``pixel``: ``resolution`` is the short edge. Area ``R x round64(R * 16 / 9)``: the bucket SimpleTuner
  gives a 16:9 landscape video on its 64 px grid (480 -> 480x832, LongCat-Video's own). Other aspects
  get buckets of the same pixel count here, where SimpleTuner keeps their short edge at R.
- ``pixel_area`` (SimpleTuner's default): buckets of about R^2 pixels: area ``R x R``.
- ``area``: ``resolution`` in megapixels; 0.25, 0.5, 1, 2 and 4 (within 0.05) stand for 512^2, 768^2,
  1024^2, 1536^2 and 2048^2 pixels, other values for value * 1e6; the square edge of that area, rounded
  to the 64 px grid, is our area ``E x E``.

Sides are then rounded to the model's 16 px grid, with a warning when that changes them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longcat_data.buckets import MODEL_SIDE_MULTIPLE
from longcat_data.config import PrepConfig
from longcat_data.defaults import DEFAULT_FRAMES
from longcat_data.files import write_atomic, write_json_atomic
from longcat_data.flags import ConfigError, format_area

log = logging.getLogger(__name__)

BACKENDS_FILE = "multidatabackend.json"
CONFIG_FILE = "config.json"
SIMPLETUNER_GRID = 64  # aspect_bucket_alignment, as SimpleTuner's LongCat-Video guide keeps it
_AREA_PRESETS = {0.25: 512**2, 0.5: 768**2, 1.0: 1024**2, 2.0: 1536**2, 4.0: 2048**2}
# SimpleTuner's defaults for the keys a dataset may leave to the global config.
_DEFAULTS = {"resolution": 1024, "resolution_type": "pixel_area", "caption_strategy": "filename"}
# Dataset keys this module reads; the rest of an entry is named as not used.
_USED = {
    "id",
    "type",
    "dataset_type",
    "instance_data_dir",
    "caption_strategy",
    "instance_prompt",
    "resolution",
    "resolution_type",
    "video",
    "is_i2v",
    "conditioning_data",
    "parquet",
    "disabled",
    "disable",
}
_CAPTIONS = {"textfile": "sidecar", "filename": "filename"}


@dataclass(frozen=True)
class Dataset:
    """One video dataset of the file, as a prep job."""

    id: str
    config: PrepConfig
    entry: dict[str, Any]  # the file's entry, rewritten to point at the shards
    caption_table: CaptionTable | None = None  # caption_strategy parquet: written as config's jsonl first


@dataclass(frozen=True)
class CaptionTable:
    """SimpleTuner's ``parquet`` block: a parquet or JSONL table of file names and captions."""

    path: Path
    filename_column: str
    caption_column: str
    fallback_column: str | None

    def rows(self) -> list[dict[str, Any]]:
        if self.path.suffix.lower() in (".jsonl", ".json"):
            lines = self.path.read_text(encoding="utf-8").splitlines()
            return [json.loads(line) for line in lines if line.strip()]
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ConfigError(
                f'{self.path}: reading parquet needs pyarrow (pip install -e ".[simpletuner]"), or give a .jsonl'
            ) from None
        return pq.read_table(self.path).to_pylist()

    def captions(self) -> list[dict[str, str]]:
        """``{"file_name", "caption"}`` per row with a caption (the first of a list; else the fallback's)."""
        out = []
        for row in self.rows():
            caption = _first_text(row.get(self.caption_column)) or _first_text(
                row.get(self.fallback_column or "")
            )
            name = row.get(self.filename_column)
            if caption and name not in (None, ""):
                out.append({"file_name": str(name), "caption": caption})
        return out


def _first_text(value: Any) -> str:
    if isinstance(value, list | tuple):
        value = value[0] if value else ""
    return value.strip() if isinstance(value, str) else ""


def _round(value: float, multiple: int) -> int:
    return max(multiple, round(value / multiple) * multiple)


def simpletuner_area(resolution: float, resolution_type: str) -> tuple[int, int]:
    """Our ``--area`` (height, width) for a SimpleTuner ``resolution`` of ``resolution_type`` (the rules
    in the module docstring), before rounding to the model's grid."""
    if resolution_type == "pixel":
        return int(resolution), _round(resolution * 16 / 9, SIMPLETUNER_GRID)
    if resolution_type == "pixel_area":
        return int(resolution), int(resolution)
    if resolution_type == "area":
        pixels = next((v for k, v in _AREA_PRESETS.items() if abs(resolution - k) < 0.05), resolution * 1e6)
        edge = _round(int(math.sqrt(pixels)), SIMPLETUNER_GRID)
        return edge, edge
    raise ValueError(f"resolution_type {resolution_type!r}: must be pixel, area or pixel_area")


def _on_model_grid(area: tuple[int, int], where: str) -> tuple[int, int]:
    fitted = (_round(area[0], MODEL_SIDE_MULTIPLE), _round(area[1], MODEL_SIDE_MULTIPLE))
    if fitted != area:
        log.warning(
            "%s: area %s is not on the model's 16 px grid: using %s",
            where,
            format_area(area),
            format_area(fitted),
        )
    return fitted


def read_simpletuner(path: str | Path) -> tuple[list[dict], dict[str, Any], dict[str, Any] | None, Path]:
    """(dataset entries, the global settings they default to, the config.json's values or None, the
    dataset file): from a multidatabackend.json, or a config.json whose ``data_backend_config`` names one."""
    path = Path(path)
    values = _read_json(path)
    config = None
    backends_path = path
    if isinstance(values, dict):
        config = values
        settings = {k.lstrip("-"): v for k, v in values.items()}
        if not settings.get("data_backend_config"):
            raise ConfigError(
                f"{path}: a SimpleTuner config.json without data_backend_config: give that file"
            )
        backends_path = Path(str(settings["data_backend_config"])).expanduser()
        if not backends_path.is_absolute() and not backends_path.is_file():
            backends_path = path.parent / backends_path
        values = _read_json(backends_path)
    else:
        settings = {}
    if not isinstance(values, list) or not all(isinstance(e, dict) for e in values):
        raise ConfigError(f"{backends_path}: a SimpleTuner dataset config is a JSON list of datasets")
    defaults = {k: settings[k] for k in (*_DEFAULTS, "eval_dataset_id") if settings.get(k) is not None}
    return values, defaults, config, backends_path


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(f"SimpleTuner file {path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None


def plan_datasets(
    entries: list[dict], settings: Mapping[str, Any], base: PrepConfig, source: Path
) -> tuple[list[Dataset], list[dict], list[str]]:
    """The prep job of every usable video dataset, the entries kept as they are (an image dataset that
    is ``eval_dataset_id``: validation reads its image + caption pairs), and one warning line per
    dataset or key not used. A video dataset that cannot be prepped as written is a ConfigError naming
    it and the fix."""
    by_id = {str(e.get("id")): e for e in entries}
    used_as_start_frames = {c for e in entries for c in _as_list(e.get("conditioning_data"))}
    jobs: list[Dataset] = []
    kept: list[dict] = []
    notes: list[str] = []
    taken: set[str] = set()
    for entry in entries:
        name = str(entry.get("id", "?"))
        where = f"{source.name} dataset {name!r}"
        kind = entry.get("dataset_type", "image")
        if entry.get("disabled") or entry.get("disable"):
            notes.append(f"{where}: disabled, skipped")
            continue
        if kind == "conditioning":
            if name not in used_as_start_frames:
                notes.append(
                    f"{where}: conditioning images no video dataset names in conditioning_data, skipped"
                )
            continue
        if kind == "image" and name == settings.get("eval_dataset_id"):
            notes.append(f"{where}: the eval dataset, kept as it is (validation reads its images + captions)")
            kept.append(entry)
            continue
        if kind != "video":
            notes.append(
                f"{where}: dataset_type {kind!r} not used (longcat-prep makes video clips; the umT5 "
                "caption embeddings go into the shards)"
            )
            continue
        jobs.append(_plan_one(entry, settings, base, where, by_id, taken, notes))
    if not jobs:
        raise ConfigError(f"{source}: no video dataset (dataset_type: video) to prep")
    return jobs, kept, notes


def _plan_one(
    entry: dict,
    settings: Mapping[str, Any],
    base: PrepConfig,
    where: str,
    by_id: Mapping[str, dict],
    taken: set[str],
    notes: list[str],
) -> Dataset:
    name = str(entry.get("id", ""))
    folder = re.sub(r"[^\w.-]", "_", name) or "dataset"
    if folder in taken:
        raise ConfigError(f"{where}: a second dataset with the id {name!r}: give each dataset its own id")
    taken.add(folder)
    if entry.get("type", "local") != "local":
        raise ConfigError(
            f"{where}: type {entry.get('type')!r}: longcat-prep reads local folders; copy the videos to "
            "a folder and set type local with instance_data_dir"
        )
    videos = entry.get("instance_data_dir")
    if not videos or not Path(str(videos)).expanduser().is_dir():
        raise ConfigError(f"{where}: instance_data_dir {videos!r} is not a folder of videos")
    values = {**_DEFAULTS, **settings, **{k: v for k, v in entry.items() if v is not None}}
    area = _on_model_grid(_area(values, where), where)
    video = entry.get("video") if isinstance(entry.get("video"), dict) else {}
    frames = video.get("num_frames")
    if frames is None:
        frames = DEFAULT_FRAMES
        notes.append(f"{where}: video.num_frames not set: using {frames} (LongCat-Video's clip length)")
    if not isinstance(frames, int) or isinstance(frames, bool):
        raise ConfigError(f"{where}: video.num_frames = {frames!r}: must be a whole number of frames")
    unused_video = sorted(set(video) - {"num_frames", "is_i2v"})
    if unused_video:
        notes.append(
            f"{where}: video keys not used: {', '.join(unused_video)} (videos shorter than num_frames are "
            "kept at their own length, 4k+1)"
        )
    start_frames = _start_frames(entry, by_id, where)
    unused = sorted(set(entry) - _USED)
    if unused:
        notes.append(f"{where}: keys not used by longcat-prep: {', '.join(unused)}")
    out_dir = Path(str(base.out_dir)) / folder
    table = _caption_table(entry, where) if values["caption_strategy"] == "parquet" else None
    captions_file = Path(str(base.out_dir)) / ".simpletuner" / f"{folder}.captions.jsonl"
    try:
        config = dataclasses.replace(
            base,
            simpletuner=None,
            videos_dir=str(Path(str(videos)).expanduser()),
            out_dir=str(out_dir),
            frames=frames,
            area=format_area(area),
            captions=f"jsonl:{captions_file.resolve()}" if table else _captions(values, where),
            conditioning_dir=start_frames,
        )
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    rewritten = {
        "id": name,
        "type": "local",
        "dataset_type": "video",
        "instance_data_dir": str(out_dir.resolve()),
        "video": {"num_frames": config.frames},
    }
    is_i2v = video.get("is_i2v", entry.get("is_i2v"))
    if isinstance(is_i2v, str):
        is_i2v = is_i2v.strip().lower() in ("true", "1", "yes")
    if is_i2v is None:
        notes.append(
            f"{where}: is_i2v not set (SimpleTuner then trains text-to-video): set is_i2v: true for I2V"
        )
        is_i2v = False
    rewritten["is_i2v"] = bool(is_i2v)
    return Dataset(name, config, rewritten, table)


def _caption_table(entry: dict, where: str) -> CaptionTable:
    block = entry.get("parquet")
    if not isinstance(block, dict) or not block.get("path"):
        raise ConfigError(f"{where}: caption_strategy parquet needs a parquet block with its path")
    path = Path(str(block["path"])).expanduser()
    if not path.is_absolute():
        path = Path(str(entry["instance_data_dir"])).expanduser() / path
    if not path.is_file():
        raise ConfigError(f"{where}: parquet.path {block['path']!r}: no such file ({path})")
    return CaptionTable(
        path,
        str(block.get("filename_column", "filename")),
        str(block.get("caption_column", "caption")),
        block.get("fallback_caption_column"),
    )


def _area(values: Mapping[str, Any], where: str) -> tuple[int, int]:
    resolution, kind = values["resolution"], values["resolution_type"]
    if isinstance(resolution, bool) or not isinstance(resolution, int | float) or resolution <= 0:
        raise ConfigError(f"{where}: resolution = {resolution!r}: must be a positive number")
    try:
        return simpletuner_area(float(resolution), str(kind))
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None


def _captions(values: Mapping[str, Any], where: str) -> str:
    strategy = values["caption_strategy"]
    if strategy in _CAPTIONS:
        return _CAPTIONS[strategy]
    if strategy == "instanceprompt":
        prompt = values.get("instance_prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError(f"{where}: caption_strategy instanceprompt needs a non-empty instance_prompt")
        return f"prompt:{prompt.strip()}"
    raise ConfigError(
        f"{where}: caption_strategy {strategy!r} is not one longcat-prep reads (textfile, filename, "
        "instanceprompt, parquet): write the captions as VIDEO.txt files and use textfile"
    )


def _start_frames(entry: dict, by_id: Mapping[str, dict], where: str) -> str | None:
    """The folder of start-frame images of ``conditioning_data`` (None: each clip's first frame)."""
    names = _as_list(entry.get("conditioning_data"))
    if not names:
        return None
    if len(names) > 1:
        raise ConfigError(
            f"{where}: conditioning_data names {len(names)} datasets; one start frame per clip: keep one"
        )
    start = by_id.get(names[0])
    if start is None or not start.get("instance_data_dir"):
        raise ConfigError(
            f"{where}: conditioning_data {names[0]!r} is not a dataset with an instance_data_dir"
        )
    folder = Path(str(start["instance_data_dir"])).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"{where}: the start frames of {names[0]!r}, {folder}, are not a folder")
    return str(folder)


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list | tuple) else [str(value)]


def run_simpletuner(cfg: PrepConfig, run_shard: Callable[[PrepConfig], Any]) -> list[tuple[Dataset, Any]]:
    """Prep every video dataset of ``cfg.simpletuner`` with ``run_shard`` (``prep.run_shard``), then
    write ``OUT/multidatabackend.json`` (and ``OUT/config.json`` when a config.json was given). Every
    dataset is checked before the first is prepped. Returns each dataset with its run's result."""
    assert cfg.simpletuner is not None and cfg.out_dir is not None
    entries, settings, config, source = read_simpletuner(cfg.simpletuner)
    jobs, kept, notes = plan_datasets(entries, settings, cfg, source)
    for note in notes:
        log.warning("%s", note)
    if len({job.config.frames for job in jobs}) > 1:
        log.warning(
            "%s: the datasets differ in video.num_frames; one training run trains one clip length", source
        )
    results = []
    for job in jobs:
        if job.caption_table is not None:
            mapping = Path(job.config.captions.partition(":")[2])
            write_atomic(mapping, "".join(json.dumps(row) + "\n" for row in job.caption_table.captions()))
        log.info("dataset %s: %s -> %s", job.id, job.config.videos_dir, job.config.out_dir)
        results.append((job, run_shard(job.config)))
    out = Path(cfg.out_dir)
    write_json_atomic(out / BACKENDS_FILE, [*(job.entry for job in jobs), *kept])
    if config is not None:
        keys = [k for k in config if k.lstrip("-") == "data_backend_config"]
        write_json_atomic(out / CONFIG_FILE, {**config, keys[0]: str((out / BACKENDS_FILE).resolve())})
    return results


def report(results: list[tuple[Dataset, Any]], out: Path) -> tuple[list[str], str | None]:
    """The lines ``longcat-prep`` prints after ``run_simpletuner`` (each dataset's summary, where the
    config went, how to train), and the failure of the datasets that wrote nothing (None: none)."""
    lines = [f"{dataset.id}: {stats.summary()}" for dataset, stats in results]
    failed = [f"dataset {dataset.id}: {stats.failure()}" for dataset, stats in results if stats.failure()]
    lines.append(f"wrote {out / BACKENDS_FILE}: its datasets point at the shards")
    if (out / CONFIG_FILE).is_file():
        lines.append(f"train: longcat-train --config {out / CONFIG_FILE}")
    else:
        lines.append(
            f"train: set data_backend_config to {out / BACKENDS_FILE} in your config.json, then "
            "longcat-train --config config.json"
        )
    return lines, "; ".join(failed) or None
