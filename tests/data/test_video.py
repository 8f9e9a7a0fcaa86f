import dataclasses
import io
import pickle
import sys
import types
import warnings
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from longcat_data.buckets import InputTooSmall, choose_bucket, make_buckets, trim_to_4k_plus_1
from longcat_data.defaults import DEMO_AREA, DEMO_FRAMES
from longcat_data.demo import (
    DEMO_CLIPS,
    frame_indices,
    make_bad_inputs,
    synthetic_frames,
    write_demo_clips,
)
from longcat_data.video import (
    CropBox,
    ImageTooLarge,
    VideoError,
    find_start_frame,
    load_start_frame,
    probe,
    read_frames,
    read_image,
    resize_center_crop,
    write_frames,
    write_gif,
    write_mp4,
)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("demo")
    write_demo_clips(directory)
    return directory


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_bad_inputs(tmp_path_factory.mktemp("bad inputs"))


def is_red(pixel: np.ndarray) -> bool:
    return bool(pixel[0] > 200 and pixel[1] < 60 and pixel[2] < 60)


@pytest.mark.parametrize("clip", DEMO_CLIPS, ids=lambda clip: clip.name)
def test_demo_clips_probe_and_decode_every_frame_upright(demo_dir: Path, clip) -> None:
    path = demo_dir / f"{clip.name}.mp4"
    info = probe(path)
    assert (info.width, info.height, info.frame_count) == (clip.width, clip.height, clip.frames)
    assert info.fps == pytest.approx(clip.fps)
    assert info.duration == pytest.approx(clip.frames / clip.fps)
    assert info.codec == "h264" and not info.variable_frame_rate
    assert info.rotation == clip.rotation % 360
    frames = read_frames(path, 0, clip.frames, info=info)
    assert frames.dtype == np.uint8 and frames.shape == (clip.frames, clip.height, clip.width, 3)
    assert frame_indices(frames) == list(range(clip.frames))
    assert is_red(frames[0, 4, 4]) and not is_red(frames[0, -4, 4]) and not is_red(frames[0, 4, -4])
    assert path.with_suffix(".txt").exists() == (clip.caption is not None)


def test_demo_clips_all_fit_the_demo_buckets(demo_dir: Path) -> None:
    buckets = make_buckets(DEMO_AREA)
    for clip in DEMO_CLIPS:
        choose_bucket(clip.height, clip.width, buckets)
        assert trim_to_4k_plus_1(clip.frames, DEMO_FRAMES) == DEMO_FRAMES
    long_clip = max(DEMO_CLIPS, key=lambda clip: clip.frames)
    assert long_clip.frames >= 2 * DEMO_FRAMES


def test_read_from_the_middle_seeks_and_stops(demo_dir: Path) -> None:
    frames = read_frames(demo_dir / "long_country_drive.mp4", 20, 17)
    assert frame_indices(frames) == list(range(20, 37))


def test_resample_to_a_lower_and_a_higher_rate(demo_dir: Path) -> None:
    path = demo_dir / "long_country_drive.mp4"  # 40 frames at 24 fps
    info = probe(path)
    assert info.frames_at(12) == 20 and info.frames_at(30) == 49
    assert frame_indices(read_frames(path, 3, 10, target_fps=12)) == list(range(6, 26, 2))
    # At 30 fps, output frame k shows the source frame nearest k/30 s: round(k * 24 / 30).
    expected = [int(np.floor(k * 24 / 30 + 0.5)) for k in range(5, 45)]
    assert frame_indices(read_frames(path, 5, 40, target_fps=30)) == expected


def test_variable_frame_rate_is_flagged_and_read_by_timestamp(bad: dict[str, Path]) -> None:
    path = bad["variable_rate"]
    info = probe(path)
    assert info.variable_frame_rate
    # Gaps alternate 1/15 s and 1/30 s, so 16 gaps span 0.8 s.
    timestamps = np.cumsum([0.0] + [1 / 30 if i % 2 else 1 / 15 for i in range(DEMO_FRAMES - 1)])
    assert info.span == pytest.approx(0.8, abs=2e-3)
    assert info.frames_at(30) == 25
    frames = read_frames(path, 0, 25, target_fps=30)
    for k, source in enumerate(frame_indices(frames)):
        # Each output frame is the source frame nearest k/30 s (at an exact midpoint, either one).
        assert abs(timestamps[source] - k / 30) <= np.abs(timestamps - k / 30).min() + 2e-3
    # Without a target rate a variable-rate file is read at its average rate, evenly in time.
    assert len(read_frames(path, 0, info.frames_at())) == info.frames_at()


def test_rotated_phone_video_comes_out_upright(bad: dict[str, Path]) -> None:
    info = probe(bad["rotated"])
    assert (info.width, info.height, info.rotation) == (192, 320, 270)
    frames = read_frames(bad["rotated"], 0, 5, info=info)
    assert frames.shape == (5, 320, 192, 3)
    assert is_red(frames[0, 4, 4]) and not is_red(frames[0, -4, -40])


