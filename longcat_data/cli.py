"""longcat-prep: raw videos -> WebDataset shards of VAE latents, start-frame latents and text embeddings.

The shard pipeline is a chain of stages over plain values::

    list inputs -> rank slice -> skip done -> [workers] decode, bucket, trim, crop, caption
                -> group by shape -> encode (VAE, umT5) -> [writer thread] pack and write

Decoding runs in DataLoader worker processes and tar writing in a background thread, so the main
process keeps the GPU busy with encoding. Adding a subcommand: write its config dataclass and a
``run_<name>`` function, and add one line to ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import re
import signal
import sys
import textwrap
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from longcat_data import encode, hub, shards
from longcat_data.buckets import (
    Bucket,
    InputTooSmall,
    choose_bucket,
    clip_starts,
    make_buckets,
    trim_to_4k_plus_1,
)
from longcat_data.captions import (
    DEFAULT_PROMPT_TEMPLATE,
    Captioner,
    CaptionError,
    CaptionSource,
    QwenCaptioner,
    caption_videos,
    load_caption_mapping,
    precompute_captions,
    resolve_caption,
)
from longcat_data.config import (
    CaptionConfig,
    DemoConfig,
    InspectConfig,
    MergeConfig,
    PrepConfig,
    PushConfig,
    parse_captions,
)
from longcat_data.flags import add_flags, parse, parse_area, parse_size
from longcat_data.video import (
    VIDEO_EXTENSIONS,
    VideoError,
    find_start_frame,
    load_start_frame,
    probe,
    read_frames,
    resize_center_crop,
)

log = logging.getLogger("longcat_data.prep")

PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>


DTYPES: dict[str, torch.dtype | None] = {"auto": None, "bf16": torch.bfloat16, "fp32": torch.float32}


def encoding_device(cfg: PrepConfig) -> torch.device:
    """``--device``, else this rank's GPU (``LOCAL_RANK``) when there is one, else the CPU."""
    if cfg.device is not None:
        return torch.device(cfg.device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def encoding_dtype(cfg: PrepConfig) -> torch.dtype:
    return DTYPES[cfg.dtype] or encode.default_dtype(encoding_device(cfg))


def prep_settings(cfg: PrepConfig) -> dict[str, Any]:
    return cfg.settings(str(encoding_dtype(cfg)).removeprefix("torch."))


# ---------------------------------------------------------------- inputs (pure)


@dataclass(frozen=True)
class InputItem:
    key: str
    path: Path
    source: str  # path relative to the videos folder, as recorded in shards and the manifest


@dataclass(frozen=True)
class Rejection:
    source: str
    kind: str  # short category for the summary line
    reason: str  # one line: what is wrong and how to fix it


def sample_key(source: str) -> str:
    """A stable webdataset key from a relative path: no dots or spaces, folders joined by '__'."""
    parts = Path(source).with_suffix("").parts
    return "__".join(re.sub(r"[^\w-]+", "_", part) for part in parts)


def clip_key(input_key: str, clip: int, clips_per_video: int) -> str:
    return input_key if clips_per_video == 1 else f"{input_key}-c{clip}"


def assign_keys(sources: Iterable[str], done: dict[str, str]) -> tuple[list[InputItem], list[Rejection]]:
    """Give each relative path its key; of several paths sharing a key, keep one and reject the rest.

    The one kept is the one already written by an earlier run, else the first in sorted order, so
    reruns agree with what is on disk.
    """
    by_key: dict[str, list[str]] = defaultdict(list)
    for source in sorted(sources):
        by_key[sample_key(source)].append(source)
    items, rejected = [], []
    for key, group in by_key.items():
        keep = done[key] if done.get(key) in group else group[0]
        items.append(InputItem(key, Path(keep), keep))
        rejected += [
            Rejection(s, "duplicate key", f"same sample key {key!r} as {keep}; rename one of them")
            for s in group
            if s != keep
        ]
    items.sort(key=lambda item: item.source)
    return items, rejected


def list_videos(videos_dir: Path, exclude: Path | None = None) -> list[str]:
    """Relative paths of files with a video extension; hidden files (e.g. macOS ._ forks) are left out."""
    found = []
    for path in videos_dir.rglob("*"):
        relative = path.relative_to(videos_dir)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if exclude is not None and path.is_relative_to(exclude):
            continue
        if path.suffix.lower() in VIDEO_EXTENSIONS and not path.is_dir():
            found.append(relative.as_posix())
    return found


# ---------------------------------------------------------------- decode stage (worker processes)


@dataclass
class Clip:
    key: str
    input_key: str
    frames: torch.Tensor  # uint8 [F, H, W, 3]; a tensor so worker processes hand it over in shared memory
    cond_image: np.ndarray  # uint8 [H, W, 3]
    caption: str
    meta: dict[str, Any]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.frames.shape)


