"""Videos -> clips: the per-input stages of ``longcat-prep shard``, run in DataLoader worker processes.

Each stage is a generator over plain dict samples (webdataset style)::

    inputs -> probe_inputs -> choose_clips -> caption_inputs -> load_start_frames -> decode_clips

Remote videos (``s3://``, ...) are first copied into a local staging mirror by ``fetch_inputs`` (with
their sidecar caption and start frame) and removed once decoded, so the stages read local files and at
most the inputs in flight are staged.

An input sample is ``{"__key__", "source"}`` (``assign_keys``); the stages fill it in, and
``decode_clips`` gives it its ``clips``, each ``{"__key__", "input", "source", "frames", "cond_image",
"caption", "meta"}``. A sample that fails a stage becomes a rejection record (``rejection``) that later
stages pass on untouched, so one bad file never ends the run. ``decoded_inputs`` runs the stages
``workers`` inputs ahead of the encoder; ``longcat_data.prep`` encodes and writes what comes out.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import re
import signal
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from longcat_data import storage
from longcat_data.buckets import Bucket, InputTooSmall, choose_bucket, clip_starts, trim_to_4k_plus_1
from longcat_data.captions import Captioner, CaptionError, CaptionSource, resolve_caption
from longcat_data.interrupts import ignore_stop_signals
from longcat_data.video import (
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    VideoError,
    find_start_frame,
    load_start_frame,
    probe,
    read_frames,
    resize_center_crop,
    start_frame_candidates,
)

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>
# Rates outside these are warned about: real footage, slow motion included, sits well inside.
MIN_PLAUSIBLE_FPS, MAX_PLAUSIBLE_FPS = 1.0, 240.0


# ---------------------------------------------------------------- inputs and rejections (pure)


def sample_key(source: str) -> str:
    """A stable webdataset key from a relative path: no dots or spaces, folders joined by '__'."""
    parts = Path(source).with_suffix("").parts
    return "__".join(re.sub(r"[^\w-]+", "_", part) for part in parts)


def clip_key(input_key: str, clip: int, clips_per_video: int) -> str:
    return input_key if clips_per_video == 1 else f"{input_key}-c{clip}"


def rejection(sample: dict, kind: str, reason: str) -> dict:
    """The record that replaces a sample a stage failed on: ``kind`` is a short category for the summary,
    ``reason`` one line saying what is wrong and how to fix it. Warnings gathered so far go along."""
    return {
        "__key__": sample["__key__"],
        "source": sample["source"],
        "rejected": kind,
        "reason": reason,
        "warnings": sample.get("warnings", []),
    }


def is_rejection(sample: dict) -> bool:
    return "rejected" in sample


def assign_keys(sources: Iterable[str], done: dict[str, str]) -> tuple[list[dict], list[dict]]:
    """Input samples (``__key__``, ``source``) for relative paths, and rejections for paths whose key
    another path has: of several paths sharing a key, the one already written by an earlier run is kept,
    else the first in sorted order, so reruns agree with what is on disk."""
    by_key: dict[str, list[str]] = defaultdict(list)
    for source in sorted(sources):
        by_key[sample_key(source)].append(source)
    inputs, rejected = [], []
    for key, group in by_key.items():
        keep = done[key] if done.get(key) in group else group[0]
        inputs.append({"__key__": key, "source": keep})
        rejected += [
            rejection(
                {"__key__": key, "source": s},
                "duplicate key",
                f"same sample key {key!r} as {keep}; rename one of them",
            )
            for s in group
            if s != keep
        ]
    inputs.sort(key=lambda sample: sample["source"])
    return inputs, rejected


def list_videos(videos_dir: Path, exclude: Path | None = None) -> list[str]:
    """Relative paths of files with a video extension, sorted (:func:`list_media`)."""
    return list_media(videos_dir, exclude)[0]


def list_media(videos_dir: Path, exclude: Path | None = None) -> tuple[list[str], list[str]]:
    """Relative paths of the files with a video extension and of those with an image extension, each
    sorted, through symlinked folders too.

    Hidden files and folders (e.g. macOS ._ forks) are left out, and so is ``exclude`` (the output
    folder). A folder reached twice (a symlink loop, a link to a folder listed already) is listed once:
    real folders are walked before symlinks to folders, so a video keeps its real path where it has one.
    A folder that cannot be read is left out with a warning naming it.
    """
    found: list[str] = []
    seen: set[Path] = set()
    excluded = exclude.resolve() if exclude is not None else None
    folders: list[tuple[Path, PurePosixPath]] = [(videos_dir, PurePosixPath())]
    links: list[tuple[Path, PurePosixPath]] = []
    while folders or links:
        folder, relative = folders.pop() if folders else links.pop()
        real = folder.resolve()
        if excluded is not None and real.is_relative_to(excluded):
            continue
        if real in seen:
            log.warning("%s leads to %s, listed already (a symlink loop?); not listed again", folder, real)
            continue
        seen.add(real)
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name, reverse=True)
        except OSError as err:
            if folder == videos_dir:
                raise ValueError(
                    f"cannot read the videos folder {folder} ({err.strerror}); check its permissions"
                ) from err
            log.warning(
                "cannot read folder %s (%s); its videos are left out: fix its permissions",
                folder,
                err.strerror,
            )
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                is_dir, is_link = entry.is_dir(), entry.is_symlink()  # is_dir follows symlinks
            except OSError as err:
                log.warning("cannot read %s (%s); left out", entry.path, err.strerror)
                continue
            if is_dir:
                (links if is_link else folders).append((Path(entry.path), relative / entry.name))
            else:
                found.append((relative / entry.name).as_posix())
    return split_media(found)


def split_media(names: Iterable[str]) -> tuple[list[str], list[str]]:
    """``names`` with a video extension and those with an image extension, each sorted; others dropped."""
    videos: list[str] = []
    images: list[str] = []
    for name in sorted(names):
        suffix = PurePosixPath(name).suffix.lower()
        if suffix in VIDEO_EXTENSIONS:
            videos.append(name)
        elif suffix in IMAGE_EXTENSIONS:
            images.append(name)
    return videos, images


def list_remote_media(url: str, exclude: str | None = None) -> tuple[list[str], list[str]]:
    """``list_media`` of a remote folder: relative paths of the files with a video extension and of those
    with an image extension, sorted, hidden files and folders and ``exclude`` (the output folder, when it
    is inside) left out."""
    try:
        files = storage.list_files(url)
    except FileNotFoundError:
        raise FileNotFoundError(f"videos folder {url} does not exist or holds no files") from None
    except OSError as err:
        raise ValueError(f"cannot list the videos folder: {storage.describe_remote_error(err, url)}") from err
    inside = exclude.rstrip("/") + "/" if exclude else None
    base = url.rstrip("/") + "/"
    skip = inside[len(base) :] if inside is not None and inside.startswith(base) else None
    return split_media(
        name
        for name in files
        if not any(part.startswith(".") for part in PurePosixPath(name).parts)
        and not (skip and name.startswith(skip))
    )


# ---------------------------------------------------------------- per-input stages (worker processes)


@dataclass
class ClipSpec:
    """Everything the per-input stages need to turn one input into clips."""

    videos_dir: Path
    buckets: list[Bucket]
    frames: int
    fps: float | None
    clips_per_video: int
    caption_strategy: CaptionSource
    caption_mapping: dict[str, str] | None
    conditioning_dir: Path | None
    done_keys: set[str]
    captioner: Captioner | None = None
    caption_prompt: str | None = None  # the caption of every video (--captions prompt:TEXT)
    decode_threads: int = 0  # per worker; 0: one per core (the decoder's default)
    # Remote inputs: the videos' URL (``videos_dir`` is then their local staging mirror), and the start
    # frames' URL with the names in it (``conditioning_dir`` their mirror).
    videos_url: str | None = None
    conditioning_url: str | None = None
    conditioning_names: frozenset[str] = frozenset()


Stage = Callable[[Iterable[dict], ClipSpec], Iterator[dict]]


def stage(kind: str) -> Callable[[Callable[[dict, ClipSpec], None]], Stage]:
    """Make a stage of ``step(sample, spec)``, which fills in one input sample.

    A sample the step fails on becomes a rejection of ``kind`` (an input too small for any bucket, or an
    unexpected error, get kinds of their own); rejections from earlier stages pass through untouched.
    """

    def make(step: Callable[[dict, ClipSpec], None]) -> Stage:
        @functools.wraps(step)
        def run(samples: Iterable[dict], spec: ClipSpec) -> Iterator[dict]:
            for sample in samples:
                yield sample if is_rejection(sample) else _attempt(step, sample, spec, kind)

        return run

    return make


def _attempt(step: Callable[[dict, ClipSpec], None], sample: dict, spec: ClipSpec, kind: str) -> dict:
    try:
        step(sample, spec)
    except (VideoError, CaptionError) as err:
        return rejection(sample, kind, err.reason)
    except InputTooSmall as err:
        return rejection(sample, "too small", str(err))
    except Exception as err:  # a bad file must never end the run; the reason still names the error
        log.debug("unexpected failure on %s", sample["source"], exc_info=True)
        return rejection(sample, "error", f"{type(err).__name__}: {err}")
    return sample


def _staged_files(source: str, spec: ClipSpec) -> list[tuple[str, Path]]:
    """(URL, mirror path) of what ``fetch_inputs`` may copy for an input: the video, its sidecar, its
    start frame."""
    assert spec.videos_url is not None
    sidecar = PurePosixPath(source).with_suffix(".txt").as_posix()
    files = [(source, spec.videos_dir / source)]
    if spec.caption_strategy == "textfile":
        files.append((sidecar, spec.videos_dir / sidecar))
    staged = [(storage.join(spec.videos_url, name), path) for name, path in files]
    if spec.conditioning_url is not None and spec.conditioning_dir is not None:
        stem = PurePosixPath(source).with_suffix("").as_posix()
        found = next((n for n in start_frame_candidates(stem) if n in spec.conditioning_names), None)
        if found is not None:
            staged.append((storage.join(spec.conditioning_url, found), spec.conditioning_dir / found))
    return staged


@stage("unreadable")
def fetch_inputs(sample: dict, spec: ClipSpec) -> None:
    """A remote input copied into the staging mirror, with its sidecar caption and start frame."""
    if spec.videos_url is None:
        return
    (video_url, video_path), *others = _staged_files(sample["source"], spec)
    if not storage.fetch(video_url, video_path):
        raise VideoError(video_url, "is no longer in its folder (deleted after the listing?)")
    for url, path in others:
        storage.fetch(url, path)  # a missing sidecar or start frame is the later stages' to report


def remove_fetched(samples: Iterable[dict], spec: ClipSpec) -> Iterator[dict]:
    """Each input's staged copies deleted once its stages are done (rejected or not)."""
    for sample in samples:
        if spec.videos_url is not None:
            for _, path in _staged_files(sample["source"], spec):
                path.unlink(missing_ok=True)
        yield sample


