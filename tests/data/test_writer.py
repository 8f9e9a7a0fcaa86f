"""Shard writer (longcat_data.writer): size rolling, atomic names, crash recovery, refusal, rank merge."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from longcat_data import writer as shard_writer
from longcat_data.flags import parse_size
from longcat_data.manifest import OutputMismatch, merge_manifest, read_manifest
from longcat_data.shards import ShardSample
from longcat_data.writer import ShardWriter

SETTINGS = {"frames": 9, "area": [64, 64]}
ENCODERS = {"model": "tiny", "vae_config": "abc"}


def make_sample(key: str, t: int = 3, hw: int = 8, with_text: bool = True) -> dict[str, bytes | str]:
    gen = torch.Generator().manual_seed(sum(map(ord, key)))
    image = np.random.default_rng(len(key)).integers(0, 255, (hw * 8, hw * 8, 3), dtype=np.uint8)
    return ShardSample(
        key,
        torch.randn(16, t, hw, hw, generator=gen),
        torch.randn(16, 1, hw, hw, generator=gen),
        image,
        f"caption of {key}",
        {"source": f"{key}.mp4", "bucket": [hw * 8, hw * 8, 4 * t - 3]},
        torch.randn(5, 32, generator=gen) if with_text else None,
    ).to_members()


def writer(out: Path, **kw) -> ShardWriter:
    # A sample here is about 21 kB, so shards roll after every second sample.
    args = {"settings": SETTINGS, "encoders": ENCODERS, "max_bytes": 40_000, **kw}
    return ShardWriter(out, **args)


def read_keys(out: Path) -> list[str]:
    manifest = read_manifest(out)
    urls = [str(out / s["name"]) for s in manifest["shards"]]
    return [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]


def test_sample_round_trip_through_webdataset(tmp_path: Path) -> None:
    sample = make_sample("clip_a")
    with writer(tmp_path, max_bytes=10**9) as w:
        w.write(sample, "64x64x9")
        w.write(make_sample("clip_b", with_text=False), "64x64x9")
    got = list(wds.WebDataset(str(tmp_path / "train-000000.tar"), shardshuffle=False))
    assert [g["__key__"] for g in got] == ["clip_a", "clip_b"]
    decoded = ShardSample.from_members(got[0])
    assert decoded.latents.dtype == torch.bfloat16 and decoded.latents.shape == (16, 3, 8, 8)
    assert decoded.cond_latents.shape == (16, 1, 8, 8)
    assert decoded.text_embeds.shape == (5, 32) and decoded.text_embeds.dtype == torch.bfloat16
    assert decoded.cond_image.shape == (64, 64, 3) and decoded.cond_image.dtype == np.uint8
    assert decoded.caption == "caption of clip_a"
    assert decoded.meta["bucket"] == [64, 64, 9]
    assert ShardSample.from_members(got[1]).text_embeds is None
    assert set(got[0]) >= {
        "latents.safetensors",
        "cond.safetensors",
        "cond.png",
        "txt",
        "t5.safetensors",
        "json",
    }


@pytest.mark.parametrize(
    ("text", "size"),
    [("1GB", 10**9), ("200MB", 200 * 10**6), ("512KiB", 512 * 1024), ("1e6", 10**6), ("7", 7)],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "MB", "1 furlong", "-5MB", "0"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_stream_names() -> None:
    assert shard_writer.stream_name(0, 1) == "train"
    assert shard_writer.stream_name(3, 4) == "train-r3"
    assert shard_writer.shard_filename("train-r3", 12) == "train-r3-000012.tar"
    with pytest.raises(ValueError):
        shard_writer.stream_name(4, 4)


def test_rolls_by_size_and_only_finished_shards_have_final_names(tmp_path: Path) -> None:
    w = writer(tmp_path)
    for i in range(5):
        w.write(make_sample(f"k{i}"), "64x64x9")
        names = sorted(p.name for p in tmp_path.glob("train-*"))
        # Every visible .tar is recorded in the state; the shard in progress is .partial.
        state = json.loads((tmp_path / ".prep" / "train.json").read_text())
        assert {n for n in names if n.endswith(".tar")} == {s["name"] for s in state["shards"]}
    manifest = w.close()
    assert len(manifest["shards"]) == 3, "40 kB shards roll every 2 samples"
    assert not list(tmp_path.glob("*.partial"))
    assert sum(s["samples"] for s in manifest["shards"]) == 5
    assert manifest["buckets"] == {"64x64x9": 5} and manifest["complete"]
    assert read_keys(tmp_path) == [f"k{i}" for i in range(5)]
    for s in manifest["shards"]:
        assert (tmp_path / s["name"]).stat().st_size == s["bytes"]


def test_crash_loses_only_the_partial_shard_and_rerun_skips_done(tmp_path: Path) -> None:
    w = writer(tmp_path)
    for i in range(3):
        w.write(make_sample(f"k{i}"), "b")
        w.finish_input(f"k{i}", f"k{i}.mp4")
    # A hard crash: the writer is never closed; the open shard stays .partial.
    finished = {s.name for s in w.state.shards}
    assert finished and list(tmp_path.glob("*.partial"))
    del w

    again = writer(tmp_path)
    assert not list(tmp_path.glob("*.partial")), "an unrecorded partial is removed"
    done = again.done_keys
    assert done and done < {"k0", "k1", "k2"}
    assert set(again.done_inputs) == done
    for i in range(5):
        if f"k{i}" not in done:
            again.write(make_sample(f"k{i}"), "b")
    with pytest.raises(KeyError):
        again.write(make_sample(sorted(done)[0]), "b")
    again.close()
    keys = read_keys(tmp_path)
    assert sorted(keys) == [f"k{i}" for i in range(5)] and len(keys) == len(set(keys))
    assert finished <= {p.name for p in tmp_path.glob("*.tar")}


def test_crash_between_state_and_rename_rolls_forward(tmp_path: Path) -> None:
    with writer(tmp_path) as w:
        w.write(make_sample("k0"), "b")
    tar = tmp_path / "train-000000.tar"
    tar.rename(tmp_path / "train-000000.tar.partial")
    again = writer(tmp_path)
    assert tar.exists() and again.done_keys == {"k0"}
    again.close()
    assert read_keys(tmp_path) == ["k0"]


def test_exception_keeps_whole_samples_and_marks_incomplete(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), writer(tmp_path, max_bytes=10**9) as w:
        w.write(make_sample("k0"), "b")
        raise KeyboardInterrupt
    manifest = read_manifest(tmp_path)
    assert not manifest["complete"]
    assert read_keys(tmp_path) == ["k0"]


def test_refuses_other_settings_or_encoders(tmp_path: Path) -> None:
    writer(tmp_path).close()
    with pytest.raises(OutputMismatch, match=r"settings\.frames: 9 -> 17"):
        writer(tmp_path, settings={**SETTINGS, "frames": 17})
    with pytest.raises(OutputMismatch, match=r"encoders\.model: 'tiny' -> '/ckpt'"):
        writer(tmp_path, encoders={**ENCODERS, "model": "/ckpt"})
    writer(tmp_path).close()  # the same settings are welcome


def test_two_ranks_merge_into_one_manifest(tmp_path: Path) -> None:
    r0 = writer(tmp_path, rank=0, world_size=2, listing="L")
    r1 = writer(tmp_path, rank=1, world_size=2, listing="L")
    r0.write(make_sample("a"), "x")
    r1.write(make_sample("b"), "y")
    r1.reject("bad.mp4", "not a video")
    assert not r0.close()["complete"], "rank 1 has not finished"
    manifest = r1.close()
    assert manifest["complete"]
    assert [s["name"] for s in manifest["shards"]] == ["train-r0-000000.tar", "train-r1-000000.tar"]
    assert manifest["buckets"] == {"x": 1, "y": 1}
    assert manifest["rejected"] == [{"source": "bad.mp4", "reason": "not a video"}]
    assert merge_manifest(tmp_path) == manifest


def test_a_rerun_tidies_what_killed_runs_left_and_nothing_else(tmp_path: Path) -> None:
    for rank in (0, 1):
        with writer(tmp_path, rank=rank, world_size=2, listing="L") as w:
            w.write(make_sample(f"k{rank}"), "b")
    prep_dir = tmp_path / ".prep"
    ours = [
        prep_dir / ".train-r0.json.123.tmp",
        prep_dir / ".captions-train-r0.jsonl.77.tmp",
        tmp_path / "train-r0-000005.tar.partial",
        tmp_path / ".manifest.json.999.tmp",
        tmp_path / "train-r1-000003.tar.partial",  # rank 1's writer is gone: tidied too
        prep_dir / ".train-r1.json.5.tmp",
    ]
    theirs = [prep_dir / ".notes.tmp", tmp_path / "notes.tar.partial", tmp_path / ".README.md.tmp"]
    for path in ours + theirs:
        path.write_bytes(b"x")
    writer(tmp_path, rank=0, world_size=2, listing="L").close()
    assert [p.name for p in ours if p.exists()] == []
    assert all(p.exists() for p in theirs)
    assert sorted(read_keys(tmp_path)) == ["k0", "k1"]


def test_a_live_writers_files_are_left_alone(tmp_path: Path) -> None:
    r1 = writer(tmp_path, rank=1, world_size=2, listing="L")
    r1.write(make_sample("k1"), "b")
    in_progress = tmp_path / "train-r1-000000.tar.partial"
    assert in_progress.is_file()
    r0 = writer(tmp_path, rank=0, world_size=2, listing="L")
    assert in_progress.is_file(), "rank 1 still writes it"
    r0.write(make_sample("k0"), "b")
    r0.close()
    r1.close()
    assert sorted(read_keys(tmp_path)) == ["k0", "k1"]


def test_shards_no_state_lists_are_read_back_or_set_aside(tmp_path: Path, caplog) -> None:
    with writer(tmp_path) as w:
        for i in range(4):
            w.write(make_sample(f"k{i}"), "64x64x9")
    (tmp_path / ".prep" / "train.json").unlink()
    damaged = tmp_path / "train-000001.tar"
    damaged.write_bytes(damaged.read_bytes()[:5000])
    again = writer(tmp_path)
    assert again.done_keys == {"k0", "k1"}, "the whole shard is read back"
    assert (tmp_path / "train-000001.tar.unlisted").is_file() and not damaged.exists()
    assert "train-000001.tar is not in any prep state and is damaged" in caplog.text
    for key in ("k2", "k3"):
        again.write(make_sample(key), "64x64x9")
    manifest = again.close()
    assert manifest["complete"] and sorted(read_keys(tmp_path)) == ["k0", "k1", "k2", "k3"]
