"""Validation during training: fixed (start image, prompt) pairs sampled with the LoRA as it trains.

A pair is image-to-video (its start image) or, for continuation validation, a continuation of the
validation clip's first ``cond_frames`` frames: from eval shards their latents (the clip's first
condition latents, exact since the VAE is causal), from a folder of videos the frames themselves.

Each validation writes ``validation/step_NNNNNN/<key>.mp4`` and a contact sheet comparing the LoRA's
video with the base model's. The videos come from ``sampling.generate_videos``, the sampler's own path.
``validation_lora`` LoRAs (e.g. the distill LoRA) are on for both rows, so the sheet compares with and
without the LoRA that trains.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load as load_safetensors
from torch import nn
from webdataset.handlers import reraise_exception

from longcat_data.buckets import latent_frames
from longcat_data.defaults import DEFAULT_FPS
from longcat_data.encode import decode_latents, encode_video, load_vae
from longcat_data.shards import CAPTION, COND_IMAGE, LATENTS, ShardError
from longcat_data.stream import TextCache, expand_shard_spec, read_tars
from longcat_data.video import (
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    VideoError,
    probe,
    read_frames,
    read_mp4,
    resize_center_crop,
    write_mp4,
)
from longcat_train import parallel
from longcat_train.config import ConfigError, TrainConfig, VideoSettings
from longcat_train.lora_apply import LoadedLoras, load_loras
from longcat_train.lora_spec import parse_lora_spec
from longcat_train.parallel import Dist
from longcat_train.sampling import (
    SampleInputError,
    decode_videos,
    denoise,
    fit_start_image,
    generate_videos,
    read_start_image,
    round_frames,
)

log = logging.getLogger(__name__)


@dataclass
class ValidationPair:
    """A fixed (start image, prompt) the trainer samples at every validation; a continuation pair
    also holds its condition: the clip's first frames or, from eval shards, their latents."""

    key: str
    image: np.ndarray  # uint8 [H, W, 3]
    prompt: str
    frames: np.ndarray | None = None  # uint8 [N, H, W, 3]: continue these frames
    latents: torch.Tensor | None = None  # [16, n, h, w]: continue these condition latents

    @property
    def continues(self) -> bool:
        return self.frames is not None or self.latents is not None