@stage("unreadable")
def probe_inputs(sample: dict, spec: ClipSpec) -> None:
    info = probe(spec.videos_dir / sample["source"])
    if not MIN_PLAUSIBLE_FPS <= info.fps <= MAX_PLAUSIBLE_FPS:
        warning = (
            f"{sample['source']}: the file says {info.fps:g} frames per second, implausible for a video "
            "(broken timestamps?); check its clips, or set --fps to resample"
        )
        sample.setdefault("warnings", []).append(warning)
    sample["info"] = info


@stage("too small")
def choose_clips(sample: dict, spec: ClipSpec) -> None:
    """The bucket the video is cropped to, the clip length (4k+1 frames) and where each clip starts."""
    info = sample["info"]
    height, width = choose_bucket(info.height, info.width, spec.buckets)
    available = info.frames_at(spec.fps)
    count = trim_to_4k_plus_1(available, spec.frames)
    sample["bucket"] = [height, width, count]
    sample["starts"] = clip_starts(available, count, spec.clips_per_video)


@stage("caption")
def caption_inputs(sample: dict, spec: ClipSpec) -> None:
    path = spec.videos_dir / sample["source"]
    sample["caption"], sample["caption_source"] = resolve_caption(
        path,
        spec.caption_strategy,
        videos_dir=spec.videos_dir,
        mapping=spec.caption_mapping,
        captioner=spec.captioner,
        filename_fallback=spec.caption_strategy == "textfile",
        prompt=spec.caption_prompt,
    )
    if spec.caption_strategy == "textfile" and sample["caption_source"] == "filename":
        warning = f"{sample['source']}: no sidecar caption, using its file name; add {path.stem}.txt"
        sample.setdefault("warnings", []).append(warning)


