"""Prep, streaming, inspect and push against a real S3 endpoint on localhost (moto's server, started here).

Nothing of ours is mocked: s3fs talks HTTP to the server, which keeps objects as S3 does (a put or a
multipart upload visible only once complete, conditional creates with If-None-Match). Each test gets its
own bucket; its listing after a run says exactly what a user's bucket would hold.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("s3fs", reason="needs s3fs (pip install -e '.[s3]')")
moto_server = pytest.importorskip("moto.server", reason="needs moto's server mode (pip install -e '.[test]')")

from longcat_data import cli, prep  # noqa: E402
from longcat_data.captions import CaptionError  # noqa: E402
from longcat_data.config import InspectConfig, PrepConfig  # noqa: E402
from longcat_data.demo import DEMO_CLIPS, write_demo_clips  # noqa: E402
from longcat_data.files import OutputError  # noqa: E402
from longcat_data.hub import push_dataset  # noqa: E402
from longcat_data.inspection import run_inspect  # noqa: E402
from longcat_data.locks import Holder, OutputLocked  # noqa: E402
from longcat_data.manifest import read_manifest  # noqa: E402
from longcat_data.object_locks import ObjectLock  # noqa: E402
from longcat_data.storage import RemoteFolder, folder  # noqa: E402
from longcat_data.stream import expand_shard_spec  # noqa: E402
from longcat_data.tars import stream_keys  # noqa: E402

CLIPS = DEMO_CLIPS[:4]
EXPECTED = sorted(c.name for c in CLIPS)
AREA, FRAMES = "128x192", 9
TIMEOUT = 180

pytestmark = pytest.mark.usefixtures("one_thread")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server on a free port; the AWS_* variables s3fs (and boto3) read point at it."""
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def bucket(s3_endpoint, request) -> str:
    import boto3

    name = "t-" + request.node.name.lower().replace("_", "-")[:50].strip("-")
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def demo_videos(tmp_path_factory) -> Path:
    videos = tmp_path_factory.mktemp("videos")
    write_demo_clips(videos, CLIPS)
    return videos


def upload(local: Path, url: str) -> None:
    store = folder(url)
    for path in sorted(local.rglob("*")):
        if path.is_file():
            store.fs.put_file(str(path), f"{store.root}/{path.relative_to(local).as_posix()}")


def objects(bucket: str) -> list[str]:
    """Every object key in the bucket, and every unfinished multipart upload (as 'upload:KEY')."""
    import boto3

    s3 = boto3.client("s3")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    uploads = s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    return sorted(keys + [f"upload:{u['Key']}" for u in uploads])


def shard_contents(url: str) -> list[str]:
    """Sample keys of every shard the folder's manifest lists, in order (duplicates kept)."""
    store = folder(url)
    keys: list[str] = []
    for shard in read_manifest(store)["shards"]:
        with store.open(shard["name"]) as f:
            found, damage = stream_keys(f)
        assert not damage and len(found) == shard["samples"]
        keys += found
    return keys


def config(videos: str, out: str, **kw) -> PrepConfig:
    values = dict(model="tiny", area=AREA, frames=FRAMES, workers=0, shard_size="100KB")
    return PrepConfig(videos, out, **{**values, **kw})


def test_prep_from_and_to_s3_then_train_inspect_push(bucket, demo_videos, tmp_path):
    upload(demo_videos, f"s3://{bucket}/videos")
    out = f"s3://{bucket}/shards"
    staging = tmp_path / "staging"
    stats = prep.run_shard(config(f"s3://{bucket}/videos", out, staging_dir=str(staging), workers=1))
    assert stats.written == len(CLIPS)

    manifest = read_manifest(out)
    assert manifest["complete"] and len(manifest["shards"]) >= 2, "100KB shards: several uploads"
    assert sorted(shard_contents(out)) == EXPECTED
    # The sidecar captions came from the bucket too.
    assert manifest["rejected"] == []
    names = [s["name"] for s in manifest["shards"]]
    assert objects(bucket) == sorted(
        [f"videos/{p.name}" for p in demo_videos.iterdir()]
        + [f"shards/{n}" for n in names]
        + ["shards/manifest.json", "shards/.prep/train.json"]
    ), "no lock, temporary or unfinished upload is left behind"
    assert not [p for p in staging.rglob("*") if p.is_file()], "staging is emptied as it goes"

    # Training streams the shards from the bucket (the manifest is read there, sizes checked).
    from longcat_train.config import TrainConfig
    from longcat_train.trainer import train

    assert expand_shard_spec(out) == [f"{out}/{n}" for n in names]
    result = train(
        TrainConfig(
            model="tiny",
            shards=[out],
            frames=FRAMES,
            output_dir=str(tmp_path / "run"),
            num_workers=1,
            progress=False,
            report_to="none",
            checkpointing_steps=0,
            max_train_steps=2,
            shuffle_buffer=2,
        )
    )
    assert sorted(result.losses) == [1, 2] and result.corrupt_samples == 0

    assert cli.main(["merge", out]) == 0
    assert read_manifest(out) == manifest
    run_inspect(InspectConfig(out, max_images=4))
    push = push_dataset(out, "me/clips", dry_run=True)
    assert set(names) <= set(push)
    assert {"shards/contact_sheet.png", "shards/README.md"} <= set(objects(bucket))
    with pytest.raises(Exception, match="copy this one to a local disk"):
        push_dataset(out, "me/clips")