def test_matroska_with_an_old_style_rotate_tag(tmp_path: Path) -> None:
    # Older tools wrote a clockwise "rotate" tag instead of a display matrix; Matroska keeps only tags,
    # and has no per-frame index, so this also covers the demux-and-count path.
    upright = synthetic_frames(320, 192, 24)
    path = tmp_path / "old_phone.mkv"
    with av.open(str(path), "w", format="matroska") as container:
        stream = container.add_stream("libx264", rate=24, options={"g": "8"})
        stream.width, stream.height, stream.pix_fmt = 320, 192, "yuv420p"
        stream.metadata["rotate"] = "90"
        for image in np.rot90(upright, 1, axes=(1, 2)):
            container.mux(
                stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24"))
            )
        container.mux(stream.encode())
    info = probe(path)
    assert (info.width, info.height, info.frame_count, info.rotation) == (192, 320, 24, 270)
    frames = read_frames(path, 13, 9, info=info)
    assert frames.shape == (9, 320, 192, 3) and is_red(frames[0, 4, 4])
    assert frame_indices(frames) == list(range(13, 22))


@pytest.mark.parametrize(
    ("problem", "reason"),
    [
        ("zero_byte", "empty file"),
        ("truncated", "truncated"),
        ("truncated_index", "truncated"),
        ("image", "PNG image, not a video"),
        ("audio_only", "audio only"),
    ],
)
def test_unusable_inputs_raise_a_one_line_video_error(
    bad: dict[str, Path], problem: str, reason: str
) -> None:
    with pytest.raises(VideoError, match=reason) as err:
        probe(bad[problem])
    message = str(err.value)
    assert message.startswith(str(bad[problem])) and "\n" not in message
    assert err.value.path == bad[problem]


def test_video_error_survives_a_trip_to_a_worker_process(bad: dict[str, Path]) -> None:
    with pytest.raises(VideoError) as err:
        probe(bad["zero_byte"])
    copy = pickle.loads(pickle.dumps(err.value))
    assert (copy.path, copy.reason, str(copy)) == (err.value.path, err.value.reason, str(err.value))


def test_frames_missing_from_the_data_are_reported_as_truncation(demo_dir: Path) -> None:
    path = demo_dir / "spinning_top.mp4"
    info = probe(path)
    # What a probe of a file whose index promises twice the frames its data holds would say.
    promised = dataclasses.replace(info, frame_count=2 * info.frame_count, span=2 * info.span + 1 / info.fps)
    with pytest.raises(VideoError, match="truncated: frames stop before"):
        read_frames(path, info.frame_count - 3, 10, info=promised)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(VideoError, match="not found"):
        probe(tmp_path / "nope.mp4")


def test_garbage_with_a_video_extension(tmp_path: Path) -> None:
    path = tmp_path / "noise.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(VideoError, match="not a readable video"):
        probe(path)


def test_decodable_but_too_small_inputs_are_rejected_by_the_rules(bad: dict[str, Path]) -> None:
    assert probe(bad["three_frames"]).frame_count == 3
    with pytest.raises(InputTooSmall, match="only 3 frames"):
        trim_to_4k_plus_1(3)
    tiny = probe(bad["tiny"])
    with pytest.raises(InputTooSmall, match="64x48"):
        choose_bucket(tiny.height, tiny.width, make_buckets(DEMO_AREA))


def test_unicode_and_spaces_in_the_name(bad: dict[str, Path]) -> None:
    path = bad["unicode_name"]
    assert "☕" in path.name and " " in path.name
    assert read_frames(path, 0, DEMO_FRAMES).shape == (DEMO_FRAMES, 192, 320, 3)


def test_requesting_frames_past_the_end(demo_dir: Path) -> None:
    with pytest.raises(ValueError, match="21 available"):
        read_frames(demo_dir / "uncaptioned_clip.mp4", 10, 12)


def test_resize_center_crop_covers_then_crops_without_stretching() -> None:
    # 100 x 300 source: thirds red / green / blue. A square output keeps only the green middle.
    source = np.zeros((2, 100, 300, 3), np.uint8)
    source[:, :, :100, 0] = source[:, :, 100:200, 1] = source[:, :, 200:, 2] = 255
    out, box = resize_center_crop(source, 64, 64)
    assert out.shape == (2, 64, 64, 3) and out.dtype == np.uint8
    assert box == CropBox(100.0, 0.0, 200.0, 100.0)
    assert out[:, 4:-4, 4:-4, 1].min() > 240 and out[:, 4:-4, 4:-4, [0, 2]].max() < 15
    single, single_box = resize_center_crop(source[0], 48, 96)
    assert single.shape == (48, 96, 3)
    assert (single_box.right - single_box.left) / (single_box.bottom - single_box.top) == pytest.approx(2.0)