@stage("start frame")
def load_start_frames(sample: dict, spec: ClipSpec) -> None:
    """The start frame brought in ``--conditioning-dir``; without that folder, each clip's first frame."""
    sample["cond_image"], sample["cond_source"] = None, "first_frame"
    if spec.conditioning_dir is not None:
        height, width, _ = sample["bucket"]
        image_path = find_start_frame(
            spec.videos_dir / sample["source"], spec.videos_dir, spec.conditioning_dir
        )
        sample["cond_image"], _ = load_start_frame(image_path, height, width)
        sample["cond_source"] = image_path.relative_to(spec.conditioning_dir).as_posix()


@stage("unreadable")
def decode_clips(sample: dict, spec: ClipSpec) -> None:
    """The input's ``clips`` not written yet, decoded and cropped to the bucket (all of them, or none)."""
    path, info, (height, width, count) = spec.videos_dir / sample["source"], sample["info"], sample["bucket"]
    clips = []
    for index, start in enumerate(sample["starts"]):
        key = clip_key(sample["__key__"], index, spec.clips_per_video)
        if key in spec.done_keys:
            continue
        raw = read_frames(path, start, count, spec.fps, info=info, threads=spec.decode_threads)
        frames, box = resize_center_crop(raw, height, width)
        clips.append(
            {
                "__key__": key,
                "input": sample["__key__"],
                "source": sample["source"],
                # A tensor, so worker processes hand the frames over in shared memory.
                "frames": torch.from_numpy(frames),
                "cond_image": frames[0] if sample["cond_image"] is None else sample["cond_image"],
                "caption": sample["caption"],
                "meta": {
                    "source": sample["source"],
                    "clip": index,
                    "start_frame": start,
                    "fps": spec.fps or info.fps,
                    "source_fps": info.fps,
                    "size": [info.height, info.width],
                    "rotation": info.rotation,
                    "crop": [round(v, 3) for v in box],
                    "bucket": [height, width, count],
                    "caption_source": sample["caption_source"],
                    "cond_source": sample["cond_source"],
                },
            }
        )
    sample["clips"] = clips


