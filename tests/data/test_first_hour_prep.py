"""Issue 19 on the prep side, through ``longcat-prep``: 4k+1 frame counts, runs that write nothing,
short clips, the --area grid, SimpleTuner dataset configs."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from PIL import Image

from longcat_data import cli
from longcat_data.config import PrepConfig
from longcat_data.demo import write_demo_clips
from longcat_data.flags import ConfigError
from longcat_data.simpletuner import plan_datasets, simpletuner_area

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--model", "tiny", "--workers", "0", "--area", "64x64"]


@pytest.fixture(scope="module")
def two_videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    demo = tmp_path_factory.mktemp("demo")
    write_demo_clips(demo)
    videos = demo / "two"
    videos.mkdir()
    for name in ("beach_waves", "spinning_top"):
        for suffix in (".mp4", ".txt"):
            shutil.copy(demo / f"{name}{suffix}", videos / f"{name}{suffix}")
    return videos


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def test_frames_not_4k_plus_1_are_rounded_down_and_stored_as_held(two_videos, tmp_path, capsys, caplog):
    out = tmp_path / "shards"
    with caplog.at_level(logging.WARNING):
        assert cli.main(["shard", str(two_videos), str(out), *TINY, "--frames", "10"]) == 0
    assert [r.getMessage() for r in caplog.records if "4k+1" in r.getMessage()] == [
        "frames must be 4k+1 for the VAE: using 9 instead of 10"
    ]
    manifest = _manifest(out)
    assert manifest["settings"]["frames"] == 9
    assert {key.rsplit("x", 1)[1] for key in manifest["buckets"]} == {"9"}
    # The rerun with the same flag resumes (the stored 9 is what it asks for).
    assert cli.main(["shard", str(two_videos), str(out), *TINY, "--frames", "10"]) == 0
    assert "skipped 2 already done" in capsys.readouterr().out


def test_videos_shorter_than_frames_are_kept_and_counted(two_videos, tmp_path, capsys):
    out = tmp_path / "shards"
    assert cli.main(["shard", str(two_videos), str(out), *TINY, "--frames", "93"]) == 0
    summary = capsys.readouterr().out
    frames = sorted(int(key.rsplit("x", 1)[1]) for key in _manifest(out)["buckets"])
    assert all(f < 93 for f in frames)
    assert "2 clips from videos shorter than --frames 93 kept at their own length" in summary


def test_a_run_that_rejects_every_video_fails_with_the_fix(two_videos, tmp_path, capsys):
    out = tmp_path / "shards"
    argv = ["shard", str(two_videos), str(out), "--model", "tiny", "--workers", "0", "--area", "1024x1024"]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert "rejected 2 (2 too small)" in captured.out
    [line] = [line for line in captured.err.splitlines() if "error:" in line]
    assert "every video was rejected, nothing was written" in line and "use a smaller --area" in line
    # And the trainer, pointed at that folder, says why there is nothing to train on.
    from longcat_data.shards import ShardError
    from longcat_data.stream import expand_shard_spec

    with pytest.raises(ShardError, match="longcat-prep rejected all 2 videos"):
        expand_shard_spec(str(out))


def test_a_folder_without_videos_fails(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not a video")
    assert cli.main(["shard", str(tmp_path / "empty"), str(tmp_path / "out"), *TINY]) == 2
    assert f"{tmp_path / 'empty'}: no videos to prep" in capsys.readouterr().err


def test_images_in_the_videos_folder_are_named_once_and_left_out(two_videos, tmp_path, capsys, caplog):
    videos = tmp_path / "videos"
    shutil.copytree(two_videos, videos)
    (videos / "stills").mkdir()
    for name in ("b.png", "a.JPG", ".hidden.png"):
        Image.new("RGB", (64, 64)).save(videos / "stills" / name, format="PNG")
    assert cli.main(["shard", str(videos), str(tmp_path / "out"), *TINY]) == 0
    assert "written 2 clips from 2 videos" in capsys.readouterr().out
    [warning] = [r.getMessage() for r in caplog.records if "image" in r.getMessage()]
    assert (
        f"{videos}: left out 2 images (stills/a.JPG, stills/b.png): clips are made from videos only"
        in warning
    )
    # Start frames kept beside the videos (--conditioning-dir the same folder) are no stray images.
    beside = tmp_path / "beside"
    shutil.copytree(two_videos, beside)
    for name in ("beach_waves", "spinning_top"):
        Image.new("RGB", (64, 64)).save(beside / f"{name}.png")
    caplog.clear()
    out3 = str(tmp_path / "out3")
    assert cli.main(["shard", str(beside), out3, *TINY, "--conditioning-dir", str(beside)]) == 0
    assert "written 2 clips from 2 videos" in capsys.readouterr().out
    assert not any("left out" in r.getMessage() for r in caplog.records)
    # Only images: the run fails, and the line before its error says where the images went.
    caplog.clear()
    assert cli.main(["shard", str(videos / "stills"), str(tmp_path / "out2"), *TINY]) == 2
    assert "no videos to prep" in capsys.readouterr().err
    assert any("left out 2 images" in r.getMessage() for r in caplog.records)


def test_a_rank_whose_slice_is_empty_is_no_failure(two_videos, tmp_path, capsys):
    # More ranks than videos (torchrun on 8 GPUs, 2 videos): the idle rank finishes cleanly.
    argv = ["shard", str(two_videos), str(tmp_path / "out"), *TINY, "--rank", "3", "--world-size", "4"]
    assert cli.main(argv) == 0
    assert "written 0 clips" in capsys.readouterr().out


@pytest.mark.parametrize("area", ["100x100", "480x830"])
def test_an_area_off_the_model_grid_is_refused_before_any_work(area, tmp_path, capsys):
    assert cli.main(["shard", str(tmp_path), str(tmp_path / "out"), "--area", area]) == 2
    assert "multiples of 16" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- SimpleTuner dataset configs


@pytest.mark.parametrize(
    ("resolution", "kind", "area"),
    [
        (480, "pixel", (480, 832)),  # a 16:9 video's bucket on SimpleTuner's 64 px grid
        (720, "pixel", (720, 1280)),
        (480, "pixel_area", (480, 480)),
        (1024, "pixel_area", (1024, 1024)),
        (0.25, "area", (512, 512)),  # its preset: 512^2 pixels
        (1.0, "area", (1024, 1024)),
        (0.4, "area", (640, 640)),  # 400000 pixels: a 632 px square, on the 64 px grid
    ],
)
def test_simpletuner_resolutions_map_to_areas(resolution, kind, area):
    assert simpletuner_area(resolution, kind) == area


def _plan(tmp_path: Path, entries: list[dict], settings: dict | None = None, **base):
    cfg = PrepConfig(simpletuner="x.json", out_dir=str(tmp_path / "out"), model="tiny", **base)
    jobs, _, notes = plan_datasets(entries, settings or {}, cfg, tmp_path / "multidatabackend.json")
    return jobs, notes


def _video(tmp_path: Path, **entry) -> dict:
    (tmp_path / "clips").mkdir(exist_ok=True)
    return {
        "id": "clips",
        "type": "local",
        "dataset_type": "video",
        "instance_data_dir": str(tmp_path / "clips"),
        **entry,
    }


def test_simpletuner_dataset_settings_become_prep_settings(tmp_path):
    (tmp_path / "starts").mkdir()
    entries = [
        _video(
            tmp_path,
            caption_strategy="instanceprompt",
            instance_prompt="a sks dog runs",
            resolution=480,
            resolution_type="pixel",
            video={"num_frames": 50, "min_frames": 30, "is_i2v": True},
            conditioning_data=["starts"],
            repeats=3,
        ),
        {
            "id": "starts",
            "type": "local",
            "dataset_type": "conditioning",
            "instance_data_dir": str(tmp_path / "starts"),
        },
        {"id": "embeds", "dataset_type": "text_embeds", "type": "local"},
    ]
    [job], notes = _plan(tmp_path, entries)
    cfg = job.config
    assert (cfg.frames, cfg.area, cfg.captions) == (49, "480x832", "prompt:a sks dog runs")
    assert cfg.conditioning_dir == str(tmp_path / "starts") and cfg.out_dir == str(tmp_path / "out" / "clips")
    assert job.entry["is_i2v"] is True and job.entry["video"] == {"num_frames": 49}
    text = "\n".join(notes)
    assert "keys not used by longcat-prep: repeats" in text and "video keys not used: min_frames" in text
    assert "'embeds': dataset_type 'text_embeds' not used" in text


def test_simpletuner_defaults_are_simpletuners(tmp_path):
    # No resolution, type or caption strategy: SimpleTuner's own defaults (1024, pixel_area, filename),
    # or the config.json's global values.
    [job], notes = _plan(tmp_path, [_video(tmp_path)])
    assert (job.config.area, job.config.captions, job.config.frames) == ("1024x1024", "filename", 93)
    assert any("video.num_frames not set" in n for n in notes) and any("is_i2v not set" in n for n in notes)
    [job], _ = _plan(tmp_path, [_video(tmp_path)], {"resolution": 0.25, "resolution_type": "area"})
    assert job.config.area == "512x512"


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"caption_strategy": "csv"}, "caption_strategy 'csv' is not one longcat-prep reads"),
        ({"caption_strategy": "parquet"}, "caption_strategy parquet needs a parquet block"),
        ({"caption_strategy": "parquet", "parquet": {"path": "nope.parquet"}}, "parquet.path 'nope.parquet'"),
        ({"caption_strategy": "instanceprompt"}, "needs a non-empty instance_prompt"),
        ({"type": "aws"}, "type 'aws': longcat-prep reads local folders"),
        ({"instance_data_dir": "/no/such/clips"}, "is not a folder of videos"),
        ({"resolution_type": "megapixel"}, "resolution_type 'megapixel': must be pixel, area or pixel_area"),
        ({"resolution": "big"}, "resolution = 'big': must be a positive number"),
        ({"video": {"num_frames": 3}}, "--frames must be at least 5"),
        ({"conditioning_data": ["nowhere"]}, "conditioning_data 'nowhere' is not a dataset"),
    ],
)
def test_simpletuner_datasets_that_cannot_be_prepped_are_named(tmp_path, entry, message):
    with pytest.raises(ConfigError, match=message) as err:
        _plan(tmp_path, [_video(tmp_path, **entry)])
    assert "dataset 'clips'" in str(err.value)


def test_simpletuner_needs_a_video_dataset(tmp_path):
    with pytest.raises(ConfigError, match="no video dataset"):
        _plan(tmp_path, [{"id": "imgs", "dataset_type": "image", "instance_data_dir": str(tmp_path)}])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--simpletuner", "db.json", "--output-dir", "o", "--frames", "9"], "--frames: with --simpletuner"),
        (
            ["--simpletuner", "db.json", "videos", "o"],
            "takes each dataset's videos from its instance_data_dir",
        ),
        (["--simpletuner", "db.json"], "give only --output-dir OUT"),
        (["videos"], "give VIDEOS_DIR and OUT_DIR"),
        (["--simpletuner", "nope.json", "--output-dir", "o"], "nope.json does not exist"),
    ],
)
def test_simpletuner_command_lines_are_checked(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["shard", *argv]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert message in line


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_simpletuner_parquet_captions_become_a_caption_mapping(tmp_path, suffix):
    from longcat_data.simpletuner import run_simpletuner

    rows = [
        {"id": "a", "caption": "a dog runs", "tags": "dog"},
        {"id": "b", "caption": "", "tags": "a cat sits"},  # empty: the fallback column's
        {"id": "c", "caption": None, "tags": None},  # none: left to the prep's missing-caption rule
    ]
    table = tmp_path / f"captions{suffix}"
    if suffix == ".jsonl":
        table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pq = pytest.importorskip("pyarrow.parquet")
        import pyarrow as pa

        pq.write_table(pa.Table.from_pylist(rows), table)
    block = {"path": str(table), "filename_column": "id", "caption_column": "caption"}
    entry = _video(tmp_path, caption_strategy="parquet", parquet={**block, "fallback_caption_column": "tags"})
    (tmp_path / "db.json").write_text(json.dumps([entry]))
    cfg = PrepConfig(simpletuner=str(tmp_path / "db.json"), out_dir=str(tmp_path / "out"), model="tiny")
    prepped = []
    run_simpletuner(cfg, prepped.append)
    [job] = prepped
    kind, _, mapping = job.captions.partition(":")
    assert kind == "jsonl"
    assert [json.loads(line) for line in Path(mapping).read_text().splitlines()] == [
        {"file_name": "a", "caption": "a dog runs"},
        {"file_name": "b", "caption": "a cat sits"},
    ]
    assert json.loads((tmp_path / "out" / "multidatabackend.json").read_text())[0]["id"] == "clips"


def test_shards_made_before_the_rule_train_at_the_count_they_hold():
    from longcat_data.manifest import check_manifest, made_frames

    # An older prep stored --frames 90 as typed; its clips are 89 frames long.
    manifest = {"settings": {"frames": 90}, "buckets": {"64x64x89": 2}}
    assert made_frames(manifest) == 89
    check_manifest(manifest, encoders=None, frames=89)


def test_simpletuner_image_eval_dataset_is_kept_for_validation(tmp_path):
    cfg = PrepConfig(simpletuner="x.json", out_dir=str(tmp_path / "out"), model="tiny")
    (tmp_path / "val").mkdir()
    val = {"id": "val", "type": "local", "dataset_type": "image", "instance_data_dir": str(tmp_path / "val")}
    other = {**val, "id": "stills"}
    entries = [_video(tmp_path), val, other]
    jobs, kept, notes = plan_datasets(entries, {"eval_dataset_id": "val"}, cfg, tmp_path / "db.json")
    assert [j.id for j in jobs] == ["clips"] and kept == [val]
    assert any("'stills': dataset_type 'image' not used" in n for n in notes)