def _safe_key(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("._") or "pair"


def load_validation_pairs(source: str, limit: int, cond_frames: int | None = None) -> list[ValidationPair]:
    """Up to ``limit`` pairs, in a fixed order, from a folder of images (or videos: their first frame)
    + same-stem ``.txt`` captions, or from eval shards (``cond.png`` + ``txt`` of each sample; any spec
    ``expand_shard_spec`` takes). With ``cond_frames``, continuation pairs: of a folder's videos (their
    first ``cond_frames`` frames) or of the eval shards' clips (their first condition latents)."""
    folder = Path(source).expanduser()
    # A shard folder also holds images (longcat-prep inspect's contact sheet): tars decide.
    is_shard_dir = folder.is_dir() and any(folder.glob("*.tar"))
    files = sorted(folder.iterdir()) if folder.is_dir() and not is_shard_dir else []
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    videos = [p for p in files if p.suffix.lower() in VIDEO_EXTENSIONS]
    if images and (cond_frames is None or not videos):
        if cond_frames is not None:
            raise SampleInputError(
                f"{source} holds images: a continuation validation continues videos; give a folder of "
                "videos + .txt captions, or eval shards"
            )
        pairs = _folder_pairs(images[:limit], lambda path: (read_start_image(path), None))
    elif videos:
        pairs = _folder_pairs(videos[:limit], lambda path: _first_frames(path, cond_frames))
    else:
        pairs = _shard_pairs(source, limit, cond_frames)
    if not pairs:
        raise SampleInputError(
            f"no validation pairs in {source} (expected images or videos with .txt captions, or eval shards)"
        )
    log.info("validation: %d pairs from %s", len(pairs), source)
    return pairs


def _folder_pairs(
    paths: list[Path], read: Callable[[Path], tuple[np.ndarray, np.ndarray | None]]
) -> list[ValidationPair]:
    """A pair per image or video, with its same-stem ``.txt``; ``read`` gives the start image and the
    frames a continuation continues (None: image-to-video)."""
    pairs = []
    for path in paths:
        caption = path.with_suffix(".txt")
        if not caption.is_file():
            raise SampleInputError(f"validation file {path} has no caption: write its prompt to {caption}")
        prompt = caption.read_text(encoding="utf-8").strip()
        if not prompt:
            raise SampleInputError(f"validation caption {caption} is empty")
        image, frames = read(path)
        pairs.append(ValidationPair(_safe_key(path.stem), image, prompt, frames=frames))
    return pairs


def _first_frames(path: Path, cond_frames: int | None) -> tuple[np.ndarray, np.ndarray | None]:
    """A validation video's first frame, and its first ``cond_frames`` frames (None: image-to-video)."""
    count = cond_frames or 1
    available = probe(path).frames_at()
    if available < count:
        raise SampleInputError(
            f"validation video {path} has {available} frames, fewer than cond_frames = {count}: use a "
            "longer clip or lower cond_frames"
        )
    frames = read_frames(path, 0, count)
    return frames[0], frames if cond_frames else None


def _shard_pairs(spec: str, limit: int, cond_frames: int | None) -> list[ValidationPair]:
    pairs: list[ValidationPair] = []
    # Shards in the order listed, samples in file order, no shuffling: the same pairs every run.
    sources = ({"url": url} for url in expand_shard_spec(spec))
    for sample in read_tars(sources, handler=reraise_exception):
        if COND_IMAGE not in sample or CAPTION not in sample:
            continue
        key = sample["__key__"]
        image = read_start_image(sample[COND_IMAGE], name=f"{key}/{COND_IMAGE}")
        pair = ValidationPair(_safe_key(key), image, sample[CAPTION].decode("utf-8").strip())
        if cond_frames is not None:
            pair.latents = _first_latents(sample, cond_frames)
        pairs.append(pair)
        if len(pairs) == limit:
            break
    return pairs


def _first_latents(sample: dict, cond_frames: int) -> torch.Tensor:
    """An eval clip's first condition latents: what encoding its first ``cond_frames`` frames gives."""
    where = f"{sample.get('__url__')} (sample {sample['__key__']})"
    if LATENTS not in sample:
        raise SampleInputError(
            f"{where} has no {LATENTS}: a continuation validation needs the clip's latents"
        )
    latents = load_safetensors(sample[LATENTS])["latents"]
    n = latent_frames(cond_frames)
    if latents.shape[1] < n:
        raise SampleInputError(
            f"{where} has {latents.shape[1]} latent frames, fewer than the {n} of cond_frames = {cond_frames}: "
            "lower cond_frames or validate on longer clips"
        )
    return latents[:, :n].float()


def continuation_latents(vae: nn.Module, pair: ValidationPair, area: tuple[int, int]) -> torch.Tensor:
    """The condition latents [1, 16, n, h, w] a continuation pair continues, at the bucket of ``area``
    its frames fit: its own latents where they are that size already, else its frames (decoded from
    its latents when it has no frames) fitted as a start image is, and encoded."""
    bucket = fit_start_image(pair.image, area).shape[:2]
    if pair.latents is not None and tuple(8 * s for s in pair.latents.shape[-2:]) == bucket:
        return pair.latents[None]
    frames = pair.frames if pair.frames is not None else decode_latents(vae, pair.latents[None])[0].numpy()
    fitted, _ = resize_center_crop(frames, *bucket)
    return encode_video(vae, fitted[None])


def contact_sheet(
    start: np.ndarray,
    rows: Sequence[tuple[str, np.ndarray]],
    columns: int = 4,
    height: int = 160,
    title: str = "",
) -> np.ndarray:
    """A PNG-ready uint8 sheet: ``title`` on top, then per row a label, the start frame, then ``columns``
    evenly spaced frames."""
    scale = height / start.shape[0]
    width = max(1, round(start.shape[1] * scale))
    label_w, gap = 72, 4
    head = 34 if title else 18
    cells = 1 + columns
    sheet = Image.new("RGB", (label_w + cells * (width + gap), len(rows) * (height + gap) + head), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((4, 2), title, fill="black")
    draw.text((label_w, head - 16), "start", fill="black")

    def paste(frame: np.ndarray, col: int, row: int) -> None:
        cell = Image.fromarray(frame).resize((width, height), Image.Resampling.BICUBIC)
        sheet.paste(cell, (label_w + col * (width + gap), head + row * (height + gap)))

    for r, (label, video) in enumerate(rows):
        draw.text((4, head + r * (height + gap) + height // 2), label, fill="black")
        paste(start, 0, r)
        for c, index in enumerate(np.linspace(0, len(video) - 1, columns).round().astype(int)):
            if r == 0:
                draw.text((label_w + (c + 1) * (width + gap), head - 16), f"frame {index}", fill="black")
            paste(video[index], c + 1, r)
    return np.asarray(sheet)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)


def run_validation(
    model: nn.Module,
    vae: nn.Module,
    pairs: Sequence[ValidationPair],
    embeds: dict[str, torch.Tensor],
    settings: VideoSettings,
    *,
    step: int,
    output_dir: str | Path,
    tb_writer: object | None = None,
    fps: int = DEFAULT_FPS,
    sharded: bool = False,
    progress: bool = False,
    lora: str = "LoRA",
) -> list[Path]:
    """Sample every pair with ``settings``, with the model as it is (LoRA on) and, where the model
    carries a peft adapter, with the adapter off; write ``validation/step_NNNNNN/<key>.mp4`` and
    ``<key>_sheet.png``.

    ``embeds`` maps each prompt, and ``""`` (the negative prompt) when guidance > 1, to its [L, D]
    embedding. Base-model videos do not change during training, so each is sampled once and kept in
    ``validation/base/`` under a name carrying its settings. ``sharded``: the model is split across
    ranks (FSDP), which all sample together. ``progress``: a bar per video (steps, ETA). ``lora``
    names the trained LoRA on the sheet, whose title is it and the step. Returns the files written.
    """
    root = Path(output_dir) / "validation"
    step_dir = root / f"step_{step:06d}"
    use_cfg = settings.guidance > 1.0
    negative = embeds.get("") if use_cfg else None
    if use_cfg and negative is None:
        raise KeyError('validation embeds need the empty negative prompt "" when guidance > 1')
    has_adapter = hasattr(model, "disable_adapter")

    def sample(pair: ValidationPair) -> np.ndarray:
        prompt = [embeds[pair.prompt]]
        if not pair.continues:
            return generate_videos(model, vae, pair.image, prompt, negative, settings, progress=progress)[0]
        latents = denoise(
            model,
            continuation_latents(vae, pair, settings.area),
            prompt,
            negative,
            frames=round_frames(settings.frames),
            steps=settings.steps,
            guidance=settings.guidance,
            shift=settings.shift,
            seeds=[settings.seed],
            distill=settings.distill,
            progress=progress,
        )
        return decode_videos(vae, latents)[0]

    written: list[Path] = []
    with _eval_mode(model):
        for number, pair in enumerate(pairs, 1):
            if pair.prompt not in embeds:
                raise KeyError(f"validation embeds have no entry for the prompt of {pair.key!r}")
            log.info(
                "validation at step %d: %s (%d of %d), %d steps%s",
                step,
                pair.key,
                number,
                len(pairs),
                settings.steps,
                " + the base model's once" if has_adapter else "",
            )
            video = sample(pair)
            written.append(write_mp4(video, step_dir / f"{pair.key}.mp4", fps=fps))
            rows = [(f"LoRA @{step}" if has_adapter else "model", video)]
            if has_adapter:
                cached = root / "base" / _base_name(pair, settings)
                base = _base_video(model, pair, sample, cached, fps, sharded=sharded)
                rows.insert(0, ("base", base))
            title = f"step {step}: {lora}" + (" (top: the base model, no LoRA)" if has_adapter else "")
            sheet = contact_sheet(fit_start_image(pair.image, settings.area), rows, title=title)
            sheet_path = step_dir / f"{pair.key}_sheet.png"
            Image.fromarray(sheet).save(sheet_path)
            written.append(sheet_path)
            if tb_writer is not None:
                # add_video needs moviepy, which this project does not install; the sheet shows the same.
                tb_writer.add_image(f"validation/{pair.key}", sheet, global_step=step, dataformats="HWC")
    log.info("validation at step %d: %d files in %s", step, len(written), step_dir)
    return written


def _base_name(pair: ValidationPair, settings: VideoSettings) -> str:
    # The name carries everything the base video depends on, so a changed pair or setting resamples.
    condition = pair.frames if pair.frames is not None else pair.latents
    shown = b"" if condition is None else np.ascontiguousarray(np.asarray(condition)).tobytes()
    shape = None if condition is None else tuple(condition.shape)
    identity = hashlib.sha256(
        pair.image.tobytes() + shown + repr((pair.image.shape, shape, pair.prompt, settings)).encode()
    )
    return f"{pair.key}_{identity.hexdigest()[:12]}.mp4"


def _base_video(
    model: nn.Module,
    pair: ValidationPair,
    sample: Callable[[ValidationPair], np.ndarray],
    cached: Path,
    fps: int,
    *,
    sharded: bool,
) -> np.ndarray:
    # With FSDP every rank runs each forward together, but only rank 0 writes (and so finds) the cache;
    # sharded models therefore always sample, so all ranks make the same calls.
    if cached.is_file() and not sharded:
        return read_mp4(cached)
    with model.disable_adapter():
        video = sample(pair)
    write_mp4(video, cached, fps=fps)
    return video


# ---------------------------------------------------------------- in the trainer


class Validation:
    """Samples the validation pairs with the current LoRA (``run_validation``) when the config names a
    ``validation_source``; otherwise says so once and does nothing. ``dtype``: the VAE's weights.

    The pairs are read and fitted to the validation area when training starts, so a bad source is a
    ConfigError before anything loads; a validation that fails later (a sampling error, out of memory)
    is logged in one line and training goes on. The ``validation_lora`` LoRAs (and ``validation_distill_lora``) are hooked onto the model
    once (:meth:`attach`, before the first step, so one that does not fit is refused then) and are on
    only while the pairs are sampled."""

    def __init__(self, cfg: TrainConfig, d: Dist, dtype: torch.dtype) -> None:
        self.cfg, self.d, self.dtype = cfg, d, dtype
        self.pairs: list[ValidationPair] = []
        self.vae: nn.Module | None = None
        self.loras: LoadedLoras | None = None
        if not cfg.validation_source:
            log.info("no validation_source: validation off")
            if cfg.validation_loras:
                log.warning(
                    "validation_lora / validation_distill_lora not used: there is no validation_source to sample"
                )
            return
        source = cfg.validation_source
        try:
            continuation = cfg.validation_task == "continuation"
            cond_frames = cfg.cond_frames if continuation else None
            self.pairs = load_validation_pairs(source, cfg.validation_limit, cond_frames)
            for pair in self.pairs:
                fit_start_image(pair.image, cfg.validation_settings.area)
        except (SampleInputError, ShardError, VideoError, OSError) as err:
            raise ConfigError(f"validation_source {source}: {str(err).strip().splitlines()[-1]}") from err

    def attach(self, model: nn.Module) -> None:
        """Hook the ``validation_lora`` LoRAs onto ``model`` (the one training), off until a validation."""
        if not self.pairs or not self.cfg.validation_loras:
            return
        entries = [parse_lora_spec(spec).entry(1.0) for spec in self.cfg.validation_loras]
        try:
            self.loras = load_loras(model, entries, merge=False, device=self.d.device)
        except ValueError as err:
            raise ConfigError(f"validation_lora: {err}") from None
        self.loras.enabled = False

    @property
    def prompts(self) -> list[str]:
        if not self.pairs:
            return []
        return [p.prompt for p in self.pairs] + ([""] if self.cfg.validation_settings.guidance > 1 else [])

    def due(self, step: int, last: int) -> bool:
        every = self.cfg.validation_every
        return bool(self.pairs) and (step == last or (every > 0 and step % every == 0))

    def __call__(self, model: nn.Module, step: int, text: TextCache, tb_writer: object | None) -> None:
        """All ranks call this; with DDP rank 0 samples alone, with FSDP every rank takes part. Any
        error inside is logged with the step and swallowed: a validation never ends a run."""
        sharded = parallel.is_fsdp(model)
        if self.d.main or sharded:
            try:
                self._sample(model, step, text, tb_writer, sharded)
            except Exception as err:  # whatever sampling raises, the training is worth more
                line = (str(err).strip().splitlines() or [""])[-1][:300]
                log.warning(
                    "validation at step %d failed (%s: %s); training goes on", step, type(err).__name__, line
                )
                if self.d.device.type == "cuda":
                    torch.cuda.empty_cache()
        parallel.barrier(self.d)

    def _sample(
        self, model: nn.Module, step: int, text: TextCache, tb_writer: object | None, sharded: bool
    ) -> None:
        if self.vae is None:
            self.vae = load_vae(self.cfg.model, device=self.d.device, dtype=self.dtype)
        embeds = {p: text[p] for p in self.prompts}
        out = self.cfg.output_dir if self.d.main else tempfile.mkdtemp(prefix="longcat-val-")
        if self.loras is not None:
            self.loras.enabled = True
        try:
            # Sampling must not move the training RNG, or a changed validation cadence would change training.
            with torch.random.fork_rng(devices=[self.d.device] if self.d.device.type == "cuda" else []):
                run_validation(
                    parallel.unwrap(model),
                    self.vae,
                    self.pairs,
                    embeds,
                    self.cfg.validation_settings,
                    step=step,
                    output_dir=out,
                    tb_writer=tb_writer if self.d.main else None,
                    sharded=sharded,
                    progress=self.d.main and self.cfg.progress,
                    lora=f"LoRA {Path(self.cfg.output_dir).name} (rank {self.cfg.lora_rank})",
                )
        finally:
            if self.loras is not None:
                self.loras.enabled = False
            if not self.d.main:
                shutil.rmtree(out, ignore_errors=True)