@dataclass
class Prepared:
    item: InputItem
    clips: list[Clip] = field(default_factory=list)
    rejection: Rejection | None = None
    warnings: list[str] = field(default_factory=list)

    def pin_memory(self) -> Prepared:
        """Called by the DataLoader's pinning thread: page-locked frames make the upload asynchronous."""
        for clip in self.clips:
            clip.frames = clip.frames.pin_memory()
        return self


@dataclass
class ClipSpec:
    """Everything a worker needs to turn one input into clips."""

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
    decode_threads: int = 0  # per worker; 0: one per core (the decoder's default)


def prepare_input(item: InputItem, spec: ClipSpec) -> Prepared:
    """Decode, bucket, trim, crop and caption one video; every failure becomes a Rejection."""
    out = Prepared(item)
    path = spec.videos_dir / item.path
    stage = "unreadable"
    try:
        info = probe(path)
        stage = "too small"
        height, width = choose_bucket(info.height, info.width, spec.buckets)
        available = info.frames_at(spec.fps)
        count = trim_to_4k_plus_1(available, spec.frames)
        starts = clip_starts(available, count, spec.clips_per_video)
        stage = "caption"
        caption, caption_source = resolve_caption(
            path,
            spec.caption_strategy,
            videos_dir=spec.videos_dir,
            mapping=spec.caption_mapping,
            captioner=spec.captioner,
            filename_fallback=spec.caption_strategy == "textfile",
        )
        if spec.caption_strategy == "textfile" and caption_source == "filename":
            out.warnings.append(f"{item.source}: no sidecar caption, using its file name; add {path.stem}.txt")
        cond_image, cond_source = None, "first_frame"
        if spec.conditioning_dir is not None:
            stage = "start frame"
            image_path = find_start_frame(path, spec.videos_dir, spec.conditioning_dir)
            cond_image, _ = load_start_frame(image_path, height, width)
            cond_source = image_path.relative_to(spec.conditioning_dir).as_posix()
        stage = "unreadable"
        for index, start in enumerate(starts):
            key = clip_key(item.key, index, spec.clips_per_video)
            if key in spec.done_keys:
                continue
            raw = read_frames(path, start, count, spec.fps, info=info, threads=spec.decode_threads)
            frames, box = resize_center_crop(raw, height, width)
            out.clips.append(
                Clip(
                    key=key,
                    input_key=item.key,
                    frames=torch.from_numpy(frames),
                    cond_image=frames[0] if cond_image is None else cond_image,
                    caption=caption,
                    meta={
                        "source": item.source,
                        "clip": index,
                        "start_frame": start,
                        "fps": spec.fps or info.fps,
                        "source_fps": info.fps,
                        "size": [info.height, info.width],
                        "rotation": info.rotation,
                        "crop": [round(v, 3) for v in box],
                        "bucket": [height, width, count],
                        "caption_source": caption_source,
                        "cond_source": cond_source,
                    },
                )
            )
    except (VideoError, CaptionError) as err:
        out.rejection = Rejection(item.source, stage, err.reason)
    except InputTooSmall as err:
        out.rejection = Rejection(item.source, "too small", str(err))
    except Exception as err:  # a bad file must never end the run; the reason still names the error
        log.debug("unexpected failure on %s", item.source, exc_info=True)
        out.rejection = Rejection(item.source, "error", f"{type(err).__name__}: {err}")
    if out.rejection is not None:
        out.clips = []
    return out


class _InputDataset(Dataset):
    def __init__(self, items: list[InputItem], spec: ClipSpec) -> None:
        self.items, self.spec = items, spec

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Prepared:
        return prepare_input(self.items[index], self.spec)