def test_captions_mapping_and_start_frames_from_the_bucket(bucket, demo_videos, tmp_path, make_image):
    from PIL import Image

    videos = tmp_path / "videos"
    videos.mkdir()
    frames = tmp_path / "frames"
    frames.mkdir()
    mapping = []
    for clip in CLIPS[:2]:
        (videos / f"{clip.name}.mp4").write_bytes((demo_videos / f"{clip.name}.mp4").read_bytes())
        Image.fromarray(make_image(128, 192)).save(frames / f"{clip.name}.png")
        mapping.append({"file_name": f"{clip.name}.mp4", "caption": f"mapped {clip.name}"})
    (tmp_path / "captions.jsonl").write_text("\n".join(map(json.dumps, mapping)))
    upload(videos, f"s3://{bucket}/videos")
    upload(frames, f"s3://{bucket}/frames")
    folder(f"s3://{bucket}/meta").write_atomic("captions.jsonl", (tmp_path / "captions.jsonl").read_bytes())

    out = f"s3://{bucket}/shards"
    cfg = config(
        f"s3://{bucket}/videos",
        out,
        captions=f"jsonl:s3://{bucket}/meta/captions.jsonl",
        conditioning_dir=f"s3://{bucket}/frames",
    )
    assert prep.run_shard(cfg).written == 2
    store = folder(out)
    from longcat_data.shards import ShardSample
    from longcat_data.stream import SkipCounter, read_tars

    samples = [
        ShardSample.from_members(m)
        for m in read_tars(({"url": u} for u in expand_shard_spec(out)), SkipCounter())
    ]
    assert sorted(s.caption for s in samples) == sorted(f"mapped {c.name}" for c in CLIPS[:2])
    assert {s.meta["cond_source"] for s in samples} == {f"{c.name}.png" for c in CLIPS[:2]}
    assert read_manifest(store)["settings"]["conditioning_dir"] == f"s3://{bucket}/frames"

    # A state lost (moved away): its finished shards are read back from the bucket, nothing is encoded.
    shards = read_manifest(store)["shards"]
    store.remove(".prep/train.json")
    again = prep.run_shard(cfg)
    assert (again.written, again.skipped) == (0, 2)
    assert read_manifest(store)["shards"] == shards

    missing = config(
        f"s3://{bucket}/videos", f"s3://{bucket}/other", captions=f"jsonl:s3://{bucket}/no.jsonl"
    )
    with pytest.raises(CaptionError, match=f"s3://{bucket}/no.jsonl: caption mapping file not found"):
        prep.run_shard(missing)


def test_ray_engine_reads_and_writes_the_bucket(bucket, demo_videos, tmp_path, make_image):
    """Ray tasks fetch the remote videos, sidecars and start frames into the staging folder themselves;
    the command's process uploads the shards: the same samples as the local engine, nothing left over."""
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install -e '.[ray]')")
    from PIL import Image

    from longcat_data.shards import ShardSample
    from longcat_data.stream import SkipCounter, read_tars

    frames = tmp_path / "frames"
    frames.mkdir()
    for clip in CLIPS:
        Image.fromarray(make_image(128, 192)).save(frames / f"{clip.name}.png")
    upload(demo_videos, f"s3://{bucket}/videos")
    upload(frames, f"s3://{bucket}/frames")
    staging = tmp_path / "staging"

    def run(engine: str) -> dict[str, ShardSample]:
        out = f"s3://{bucket}/{engine}"
        cfg = config(
            f"s3://{bucket}/videos",
            out,
            engine=engine,
            conditioning_dir=f"s3://{bucket}/frames",
            staging_dir=str(staging),
        )
        assert prep.run_shard(cfg).written == len(CLIPS)
        assert read_manifest(out)["complete"] and read_manifest(out)["rejected"] == []
        urls = ({"url": u} for u in expand_shard_spec(out))
        return {m["__key__"]: ShardSample.from_members(m) for m in read_tars(urls, SkipCounter())}

    local = run("local")
    # The workers inherit the store's AWS_* variables from this process, so Ray starts after they are set.
    ray.init(
        num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20, logging_level=logging.WARNING
    )
    try:
        remote = run("ray")
    finally:
        ray.shutdown()
    assert sorted(remote) == sorted(local) == EXPECTED
    for key, sample in remote.items():
        assert (sample.caption, sample.meta) == (local[key].caption, local[key].meta), key
        assert sample.meta["cond_source"] == f"{key}.png"
        assert sample.latents.equal(local[key].latents) and sample.text_embeds.equal(local[key].text_embeds)
    assert not [p for p in staging.rglob("*") if p.is_file()], "every staged video deleted once decoded"
    assert not [o for o in objects(bucket) if o.startswith("ray/") and o.endswith((".lock", ".tmp"))]


