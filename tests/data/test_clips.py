"""The per-input stages (longcat_data.clips): sample keys, duplicates, clips of a long video, and how a
stage turns a failure into a rejection record that later stages pass on untouched."""

from __future__ import annotations

from pathlib import Path

import pytest

from longcat_data import clips
from longcat_data.buckets import InputTooSmall, make_buckets
from longcat_data.clips import ClipSpec, is_rejection, prepare_inputs, rejection, stage
from longcat_data.demo import DEMO_CLIPS, synthetic_frames, write_demo_clips
from longcat_data.video import VideoError, write_mp4


@pytest.fixture(scope="module")
def long_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    videos = tmp_path_factory.mktemp("videos")
    write_demo_clips(videos, [c for c in DEMO_CLIPS if c.name == "long_country_drive"])
    return videos


def spec(videos: Path = Path("."), **kw) -> ClipSpec:
    args = {
        "frames": 9,
        "fps": None,
        "clips_per_video": 1,
        "caption_strategy": "textfile",
        "caption_mapping": None,
    }
    args.update(conditioning_dir=None, done_keys=set(), **kw)
    return ClipSpec(videos, make_buckets((128, 192)), **args)


def test_sample_keys_are_stable_and_dot_free() -> None:
    assert clips.sample_key("clips/my clip.v2.mp4") == "clips__my_clip_v2"
    assert clips.sample_key("café au lait ☕ 01.mp4") == "café_au_lait_01"
    assert clips.clip_key("a", 1, 3) == "a-c1" and clips.clip_key("a", 0, 1) == "a"


def test_assign_keys_rejects_duplicates_and_prefers_written_ones() -> None:
    items, rejected = clips.assign_keys(["b.mp4", "a.mov", "a.mp4"], done={})
    assert [i["source"] for i in items] == ["a.mov", "b.mp4"]
    assert [(r["source"], r["rejected"]) for r in rejected] == [("a.mp4", "duplicate key")]
    items, rejected = clips.assign_keys(["a.mov", "a.mp4"], done={"a": "a.mp4"})
    assert [i["source"] for i in items] == ["a.mp4"] and rejected[0]["source"] == "a.mov"


def test_several_clips_per_video_and_fps_resampling(long_video: Path) -> None:
    source = "long_country_drive.mp4"  # 40 frames at 24 fps
    item = {"__key__": clips.sample_key(source), "source": source}
    clip_spec = ClipSpec(
        long_video, make_buckets((128, 192)), 9, None, 3, "textfile", None, None, {"long_country_drive-c1"}
    )
    (prepared,) = prepare_inputs([item], clip_spec)
    assert not is_rejection(prepared)
    assert [c["__key__"] for c in prepared["clips"]] == ["long_country_drive-c0", "long_country_drive-c2"]
    assert [c["meta"]["start_frame"] for c in prepared["clips"]] == [0, 18]
    clip_spec.fps, clip_spec.done_keys = 12.0, set()
    (prepared,) = prepare_inputs([item], clip_spec)
    assert len(prepared["clips"]) == 2 and prepared["clips"][0]["meta"]["fps"] == 12.0
    assert "clips" not in item, "the caller's input sample is left as it was"


def test_a_stage_passes_rejections_through_untouched() -> None:
    seen = []

    @stage("unreadable")
    def step(sample: dict, _: ClipSpec) -> None:
        seen.append(sample["__key__"])
        sample["done"] = True

    earlier = rejection({"__key__": "a", "source": "a.mp4"}, "too small", "smaller than every bucket")
    out = list(step([earlier, {"__key__": "b", "source": "b.mp4"}], spec()))
    assert out[0] is earlier and out[0] == {**earlier}
    assert out[1] == {"__key__": "b", "source": "b.mp4", "done": True}
    assert seen == ["b"]


@pytest.mark.parametrize(
    ("error", "kind", "reason"),
    [
        (VideoError("v.mp4", "no video stream"), "unreadable", "no video stream"),
        (
            InputTooSmall("48x64 is smaller than every bucket"),
            "too small",
            "48x64 is smaller than every bucket",
        ),
        (RuntimeError("boom"), "error", "RuntimeError: boom"),
    ],
)
def test_a_failing_step_becomes_a_rejection_with_its_warnings(
    error: Exception, kind: str, reason: str
) -> None:
    @stage("unreadable")
    def step(sample: dict, _: ClipSpec) -> None:
        raise error

    sample = {"__key__": "v", "source": "v.mp4", "warnings": ["v.mp4: no sidecar caption"], "info": object()}
    (out,) = step([sample], spec())
    assert out == {
        "__key__": "v",
        "source": "v.mp4",
        "rejected": kind,
        "reason": reason,
        "warnings": ["v.mp4: no sidecar caption"],
    }