def _unbatched(sample: Prepared) -> Prepared:
    return sample


def _die_with_parent(_: int) -> None:
    # A decoder whose parent was killed (kill -9, OOM killer) would otherwise linger, blocked on a
    # result pipe nobody reads. Linux only; elsewhere the DataLoader's own watchdog has to do.
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def decoded_inputs(
    items: list[InputItem], spec: ClipSpec, workers: int, pin_memory: bool = False
) -> Iterator[Prepared]:
    """Prepared inputs in order, decoded ``workers`` at a time ahead of the consumer (bounded)."""
    loader = DataLoader(
        _InputDataset(items, spec),
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        collate_fn=_unbatched,
        prefetch_factor=2 if workers else None,
        worker_init_fn=_die_with_parent,
    )
    yield from loader


# ---------------------------------------------------------------- group and encode stages


def same_shape_batches(clips: Iterable[Clip], batch_size: int) -> Iterator[list[Clip]]:
    """Batches of clips with one shape. Holds at most ``2 * batch_size`` clips: when more are waiting,
    the fullest group goes out short rather than let rare buckets pile up decoded frames in memory."""
    groups: dict[tuple[int, ...], list[Clip]] = defaultdict(list)
    waiting = 0
    for clip in clips:
        group = groups[clip.shape]
        group.append(clip)
        waiting += 1
        if len(group) == batch_size or waiting > 2 * batch_size:
            fullest = group if len(group) == batch_size else max(groups.values(), key=len)
            waiting -= len(fullest)
            yield groups.pop(fullest[0].shape)
    yield from (group for group in groups.values() if group)


@dataclass
class Encoders:
    vae: torch.nn.Module
    tokenizer: Any | None
    text_encoder: torch.nn.Module | None
    ids: dict[str, str]


def load_encoders(cfg: PrepConfig) -> Encoders:
    device, dtype = encoding_device(cfg), encoding_dtype(cfg)
    vae = encode.load_vae(cfg.model, device, dtype)
    if cfg.vae_tiling:
        vae.enable_tiling()
    tokenizer = text_encoder = None
    if cfg.text_embeds:
        tokenizer, text_encoder = encode.load_text_encoder(cfg.model, device, dtype)
    return Encoders(vae, tokenizer, text_encoder, encode.encoder_ids(cfg.model))


@dataclass
class EncodedClip:
    clip: Clip
    latents: torch.Tensor  # bf16 [16, T, h, w], CPU
    cond_latents: torch.Tensor  # bf16 [16, 1, h, w], CPU
    text_embeds: torch.Tensor | None  # bf16 [L, D], CPU


def encode_batch(batch: list[Clip], enc: Encoders) -> list[EncodedClip]:
    # One clip needs no stacking copy (a 480x832x93 clip is 111 MB).
    frames = batch[0].frames[None] if len(batch) == 1 else torch.stack([c.frames for c in batch])
    latents = encode.encode_video(enc.vae, frames)
    # The Wan VAE is causal: latent frame 0 is computed from pixel frame 0 alone, by the same first-chunk
    # pass that encoding the start frame by itself runs. So a clip's own start frame costs no second VAE
    # call (tests/data check the equality); start frames brought from a conditioning folder do.
    cond_latents = latents[:, :, :1].clone()
    brought = [i for i, c in enumerate(batch) if c.meta["cond_source"] != "first_frame"]
    if brought:
        conds = torch.from_numpy(np.stack([batch[i].cond_image for i in brought]))
        cond_latents[brought] = encode.encode_image(enc.vae, conds)
    latents, cond_latents = latents.to(torch.bfloat16).cpu(), cond_latents.to(torch.bfloat16).cpu()
    embeds: list[torch.Tensor | None] = [None] * len(batch)
    if enc.text_encoder is not None:
        texts = encode.encode_text(enc.tokenizer, enc.text_encoder, [c.caption for c in batch])
        embeds = [e.to(torch.bfloat16).cpu() for e in texts]
    return [EncodedClip(c, z, cz, e) for c, z, cz, e in zip(batch, latents, cond_latents, embeds, strict=True)]


