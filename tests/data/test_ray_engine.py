"""``longcat-prep shard --engine ray`` on a local 2-CPU Ray instance (one for the whole module: Ray starts
slowly): the same samples as the local engine, workers that die once are retried, resume across
engines. Tiny encoders, a handful of small clips."""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from longcat_data import prep
from longcat_data.config import PrepConfig
from longcat_data.demo import DEMO_CLIPS, make_bad_inputs, write_demo_clips
from longcat_data.interrupts import Interrupted
from longcat_data.manifest import read_manifest
from longcat_data.shards import ShardSample
from longcat_data.writer import ShardWriter

ray = pytest.importorskip("ray", reason="ray is not installed (pip install -e '.[ray]')")
ray_engine = pytest.importorskip("longcat_data.ray_engine")

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.timeout(300)]


def config(videos: Path, out: Path, engine: str) -> PrepConfig:
    return PrepConfig(
        str(videos),
        str(out),
        model="tiny",
        area="128x192",
        frames=9,
        shard_size="100KB",
        workers=1,
        engine=engine,
    )


def contents(out: Path) -> tuple[dict[str, ShardSample], list[tuple[str, str]], dict]:
    """Samples by key (a key written twice fails), the rejected list, the manifest."""
    manifest = read_manifest(out)
    urls = [str(out / s["name"]) for s in manifest["shards"]]
    samples: dict[str, ShardSample] = {}
    for members in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        sample = ShardSample.from_members(members)
        assert sample.key not in samples, f"{sample.key} written twice"
        samples[sample.key] = sample
    rejected = sorted((r["source"], r["reason"]) for r in manifest["rejected"])
    return samples, rejected, manifest


def assert_same_output(out: Path, reference: Path) -> None:
    samples, rejected, manifest = contents(out)
    want, want_rejected, want_manifest = contents(reference)
    assert manifest["complete"] and sorted(samples) == sorted(want)
    assert rejected == want_rejected and manifest["buckets"] == want_manifest["buckets"]
    assert manifest["settings"] == want_manifest["settings"]
    for key, sample in samples.items():
        other = want[key]
        assert torch.equal(sample.latents, other.latents), key
        assert torch.equal(sample.cond_latents, other.cond_latents), key
        assert torch.equal(sample.text_embeds, other.text_embeds), key
        assert (sample.caption, sample.meta) == (other.caption, other.meta), key


@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory):
    """The module's Ray instance (2 CPUs, a small object store); yields the fault folder its workers
    watch (``ray_engine.FAULTS_ENV``, inherited by the workers, so set before ``ray.init``)."""
    folder = tmp_path_factory.mktemp("faults")
    with pytest.MonkeyPatch.context() as env:
        env.setenv(ray_engine.FAULTS_ENV, str(folder))
        env.setenv("OMP_NUM_THREADS", "1")
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=100 * 2**20,
            logging_level=logging.WARNING,
        )
        try:
            yield folder
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("videos")
    write_demo_clips(folder, DEMO_CLIPS[:4])
    shutil.copy(make_bad_inputs(tmp_path_factory.mktemp("bad"))["zero_byte"], folder / "zero_byte.mp4")
    return folder


