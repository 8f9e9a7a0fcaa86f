"""``longcat-prep shard``: raw videos -> WebDataset shards of VAE latents, start-frame latents and text embeddings.

The pipeline is a chain of stages, each a generator over plain dict samples (webdataset style)::

    [DataLoader workers]  inputs -> probe -> bucket and trim -> caption -> start frame -> decode
                          (``longcat_data.clips``)
    [main process]        clips_of_inputs -> same_shape_batches -> encode_batches (VAE, umT5)
    [writer thread]       write_clips: each clip packed as a ShardSample and written by the ShardWriter

That is the local engine (``--engine local``). ``--engine ray`` (``longcat_data.ray_engine``) runs the
same stage functions elsewhere: the per-input stages in Ray tasks, ``same_shape_batches`` +
``encode_batch`` in encoder actors, and ``clips_of_inputs`` + ``write_clips`` here, streamed.

Encoding adds ``latents``, ``cond_latents`` and ``text_embeds`` to each clip sample. Rejection records
(an input a stage failed on) pass every stage untouched and end in the writer's reject list. Decoding
runs in worker processes and tar writing in a background thread, so the main process keeps the GPU busy
with encoding.

SIGTERM and SIGHUP stop a run as Ctrl-C does (``longcat_data.interrupts``): the clip in flight is
finished or dropped, the shard in progress is closed with its whole samples, the state is saved, and
``Interrupted`` propagates (the CLI exits 128 + the signal number).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from longcat_data import encode, storage
from longcat_data.buckets import make_buckets
from longcat_data.captions import Captioner
from longcat_data.clips import (
    ClipSpec,
    assign_keys,
    decoded_inputs,
    is_rejection,
    rejection,
)
from longcat_data.config import PrepConfig, parse_captions
from longcat_data.defaults import TEXT_MAX_LENGTH
from longcat_data.files import OutputError
from longcat_data.flags import parse_area, parse_size
from longcat_data.interrupts import StopSignals, stop_signals
from longcat_data.manifest import captions_cache_path, check_compatible, listing_digest, read_states
from longcat_data.prep_inputs import caption_mapping, check_paths, list_inputs, remote_inputs, staging_folder
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
    # perf_counter of the first and the last clip written: the steady rate leaves start-up out.
    first_write: float | None = None
    last_write: float | None = None

    @property
    def steady_rate(self) -> float:
        """Clips/s from the first clip written to the last (0 with fewer than two)."""
        if self.first_write is None or self.last_write is None or self.last_write <= self.first_write:
            return 0.0
        return (self.written - 1) / (self.last_write - self.first_write)

    def rejected_line(self) -> str:
        """``rejected 3 (2 unreadable, 1 too small)``: the progress bar's tail and the summary's."""
        reasons = ", ".join(f"{n} {kind}" for kind, n in self.rejected.most_common())
        return f"rejected {sum(self.rejected.values())}" + (f" ({reasons})" if reasons else "")

    def summary(self) -> str:
        rate = self.written / self.wall_seconds if self.wall_seconds else 0.0
        line = (
            f"written {self.written} clips from {self.inputs_written} videos ({rate:.2f} clips/s), "
            f"skipped {self.skipped} already done, {self.rejected_line()}"
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


@dataclass(frozen=True)
class EncoderFactory:
    """How to build the encoders on a device, and their ids: what a Ray encoder actor is given, so the
    models are built where they run. ``build`` must pickle (a module-level function or a partial)."""

    build: Callable[[torch.device, torch.dtype], Encoders]
    ids: dict[str, str]


def _build_encoders(
    model: str,
    vae_tiling: bool,
    text_embeds: bool,
    compile_vae: bool,
    device: torch.device,
    dtype: torch.dtype,
) -> Encoders:
    vae = encode.load_vae(model, device, dtype)
    if vae_tiling:
        vae.enable_tiling()
    if compile_vae and vae.device.type == "cuda":
        encode.compile_vae_encoder(vae)
    tokenizer = text_encoder = None
    if text_embeds:
        tokenizer, text_encoder = encode.load_text_encoder(model, device, dtype)
    return Encoders(vae, tokenizer, text_encoder, encode.encoder_ids(model))


def encoder_factory(cfg: PrepConfig) -> EncoderFactory:
    """The encoders ``--model`` names, with the settings of ``cfg``."""
    build = partial(_build_encoders, cfg.model, cfg.vae_tiling, cfg.text_embeds, cfg.compile_vae)
    return EncoderFactory(build, encode.encoder_ids(cfg.model))


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


def encode_inputs(records: list[dict], enc: Encoders, batch_size: int) -> list[dict]:
    """Prepared inputs -> the same inputs with their clips encoded, ``same_shape_batches`` and
    ``encode_batches`` over all their clips (a Ray encoder actor's work on one batch of inputs). Each
    input gets its share of the encoding time as ``encode_seconds``; rejections pass untouched."""
    stats = PrepStats()
    clips = [clip for record in records if not is_rejection(record) for clip in record["clips"]]
    batches = encode_batches(same_shape_batches(clips, batch_size), enc, stats)
    encoded = {clip["__key__"]: clip for batch in batches for clip in batch}
    share = stats.encode_seconds / max(1, len(records))
    return [
        record
        if is_rejection(record)
        else {**record, "clips": [encoded[c["__key__"]] for c in record["clips"]], "encode_seconds": share}
        for record in records
    ]


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
        bar.set_postfix_str(stats.rejected_line(), refresh=False)
        stats.first_reason.setdefault(r["rejected"], f"{r['source']}: {r['reason']}")

    def settle(written: Future[list[tuple[dict, str | None]]]) -> None:
        for clip, error in written.result():
            if error is None:
                stats.written += 1
                stats.last_write = time.perf_counter()
                stats.first_write = stats.first_write or stats.last_write
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


def progress_bar(clips: int, rank: int, world: int, engine: str = "local") -> tqdm:
    """One line for the whole run (with ``--engine ray``, the whole cluster): clips/s, ETA, rejections."""
    return tqdm(
        total=clips,
        unit="clip",
        desc=f"rank {rank}" if world > 1 else ("ray" if engine == "ray" else "encoding"),
        postfix="rejected 0",
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


def local_batches(
    cfg: PrepConfig,
    todo: list[dict],
    spec: ClipSpec,
    encoders: Encoders | EncoderFactory,
    stats: PrepStats,
    stop: StopSignals,
    clips_of: Callable[[Iterable[dict]], Iterator[dict]],
    cleanup: list[Callable[[], None]],
) -> Iterator[list[dict]]:
    """``--engine local``: decode workers prepare the inputs, this process encodes them."""
    enc = (
        encoders
        if isinstance(encoders, Encoders)
        else encoders.build(encoding_device(cfg), encoding_dtype(cfg))
    )
    records = decoded_inputs(todo, spec, cfg.workers, pin_memory=enc.vae.device.type == "cuda")
    # Stops the decode workers after the writer is closed rather than whenever the generator is
    # collected: they ignore stop signals, so only this tells them to go.
    cleanup.append(records.close)
    # A signal while an input is being received waits for it: cut short, the transfer from the decode
    # worker would fail noisily on both sides.
    samples = clips_of(stop.between(records))
    return encode_batches(same_shape_batches(samples, cfg.batch_size), enc, stats)


def ray_batches(
    cfg: PrepConfig,
    todo: list[dict],
    spec: ClipSpec,
    encoders: Encoders | EncoderFactory,
    stats: PrepStats,
    stop: StopSignals,
    clips_of: Callable[[Iterable[dict]], Iterator[dict]],
    cleanup: list[Callable[[], None]],
) -> Iterator[list[dict]]:
    """``--engine ray``: Ray tasks prepare the inputs and Ray actors encode them (``ray_engine``)."""
    from longcat_data.ray_engine import EncodeJob, encoded_inputs

    if isinstance(encoders, Encoders):
        raise TypeError("--engine ray builds its encoders in its actors: pass an EncoderFactory")
    job = EncodeJob(encoders, encoding_device(cfg).type, encoding_dtype(cfg), cfg.batch_size, encode_inputs)
    records = encoded_inputs(todo, spec, job, cfg.ray_encoders)
    cleanup.append(records.close)

    def timed(records: Iterable[dict]) -> Iterator[dict]:
        for record in records:
            stats.encode_seconds += record.pop("encode_seconds", 0.0)
            yield record

    # Every clip of an input arrives encoded at once: each goes to the writer as it is.
    return ([sample] for sample in clips_of(stop.between(timed(records))))


def run_shard(
    cfg: PrepConfig, encoders: Encoders | EncoderFactory | None = None, captioner: Captioner | None = None
) -> PrepStats:
    """The whole shard command; ``encoders``/``captioner`` let callers (benchmarks, tests) inject models
    (the Ray engine takes an ``EncoderFactory``: its actors build the models).

    Stop signals raise ``interrupts.Interrupted`` after the shard in progress is closed and the state
    saved; a failing disk raises OutputError after the same (the shard in progress is dropped then).
    """
    started = time.perf_counter()
    check_paths(cfg)
    with ExitStack() as session:
        staging = session.enter_context(staging_folder(cfg))
        if cfg.engine == "ray":
            from longcat_data import ray_engine  # ConfigError naming the extra to install without Ray

            # Before the stop signals are ours: ray.init sets a SIGTERM handler of its own.
            cfg = session.enter_context(ray_engine.connected(cfg))
        stats = _run_shard(cfg, encoders, captioner, staging)
    stats.wall_seconds = time.perf_counter() - started
    return stats


def _run_shard(
    cfg: PrepConfig, encoders: Encoders | EncoderFactory | None, captioner: Captioner | None, staging: Path
) -> PrepStats:
    rank, world = cfg.resolved_rank
    remote_out = storage.is_remote(cfg.out_dir)
    out_dir: str | Path = cfg.out_dir.rstrip("/") if remote_out else storage.local_path(cfg.out_dir)
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

    sources = list_inputs(cfg, report=rank == 0)
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
        cleanup: list[Callable[[], None]] = []
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
            with logging_redirect_tqdm(), progress_bar(clips, rank, world, cfg.engine) as bar:

                def clips_of(records: Iterable[dict]) -> Iterator[dict]:
                    # Duplicate keys are the listing's, so one rank reports them.
                    return chain(
                        duplicates if rank == 0 else [],
                        clips_of_inputs(records, writer, bar, cfg.clips_per_video),
                    )

                engine = ray_batches if cfg.engine == "ray" else local_batches
                factory = encoders if encoders is not None else encoder_factory(cfg)
                batches = engine(cfg, todo, spec, factory, stats, stop, clips_of, cleanup)
                write_clips(batches, writer, ids, stats, bar)
            finished = True
        finally:
            try:
                # A stop signal now waits: the shard in progress is being closed and the state saved.
                with stop.deferred(raise_after=finished):
                    writer.close(complete=finished)
            finally:
                for close in cleanup:
                    close()
    stats.shards = len(writer.state.shards)
    return stats