# ---------------------------------------------------------------- write stage


@dataclass
class PrepStats:
    written: int = 0
    inputs_written: int = 0
    skipped: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    encode_seconds: float = 0.0
    wall_seconds: float = 0.0
    shards: int = 0

    def summary(self) -> str:
        rate = self.written / self.wall_seconds if self.wall_seconds else 0.0
        reasons = ", ".join(f"{n} {kind}" for kind, n in self.rejected.most_common())
        rejected = sum(self.rejected.values())
        return (
            f"written {self.written} clips from {self.inputs_written} videos ({rate:.2f} clips/s), "
            f"skipped {self.skipped} already done, rejected {rejected}" + (f" ({reasons})" if reasons else "")
        )


class _BackgroundWriter:
    """Packs and writes encoded clips on one thread (in order), at most ``depth`` batches behind."""

    def __init__(self, writer: shards.ShardWriter, encoders: dict[str, str], depth: int = 2) -> None:
        self.writer, self.encoders, self.depth = writer, encoders, depth
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self.pending: list[Future[list[tuple[Clip, str | None]]]] = []

    def submit(self, batch: list[EncodedClip]) -> list[tuple[Clip, str | None]]:
        """Queue a batch; returns (clip, error or None) for batches that finished meanwhile."""
        self.pending.append(self.pool.submit(self._write, batch))
        done = []
        while len(self.pending) > self.depth or (self.pending and self.pending[0].done()):
            done += self.pending.pop(0).result()
        return done

    def drain(self) -> list[tuple[Clip, str | None]]:
        done = []
        while self.pending:
            done += self.pending.pop(0).result()
        self.pool.shutdown()
        return done

    def _write(self, batch: list[EncodedClip]) -> list[tuple[Clip, str | None]]:
        results = []
        for e in batch:
            clip = e.clip
            sample = shards.encode_sample(
                clip.key, e.latents, e.cond_latents, clip.cond_image, clip.caption,
                {**clip.meta, "encoders": self.encoders}, e.text_embeds,
            )
            try:
                self.writer.write(sample, shards.bucket_name(*clip.meta["bucket"]))
                results.append((clip, None))
            except KeyError as err:
                results.append((clip, f"{err.args[0]}; two inputs map to one key, rename one"))
        return results


def qwen_captions(cfg: PrepConfig, videos_dir: Path, sources: list[str], stream: str) -> Captioner:
    """Caption this rank's videos with Qwen-2.5-VL before encoding, so the two models never share the GPU.

    Captions are cached in ``OUT_DIR/.prep/captions-<stream>.jsonl``; a rerun captions only what is new.
    """
    captioner = QwenCaptioner(cfg.caption_model, device=encoding_device(cfg), dtype=encoding_dtype(cfg))
    cache = Path(cfg.out_dir) / shards.STATE_DIR / f"captions-{stream}.jsonl"
    captions = precompute_captions(videos_dir, sources, captioner, cache)
    del captioner
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return captions


