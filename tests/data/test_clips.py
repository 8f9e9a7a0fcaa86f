"""The per-input stages (longcat_data.clips): sample keys, duplicates, clips of a long video, and how a
stage turns a failure into a rejection record that later stages pass on untouched."""

from __future__ import annotations

from pathlib import Path

import pytest

from longcat_data import clips
from longcat_data.buckets import InputTooSmall, make_buckets
from longcat_data.clips import ClipSpec, is_rejection, prepare_inputs, rejection, stage
from longcat_data.demo import DEMO_CLIPS, write_demo_clips
from longcat_data.video import VideoError


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