def test_start_frames_from_a_conditioning_folder(tmp_path: Path) -> None:
    videos, starts = tmp_path / "videos", tmp_path / "starts"
    (starts / "sub").mkdir(parents=True)
    Image.new("RGB", (90, 60), (0, 0, 255)).save(starts / "sub" / "a.png")
    Image.new("RGB", (60, 90), (0, 255, 0)).save(starts / "b.jpg")
    assert find_start_frame(videos / "sub" / "a.mp4", videos, starts) == starts / "sub" / "a.png"
    assert find_start_frame(videos / "other" / "b.mov", videos, starts) == starts / "b.jpg"
    with pytest.raises(VideoError, match="no start frame") as err:
        find_start_frame(videos / "c.mp4", videos, starts)
    assert str(videos / "c.mp4") in str(err.value)
    image, box = load_start_frame(starts / "sub" / "a.png", 32, 32)
    assert image.shape == (32, 32, 3) and box == CropBox(15.0, 0.0, 75.0, 60.0)
    (starts / "broken.png").write_bytes(b"not an image")
    with pytest.raises(VideoError, match="not a readable image"):
        load_start_frame(starts / "broken.png", 32, 32)


def test_start_frame_image_honours_exif_orientation(tmp_path: Path) -> None:
    landscape = np.zeros((40, 80, 3), np.uint8)
    landscape[:10, :10] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 8  # stored landscape, shown turned 90 degrees counter-clockwise
    Image.fromarray(landscape).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    image, _ = load_start_frame(tmp_path / "phone.jpg", 80, 40)
    assert image.shape == (80, 40, 3) and is_red(image[-4, 4])


def test_read_image_from_bytes_names_them_in_the_error(tmp_path: Path) -> None:
    Image.new("RGB", (6, 4), (0, 255, 0)).save(tmp_path / "green.png")
    image = read_image((tmp_path / "green.png").read_bytes(), name="upload.png")
    assert image.shape == (4, 6, 3) and image.dtype == np.uint8 and tuple(image[0, 0]) == (0, 255, 0)
    with pytest.raises(VideoError, match="upload.png: not a readable image") as err:
        read_image(b"not an image", name="upload.png")
    assert "\n" not in str(err.value)


def test_decord_is_used_when_present_for_plain_files_only(
    demo_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[list[int]] = []
    threads: list[int] = []

    class FakeBatch:
        def __init__(self, frames: np.ndarray) -> None:
            self.frames = frames

        def asnumpy(self) -> np.ndarray:
            return self.frames

    class FakeReader:
        def __init__(self, path: str, ctx: object, num_threads: int = 0) -> None:
            threads.append(num_threads)
            with av.open(path) as container:
                self.frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])

        def get_batch(self, indices: list[int]) -> FakeBatch:
            calls.append(indices)
            return FakeBatch(self.frames[indices])

    fake = types.ModuleType("decord")
    fake.VideoReader = FakeReader
    fake.cpu = lambda index: index
    monkeypatch.setitem(sys.modules, "decord", fake)

    frames = read_frames(demo_dir / "long_country_drive.mp4", 4, 8, target_fps=12)
    assert calls == [list(range(8, 24, 2))] and frame_indices(frames) == list(range(8, 24, 2))
    assert threads == [0]  # the decoder's own default unless told
    read_frames(demo_dir / "long_country_drive.mp4", 0, 5, threads=2)
    assert threads == [0, 2]
    upright = read_frames(demo_dir / "phone_rotated.mp4", 0, 5)
    assert len(calls) == 2 and upright.shape == (5, 320, 192, 3)
    assert frame_indices(read_frames(demo_dir / "phone_rotated.mp4", 0, 5, backend="pyav")) == list(range(5))


class _ClosedGuard:
    """PyAV objects that fail loudly when read after their container is closed.

    A closed container's stream fields read freed memory: usually the old value, sometimes garbage (a
    -2474 fps rate on a 16-core host). Plain tests cannot catch that, so the probe runs on proxies that do.
    """

    class Stream:
        def __init__(self, stream: av.video.stream.VideoStream, guard: "_ClosedGuard") -> None:
            object.__setattr__(self, "_stream", stream)
            object.__setattr__(self, "_guard", guard)

        def __getattr__(self, name: str):
            assert not self._guard.closed, f"stream.{name} read after the container was closed"
            return getattr(self._stream, name)

        def __setattr__(self, name: str, value) -> None:
            setattr(self._stream, name, value)

    class Container:
        def __init__(self, container: av.container.InputContainer, guard: "_ClosedGuard") -> None:
            self._container, self._guard = container, guard

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self._container.close()
            self._guard.closed = True

        @property
        def streams(self):
            real = self._container.streams
            return types.SimpleNamespace(
                video=[_ClosedGuard.Stream(s, self._guard) for s in real.video], audio=real.audio
            )

        def decode(self, stream):
            return self._container.decode(stream._stream)

        def demux(self, stream):
            return self._container.demux(stream._stream)

        def seek(self, *args, stream=None, **kwargs):
            return self._container.seek(*args, stream=stream._stream if stream else None, **kwargs)

        def __getattr__(self, name: str):
            return getattr(self._container, name)

    def __init__(self) -> None:
        self.closed = False