def run_shard(cfg: PrepConfig, encoders: Encoders | None = None, captioner: Captioner | None = None) -> PrepStats:
    """The whole shard command; ``encoders``/``captioner`` let callers (benchmarks, tests) inject models."""
    started = time.perf_counter()
    rank, world = cfg.resolved_rank
    videos_dir, out_dir = Path(cfg.videos_dir), Path(cfg.out_dir)
    if not videos_dir.is_dir():
        raise FileNotFoundError(f"videos folder {videos_dir} does not exist")
    strategy, mapping_file = parse_captions(cfg.captions)
    mapping = load_caption_mapping(mapping_file) if mapping_file else None
    settings = prep_settings(cfg)
    ids = encoders.ids if encoders is not None else encode.encoder_ids(cfg.model)
    # Checked before loading the models: a refusal should come in seconds, not after a 20 GB download.
    shards.check_compatible(out_dir, settings, ids)

    sources = list_videos(videos_dir, exclude=out_dir.resolve() if out_dir.exists() else None)
    prior = {key: src for s in shards.read_states(out_dir) for r in s.shards for key, src in r.inputs.items()}
    all_items, duplicates = assign_keys(sources, prior)
    mine = all_items[rank::world]

    writer = shards.ShardWriter(
        out_dir, settings=settings, encoders=ids, listing=shards.listing_digest(i.key for i in all_items),
        rank=rank, world_size=world, max_bytes=parse_size(cfg.shard_size),
    )
    stats = PrepStats()
    todo = [item for item in mine if writer.done_inputs.get(item.key) != item.source]
    stats.skipped = len(mine) - len(todo)
    rejections = duplicates if rank == 0 else []
    log.info(
        "%s: %d videos (%d for rank %d of %d), %d already done", videos_dir, len(all_items) + len(duplicates),
        len(mine), rank, world, stats.skipped,
    )
    if strategy == "captioner" and captioner is None:
        captioner = qwen_captions(cfg, videos_dir, [item.source for item in todo], writer.stream)
    enc = encoders or load_encoders(cfg)
    spec = ClipSpec(
        videos_dir=videos_dir, buckets=make_buckets(parse_area(cfg.area)), frames=cfg.frames, fps=cfg.fps,
        clips_per_video=cfg.clips_per_video, caption_strategy=strategy, caption_mapping=mapping,
        conditioning_dir=Path(cfg.conditioning_dir) if cfg.conditioning_dir else None,
        done_keys=writer.done_keys, captioner=captioner,
        # Each decoder left to its default starts a thread per core: 8 workers then oversubscribe the
        # CPU and slow the kernel launches of the encoding process, which is what the GPU waits on.
        decode_threads=max(1, (os.cpu_count() or 2) // cfg.workers) if cfg.workers else 0,
    )
    remaining: dict[str, int] = {}
    sources_by_key = {item.key: item.source for item in todo}

    def reject(r: Rejection) -> None:
        log.warning("skipped %s: %s", r.source, r.reason)
        writer.reject(r.source, r.reason)
        stats.rejected[r.kind] += 1

    def settle(results: list[tuple[Clip, str | None]]) -> None:
        for clip, error in results:
            if error is None:
                stats.written += 1
                bar.update(1)
            else:
                reject(Rejection(clip.meta["source"], "duplicate key", error))
            remaining[clip.input_key] -= 1
            if remaining[clip.input_key] == 0:
                writer.finish_input(clip.input_key, sources_by_key[clip.input_key])
                stats.inputs_written += 1

    def clips() -> Iterator[Clip]:
        pin = enc.vae.device.type == "cuda"
        for prepared in decoded_inputs(todo, spec, cfg.workers, pin_memory=pin):
            for warning in prepared.warnings:
                log.warning(warning)
            if prepared.rejection is not None:
                reject(prepared.rejection)
            elif not prepared.clips:
                writer.finish_input(prepared.item.key, prepared.item.source)
            remaining[prepared.item.key] = len(prepared.clips)
            # The bar counts clips; its total starts at the most each video could give, then tightens.
            bar.total -= cfg.clips_per_video - len(prepared.clips)
            bar.refresh()
            yield from prepared.clips

    for r in rejections:
        reject(r)
    with writer, logging_redirect_tqdm(), tqdm(
        total=len(todo) * cfg.clips_per_video, unit="clip", desc=f"rank {rank}" if world > 1 else "encoding",
        # In a terminal, live; in a batch job's log, a line a minute rather than nothing for hours.
        dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 60,
    ) as bar:
        background = _BackgroundWriter(writer, ids)
        try:
            for batch in same_shape_batches(clips(), cfg.batch_size):
                tick = time.perf_counter()
                encoded = encode_batch(batch, enc)
                stats.encode_seconds += time.perf_counter() - tick
                settle(background.submit(encoded))
        finally:
            settle(background.drain())
    stats.shards = len(writer.state.shards)
    stats.wall_seconds = time.perf_counter() - started
    return stats


# ---------------------------------------------------------------- other commands


def run_demo(cfg: DemoConfig) -> None:
    from longcat_data.defaults import DEMO_AREA, DEMO_FRAMES
    from longcat_data.demo import write_demo_clips

    paths = write_demo_clips(cfg.out_dir)
    out = Path(cfg.out_dir)
    print(f"wrote {len(paths)} demo clips to {out}")
    print(
        f"next: longcat-prep shard {out} {out.with_name(out.name + '_shards')} --model tiny "
        f"--area {DEMO_AREA[0]}x{DEMO_AREA[1]} --frames {DEMO_FRAMES}"
    )


def run_merge(cfg: MergeConfig) -> None:
    manifest = shards.merge_manifest(cfg.out_dir)
    samples = sum(s["samples"] for s in manifest["shards"])
    state = "complete" if manifest["complete"] else "INCOMPLETE (some rank has not finished)"
    print(f"{cfg.out_dir}/manifest.json: {samples} samples in {len(manifest['shards'])} shards, {state}")


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


def run_inspect(cfg: InspectConfig) -> None:
    import webdataset as wds

    out = Path(cfg.out_dir)
    manifest = shards.read_manifest(out)
    if manifest is None:
        raise FileNotFoundError(f"{out}/manifest.json not found: not a shard folder (or run longcat-prep merge)")
    total = sum(s["samples"] for s in manifest["shards"])
    size = sum(s["bytes"] for s in manifest["shards"])
    print(f"{out}: {total} samples in {len(manifest['shards'])} shards ({size / 1e6:.1f} MB), "
          f"{'complete' if manifest['complete'] else 'INCOMPLETE'}")
    print(f"encoders: {manifest['encoders'].get('model')}  settings: {manifest['settings']}")
    print(f"{'bucket (HxWxF)':<20}{'samples':>8}")
    for bucket, count in manifest["buckets"].items():
        print(f"{bucket:<20}{count:>8}")
    if manifest["rejected"]:
        print(f"rejected {len(manifest['rejected'])}:")
        for entry in manifest["rejected"]:
            print(f"  {entry['source']}: {entry['reason']}")
    urls = [str(out / s["name"]) for s in manifest["shards"]]
    items = []
    if urls:
        dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False).select(
            lambda s: shards.COND_IMAGE in s
        )
        for sample in dataset:
            decoded = shards.decode_sample(sample)
            items.append((decoded["cond_image"], f"{decoded['key']}: {decoded['caption']}"))
            if len(items) >= cfg.max_images:
                break
    sheet_path = Path(cfg.sheet) if cfg.sheet else out / "contact_sheet.png"
    contact_sheet(items).save(sheet_path)
    print(f"contact sheet: {sheet_path}")