INPUT_STAGES: tuple[Stage, ...] = (
    fetch_inputs,
    probe_inputs,
    choose_clips,
    caption_inputs,
    load_start_frames,
    decode_clips,
)


def prepare_inputs(inputs: Iterable[dict], spec: ClipSpec) -> Iterator[dict]:
    """The per-input stages: each input comes out with its decoded ``clips``, or as a rejection."""
    # Copies: a caller's list of inputs must not come to hold every decoded frame.
    samples: Iterator[dict] = (dict(sample) for sample in inputs)
    for run in INPUT_STAGES:
        samples = run(samples, spec)
    return remove_fetched(samples, spec)


def prepare_input(sample: dict, spec: ClipSpec) -> dict:
    """One input through the per-input stages (what a Ray task of ``--engine ray`` runs)."""
    (prepared,) = prepare_inputs([sample], spec)
    return prepared


class _InputStream(IterableDataset):
    """Worker w of W prepares inputs w, w + W, ...; the DataLoader takes one result from each worker in
    turn, so the prepared inputs come out in input order."""

    def __init__(self, inputs: list[dict], spec: ClipSpec) -> None:
        super().__init__()
        self.inputs, self.spec = inputs, spec

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return prepare_inputs(self.inputs[worker::workers], self.spec)


def _unbatched(sample: dict) -> dict:
    return sample


def _init_worker(_: int) -> None:
    # Stop signals reach the whole process group; the main process stops decoding when it is ready, so
    # a worker must not die first (its death would surface as a DataLoader error, not an interruption).
    ignore_stop_signals()
    # A decoder whose parent was killed (kill -9, OOM killer) would otherwise linger, blocked on a
    # result pipe nobody reads. Linux only; elsewhere the DataLoader's own watchdog has to do.
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def decoded_inputs(
    inputs: list[dict], spec: ClipSpec, workers: int, pin_memory: bool = False
) -> Iterator[dict]:
    """Prepared inputs in order, decoded ``workers`` at a time ahead of the consumer (bounded). With
    ``pin_memory`` the frames arrive page-locked, so their upload to the GPU is asynchronous."""
    loader = DataLoader(
        _InputStream(inputs, spec),
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        collate_fn=_unbatched,
        prefetch_factor=2 if workers else None,
        worker_init_fn=_init_worker,
    )
    yield from loader
