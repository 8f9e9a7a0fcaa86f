"""Generated demo media: small real H.264 clips with captions, and a folder of broken inputs.

The demo and the tests need videos without downloading any. Content moves (a drifting gradient and a
bouncing disc) so consecutive frames differ, a red square marks the top-left corner as displayed (so a
wrong rotation shows), and a grey patch in the bottom-right corner has brightness
``FRAME_INDEX_STEP * i`` in frame i, so tests can tell which source frame they got back.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
from PIL import Image

from longcat_data.defaults import DEMO_AREA, DEMO_FRAMES
from longcat_data.video import write_mp4

log = logging.getLogger(__name__)

# How ``write_mp4`` encodes the clips: near-lossless, so each frame's index patch survives; a keyframe
# every few frames, so reading from a clip's middle seeks; the index after the frame data, as cameras
# write it (a cut-off copy then loses it).
CLIP_ENCODING: dict[str, Any] = {"crf": 16, "keyframe_interval": 8, "faststart": False}

FRAME_INDEX_STEP = 6
MARKER_SIZE = 16
INDEX_PATCH_SIZE = 32


@dataclass(frozen=True)
class DemoClip:
    name: str
    width: int  # as displayed
    height: int
    frames: int
    fps: int
    caption: str | None  # None: no sidecar, the missing-caption case
    rotation: int = 0  # counter-clockwise display rotation stored as metadata


DEMO_CLIPS = (
    DemoClip("beach_waves", 352, 208, 33, 24, "Gentle waves roll onto a sandy beach at sunset, warm light."),
    DemoClip(
        "city_night_portrait", 208, 352, 33, 30, "A tall view of a city street at night with moving lights."
    ),
    DemoClip("spinning_top", 272, 272, 25, 24, "A colourful spinning top turns on a wooden table, close-up."),
    DemoClip("long_country_drive", 320, 192, 40, 24, "A car drives along a country road past green fields."),
    DemoClip("uncaptioned_clip", 320, 240, 21, 30, None),
    # Phones store portrait video as landscape frames plus a rotation; -90 is what they write.
    DemoClip(
        "phone_rotated", 192, 320, 21, 30, "A handheld phone video of a dog running in a park.", rotation=-90
    ),
)


def synthetic_frames(height: int, width: int, count: int, seed: int = 0) -> np.ndarray:
    """Moving test pattern, uint8 [count, height, width, 3]; see the module docstring for its marks."""
    rng = np.random.default_rng(seed)
    tint = rng.uniform(0.3, 1.0, size=3)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    radius = max(4.0, min(height, width) / 6)
    frames = np.empty((count, height, width, 3), dtype=np.uint8)
    for i in range(count):
        phase = i / max(count - 1, 1)
        wave = 0.5 + 0.5 * np.sin(2 * np.pi * (x / width + y / height + phase))
        image = (wave[..., None] * tint * 200).astype(np.uint8)
        cy = radius + (height - 2 * radius) * abs(np.sin(np.pi * phase * 1.5))
        cx = radius + (width - 2 * radius) * phase
        image[(y - cy) ** 2 + (x - cx) ** 2 < radius**2] = (250, 220, 40)
        image[:MARKER_SIZE, :MARKER_SIZE] = (255, 0, 0)
        image[-INDEX_PATCH_SIZE:, -INDEX_PATCH_SIZE:] = min(255, FRAME_INDEX_STEP * i)
        frames[i] = image
    return frames


def frame_indices(frames: np.ndarray) -> list[int]:
    """The source frame index each frame of ``synthetic_frames`` carries in its grey patch."""
    patch = frames[:, -INDEX_PATCH_SIZE + 8 : -8, -INDEX_PATCH_SIZE + 8 : -8].astype(np.float32)
    return [round(float(value) / FRAME_INDEX_STEP) for value in patch.mean(axis=(1, 2, 3))]


def write_demo_clips(
    out_dir: str | Path, clips: Sequence[DemoClip] = DEMO_CLIPS, seed: int = 0
) -> list[Path]:
    """Write the demo clips (and their sidecar captions) into ``out_dir``; returns the video paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, clip in enumerate(clips):
        frames = synthetic_frames(clip.height, clip.width, clip.frames, seed=seed + index)
        path = write_mp4(
            frames, out_dir / f"{clip.name}.mp4", clip.fps, rotation=clip.rotation, **CLIP_ENCODING
        )
        if clip.caption is not None:
            path.with_suffix(".txt").write_text(clip.caption + "\n", encoding="utf-8")
        paths.append(path)
    log.info("wrote %d demo clips to %s", len(paths), out_dir)
    return paths