def run_shard_command(cfg: PrepConfig) -> None:
    if encoding_device(cfg).type == "cpu" and cfg.workers:
        # Encoding threads and decoder processes share the cores; oversubscribed, both crawl.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - cfg.workers))
    stats = run_shard(cfg)
    print(stats.summary())


def caption_prompt(cfg: CaptionConfig) -> str:
    """``--prompt-template``: the text itself, ``@FILE`` to read it, or the default template."""
    if cfg.prompt_template is None:
        return DEFAULT_PROMPT_TEMPLATE
    if cfg.prompt_template.startswith("@"):
        return Path(cfg.prompt_template[1:]).read_text(encoding="utf-8").strip()
    return cfg.prompt_template


def run_caption(cfg: CaptionConfig) -> None:
    videos_dir = Path(cfg.videos_dir)
    if not videos_dir.is_dir():
        raise FileNotFoundError(f"videos folder {videos_dir} does not exist")
    captioner = QwenCaptioner(
        cfg.model, prompt_template=caption_prompt(cfg), fps=cfg.fps, max_frames=cfg.max_frames,
        max_pixels=cfg.max_pixels, max_new_tokens=cfg.max_new_tokens, device=cfg.device,
    )
    with logging_redirect_tqdm():
        report = caption_videos(
            videos_dir, sorted(list_videos(videos_dir)), captioner, jsonl=cfg.jsonl, overwrite=cfg.overwrite,
            batch_size=cfg.batch_size,
        )
    for source, reason in report.failed:
        print(f"  failed {source}: {reason}")
    print(report.summary())


