"""Video and image files: probe a video, read the frames of one clip by timestamp, resize and
centre-crop; read an image; write MP4, GIF and PNG frames.

Frames are chosen by presentation time, not by decode order, so variable-frame-rate files and fps
resampling are one code path: output frame k of a clip read at ``rate`` fps is the decoded frame whose
timestamp is nearest to ``start_time + (start + k) / rate``. Frames come out as the viewer sees them:
rotation metadata (phone videos) is applied.

PyAV is the decoder. decord, when importable, reads constant-frame-rate unrotated files: there frame
indices are exact and its batched C++ reader avoids PyAV's per-frame Python overhead. It knows nothing
of rotation or timestamps, so every other file stays on PyAV.

Every writer writes under a temporary name in the target folder and renames, so a reader (the preview
page, a watcher of the validation folder) never sees half a file.
"""

from __future__ import annotations

import importlib
import io
import itertools
import logging
import math
import statistics
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import ModuleType
from typing import IO, Literal, NamedTuple, TypeVar

import av
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from longcat_data.buckets import cover_scale
from longcat_data.defaults import DEFAULT_FPS

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = frozenset(
    {".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".gif"}
)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
# The formats read_image decodes (a JPEG may come out as its multi-picture variant, MPO). PIL reads many
# more, some through outside programs (EPS runs Ghostscript), which an uploaded file must never reach.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
# Decoded pixels a start image may have, checked from the header before decoding: a PNG of a few hundred
# bytes can declare 30000x30000, gigabytes once decoded. 64 megapixels is 8000x8000, far above any area.
MAX_IMAGE_PIXELS = 64_000_000

# A timestamp gap this much wider or narrower than the typical one marks the file as variable rate.
VFR_TOLERANCE = 0.1

REENCODE_HINT = "re-encode it, e.g. ffmpeg -i IN -c:v libx264 -pix_fmt yuv420p OUT.mp4"

Backend = Literal["auto", "pyav", "decord"]
T = TypeVar("T")


class InputError(Exception):
    """An input file that prep must skip; the message is one line: file, reason, fix."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.where = str(path) if "://" in str(path) else str(self.path)  # a Path folds a URL's '//'
        self.reason = " ".join(reason.split())
        super().__init__(f"{self.where}: {self.reason}")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # Prep decodes in worker processes; the default pickling would call __init__ with the message only.
        return type(self), (self.where, self.reason)


class VideoError(InputError):
    """A video or image file that cannot be read or used."""


class ImageTooLarge(VideoError):
    """An image whose header declares more than ``MAX_IMAGE_PIXELS``; refused before decoding."""


class CropBox(NamedTuple):
    """The source region that became the output, in source pixels (display orientation)."""

    left: float
    top: float
    right: float
    bottom: float


@dataclass(frozen=True)
class VideoInfo:
    """What ``probe`` learns about a file without decoding more than its first frame."""

    path: Path
    width: int  # as displayed, after rotation
    height: int
    fps: float  # nominal rate for constant-rate files, frames / duration otherwise
    frame_count: int
    duration: float  # seconds, first frame shown to last frame gone
    span: float  # seconds from the first frame's timestamp to the last frame's
    start_time: float  # timestamp of the first frame, seconds
    rotation: int  # counter-clockwise degrees applied to decoded frames: 0, 90, 180 or 270
    variable_frame_rate: bool
    codec: str

    def frames_at(self, rate: float | None = None) -> int:
        """How many frames ``read_frames`` can return at ``rate`` fps (None: the file's own frames)."""
        if rate is None and not self.variable_frame_rate:
            return self.frame_count
        return math.floor(self.span * (rate or self.fps) + 1e-6) + 1


def probe(path: str | Path) -> VideoInfo:
    """Size, rate, frame count, rotation and codec of a video; VideoError if it cannot be one."""
    path = Path(path)
    if not path.is_file():
        raise VideoError(path, "file not found")
    size = path.stat().st_size
    if size == 0:
        raise VideoError(
            path, "empty file (0 bytes), probably an interrupted copy; copy it again or delete it"
        )
    with _open(path) as container:
        stream = _video_stream(path, container)
        codec = stream.codec_context.name
        timestamps, data_end = _frame_timestamps(path, container, stream)
        if data_end > size:
            raise VideoError(
                path,
                f"truncated: {size} bytes but its index points to byte {data_end}; download it again or {REENCODE_HINT}",
            )
        first = _first_frame(path, container, stream)
        rotation = _rotation(first, stream)
        # Read while the container is open: a stream's fields point into it, and after close they return
        # whatever reuses that memory (a nonsense, even negative, rate).
        nominal = stream.average_rate or stream.guessed_rate

    deltas = np.diff(timestamps)
    typical = statistics.median(deltas) if len(deltas) else 0.0
    variable = bool(len(deltas) > 1 and (deltas.max() - deltas.min()) > VFR_TOLERANCE * typical)
    span = float(timestamps[-1] - timestamps[0])
    frame_count = len(timestamps)
    if not variable and nominal:
        fps = float(nominal)
    elif span > 0:
        fps = (frame_count - 1) / span
    else:
        fps = float(nominal or 1.0)
    frame_time = typical if typical > 0 else 1.0 / fps
    width, height = (first.height, first.width) if rotation in (90, 270) else (first.width, first.height)
    info = VideoInfo(
        path=path,
        width=width,
        height=height,
        fps=fps,
        frame_count=frame_count,
        duration=span + frame_time,
        span=span,
        # Index times are decode times, which B-frames shift; the first decoded frame has the real start.
        start_time=float(first.time) if first.time is not None else float(timestamps[0]),
        rotation=rotation,
        variable_frame_rate=variable,
        codec=codec,
    )
    log.debug("probed %s", info)
    return info


def read_frames(
    path: str | Path,
    start: int,
    count: int,
    target_fps: float | None = None,
    *,
    info: VideoInfo | None = None,
    backend: Backend = "auto",
    threads: int = 0,
) -> np.ndarray:
    """Frames ``start .. start + count - 1`` as uint8 [count, H, W, 3] RGB, upright.

    ``start`` and ``count`` are in frames at ``target_fps`` (default: the file's own frames; a
    variable-rate file is read at its average rate so motion keeps its real speed). Only the frames
    needed are decoded: a seek to the keyframe before the clip, and decoding stops at its last frame.
    Pass ``info`` from an earlier ``probe`` to skip probing again. ``threads``: decoder threads (0: one
    per core, the decoder's default).
    """
    path = Path(path)
    if target_fps is not None and target_fps <= 0:
        raise ValueError(f"target_fps must be positive, got {target_fps}")
    info = info or probe(path)
    rate = target_fps or info.fps
    available = info.frames_at(target_fps)
    if start < 0 or count < 1 or start + count > available:
        raise ValueError(
            f"{path}: frames {start}..{start + count - 1} requested, {available} available at {rate:g} fps"
        )
    times = info.start_time + (start + np.arange(count)) / rate

    decord = _decord() if backend in ("auto", "decord") else None
    if backend == "decord" and decord is None:
        raise ValueError("backend='decord' requested but decord is not installed (pip install decord)")
    if decord is not None and (backend == "decord" or (not info.variable_frame_rate and info.rotation == 0)):
        return _read_decord(decord, info, times, threads)
    return _read_pyav(info, times, threads)


def center_crop_box(src_h: int, src_w: int, height: int, width: int) -> CropBox:
    """The centred region of an ``src_h`` x ``src_w`` frame with the aspect ratio of ``height`` x ``width``:
    what :func:`resize_center_crop` scales to that size (fractional, so the aspect ratio is exact)."""
    scale = cover_scale(src_h, src_w, (height, width))
    crop_w, crop_h = width / scale, height / scale
    left, top = (src_w - crop_w) / 2, (src_h - crop_h) / 2
    return CropBox(left, top, left + crop_w, top + crop_h)


def resize_center_crop(frames: np.ndarray, height: int, width: int) -> tuple[np.ndarray, CropBox]:
    """Scale [F, H, W, 3] (or one [H, W, 3] image) to cover ``height`` x ``width``, then centre-crop.

    The aspect ratio is kept exactly (the crop box is fractional, so no sub-pixel stretch either);
    bicubic resampling widens its kernel when shrinking, which is the antialiasing.
    """
    single = frames.ndim == 3
    batch = frames[None] if single else frames
    if batch.ndim != 4 or batch.shape[-1] != 3 or batch.dtype != np.uint8:
        raise ValueError(f"expected uint8 [F, H, W, 3] or [H, W, 3], got {frames.dtype} {list(frames.shape)}")
    box = center_crop_box(*batch.shape[1:3], height, width)
    out = np.empty((len(batch), height, width, 3), dtype=np.uint8)
    for i, frame in enumerate(batch):
        resized = Image.fromarray(frame).resize((width, height), Image.Resampling.BICUBIC, box=box)
        out[i] = np.asarray(resized)
    return (out[0] if single else out), box


def find_start_frame(video: str | Path, videos_dir: str | Path, frames_dir: str | Path) -> Path:
    """The user's start-frame image for ``video``: same relative path and name, an image extension.

    Looks for ``frames_dir/<relative path without extension>.<png|jpg|jpeg|webp>``, then the bare file
    name at the top of ``frames_dir`` (a flat folder of start frames, as SimpleTuner datasets often are).
    """
    video, frames_dir = Path(video), Path(frames_dir)
    relative = video.relative_to(videos_dir).with_suffix("")
    for name in start_frame_candidates(relative.as_posix()):
        candidate = frames_dir / name
        if candidate.is_file():
            return candidate
    raise VideoError(
        video,
        f"no start frame in {frames_dir} (looked for {relative}{{{','.join(IMAGE_EXTENSIONS)}}}); "
        "add one with the same name or leave out the start-frame folder",
    )


def start_frame_candidates(stem: str) -> list[str]:
    """The names ``find_start_frame`` tries for a video whose relative path without extension is
    ``stem``, in order: the same relative path, then the bare name at the top, each image extension."""
    name = stem.rsplit("/", 1)[-1]
    return [f"{s}{ext}" for s in dict.fromkeys((stem, name)) for ext in IMAGE_EXTENSIONS]


def load_start_frame(image: str | Path, height: int, width: int) -> tuple[np.ndarray, CropBox]:
    """A start-frame image as uint8 [height, width, 3], upright (EXIF orientation), resized and cropped."""
    return resize_center_crop(read_image(image), height, width)


def read_image(source: str | Path | bytes, name: str = "image") -> np.ndarray:
    """A PNG, JPEG or WebP file, or its bytes, as uint8 [H, W, 3] RGB, upright (EXIF orientation
    applied). ``name`` stands for bytes in the error: an upload's file name, a shard member. An image of
    more than ``MAX_IMAGE_PIXELS`` is ImageTooLarge, known from its header before anything is decoded."""
    where = Path(name) if isinstance(source, bytes) else Path(source)
    try:
        with io.BytesIO(source) if isinstance(source, bytes) else open(where, "rb") as fp:
            width, height = _header_size(fp, where)
            if width * height > MAX_IMAGE_PIXELS:
                raise ImageTooLarge(
                    where,
                    f"{width}x{height} is {width * height / 1e6:.1f} megapixels, more than the "
                    f"{MAX_IMAGE_PIXELS / 1e6:g} a start image may have; resize it",
                )
            with Image.open(fp, formats=IMAGE_FORMATS) as opened:
                return np.asarray(ImageOps.exif_transpose(opened).convert("RGB"))
    # Corrupt data surfaces from PIL's decoders as any of these, not only OSError.
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, IndexError, struct.error) as err:
        raise VideoError(where, f"not a readable image ({err}); re-save it as PNG or JPEG") from err


def _header_size(fp: IO[bytes], where: Path) -> tuple[int, int]:
    """(width, height) as the image's header declares them, nothing decoded. ``Image.open`` would refuse
    a size far above PIL's own limit without naming it (and only warn below that limit), so the plugins
    of ``IMAGE_FORMATS`` read the header here, as ``Image.open`` does before its check."""
    Image.init()
    prefix = fp.read(16)
    try:
        for fmt in IMAGE_FORMATS:
            factory, accept = Image.OPEN[fmt]
            if accept is None or accept(prefix) is True:
                fp.seek(0)
                return factory(fp, where.name).size
    finally:
        fp.seek(0)
    raise UnidentifiedImageError("not a PNG, JPEG or WebP file")


# PyAV before 19 fails on non-UTF-8 metadata unless told to replace bad bytes; 19 removed the option.
_OPEN_OPTIONS = {"metadata_errors": "replace"} if int(av.__version__.split(".")[0]) < 19 else {}


def _open(path: Path) -> av.container.InputContainer:
    try:
        return av.open(str(path), **_OPEN_OPTIONS)
    except av.error.FFmpegError as err:
        raise VideoError(
            path,
            f"not a readable video: corrupt, truncated or not a video (ffmpeg: {_ffmpeg_reason(err)}); {REENCODE_HINT}",
        ) from err


def _video_stream(path: Path, container: av.container.InputContainer) -> av.video.stream.VideoStream:
    format_name = container.format.name
    if format_name == "image2" or format_name.endswith("_pipe"):
        kind = format_name.removesuffix("_pipe").upper()
        raise VideoError(
            path, f"is a {kind} image, not a video; rename it or move it out of the video folder"
        )
    if not container.streams.video:
        if container.streams.audio:
            raise VideoError(path, "audio only, no video stream; move it out of the video folder")
        raise VideoError(
            path, f"no video stream (corrupt or truncated: a cut-off MP4 loses its index); {REENCODE_HINT}"
        )
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return stream


def _frame_timestamps(
    path: Path, container: av.container.InputContainer, stream: av.video.stream.VideoStream
) -> tuple[np.ndarray, int]:
    """Sorted frame times in seconds, and the byte offset where the frame data ends (0 if unknown).

    MP4/MOV keep an index of every frame, read without touching the frame data; other containers index
    only keyframes, so their packets are demuxed (still no decoding).
    """
    time_base = float(stream.time_base)
    entries = [entry for entry in stream.index_entries if not entry.is_discard]
    if entries and len(entries) == stream.frames:
        ticks = [entry.timestamp for entry in entries]
        data_end = max(entry.pos + entry.size for entry in entries)
    else:
        try:
            ticks = [
                packet.pts if packet.pts is not None else packet.dts
                for packet in container.demux(stream)
                if packet.size and (packet.pts is not None or packet.dts is not None)
            ]
        except av.error.FFmpegError as err:
            raise VideoError(path, f"corrupt ({_ffmpeg_reason(err)}); {REENCODE_HINT}") from err
        container.seek(0)
        data_end = 0
    if not ticks:
        raise VideoError(path, f"the video stream has no frames; {REENCODE_HINT}")
    return np.sort(np.asarray(ticks, dtype=np.float64)) * time_base, data_end


def _first_frame(
    path: Path, container: av.container.InputContainer, stream: av.video.stream.VideoStream
) -> av.VideoFrame:
    try:
        for frame in container.decode(stream):
            return frame
    except av.error.FFmpegError as err:
        raise VideoError(
            path, f"cannot decode its first frame ({_ffmpeg_reason(err)}); {REENCODE_HINT}"
        ) from err
    raise VideoError(path, f"no decodable frames (corrupt or truncated); {REENCODE_HINT}")


def _rotation(frame: av.VideoFrame, stream: av.video.stream.VideoStream) -> int:
    """Counter-clockwise display rotation, snapped to a quarter turn.

    The display matrix (what phones write) arrives as frame side data; files from older tools carry a
    clockwise ``rotate`` tag instead.
    """
    degrees = frame.rotation
    if not degrees:
        # Matroska upper-cases tag names, so "rotate" may come back as "ROTATE".
        tag = next((value for key, value in stream.metadata.items() if key.lower() == "rotate"), "0")
        degrees = -int(tag) if tag.lstrip("-").isdigit() else 0
    return round(degrees / 90) % 4 * 90


def _read_pyav(info: VideoInfo, times: np.ndarray, threads: int, seek: bool = True) -> np.ndarray:
    """Nearest decoded frame to each of the ascending ``times``, decoding as little as possible."""
    with _open(info.path) as container:
        stream = _video_stream(info.path, container)
        stream.thread_count = threads
        lead_in = times[0] - 1.0 / info.fps
        seek = seek and lead_in > info.start_time
        if seek:
            container.seek(int(lead_in / float(stream.time_base)), stream=stream, backward=True)
        try:
            timed = _timed_frames(container, stream, info.fps)
            first = next(timed, None)
            if seek and first is not None and first[0] > times[0] + 0.5 / info.fps:
                log.debug("%s: seek landed after %.3fs, decoding from the start", info.path, times[0])
                return _read_pyav(info, times, threads, seek=False)
            frames = _nearest_frames(itertools.chain([first] if first else [], timed), times, 1.0 / info.fps)
            # Convert each frame as it is settled into one preallocated array: memory stays at the clip.
            clip = np.empty((len(times), info.height, info.width, 3), dtype=np.uint8)
            filled = 0
            last: av.VideoFrame | None = None
            for frame in frames:
                if frame is not last:
                    last, pixels = frame, np.rot90(frame.to_ndarray(format="rgb24"), info.rotation // 90)
                    if pixels.shape != clip.shape[1:]:
                        raise VideoError(
                            info.path,
                            f"frame size changes mid-stream ({info.width}x{info.height} to "
                            f"{pixels.shape[1]}x{pixels.shape[0]}); {REENCODE_HINT}",
                        )
                clip[filled] = pixels
                filled += 1
        except av.error.FFmpegError as err:
            raise VideoError(info.path, f"decoding failed ({_ffmpeg_reason(err)}); {REENCODE_HINT}") from err
    if filled < len(times):
        raise VideoError(
            info.path,
            f"truncated: frames stop before {times[filled]:.2f}s of {info.duration:.2f}s; "
            f"download it again or {REENCODE_HINT}",
        )
    return clip


def _timed_frames(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream, fps: float
) -> Iterator[tuple[float, av.VideoFrame]]:
    """Decoded frames with their presentation time; a frame without one follows its predecessor."""
    now = 0.0
    for frame in container.decode(stream):
        now = frame.time if frame.time is not None else now + 1.0 / fps
        yield now, frame


def _nearest_frames(timed: Iterable[tuple[float, T]], times: np.ndarray, frame_time: float) -> Iterator[T]:
    """For each ascending target time, the item with the nearest timestamp (at a tie, the earlier).

    Items arrive in time order; an item is settled once the next one shows where its half of the gap
    ends, and iteration stops as soon as every target is settled. Targets after the last item are its
    own while it is still on screen (``frame_time``); beyond that fewer items than targets come out.
    """
    settled = 0
    previous: tuple[float, T] | None = None
    for now, item in timed:
        if previous is not None:
            midpoint = (previous[0] + now) / 2
            while settled < len(times) and times[settled] <= midpoint:
                settled += 1
                yield previous[1]
            if settled == len(times):
                return
        previous = (now, item)
    while previous is not None and settled < len(times) and times[settled] < previous[0] + frame_time:
        settled += 1
        yield previous[1]


def _decord() -> ModuleType | None:
    try:
        return importlib.import_module("decord")
    except ImportError:
        return None


def _read_decord(decord: ModuleType, info: VideoInfo, times: np.ndarray, threads: int) -> np.ndarray:
    indices = np.clip(np.rint((times - info.start_time) * info.fps), 0, info.frame_count - 1).astype(int)
    try:
        reader = decord.VideoReader(str(info.path), ctx=decord.cpu(0), num_threads=threads)
        frames = reader.get_batch(indices.tolist()).asnumpy()
    except Exception as err:  # decord raises its own DECORDError and plain RuntimeErrors alike
        raise VideoError(info.path, f"decord could not read it ({err}); {REENCODE_HINT}") from err
    return np.ascontiguousarray(frames, dtype=np.uint8)


def _ffmpeg_reason(err: av.error.FFmpegError) -> str:
    return err.strerror or str(err)


# ---------------------------------------------------------------- writing


def _partial_path(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.stem}.partial{path.suffix}")


def write_mp4(
    frames: np.ndarray,
    path: str | Path,
    fps: int = DEFAULT_FPS,
    *,
    crf: int = 18,
    keyframe_interval: int | None = None,
    faststart: bool = True,
    rotation: int = 0,
    timestamps: Sequence[float] | None = None,
) -> Path:
    """Display-oriented uint8 [F, H, W, 3] -> H.264 MP4 (yuv420p, playable in browsers) at ``fps``.

    ``crf``: x264 quality (lower is closer to the frames). ``keyframe_interval``: at most this many
    frames between keyframes (None: x264's choice). ``faststart`` puts the index before the frame data,
    so a browser can start playing before the download ends. ``rotation`` (counter-clockwise degrees)
    stores the frames turned back by that angle plus display metadata, as a phone does. ``timestamps``
    (seconds, one per frame) make a variable-frame-rate file.
    """
    path = Path(path)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"write_mp4 wants uint8 [F, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    quarter_turns = round(rotation / 90)
    coded = np.rot90(frames, -quarter_turns, axes=(1, 2))
    codec_options = {"crf": str(crf)} | ({"g": str(keyframe_interval)} if keyframe_interval else {})
    tmp = _partial_path(path)
    with av.open(
        str(tmp), "w", format="mp4", options={"movflags": "+faststart"} if faststart else {}
    ) as container:
        stream = container.add_stream("libx264", rate=fps, options=codec_options)
        stream.width, stream.height = coded.shape[2], coded.shape[1]
        stream.pix_fmt = "yuv420p"
        if timestamps is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        if quarter_turns:
            stream.set_display_rotation(quarter_turns * 90)
        for i, image in enumerate(coded):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            if timestamps is not None:
                frame.pts, frame.time_base = round(timestamps[i] * 1000), Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return tmp.replace(path)


def read_mp4(path: str | Path) -> np.ndarray:
    """All frames of a video file as uint8 [F, H, W, 3], as decoded (no rotation, no resampling)."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def write_gif(frames: np.ndarray, path: str | Path, fps: int = DEFAULT_FPS, max_side: int = 320) -> Path:
    """A small looping GIF preview, scaled so its longer side is at most ``max_side``."""
    path = Path(path)
    h, w = frames.shape[1:3]
    scale = min(1.0, max_side / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    images = [Image.fromarray(f).resize(size, Image.Resampling.BICUBIC) for f in frames]
    tmp = _partial_path(path)
    images[0].save(
        tmp, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0
    )
    return tmp.replace(path)


def write_frames(frames: np.ndarray, directory: str | Path) -> list[Path]:
    """Each frame as ``directory/frame_00000.png``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"frame_{i:05d}.png" for i in range(len(frames))]
    for frame, p in zip(frames, paths, strict=True):
        Image.fromarray(frame).save(p)
    return paths