@pytest.fixture(scope="module")
def reference(videos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("local")
    prep.run_shard(config(videos, out, "local"))
    return out


def stop_after(monkeypatch: pytest.MonkeyPatch, inputs: int) -> None:
    """A Ctrl-C (a real SIGINT to this process) once the run has finished ``inputs`` more inputs."""
    finish = ShardWriter.finish_input
    done = 0

    def finishing(self: ShardWriter, key: str, source: str) -> None:
        nonlocal done
        finish(self, key, source)
        done += 1
        if done == inputs:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(ShardWriter, "finish_input", finishing)


def test_same_samples_as_the_local_engine(
    faults: Path, videos: Path, reference: Path, tmp_path: Path
) -> None:
    stats = prep.run_shard(config(videos, tmp_path, "ray"))
    assert stats.written == 4 and stats.rejected == {"unreadable": 1}
    assert_same_output(tmp_path, reference)


def test_dead_workers_are_retried_and_an_input_that_always_kills_one_is_a_rejection(
    faults: Path, videos: Path, reference: Path, tmp_path: Path
) -> None:
    # One decode task and one encoder actor die once mid-run (os._exit, as on a lost node); one input
    # kills every decode worker that takes it (a file that crashes the decoder).
    poison = DEMO_CLIPS[0].name
    for name in ("decode", "encode", f"decode.{poison}"):
        (faults / name).touch()
    try:
        stats = prep.run_shard(config(videos, tmp_path, "ray"))
    finally:
        (faults / f"decode.{poison}").unlink()
    assert not list(faults.iterdir()), "both one-time faults fired"
    assert stats.written == 3 and stats.rejected == {"unreadable": 1, "lost": 1}
    samples, rejected, _ = contents(tmp_path)
    assert sorted(samples) == sorted(set(contents(reference)[0]) - {poison})
    lost = [reason for source, reason in rejected if source == f"{poison}.mp4"]
    assert len(lost) == 1 and f"failed {ray_engine.RETRIES + 1} times" in lost[0]
    # The next run (here the local engine) tries it again and completes the set.
    assert prep.run_shard(config(videos, tmp_path, "local")).written == 1
    assert_same_output(tmp_path, reference)


def test_resume_across_engines(
    faults: Path, videos: Path, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # local, stopped -> ray continues, stopped -> local finishes.
    with monkeypatch.context() as patch:
        stop_after(patch, 2)
        with pytest.raises(Interrupted):
            prep.run_shard(config(videos, tmp_path, "local"))
    first = set(contents(tmp_path)[0])
    assert 2 <= len(first) < 4
    with monkeypatch.context() as patch:
        stop_after(patch, 1)
        with pytest.raises(Interrupted):
            prep.run_shard(config(videos, tmp_path, "ray"))
    second = set(contents(tmp_path)[0])
    assert first < second
    stats = prep.run_shard(config(videos, tmp_path, "local"))
    assert stats.skipped == len(second) and stats.written == 4 - len(second)
    assert_same_output(tmp_path, reference)


def test_the_command_stops_cleanly_on_a_sigterm_to_its_process_group(videos: Path, tmp_path: Path) -> None:
    """The CLI starts a local Ray instance of its own; a scheduler's SIGTERM reaches the whole group,
    Ray's processes included: the run still closes its shard, exits 143 with one line, and leaves no
    Ray process behind (the next run resuming it: test_resume_across_engines)."""
    many = tmp_path / "videos"
    many.mkdir()
    for copy in range(2):
        for clip in DEMO_CLIPS[:4]:
            (many / f"{clip.name}_{copy}.mp4").hardlink_to(videos / f"{clip.name}.mp4")
    out = tmp_path / "out"
    flags = ["--model", "tiny", "--area", "128x192", "--frames", "9", "--shard-size", "100KB"]
    command = [
        sys.executable,
        "-m",
        "longcat_data.cli",
        "shard",
        str(many),
        str(out),
        *flags,
        "--engine",
        "ray",
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not list(out.glob("*.tar")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1] == "interrupted (SIGTERM); re-run the same command to continue"
    samples, _, manifest = contents(out)
    assert not list(out.glob("*.partial")) and not manifest["complete"]
    assert 0 < len(samples) < 8 and set(samples) <= {
        f"{c.name}_{i}" for i in range(2) for c in DEMO_CLIPS[:4]
    }
    ray_left = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout
    assert ray_left == "", "Ray processes of the stopped run are still there"


@pytest.mark.gpu
def test_gpu_actors_give_the_local_engines_samples(faults: Path, videos: Path, tmp_path: Path) -> None:
    """On a GPU machine: the encoder actor takes the GPU (bf16 recorded, as the local engine on CUDA)."""
    local, remote = tmp_path / "local", tmp_path / "ray"
    prep.run_shard(config(videos, local, "local"))
    prep.run_shard(config(videos, remote, "ray"))
    samples, rejected, manifest = contents(remote)
    want, want_rejected, want_manifest = contents(local)
    assert manifest["settings"]["dtype"] == want_manifest["settings"]["dtype"] == "bfloat16"
    assert sorted(samples) == sorted(want) and rejected == want_rejected
    for key, sample in samples.items():
        torch.testing.assert_close(sample.latents, want[key].latents, rtol=1.6e-2, atol=1e-2)


def test_frames_travel_beside_the_records_in_batches_of_mixed_shapes(faults: Path) -> None:
    """Two buckets and an input without clips in one actor batch: every clip gets its own frames back."""
    generator = torch.Generator().manual_seed(0)

    def round_trip(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """What an encoder actor does with its batch's columns, without the encoders (defined here so
        that Ray ships it by value: its workers cannot import this module)."""
        column = np.empty(len(batch["record"]), dtype=object)
        column[:] = [
            pickle.dumps(ray_engine._frames_back(data, frames))
            for data, frames in zip(batch["record"], batch["frames"], strict=True)
        ]
        return {"record": column}

    def prepared(key: str, clips: int, shape: tuple[int, ...]) -> dict:
        frames = [torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator) for _ in range(clips)]
        return {
            "__key__": key,
            "clips": [{"__key__": f"{key}_{i}", "frames": f} for i, f in enumerate(frames)],
        }

    records = [
        prepared("a", 2, (5, 8, 12, 3)),
        prepared("b", 1, (9, 16, 8, 3)),
        {"__key__": "c", "clips": []},
    ]
    rows = [ray_engine._frames_apart(r) for r in records]
    out = ray.data.from_items(rows).map_batches(round_trip, batch_size=3).take_all()
    back = {r["__key__"]: r for r in (pickle.loads(row["record"]) for row in out)}
    for record in records:
        clips = back[record["__key__"]]["clips"]
        assert [c["__key__"] for c in clips] == [c["__key__"] for c in record["clips"]]
        for clip, want in zip(clips, record["clips"], strict=True):
            assert torch.equal(clip["frames"], want["frames"])