def _prep_command(videos: str, out: str, staging: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "longcat_data.cli",
        "shard",
        videos,
        out,
        "--model",
        "tiny",
        "--area",
        AREA,
        "--frames",
        str(FRAMES),
        "--shard-size",
        "100KB",
        "--workers",
        "0",
        "--staging-dir",
        str(staging),
    ]


def test_kill_9_mid_prep_then_rerun_loses_and_repeats_nothing(
    bucket, demo_videos, tmp_path, s3_endpoint, caplog
):
    upload(demo_videos, f"s3://{bucket}/videos")
    out = f"s3://{bucket}/shards"
    staging = tmp_path / "staging"
    env = {**os.environ, **s3_endpoint, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    run = subprocess.Popen(
        _prep_command(f"s3://{bucket}/videos", out, staging),
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    store = folder(out)
    deadline = time.monotonic() + TIMEOUT
    try:
        while store.size("train-000000.tar") is None:
            assert run.poll() is None, run.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no shard uploaded in time"
            time.sleep(0.05)
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait(TIMEOUT)
    assert store.size(".prep/train.lock") is not None, "killed with its lock held"
    # A kill during a multipart upload leaves it unfinished (no object shows, its parts are billed).
    import boto3

    s3 = boto3.client("s3")
    s3.create_multipart_upload(Bucket=bucket, Key="shards/train-000007.tar")
    s3.create_multipart_upload(Bucket=bucket, Key="videos/train-000007.tar")  # not ours: kept

    with caplog.at_level(logging.WARNING):
        prep.run_shard(config(f"s3://{bucket}/videos", out, staging_dir=str(staging)))
    assert "taking over the lock" in caplog.text
    assert sorted(shard_contents(out)) == EXPECTED, "every clip once"
    manifest = read_manifest(out)
    assert manifest["complete"]
    names = [s["name"] for s in manifest["shards"]]
    assert [o for o in objects(bucket) if o.startswith(("shards/", "upload:"))] == sorted(
        [f"shards/{n}" for n in names]
        + ["shards/manifest.json", "shards/.prep/train.json", "upload:videos/train-000007.tar"]
    ), "no stray object: no partial, lock, temporary or unfinished upload of ours"
    assert not [p for p in staging.rglob("*") if p.is_file()]


def test_lock_object_refuses_a_live_writer_and_takes_a_dead_ones(bucket):
    store = RemoteFolder(f"s3://{bucket}/out")
    mine = ObjectLock(store, Holder.me("train", 1, "abc"))
    mine.acquire()
    try:
        other = ObjectLock(store, Holder("elsewhere", 1, time.time(), "train", 1, "abc"))
        with pytest.raises(OutputLocked, match=r"being written by pid \d+ on .*delete s3://.*/train\.lock"):
            other.acquire(wait=0.3)
        # Another run (another world size) on another stream is refused while this one lives.
        with pytest.raises(OutputLocked, match="--world-size 1, this one with 2"):
            ObjectLock(store, Holder.me("train-r0", 2, "abc")).acquire(wait=0.3)
    finally:
        mine.release()
    assert store.size(".prep/train.lock") is None, "released: deleted"

    # A holder on this host whose pid is gone (kill -9): taken over at once.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    gone = Holder(socket.gethostname(), int(dead.stdout), time.time(), "train", 1, "abc")
    store.write_atomic(".prep/train.lock", json.dumps(gone.__dict__))
    taker = ObjectLock(store, Holder.me("train", 1, "abc"))
    taker.acquire(wait=0)
    taker.release()


def test_unreachable_bucket_is_one_line(s3_endpoint, demo_videos, tmp_path):
    with pytest.raises((OutputError, OSError)) as err:
        prep.run_shard(config(str(demo_videos), "s3://no-such-bucket/shards", staging_dir=str(tmp_path)))
    assert "s3://no-such-bucket" in str(err.value) and "\n" not in str(err.value)


def test_a_store_that_cannot_be_reached_is_one_line(s3_endpoint, monkeypatch):
    import s3fs

    from longcat_data.shards import ShardError

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{_free_port()}")  # nothing listens
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()  # file systems are cached per arguments, not per environment
    try:
        with pytest.raises(ShardError, match=r"^s3://any/shards/manifest.json: Could not connect") as err:
            expand_shard_spec("s3://any/shards")
        assert "\n" not in str(err.value)
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