def test_probe_reads_nothing_after_closing_the_file(demo_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from longcat_data import video

    real_open = video._open

    def guarded_open(path: Path):
        return _ClosedGuard.Container(real_open(path), _ClosedGuard())

    monkeypatch.setattr(video, "_open", guarded_open)
    clip = DEMO_CLIPS[0]
    info = probe(demo_dir / f"{clip.name}.mp4")
    assert info.fps == pytest.approx(clip.fps)
    assert read_frames(demo_dir / f"{clip.name}.mp4", 0, 5, info=info).shape[0] == 5


# ---------------------------------------------------------------- writing


def test_mp4_has_the_right_frames_size_and_rate(tmp_path: Path, make_image) -> None:
    video = np.stack([make_image(48, 80)] * 9)
    video[:, :, :, 2] = np.arange(9, dtype=np.uint8)[:, None, None] * 25
    path = write_mp4(video, tmp_path / "out.mp4", fps=15)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.average_rate == 15
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    assert len(frames) == 9 and frames[0].shape == (48, 80, 3)
    assert np.abs(np.stack(frames).astype(int) - video).mean() < 6  # lossy, but the same picture
    assert not list(tmp_path.glob(".*partial*"))


def test_gif_and_frames(tmp_path: Path, make_image) -> None:
    video = np.stack([np.roll(make_image(32, 48), 6 * i, axis=1) for i in range(5)])
    gif = write_gif(video, tmp_path / "out.gif")
    with Image.open(gif) as image:
        assert image.n_frames == 5
    assert len(write_frames(video, tmp_path / "frames")) == 5


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize(
    ("width", "height", "megapixels"),
    [(30000, 30000, "900.0"), (10000, 10000, "100.0"), (8001, 8000, "64.0")],
)
def test_read_image_refuses_too_many_pixels_from_the_header(
    tmp_path: Path, huge_image, fmt: str, width: int, height: int, megapixels: str
) -> None:
    data = huge_image(fmt, width, height)
    assert len(data) < 1000
    expected = (
        f"bomb.png: {width}x{height} is {megapixels} megapixels, more than the 64 a start image may have; "
        "resize it"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning would be a second line
        with pytest.raises(ImageTooLarge) as err:
            read_image(data, name="bomb.png")
        assert str(err.value) == expected
        (tmp_path / "bomb.png").write_bytes(data)
        with pytest.raises(ImageTooLarge) as err:
            read_image(tmp_path / "bomb.png")
        assert str(err.value) == expected.replace("bomb.png", str(tmp_path / "bomb.png"), 1)


def test_read_image_at_the_pixel_cap_is_read_not_refused(huge_image) -> None:
    # 8000x8000 is exactly the cap: the size passes and decoding starts (and fails: no pixel data).
    with pytest.raises(VideoError) as err:
        read_image(huge_image("PNG", 8000, 8000), name="edge.png")
    assert not isinstance(err.value, ImageTooLarge)
    assert str(err.value).startswith("edge.png: not a readable image")


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF", "EPS"])
def test_read_image_decodes_png_jpeg_and_webp_only(fmt: str) -> None:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 0, 255)).save(out, format=fmt)
    with pytest.raises(VideoError) as err:
        read_image(out.getvalue(), name=f"start.{fmt.lower()}")
    assert str(err.value) == (
        f"start.{fmt.lower()}: not a readable image (not a PNG, JPEG or WebP file); re-save it as PNG or JPEG"
    )
    for accepted in ("PNG", "JPEG", "WEBP"):
        out = io.BytesIO()
        Image.new("RGB", (8, 8), (0, 0, 255)).save(out, format=accepted)
        assert read_image(out.getvalue()).shape == (8, 8, 3)


def test_read_image_turns_every_corruption_into_a_video_error() -> None:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 40, 3), np.uint8)).save(out, format="PNG")
    good, rng = out.getvalue(), np.random.default_rng(1)
    for _ in range(200):
        broken = bytearray(good[: rng.integers(8, len(good))])
        for position in rng.integers(0, len(broken), 3):
            broken[position] = rng.integers(0, 256)
        try:
            read_image(bytes(broken), name="broken.png")
        except VideoError as err:
            assert str(err).startswith("broken.png: not a readable image") and "\n" not in str(err)