def make_bad_inputs(directory: str | Path) -> dict[str, Path]:
    """Write one file per input problem prep must survive; returns {problem: path}.

    Unusable: ``zero_byte``, ``truncated`` (MP4 cut short, its index lost), ``truncated_index`` (index
    first, frame data cut short), ``image`` (a PNG named .mp4), ``audio_only``. Decodable but too
    small for a clip: ``three_frames``, ``tiny`` (64x48). Valid but tricky: ``unicode_name``,
    ``variable_rate``, ``rotated`` (display-matrix rotation). ``bad_caption``: a valid clip whose sidecar
    caption is not UTF-8. Valid clips come with sidecar captions and are 320x192 x 17 frames, so they fit
    ``DEMO_AREA``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    height, width = DEMO_AREA
    frames = synthetic_frames(height, width, DEMO_FRAMES, seed=7)
    paths: dict[str, Path] = {}

    paths["zero_byte"] = directory / "zero_byte.mp4"
    paths["zero_byte"].write_bytes(b"")

    for name, faststart in (("truncated", False), ("truncated_index", True)):
        encoding = {**CLIP_ENCODING, "faststart": faststart}
        whole = write_mp4(frames, directory / f"{name}.mp4", 24, **encoding).read_bytes()
        paths[name] = directory / f"{name}.mp4"
        paths[name].write_bytes(whole[: len(whole) * 3 // 5])

    paths["image"] = directory / "still_image.mp4"
    Image.fromarray(frames[0]).save(paths["image"], format="PNG")

    paths["audio_only"] = _write_audio_only(directory / "audio_only.mp4")

    paths["three_frames"] = write_mp4(frames[:3], directory / "three_frames.mp4", 24, **CLIP_ENCODING)
    paths["tiny"] = write_mp4(
        synthetic_frames(48, 64, DEMO_FRAMES), directory / "tiny.mp4", 24, **CLIP_ENCODING
    )
    paths["unicode_name"] = write_mp4(frames, directory / "café au lait ☕ 01.mp4", 24, **CLIP_ENCODING)
    # Frame gaps of 1/30 s and 1/15 s alternate: a phone dropping frames in low light.
    times = np.cumsum([0.0] + [1 / 30 if i % 2 else 1 / 15 for i in range(DEMO_FRAMES - 1)])
    paths["variable_rate"] = write_mp4(
        frames, directory / "variable_rate.mp4", 30, timestamps=times.tolist(), **CLIP_ENCODING
    )
    rotated = synthetic_frames(width, height, DEMO_FRAMES, seed=8)
    paths["rotated"] = write_mp4(rotated, directory / "rotated.mp4", 30, rotation=-90, **CLIP_ENCODING)
    for name in ("three_frames", "tiny", "unicode_name", "variable_rate", "rotated"):
        paths[name].with_suffix(".txt").write_text(
            f"A test clip: {name.replace('_', ' ')}.\n", encoding="utf-8"
        )

    paths["bad_caption"] = write_mp4(frames, directory / "bad_caption.mp4", 24, **CLIP_ENCODING)
    paths["bad_caption"].with_suffix(".txt").write_bytes(b"caf\xe9 \xff\xfe not utf-8\n")
    return paths


def _write_audio_only(path: Path) -> Path:
    sample_rate, samples = 16000, 1024
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=sample_rate)
        stream.layout = "mono"
        tone = np.sin(np.arange(samples * 8) * 2 * np.pi * 440 / sample_rate).astype(np.float32) * 0.2
        for i, chunk in enumerate(tone.reshape(-1, samples)):
            frame = av.AudioFrame.from_ndarray(chunk[None], format="fltp", layout="mono")
            frame.sample_rate, frame.pts = sample_rate, i * samples
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path
