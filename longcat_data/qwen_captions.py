"""Qwen-2.5-VL captions: the ``longcat-prep caption`` command's model and the ``--captions qwen`` hook.

Qwen-2.5-VL only writes the caption text; the DiT is conditioned on umT5 embeddings of that text,
computed later by prep like any other caption. Captions go to sidecar ``VIDEO.txt`` files or to a jsonl
in the layout ``captions.load_caption_mapping`` reads, written as they are made, so a rerun resumes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from longcat_data.captions import (
    CaptionError,
    clean_caption,
    load_caption_mapping,
    lookup_caption,
    read_sidecar,
)
from longcat_data.defaults import DEFAULT_CAPTION_MODEL
from longcat_data.files import write_atomic
from longcat_data.video import VideoError, probe, read_frames

log = logging.getLogger(__name__)

IMAGE_PAD = "<|image_pad|>"  # Qwen-2.5-VL's placeholder token for image patches

# What a LongCat-Video caption has to carry for image-to-video: the start frame already shows how things
# look, so the text earns its keep by saying what moves, how, and what the camera does.
DEFAULT_PROMPT_TEMPLATE = (
    "Write a caption for this video clip, to be used as the prompt of a video generation model. "
    "Write one paragraph of plain prose, 50 to 120 words, present tense. Cover, in this order: the main "
    "subject and what it looks like; the action and motion over time, in the order it happens (direction, "
    "speed, body movement, interactions); the camera motion (static, pan, tilt, zoom, dolly, tracking, "
    "handheld shake) and framing; the scene, setting, lighting and time of day; the visual style (live "
    "action, animation, color grading, film grain). Describe only what is visible. No lists, no headings, "
    "no guesses about sound or intent, and do not begin with 'The video'."
)


@dataclass(frozen=True)
class CaptionFrames:
    """Frames of one video as the captioner sees them: uint8 [F, H, W, 3] sampled at ``fps``."""

    frames: np.ndarray
    fps: float


def sample_caption_frames(
    video: str | Path, fps: float = 2.0, max_frames: int = 16, max_pixels: int = 360 * 640
) -> CaptionFrames:
    """The whole video at ``fps`` (slower when that would exceed ``max_frames``), shrunk to at most
    ``max_pixels`` per frame. The processor would shrink them too; doing it here keeps memory flat."""
    info = probe(video)
    rate = min(fps, info.fps)
    if info.frames_at(rate) > max_frames and info.span > 0:
        rate = max(max_frames - 1, 1) / info.span
    count = min(info.frames_at(rate), max_frames)
    frames = read_frames(video, 0, count, rate, info=info)
    height, width = frames.shape[1:3]
    scale = math.sqrt(max_pixels / (height * width))
    if scale < 1:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        frames = np.stack([np.asarray(Image.fromarray(f).resize(size, Image.BICUBIC)) for f in frames])
    return CaptionFrames(frames, rate)


class QwenCaptioner:
    """Qwen-2.5-VL (transformers) captions: frames in, one paragraph per video out, batched.

    With torchvision installed the frames go in as a video through the model's own processor, so the
    vision tower merges frame pairs and the position code knows their timestamps. Without it (the video
    processor of transformers needs torchvision) the frames go in as an ordered series of images through
    the torchvision-free image processor, which the model also understands, at some cost in motion detail.
    ``video_input`` forces one way (None: video when torchvision is installed).
    """

    def __init__(
        self,
        model: str = DEFAULT_CAPTION_MODEL,
        *,
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
        fps: float = 2.0,
        max_frames: int = 16,
        max_pixels: int = 360 * 640,
        max_new_tokens: int = 256,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        video_input: bool | None = None,
    ) -> None:
        from transformers.utils import is_torchvision_available

        self.model_id = model
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.prompt = prompt_template
        self.fps, self.max_frames, self.max_pixels = fps, max_frames, max_pixels
        self.max_new_tokens = max_new_tokens
        self.video_input = is_torchvision_available() if video_input is None else video_input
        if not self.video_input and video_input is None:
            log.warning("torchvision is not installed: captioning from frames given as images, not as video")
        # Loaded by the first caption call: a rerun with nothing left to caption loads no weights.
        self.model: Any = None

    def _load(self) -> None:
        # transformers is imported here, not at the top: reading sidecars and mappings must stay light.
        from transformers import (
            AutoImageProcessor,
            AutoProcessor,
            AutoTokenizer,
            Qwen2_5_VLForConditionalGeneration,
        )

        if self.video_input:
            self.processor = AutoProcessor.from_pretrained(self.model_id)
            self.tokenizer = self.processor.tokenizer
        else:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_id)
            self.image_processor = AutoImageProcessor.from_pretrained(self.model_id)
        # Batched generation appends to the right end of every row, so prompts are padded on the left.
        self.tokenizer.padding_side = "left"
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(self.model_id, dtype=self.dtype)
        self.model = model.to(self.device).eval()
        log.info(
            "captioner %s on %s (%s, %s input)",
            self.model_id,
            self.device,
            self.dtype,
            "video" if self.video_input else "image",
        )

    def __call__(self, video: Path) -> str:
        """The ``Captioner`` hook: one video file -> its caption."""
        return self.caption([self.load(video)])[0]

    def load(self, video: str | Path) -> CaptionFrames:
        return sample_caption_frames(video, self.fps, self.max_frames, self.max_pixels)

    @torch.inference_mode()
    def caption(self, clips: Sequence[CaptionFrames]) -> list[str]:
        """One caption per clip, generated greedily as one batch; whitespace folded into one paragraph."""
        if self.model is None:
            self._load()
        inputs = self._video_inputs(clips) if self.video_input else self._image_inputs(clips)
        # Pixels go in the model's dtype; other floats (seconds per frame pair) keep full precision.
        inputs = {
            name: value.to(self.device, self.dtype if name.startswith("pixel_values") else None)
            for name, value in inputs.items()
        }
        generated = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new_tokens = generated[:, inputs["input_ids"].shape[1] :]
        return [
            " ".join(text.split())
            for text in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        ]

    def _video_inputs(self, clips: Sequence[CaptionFrames]) -> dict[str, torch.Tensor]:
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": self.prompt}]}]
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return dict(
            self.processor(
                text=[text] * len(clips),
                videos=[clip.frames for clip in clips],
                # The frames are sampled already; the rate tells the model how far apart they are.
                video_metadata=[{"total_num_frames": len(clip.frames), "fps": clip.fps} for clip in clips],
                do_sample_frames=False,
                padding=True,
                return_tensors="pt",
            )
        )

    def _image_inputs(self, clips: Sequence[CaptionFrames]) -> dict[str, torch.Tensor]:
        texts = []
        for clip in clips:
            intro = f"These {len(clip.frames)} images are frames of one video, in order, {1 / clip.fps:.2g} s apart."
            content = [
                {"type": "text", "text": intro},
                *({"type": "image"} for _ in clip.frames),
                {"type": "text", "text": self.prompt},
            ]
            messages = [{"role": "user", "content": content}]
            texts.append(
                self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            )
        pixels = self.image_processor(images=[f for clip in clips for f in clip.frames], return_tensors="pt")
        # The chat template writes one placeholder per image; the model wants one per merged patch, as
        # the processor would expand it.
        merge = self.image_processor.merge_size**2
        per_image = iter((pixels["image_grid_thw"].prod(-1) // merge).tolist())
        texts = [re.sub(re.escape(IMAGE_PAD), lambda _: IMAGE_PAD * next(per_image), text) for text in texts]
        tokens = self.tokenizer(texts, padding=True, return_tensors="pt")
        # Marks the image tokens so the model lays out their 3D positions (the processor's
        # mm_token_type_ids: 1 = image).
        image_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        tokens["mm_token_type_ids"] = (tokens["input_ids"] == image_id).int()
        return {**tokens, **pixels}


@dataclass
class CaptionReport:
    written: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        return f"captioned {self.written}, already captioned {self.skipped}, failed {len(self.failed)}"


def caption_videos(
    videos_dir: str | Path,
    videos: Sequence[str | Path],
    captioner: QwenCaptioner,
    *,
    jsonl: str | Path | None = None,
    overwrite: bool = False,
    batch_size: int = 4,
) -> CaptionReport:
    """Caption ``videos`` (paths relative to ``videos_dir``) into sidecar .txt files, or into ``jsonl``.

    Videos that already have a caption there are skipped unless ``overwrite``. Each sidecar is written
    atomically as soon as its caption exists, and the jsonl is rewritten atomically after every batch, so
    an interrupted run resumes where it stopped. The next batch is decoded while the model generates.
    """
    videos_dir = Path(videos_dir)
    sources = [Path(v).as_posix() for v in videos]
    store = _JsonlCaptions(Path(jsonl)) if jsonl is not None else None
    report = CaptionReport()
    todo = []
    for source in sources:
        if not overwrite and (store.has(source) if store else _has_sidecar(videos_dir / source)):
            report.skipped += 1
        else:
            todo.append(source)
    log.info(
        "%s: %d videos, %d to caption, %d already captioned",
        videos_dir,
        len(sources),
        len(todo),
        report.skipped,
    )
    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    with (
        ThreadPoolExecutor(max_workers=batch_size) as pool,
        tqdm(total=len(todo), unit="clip", desc="captioning", dynamic_ncols=True, disable=None) as bar,
    ):
        decoding = [pool.submit(captioner.load, videos_dir / s) for s in batches[0]] if batches else []
        for index, batch in enumerate(batches):
            clips, ready = [], []
            for source, future in zip(batch, decoding, strict=True):
                try:
                    clips.append(future.result())
                    ready.append(source)
                except (VideoError, ValueError) as err:
                    reason = err.reason if isinstance(err, VideoError) else str(err)
                    log.warning("cannot caption %s: %s", source, reason)
                    report.failed.append((source, reason))
            if index + 1 < len(batches):
                decoding = [pool.submit(captioner.load, videos_dir / s) for s in batches[index + 1]]
            captions = captioner.caption(clips) if clips else []
            for source, caption in zip(ready, captions, strict=True):
                caption = clean_caption(caption)
                if not caption:
                    report.failed.append((source, "the model returned an empty caption"))
                    continue
                if store is not None:
                    store.put(source, caption)
                else:
                    write_atomic((videos_dir / source).with_suffix(".txt"), caption + "\n")
                report.written += 1
            if store is not None:
                store.save()
            bar.update(len(batch))
            bar.set_postfix(failed=len(report.failed))
    return report


def _has_sidecar(video: Path) -> bool:
    try:
        return bool(read_sidecar(video))
    except CaptionError as err:
        # An unreadable caption the user wrote is theirs to fix; it is never overwritten silently.
        log.warning("keeping %s: %s", video.with_suffix(".txt"), err.reason)
        return True


class _JsonlCaptions:
    """A caption jsonl in the layout ``load_caption_mapping`` reads: ``{"file_name", "caption"}`` lines."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries = load_caption_mapping(path) if path.is_file() else {}

    def has(self, source: str) -> bool:
        return bool(self.entries.get(source))

    def put(self, source: str, caption: str) -> None:
        self.entries[source] = caption

    def save(self) -> None:
        lines = (
            json.dumps({"file_name": k, "caption": v}, ensure_ascii=False) for k, v in self.entries.items()
        )
        write_atomic(self.path, "".join(line + "\n" for line in lines))


@dataclass(frozen=True)
class CaptionCache:
    """A ``Captioner`` that answers from captions made beforehand by ``precompute_captions``.

    Prep decodes (and so captions) in worker processes: a dict of captions travels there, a
    vision-language model on a GPU does not.
    """

    captions: Mapping[str, str]
    videos_dir: Path

    def __call__(self, video: Path) -> str:
        caption = lookup_caption(self.captions, Path(video), self.videos_dir)
        if caption is None:
            raise CaptionError(video, "the captioner could not caption it (its warning says why)")
        return caption


def precompute_captions(
    videos_dir: str | Path, videos: Sequence[str | Path], captioner: QwenCaptioner, cache: str | Path
) -> CaptionCache:
    """Caption ``videos`` (relative to ``videos_dir``) into the jsonl ``cache``, resumably, and return
    the hook that serves them. Captioning runs to the end before encoding starts, so the captioner and
    the encoders never need the GPU at the same time."""
    cache = Path(cache)
    cache.parent.mkdir(parents=True, exist_ok=True)
    report = caption_videos(videos_dir, videos, captioner, jsonl=cache)
    log.info("%s", report.summary())
    return CaptionCache(load_caption_mapping(cache) if cache.is_file() else {}, Path(videos_dir))
