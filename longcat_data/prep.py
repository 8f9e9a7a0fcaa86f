"""``longcat-prep shard``: raw videos -> WebDataset shards of VAE latents, start-frame latents and text embeddings.

The pipeline is a chain of stages, each a generator over plain dict samples (webdataset style)::

    [DataLoader workers]  inputs -> probe -> bucket and trim -> caption -> start frame -> decode
                          (``longcat_data.clips``)
    [main process]        clips_of_inputs -> same_shape_batches -> encode_batches (VAE, umT5)
    [writer thread]       write_clips: each clip packed as a ShardSample and written by the ShardWriter

Encoding adds ``latents``, ``cond_latents`` and ``text_embeds`` to each clip sample. Rejection records
(an input a stage failed on) pass every stage untouched and end in the writer's reject list. Decoding
runs in worker processes and tar writing in a background thread, so the main process keeps the GPU busy
with encoding.

SIGTERM and SIGHUP stop a run as Ctrl-C does (``longcat_data.interrupts``): the clip in flight is
finished or dropped, the shard in progress is closed with its whole samples, the state is saved, and
``Interrupted`` propagates (the CLI exits 128 + the signal number).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import tempfile
import time
from collections import Counter, defaultdict, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from longcat_data import encode, storage
from longcat_data.buckets import make_buckets
from longcat_data.captions import Captioner, CaptionError, load_caption_mapping, match_captions
from longcat_data.clips import (
    ClipSpec,
    assign_keys,
    decoded_inputs,
    is_rejection,
    list_remote_videos,
    list_videos,
    rejection,
)
from longcat_data.config import PrepConfig, parse_captions
from longcat_data.defaults import TEXT_MAX_LENGTH
from longcat_data.files import OutputError
from longcat_data.flags import parse_area, parse_size
from longcat_data.interrupts import stop_signals
from longcat_data.manifest import captions_cache_path, check_compatible, listing_digest, read_states
from longcat_data.qwen_captions import QwenCaptioner, precompute_captions
from longcat_data.shards import ShardSample, bucket_name
from longcat_data.writer import ShardWriter

log = logging.getLogger(__name__)

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


def limit_encoding_threads(cfg: PrepConfig) -> None:
    """Encoding on the CPU leaves a core to each decoding worker: oversubscribed, both crawl."""
    if encoding_device(cfg).type == "cpu" and cfg.workers:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - cfg.workers))


class NothingWritten(ValueError):
    """A prep run that leaves nothing to train on; the message names the most common reason and its fix."""


@dataclass
class PrepStats:
    written: int = 0
    inputs_written: int = 0
    skipped: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    encode_seconds: float = 0.0
    wall_seconds: float = 0.0
    shards: int = 0
    frames: int = 0  # --frames: the clip length asked for
    listed: int = 0  # videos in the whole listing (every rank's)
    short_clips: Counter[int] = field(default_factory=Counter)  # frames -> clips kept shorter than asked
    first_reason: dict[str, str] = field(default_factory=dict)  # rejection kind -> its first reason

    def summary(self) -> str:
        rate = self.written / self.wall_seconds if self.wall_seconds else 0.0
        reasons = ", ".join(f"{n} {kind}" for kind, n in self.rejected.most_common())
        rejected = sum(self.rejected.values())
        line = (
            f"written {self.written} clips from {self.inputs_written} videos ({rate:.2f} clips/s), "
            f"skipped {self.skipped} already done, rejected {rejected}" + (f" ({reasons})" if reasons else "")
        )
        if self.short_clips:
            lengths = ", ".join(f"{n} of {f}" for f, n in sorted(self.short_clips.items()))
            line += (
                f"; {sum(self.short_clips.values())} clips from videos shorter than --frames {self.frames} "
                f"kept at their own length ({lengths} frames)"
            )
        return line

    def failure(self) -> str | None:
        """Why the run is a failure: the folder holds no video, or every input of this rank was rejected
        (with the most common rejection's reason and fix); None otherwise, also for a rank whose slice
        of the listing is empty (more ranks than videos)."""
        if not self.listed:
            return "no videos to prep: the folder holds no video file (searched recursively)"
        if self.written or self.skipped or self.inputs_written or not self.rejected:
            return None
        kind, count = self.rejected.most_common(1)[0]
        return (
            f"every video was rejected, nothing was written; most common ({count}, {kind}): "
            f"{self.first_reason[kind]}"
        )


# ---------------------------------------------------------------- main-process stages


def clips_of_inputs(
    records: Iterable[dict], writer: ShardWriter, bar: tqdm, clips_per_video: int
) -> Iterator[dict]:
    """The clips of each prepared input, its last one marked ``last``; rejections pass through.

    An input with no clip left to write (an earlier run wrote them all) is done at once.
    """
    for record in records:
        for warning in record.get("warnings", ()):
            log.warning(warning)
        if is_rejection(record):
            clips = []
            yield record
        else:
            clips = record["clips"]
            if clips:
                clips[-1]["last"] = True
            else:
                writer.finish_input(record["__key__"], record["source"])
        # The bar counts clips; its total starts at the most each video could give, then tightens.
        bar.total -= clips_per_video - len(clips)
        bar.refresh()
        yield from clips


def same_shape_batches(samples: Iterable[dict], batch_size: int) -> Iterator[list[dict]]:
    """Batches of clips with one frame shape; a rejection goes on at once, as a batch of its own.

    Holds at most ``2 * batch_size`` clips: when more are waiting, the fullest group goes out short
    rather than let rare buckets pile up decoded frames in memory.
    """
    groups: dict[tuple[int, ...], list[dict]] = defaultdict(list)
    waiting = 0
    for sample in samples:
        if is_rejection(sample):
            yield [sample]
            continue
        group = groups[tuple(sample["frames"].shape)]
        group.append(sample)
        waiting += 1
        if len(group) == batch_size or waiting > 2 * batch_size:
            fullest = group if len(group) == batch_size else max(groups.values(), key=len)
            waiting -= len(fullest)
            yield groups.pop(tuple(fullest[0]["frames"].shape))
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
    if cfg.compile_vae and vae.device.type == "cuda":
        encode.compile_vae_encoder(vae)
    tokenizer = text_encoder = None
    if cfg.text_embeds:
        tokenizer, text_encoder = encode.load_text_encoder(cfg.model, device, dtype)
    return Encoders(vae, tokenizer, text_encoder, encode.encoder_ids(cfg.model))


def encode_batch(batch: list[dict], enc: Encoders) -> list[dict]:
    """Clips of one shape -> the same records with ``latents`` [16, T, h, w], ``cond_latents``
    [16, 1, h, w] and ``text_embeds`` [L, D] or None (bf16, on the CPU) in place of their frames."""
    # One clip needs no stacking copy of its frames.
    frames = batch[0]["frames"][None] if len(batch) == 1 else torch.stack([c["frames"] for c in batch])
    latents = encode.encode_video(enc.vae, frames)
    # The Wan VAE is causal: latent frame 0 is computed from pixel frame 0 alone, by the same first-chunk
    # pass that encoding the start frame by itself runs. So a clip's own start frame costs no second VAE
    # call (tests/data check the equality); start frames brought from a conditioning folder do.
    cond_latents = latents[:, :, :1].clone()
    brought = [i for i, c in enumerate(batch) if c["meta"]["cond_source"] != "first_frame"]
    if brought:
        conds = torch.from_numpy(np.stack([batch[i]["cond_image"] for i in brought]))
        cond_latents[brought] = encode.encode_image(enc.vae, conds)
    latents, cond_latents = latents.to(torch.bfloat16).cpu(), cond_latents.to(torch.bfloat16).cpu()
    embeds: list[torch.Tensor | None] = [None] * len(batch)
    if enc.text_encoder is not None:
        captions = [c["caption"] for c in batch]
        for clip, tokens in zip(batch, encode.token_counts(enc.tokenizer, captions), strict=True):
            if tokens > TEXT_MAX_LENGTH:
                log.warning(
                    "%s (clip %s): its caption is %d tokens; the text encoder reads %d and the rest is cut "
                    "off: shorten it to keep all of it",
                    clip["source"],
                    clip["__key__"],
                    tokens,
                    TEXT_MAX_LENGTH,
                )
        texts = encode.encode_text(enc.tokenizer, enc.text_encoder, captions)
        embeds = [e.to(torch.bfloat16).cpu() for e in texts]
    return [
        {
            **{k: v for k, v in clip.items() if k != "frames"},
            "latents": z,
            "cond_latents": cz,
            "text_embeds": e,
        }
        for clip, z, cz, e in zip(batch, latents, cond_latents, embeds, strict=True)
    ]


def encode_batches(batches: Iterable[list[dict]], enc: Encoders, stats: PrepStats) -> Iterator[list[dict]]:
    """Each batch of clips encoded (``encode_batch``), timed into ``stats``; rejections pass through."""
    for batch in batches:
        if not is_rejection(batch[0]):
            tick = time.perf_counter()
            batch = encode_batch(batch, enc)
            stats.encode_seconds += time.perf_counter() - tick
        yield batch


# ---------------------------------------------------------------- write stage (background thread)


def _pack_and_write(
    batch: list[dict], writer: ShardWriter, encoders: dict[str, str]
) -> list[tuple[dict, str | None]]:
    """(clip, None) for each clip written, (clip, reason) for one whose key was written before."""
    results = []
    for clip in batch:
        sample = ShardSample(
            key=clip["__key__"],
            latents=clip["latents"],
            cond_latents=clip["cond_latents"],
            cond_image=clip["cond_image"],
            caption=clip["caption"],
            meta={**clip["meta"], "encoders": encoders},
            text_embeds=clip["text_embeds"],
        )
        members = sample.to_members()
        try:
            writer.write(members, bucket_name(*clip["meta"]["bucket"]))
            results.append((clip, None))
        except KeyError as err:
            results.append((clip, f"{err.args[0]}; two inputs map to one key, rename one"))
    return results


def write_clips(
    batches: Iterable[list[dict]],
    writer: ShardWriter,
    encoders: dict[str, str],
    stats: PrepStats,
    bar: tqdm,
    depth: int = 2,
) -> None:
    """The write stage: packs and writes batches on one background thread, in order and at most
    ``depth`` batches behind the encoder; rejections go to the writer's list. An input is done once its
    last clip is written. On an exception (Ctrl-C too) the batches already encoded are still written."""

    def reject(r: dict) -> None:
        log.warning("skipped %s: %s", r["source"], r["reason"])
        writer.reject(r["source"], r["reason"])
        stats.rejected[r["rejected"]] += 1
        stats.first_reason.setdefault(r["rejected"], f"{r['source']}: {r['reason']}")

    def settle(written: Future[list[tuple[dict, str | None]]]) -> None:
        for clip, error in written.result():
            if error is None:
                stats.written += 1
                bar.update(1)
                frames = clip["meta"]["bucket"][2]
                if frames < stats.frames:
                    stats.short_clips[frames] += 1
            else:
                reject(rejection(clip, "duplicate key", error))
            if clip.get("last"):
                writer.finish_input(clip["input"], clip["source"])
                stats.inputs_written += 1

    pending: deque[Future[list[tuple[dict, str | None]]]] = deque()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer") as pool:
        try:
            for batch in batches:
                if is_rejection(batch[0]):
                    reject(batch[0])
                    continue
                pending.append(pool.submit(_pack_and_write, batch, writer, encoders))
                while len(pending) > depth or (pending and pending[0].done()):
                    settle(pending.popleft())
        finally:
            while pending:
                settle(pending.popleft())


# ---------------------------------------------------------------- the command


def progress_bar(clips: int, rank: int, world: int) -> tqdm:
    return tqdm(
        total=clips,
        unit="clip",
        desc=f"rank {rank}" if world > 1 else "encoding",
        # In a terminal, live; in a batch job's log, a line a minute rather than nothing for hours.
        dynamic_ncols=True,
        mininterval=0.1 if sys.stderr.isatty() else 60,
    )


def qwen_captions(cfg: PrepConfig, videos_dir: Path, sources: list[str], stream: str) -> Captioner:
    """Caption this rank's videos with Qwen-2.5-VL before encoding, so the two models never share the GPU.

    Captions are cached in ``OUT_DIR/.prep/captions-<stream>.jsonl``; a rerun captions only what is new.
    """
    captioner = QwenCaptioner(cfg.caption_model, device=encoding_device(cfg), dtype=encoding_dtype(cfg))
    captions = precompute_captions(
        videos_dir, sources, captioner, captions_cache_path(Path(cfg.out_dir), stream)
    )
    del captioner
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return captions


def caption_mapping(
    mapping_file: Path | str, sources: list[str], videos_dir: Path, report: bool, staging: Path
) -> dict[str, str]:
    """The mapping file's caption for each video of the listing (``captions.match_captions``); entries
    that match no video are reported once (``report``: by rank 0). A remote file is copied into
    ``staging`` first; messages name it by its URL."""
    if isinstance(mapping_file, str):
        local = staging / f"captions-{os.getpid()}" / Path(mapping_file.rstrip("/").rsplit("/", 1)[-1])
        try:
            if not storage.fetch(mapping_file, local):
                raise CaptionError(mapping_file, "caption mapping file not found")
            mapping = load_caption_mapping(local)
        except CaptionError as err:
            raise CaptionError(mapping_file, err.reason) from None
        finally:
            local.unlink(missing_ok=True)
    else:
        mapping = load_caption_mapping(mapping_file)
    matched = match_captions(mapping, sources, mapping_file, videos_dir)
    warning = matched.report(mapping_file)
    if report and warning:
        log.warning("%s", warning)
    return matched.captions


@contextlib.contextmanager
def staging_folder(cfg: PrepConfig) -> Iterator[Path]:
    """``--staging-dir``, else a temporary folder removed at the end: where a remote output's shard in
    progress and remote videos being decoded wait on the local disk. Inside ``--staging-dir`` each
    output folder has a subfolder of its own, so runs into different outputs can share it."""
    if cfg.staging_dir is not None:
        output = hashlib.sha256(cfg.out_dir.rstrip("/").encode()).hexdigest()[:16]
        path = storage.local_path(cfg.staging_dir) / output
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OutputError(f"--staging-dir {storage.describe_error(err, path)}") from err
        yield path
        return
    path = Path(tempfile.mkdtemp(prefix="longcat-staging-"))
    try:
        yield path
    finally:
        storage.remove_tree(path)


def remote_inputs(cfg: PrepConfig, spec: ClipSpec, staging: Path, stream: str) -> ClipSpec:
    """``spec`` reading remote videos (and start frames) through mirrors in ``staging``."""
    if storage.is_remote(cfg.videos_dir):
        spec.videos_url = cfg.videos_dir.rstrip("/")
        spec.videos_dir = staging / f"videos-{stream}"
    if cfg.conditioning_dir is not None and storage.is_remote(cfg.conditioning_dir):
        spec.conditioning_url = cfg.conditioning_dir.rstrip("/")
        try:
            spec.conditioning_names = frozenset(storage.list_files(spec.conditioning_url))
        except FileNotFoundError:
            raise FileNotFoundError(f"start-frame folder {spec.conditioning_url} holds no files") from None
        spec.conditioning_dir = staging / f"start-frames-{stream}"
    return spec


def list_inputs(cfg: PrepConfig) -> list[str]:
    """The videos of ``cfg.videos_dir`` (local or remote), the output folder left out."""
    if storage.is_remote(cfg.videos_dir):
        return list_remote_videos(
            cfg.videos_dir, exclude=cfg.out_dir if storage.is_remote(cfg.out_dir) else None
        )
    videos_dir = storage.local_path(cfg.videos_dir)
    if not videos_dir.is_dir():
        raise FileNotFoundError(f"videos folder {videos_dir} does not exist")
    out = None if storage.is_remote(cfg.out_dir) else storage.local_path(cfg.out_dir)
    return list_videos(videos_dir, exclude=out)


def run_shard(
    cfg: PrepConfig, encoders: Encoders | None = None, captioner: Captioner | None = None
) -> PrepStats:
    """The whole shard command; ``encoders``/``captioner`` let callers (benchmarks, tests) inject models.

    Stop signals raise ``interrupts.Interrupted`` after the shard in progress is closed and the state
    saved; a failing disk raises OutputError after the same (the shard in progress is dropped then).
    """
    with staging_folder(cfg) as staging:
        return _run_shard(cfg, encoders, captioner, staging)


def _run_shard(
    cfg: PrepConfig, encoders: Encoders | None, captioner: Captioner | None, staging: Path
) -> PrepStats:
    started = time.perf_counter()
    rank, world = cfg.resolved_rank
    remote_out = storage.is_remote(cfg.out_dir)
    out_dir: str | Path = cfg.out_dir.rstrip("/") if remote_out else storage.local_path(cfg.out_dir)
    if isinstance(out_dir, Path) and out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir} is a file, not a folder: choose another output folder")
    videos_dir = (
        Path(cfg.videos_dir) if storage.is_remote(cfg.videos_dir) else storage.local_path(cfg.videos_dir)
    )
    strategy, mapping_file = parse_captions(cfg.captions)
    settings = prep_settings(cfg)
    ids = encoders.ids if encoders is not None else encode.encoder_ids(cfg.model)
    # Checked before loading the models: a refusal should come in seconds, not after a download.
    try:
        check_compatible(out_dir, settings, ids)
    except OSError as err:  # a store that cannot be reached, credentials refused
        raise OutputError(storage.describe_error(err, str(out_dir))) from err

    sources = list_inputs(cfg)
    mapping = caption_mapping(mapping_file, sources, videos_dir, rank == 0, staging) if mapping_file else None
    prior = {key: src for s in read_states(out_dir) for r in s.shards for key, src in r.inputs.items()}
    all_inputs, duplicates = assign_keys(sources, prior)
    mine = all_inputs[rank::world]

    with stop_signals() as stop:
        writer = ShardWriter(
            out_dir,
            settings=settings,
            encoders=ids,
            listing=listing_digest(s["__key__"] for s in all_inputs),
            rank=rank,
            world_size=world,
            max_bytes=parse_size(cfg.shard_size),
            staging_dir=staging / "shards" if remote_out else None,
        )
        finished = False
        records: Iterator[dict] | None = None
        try:
            stats = PrepStats(frames=cfg.frames, listed=len(all_inputs) + len(duplicates))
            todo = [s for s in mine if writer.done_inputs.get(s["__key__"]) != s["source"]]
            stats.skipped = len(mine) - len(todo)
            log.info(
                "%s: %d videos (%d for rank %d of %d), %d already done",
                cfg.videos_dir,
                len(all_inputs) + len(duplicates),
                len(mine),
                rank,
                world,
                stats.skipped,
            )
            if strategy == "captioner" and captioner is None:
                captioner = qwen_captions(cfg, videos_dir, [s["source"] for s in todo], writer.stream)
            enc = encoders or load_encoders(cfg)
            spec = ClipSpec(
                videos_dir=videos_dir,
                buckets=make_buckets(parse_area(cfg.area)),
                frames=cfg.frames,
                fps=cfg.fps,
                clips_per_video=cfg.clips_per_video,
                caption_strategy=strategy,
                caption_mapping=mapping,
                conditioning_dir=storage.local_path(cfg.conditioning_dir) if cfg.conditioning_dir else None,
                done_keys=writer.done_keys,
                captioner=captioner,
                caption_prompt=cfg.captions.partition(":")[2] if strategy == "prompt" else None,
                # Each decoder left to its default starts a thread per core: 8 workers then oversubscribe
                # the CPU and slow the kernel launches of the encoding process, which the GPU waits on.
                decode_threads=max(1, (os.cpu_count() or 2) // cfg.workers) if cfg.workers else 0,
            )
            spec = remote_inputs(cfg, spec, staging, writer.stream)
            clips = len(todo) * cfg.clips_per_video
            with logging_redirect_tqdm(), progress_bar(clips, rank, world) as bar:
                records = decoded_inputs(todo, spec, cfg.workers, pin_memory=enc.vae.device.type == "cuda")
                # A signal while an input is being received waits for it: cut short, the transfer from
                # the decode worker would fail noisily on both sides.
                prepared = stop.between(records)
                # Duplicate keys are the listing's, so one rank reports them.
                samples = chain(
                    duplicates if rank == 0 else [],
                    clips_of_inputs(prepared, writer, bar, cfg.clips_per_video),
                )
                batches = encode_batches(same_shape_batches(samples, cfg.batch_size), enc, stats)
                write_clips(batches, writer, ids, stats, bar)
            finished = True
        finally:
            try:
                # A stop signal now waits: the shard in progress is being closed and the state saved.
                with stop.deferred(raise_after=finished):
                    writer.close(complete=finished)
            finally:
                if records is not None:
                    # Stops the decode workers now rather than whenever the generator is collected: they
                    # ignore stop signals, so only this tells them to go.
                    records.close()
    stats.shards = len(writer.state.shards)
    stats.wall_seconds = time.perf_counter() - started
    return stats