def run_push(cfg: PushConfig) -> None:
    from huggingface_hub.errors import HfHubHTTPError

    try:
        files = hub.push_dataset(
            cfg.out_dir, cfg.repo_id, private=cfg.private, license=cfg.license, dry_run=cfg.dry_run
        )
    except HfHubHTTPError as err:
        # The hub's own message says what failed; the usual cause is a missing or read-only token.
        raise hub.PushError(f"{err} (log in with `hf auth login` or set HF_TOKEN to a write token)") from err
    card = Path(cfg.out_dir) / hub.CARD
    if cfg.dry_run:
        print(f"wrote {card}; a push would upload {len(files)} files to datasets/{cfg.repo_id}")
        return
    print(f"pushed {len(files)} files to https://huggingface.co/datasets/{cfg.repo_id}")
    print(f"train on it: longcat-train --shards hf://datasets/{cfg.repo_id}")


# ---------------------------------------------------------------- parser

SHARD_EPILOG = """\
examples:
  longcat-prep shard videos/ shards/ --model tiny --area 192x320 --frames 17     # CPU, no downloads
  longcat-prep shard videos/ shards/ --conditioning-dir start_frames/ --shard-size 500MB
  longcat-prep shard videos/ shards/ --captions jsonl:metadata.jsonl --fps 16 --clips-per-video 3
  torchrun --nproc-per-node 8 -m longcat_data.cli shard videos/ shards/    # one slice per GPU
  longcat-prep shard videos/ shards/ --rank 1 --world-size 4   # by hand, e.g. one per machine; then merge

Captions: 'sidecar' reads VIDEO.txt beside each video (SimpleTuner's textfile), falling back to the
file name with a warning; jsonl/csv map file names to captions (file_name + caption/text columns);
'qwen' captions every video with Qwen-2.5-VL first (cached in OUT_DIR/.prep, so reruns skip it).
Rerunning into the same OUT_DIR resumes: finished shards are kept and their videos skipped. A different
--model or content setting is refused. Bad inputs are reported, listed in manifest.json, and skipped.
"""

CAPTION_EPILOG = """\
examples:
  longcat-prep caption videos/                          # VIDEO.txt beside each video that has none
  longcat-prep caption videos/ --jsonl captions.jsonl   # then: shard ... --captions jsonl:captions.jsonl
  longcat-prep caption videos/ --prompt-template @my_prompt.txt --overwrite

Each caption is written as soon as it exists, so an interrupted run resumes where it stopped. Needs a
GPU for real use (Qwen2.5-VL-7B in bf16 takes ~17 GB). With torchvision installed the frames go in as a
video; without it, as a series of images.
"""

PUSH_EPILOG = """\
examples:
  longcat-prep push shards/ me/my-clips --private --license cc-by-4.0
  longcat-prep push shards/ me/my-clips --dry-run        # check the folder and write the card only

Pushes manifest.json, the shards it lists, the dataset card (README.md) and the contact sheet when
longcat-prep inspect made one. Refused when the folder is unfinished or mixes encoders. Rerunning after
an interruption resumes the upload. Then: longcat-train --shards hf://datasets/me/my-clips
"""

COMMANDS: dict[str, tuple[type, Callable[[Any], None], str, str]] = {
    "demo": (DemoConfig, run_demo, "write a few generated demo clips with captions", ""),
    "shard": (PrepConfig, run_shard_command, "encode a folder of videos into WebDataset shards", SHARD_EPILOG),
    "inspect": (InspectConfig, run_inspect, "counts, bucket table and a contact sheet of a shard folder", ""),
    "merge": (MergeConfig, run_merge, "write one manifest.json for shards written by several ranks", ""),
    "caption": (CaptionConfig, run_caption, "caption videos with Qwen-2.5-VL into VIDEO.txt files", CAPTION_EPILOG),
    "push": (PushConfig, run_push, "upload a finished shard folder to a Hugging Face dataset repo", PUSH_EPILOG),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longcat-prep",
        description="Turn raw videos into WebDataset shards for LongCat-Video image-to-video LoRA training.",
        epilog="start here: longcat-prep demo demo_videos && longcat-prep shard --help",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (cls, _, help_text, epilog) in COMMANDS.items():
        command = sub.add_parser(
            name, help=help_text, description=help_text, epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add_flags(command, cls)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    cls, run, _, _ = COMMANDS[args.command]
    try:
        cfg = parse(cls, args)
        run(cfg)
    except (ValueError, FileNotFoundError, shards.OutputMismatch, CaptionError, hub.PushError) as err:
        print(f"longcat-prep {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
