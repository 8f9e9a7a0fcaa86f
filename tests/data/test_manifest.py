"""Manifest and resume records (longcat_data.manifest): completeness over ranks, rejections, config diffs,
and the checks a trainer runs against the manifest of its shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from longcat_data.manifest import (
    ShardRecord,
    StreamState,
    build_manifest,
    check_manifest,
    config_diff,
    find_manifest,
    manifest_shards,
)
from longcat_data.shards import ShardError
from longcat_data.writer import stream_name

SETTINGS = {"frames": 9, "area": [64, 64]}
ENCODERS = {"model": "tiny", "vae_config": "abc"}


def test_completeness_needs_every_rank_of_one_listing() -> None:
    def state(rank: int, world: int, listing: str, complete: bool) -> StreamState:
        s = StreamState(stream_name(rank, world), rank, world, listing, SETTINGS, ENCODERS)
        s.complete = complete
        return s

    assert build_manifest([state(0, 1, "A", True)])["complete"]
    assert not build_manifest([state(0, 2, "A", True), state(1, 2, "A", False)])["complete"]
    # rank 1 finished an older listing: new videos were added since, so it still has work.
    assert not build_manifest([state(0, 2, "B", True), state(1, 2, "A", True)])["complete"]
    # A stale, unfinished 2-rank run does not matter once a 1-rank run finished everything.
    assert build_manifest([state(0, 2, "A", False), state(0, 1, "A", True)])["complete"]


def test_rejection_cleared_once_the_input_is_written() -> None:
    a = StreamState("train", 0, 1, "L", SETTINGS, ENCODERS, rejected=[{"source": "x.mp4", "reason": "r"}])
    b = StreamState(
        "train-r0",
        0,
        2,
        "L",
        SETTINGS,
        ENCODERS,
        shards=[ShardRecord("train-r0-000000.tar", 1, 10, ["x"], {"x": "x.mp4"}, {"b": 1})],
    )
    assert build_manifest([a, b])["rejected"] == []


def test_config_diff_names_nested_keys() -> None:
    diffs = config_diff({"a": 1, "n": {"x": 1}}, {"a": 1, "n": {"x": 2}, "new": True})
    assert diffs == ["n.x: 1 -> 2", "new: '<unset>' -> True"]


def test_manifest_mismatch_errors():
    manifest = {
        "encoders": ENCODERS,
        "settings": {"frames": 9},
        "buckets": {"16x24x9": 3, "16x24x5": 1},
        "complete": True,
    }
    check_manifest(manifest, encoders=ENCODERS, frames=9)  # a short clip trimmed to 5 frames is fine
    with pytest.raises(ShardError, match="other encoders.*model"):
        check_manifest(manifest, encoders={**ENCODERS, "model": "other"}, frames=9)
    with pytest.raises(ShardError, match="made with --frames 9 but the config trains on 93"):
        check_manifest(manifest, encoders=ENCODERS, frames=93)
    del manifest["settings"]
    with pytest.raises(ShardError, match="made with --frames 9"):
        check_manifest(manifest, encoders=ENCODERS, frames=5)


def test_manifest_lists_only_finished_shards_on_disk(tmp_path: Path) -> None:
    assert manifest_shards(tmp_path) is None, "no manifest: the caller globs instead"
    (tmp_path / "train-000000.tar").write_bytes(b"")
    (tmp_path / "train-000001.tar.partial").write_bytes(b"")
    listed = [{"name": "train-000000.tar"}, {"name": "train-000001.tar"}]
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": listed}))
    with pytest.raises(ShardError, match=r"2 shards, 1 of them missing \(train-000001.tar\).*allow-missing"):
        manifest_shards(tmp_path)
    assert manifest_shards(tmp_path, allow_missing=True) == [str(tmp_path / "train-000000.tar")]
    assert find_manifest([str(tmp_path / "train-000000.tar")])["shards"] == listed
    assert find_manifest(["pipe:curl -s https://example.org/train-000000.tar"]) is None
    assert find_manifest(["https://example.org/train-000000.tar"]) is None