def test_a_missing_file_is_rejected_by_the_first_stage_and_never_decoded(tmp_path: Path) -> None:
    (out,) = prepare_inputs([{"__key__": "gone", "source": "gone.mp4"}], spec(tmp_path))
    assert is_rejection(out) and out["rejected"] == "unreadable" and "not found" in out["reason"]
    assert "clips" not in out


# ---------------------------------------------------------------- listing folders


def test_symlinked_folders_are_followed_once_and_loops_not_at_all(tmp_path: Path, caplog) -> None:
    videos, elsewhere = tmp_path / "videos", tmp_path / "elsewhere"
    for folder in (videos / "real" / "deep", elsewhere):
        folder.mkdir(parents=True)
    for path in (
        videos / "top.mp4",
        videos / "real" / "a.mp4",
        videos / "real" / "deep" / "b.mov",
        elsewhere / "c.mp4",
    ):
        path.write_bytes(b"")
    (videos / "real" / "notes.txt").write_text("not a video")
    (videos / "a_link").symlink_to(videos / "real")  # sorts before "real": the real path still wins
    (videos / "more").symlink_to(elsewhere)
    (videos / "real" / "deep" / "loop").symlink_to(videos)
    (videos / "out").mkdir()
    (videos / "out" / "x.mp4").write_bytes(b"")
    assert clips.list_videos(videos, exclude=videos / "out") == [
        "more/c.mp4",
        "real/a.mp4",
        "real/deep/b.mov",
        "top.mp4",
    ]
    assert f"{videos / 'a_link'} leads to {videos / 'real'}, listed already" in caplog.text
    assert (
        f"{videos / 'real' / 'deep' / 'loop'} leads to {videos}, listed already (a symlink loop?)"
        in caplog.text
    )


def test_images_are_listed_apart_from_videos_locally_and_in_a_store(tmp_path: Path) -> None:
    import fsspec

    names = ("a.mp4", "b.PNG", ".hidden/c.mp4", "out/d.mp4", "sub/e.webp", "sub/f.jpeg", "t.txt")
    memory = fsspec.filesystem("memory")
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
        memory.pipe(f"/listing/{name}", b"")
    expected = (["a.mp4"], ["b.PNG", "sub/e.webp", "sub/f.jpeg"])
    assert clips.list_media(tmp_path, exclude=tmp_path / "out") == expected
    assert clips.list_remote_media("memory://listing", exclude="memory://listing/out") == expected
    assert clips.list_videos(tmp_path, exclude=tmp_path / "out") == ["a.mp4"]


def test_only_images_outside_the_start_frame_folder_are_reported(caplog) -> None:
    import fsspec

    from longcat_data.config import PrepConfig
    from longcat_data.prep_inputs import list_inputs

    memory = fsspec.filesystem("memory")
    for name in ("v.mp4", "frames/v.png", "stray.jpg"):
        memory.pipe(f"/reported/{name}", b"")
    cfg = PrepConfig("memory://reported", "memory://out", conditioning_dir="memory://reported/frames")
    assert list_inputs(cfg) == ["v.mp4"]
    assert "left out 1 image (stray.jpg)" in caplog.text and "frames/v.png" not in caplog.text


def test_an_unreadable_subfolder_is_reported_not_skipped_silently(
    tmp_path: Path, caplog, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("open", "locked"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "v.mp4").write_bytes(b"")
    scandir = clips.os.scandir

    def no_entry(path):
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(clips.os, "scandir", no_entry)  # root reads everything; a chmod would not do
    assert clips.list_videos(tmp_path) == ["open/v.mp4"]
    assert (
        f"cannot read folder {tmp_path / 'locked'} (Permission denied); its videos are left out: "
        "fix its permissions" in caplog.text
    )
    with pytest.raises(ValueError, match=f"cannot read the videos folder {tmp_path / 'locked'}"):
        clips.list_videos(tmp_path / "locked")


def test_an_implausible_frame_rate_is_warned_about(tmp_path: Path) -> None:
    write_mp4(synthetic_frames(128, 192, 12), tmp_path / "fast.mp4", fps=1000)
    (sample,) = clips.probe_inputs([{"__key__": "fast", "source": "fast.mp4"}], spec(tmp_path))
    assert sample["warnings"] == [
        "fast.mp4: the file says 1000 frames per second, implausible for a video (broken timestamps?); "
        "check its clips, or set --fps to resample"
    ]
