"""The shard pipeline (longcat_data.prep) end to end on generated clips and tiny encoders: round trip,
resume, refusal, bad inputs, user start frames, two ranks. Small buckets (128x192 area, 9 frames) keep
it quick on a CPU."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from longcat_data import cli, encode, prep
from longcat_data.clips import rejection, sample_key
from longcat_data.config import PrepConfig
from longcat_data.demo import DEMO_CLIPS, make_bad_inputs, write_demo_clips
from longcat_data.manifest import MANIFEST, read_manifest, read_states
from longcat_data.shards import ShardSample
from longcat_data.video import load_start_frame, read_frames, resize_center_crop

AREA, FRAMES = "128x192", 9
FLAGS = ["--model", "tiny", "--area", AREA, "--frames", str(FRAMES), "--shard-size", "100KB"]


def config(videos: Path, out: Path, **kw) -> PrepConfig:
    args = {"model": "tiny", "area": AREA, "frames": FRAMES, "shard_size": "100KB", "workers": 1, **kw}
    return PrepConfig(str(videos), str(out), **args)


def read_samples(out: Path) -> list[ShardSample]:
    manifest = read_manifest(out)
    urls = [str(out / s["name"]) for s in manifest["shards"]]
    return [ShardSample.from_members(s) for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]


# One encoding thread per process: the CI box has two cores, shared with decoders and other tests.
ONE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_cli(*args: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "longcat_data.cli", *args]
    return subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=ONE_THREAD_ENV)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def demo_videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    videos = tmp_path_factory.mktemp("videos")
    write_demo_clips(videos)
    return videos


@pytest.fixture(scope="module")
def prepped(demo_videos: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, prep.PrepStats]:
    out = tmp_path_factory.mktemp("shards")
    return out, prep.run_shard(config(demo_videos, out))


@pytest.fixture(scope="module")
def tiny_vae():
    return encode.load_vae("tiny")


# ---------------------------------------------------------------- pure parts


def clip(shape: tuple[int, ...], n: int) -> dict:
    frames = torch.zeros(shape, dtype=torch.uint8)
    return {"__key__": str(n), "input": str(n), "source": f"{n}.mp4", "frames": frames, "meta": {}}


def test_same_shape_batches_group_and_bound_memory() -> None:
    a, b, c = (5, 8, 8, 3), (5, 8, 16, 3), (5, 16, 8, 3)
    stream = [clip(a, 0), clip(b, 1), clip(a, 2), clip(c, 3), clip(b, 4), clip(c, 5), clip(c, 6)]
    batches = list(prep.same_shape_batches(stream, batch_size=2))
    assert sorted(clip["__key__"] for batch in batches for clip in batch) == [str(i) for i in range(7)]
    assert all(len({clip["frames"].shape for clip in batch}) == 1 and len(batch) <= 2 for batch in batches)
    assert [clip["__key__"] for clip in batches[0]] == ["0", "2"]


def test_rejections_pass_grouping_and_encoding_untouched() -> None:
    bad = rejection({"__key__": "x", "source": "x.mp4"}, "unreadable", "not a video")
    stream = [clip((5, 8, 8, 3), 0), bad, clip((5, 8, 8, 3), 1)]
    batches = list(prep.same_shape_batches(stream, batch_size=2))
    assert batches[0] == [bad], "a rejection goes on at once, as a batch of its own"
    assert [c["__key__"] for c in batches[1]] == ["0", "1"]
    stats = prep.PrepStats()
    assert list(prep.encode_batches([[bad]], enc=None, stats=stats)) == [[bad]]
    assert stats.encode_seconds == 0


# ---------------------------------------------------------------- the pipeline


def test_round_trip(prepped, demo_videos: Path, tiny_vae) -> None:
    out, stats = prepped
    manifest = read_manifest(out)
    assert manifest["complete"] and manifest["rejected"] == []
    assert stats.written == len(DEMO_CLIPS) and len(manifest["shards"]) > 1
    samples = read_samples(out)
    assert sorted(s.key for s in samples) == sorted(c.name for c in DEMO_CLIPS)
    assert sum(manifest["buckets"].values()) == len(samples)
    tokenizer, text_encoder = encode.load_text_encoder("tiny")
    for s in samples:
        h, w, f = s.meta["bucket"]
        assert f == FRAMES and f"{h}x{w}x{f}" in manifest["buckets"]
        assert s.latents.shape == (16, 1 + (f - 1) // 4, h // 8, w // 8) and s.latents.dtype == torch.bfloat16
        assert s.cond_latents.shape == (16, 1, h // 8, w // 8) and s.cond_latents.dtype == torch.bfloat16
        assert s.cond_image.shape == (h, w, 3)
        assert s.text_embeds.dtype == torch.bfloat16 and s.text_embeds.shape[1] == 64
        assert s.meta["encoders"] == manifest["encoders"]
        # The start frame is the first frame of the trimmed, cropped clip...
        source = demo_videos / s.meta["source"]
        first, _ = resize_center_crop(read_frames(source, 0, 1), h, w)
        assert np.array_equal(s.cond_image, first[0])
        # ...encoded alone: the stored condition latent is the VAE of that image.
        cond = encode.encode_image(tiny_vae, s.cond_image[None])[0].to(torch.bfloat16)
        assert torch.equal(cond, s.cond_latents)
        assert torch.equal(s.latents[:, :1], s.cond_latents)
        (embeds,) = encode.encode_text(tokenizer, text_encoder, [s.caption])
        assert torch.equal(embeds.to(torch.bfloat16), s.text_embeds)
    by_key = {s.key: s for s in samples}
    assert by_key["uncaptioned_clip"].meta["caption_source"] == "filename"
    assert by_key["uncaptioned_clip"].caption == "uncaptioned clip"
    assert by_key["beach_waves"].meta["caption_source"] == "textfile"
    assert by_key["phone_rotated"].meta["rotation"] in (90, 270)
    assert by_key["phone_rotated"].cond_image.shape[0] > by_key["phone_rotated"].cond_image.shape[1]


def test_rerun_skips_and_changes_are_refused(prepped, demo_videos: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "copy"
    shutil.copytree(prepped[0], out)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    stats = prep.run_shard(config(demo_videos, out))
    assert stats.skipped == len(DEMO_CLIPS) and stats.written == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == before

    assert (
        cli.main(["shard", str(demo_videos), str(out), *FLAGS[:-4], "--frames", "5", "--shard-size", "1MB"])
        == 2
    )
    assert "settings.frames: 9 -> 5" in capsys.readouterr().err
    ckpt = encode.save_tiny_encoders(tmp_path / "ckpt")
    assert cli.main(["shard", str(demo_videos), str(out), *FLAGS[2:], "--model", str(ckpt)]) == 2
    assert "encoders.model: 'tiny' -> " in capsys.readouterr().err


CRASH_SCRIPT = """
import os, signal, sys
from longcat_data import cli, writer

writes = 0
original = writer.ShardWriter._write

def write_then_die(self, sample, bucket):
    global writes
    writes += 1
    if writes == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    original(self, sample, bucket)

writer.ShardWriter._write = write_then_die
sys.exit(cli.main(sys.argv[1:]))
"""


def test_resume_after_a_killed_run(demo_videos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    script = tmp_path / "crash.py"
    script.write_text(textwrap.dedent(CRASH_SCRIPT))
    killed = subprocess.run(
        [sys.executable, str(script), "shard", str(demo_videos), str(out), *FLAGS, "--workers", "1"],
        capture_output=True,
        text=True,
        env=ONE_THREAD_ENV,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    finished = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    assert finished and list(out.glob("*.partial")), "one shard finished, one in progress when killed"
    assert not read_manifest(out)["complete"]

    stats = prep.run_shard(config(demo_videos, out))
    keys = [s.key for s in read_samples(out)]
    assert sorted(keys) == sorted(c.name for c in DEMO_CLIPS), "no loss, no duplicates"
    assert stats.skipped == sum(s["samples"] for s in read_states(out)[0].to_dict()["shards"][:1])
    assert all((out / name).read_bytes() == data for name, data in finished.items()), "finished shards kept"
    assert not list(out.glob("*.partial")) and read_manifest(out)["complete"]


def test_resume_after_an_exception(
    demo_videos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, calls = tmp_path / "out", []
    encode_batch = prep.encode_batch

    def interrupted(batch, enc):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return encode_batch(batch, enc)

    monkeypatch.setattr(prep, "encode_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prep.run_shard(config(demo_videos, out))
    assert len(read_samples(out)) == 3, "clips encoded before Ctrl-C are kept"
    monkeypatch.setattr(prep, "encode_batch", encode_batch)
    stats = prep.run_shard(config(demo_videos, out))
    assert (stats.skipped, stats.written) == (3, 3)
    keys = [s.key for s in read_samples(out)]
    assert sorted(keys) == sorted(c.name for c in DEMO_CLIPS)


def test_bad_inputs_are_rejected_with_reasons_and_good_ones_land(tmp_path: Path) -> None:
    videos = tmp_path / "bad"
    paths = make_bad_inputs(videos)
    shutil.copy(paths["rotated"], videos / "rotated.mov")  # same key as rotated.mp4
    out = tmp_path / "out"
    stats = prep.run_shard(config(videos, out, shard_size="1GB"))
    manifest = read_manifest(out)
    reasons = {r["source"]: r["reason"] for r in manifest["rejected"]}
    bad = [
        "zero_byte",
        "truncated",
        "truncated_index",
        "image",
        "audio_only",
        "three_frames",
        "tiny",
        "bad_caption",
    ]
    expected = {paths[name].name for name in bad} | {"rotated.mp4"}
    assert set(reasons) == expected
    assert all(reason.strip() for reason in reasons.values())
    assert "UTF-8" in reasons["bad_caption.mp4"] and "duplicate" not in reasons["bad_caption.mp4"]
    assert "rotated" in reasons["rotated.mp4"]
    written = {s.key for s in read_samples(out)}
    assert written == {sample_key(paths[n].name) for n in ("unicode_name", "variable_rate", "rotated")}
    assert stats.rejected["duplicate key"] == 1 and stats.rejected["caption"] == 1
    assert stats.rejected["too small"] == 2 and sum(stats.rejected.values()) == len(expected)
    assert manifest["complete"]


def test_user_start_frames_and_a_missing_one(tmp_path: Path, tiny_vae) -> None:
    videos, frames_dir = tmp_path / "videos", tmp_path / "start_frames"
    write_demo_clips(videos, DEMO_CLIPS[:2])
    frames_dir.mkdir()
    image = np.zeros((300, 500, 3), np.uint8)
    image[:, 250:] = (0, 200, 50)
    Image.fromarray(image).save(frames_dir / "beach_waves.png")
    out = tmp_path / "out"
    stats = prep.run_shard(config(videos, out, conditioning_dir=str(frames_dir)))
    (sample,) = read_samples(out)
    h, w, _ = sample.meta["bucket"]
    assert sample.meta["cond_source"] == "beach_waves.png"
    assert np.array_equal(sample.cond_image, load_start_frame(frames_dir / "beach_waves.png", h, w)[0])
    # A brought start frame is encoded by itself, not taken from the clip's first latent frame.
    cond = encode.encode_image(tiny_vae, sample.cond_image[None])[0].to(torch.bfloat16)
    assert torch.equal(cond, sample.cond_latents)
    assert not torch.allclose(sample.latents[:, :1].float(), cond.float(), atol=1e-2)
    (rejected,) = read_manifest(out)["rejected"]
    assert rejected["source"] == "city_night_portrait.mp4" and "start frame" in rejected["reason"]
    assert stats.rejected == Counter({"start frame": 1})


def test_two_ranks_then_merge(demo_videos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    env_flags = [*FLAGS, "--workers", "0", "--world-size", "2"]
    ranks = [run_cli("shard", str(demo_videos), str(out), *env_flags, "--rank", str(r)) for r in (0, 1)]
    for proc in ranks:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    os.remove(out / MANIFEST)  # merge must rebuild it from the ranks' states alone
    assert cli.main(["merge", str(out)]) == 0
    manifest = read_manifest(out)
    assert manifest["complete"]
    names = [s["name"] for s in manifest["shards"]]
    assert {n.split("-")[1] for n in names} == {"r0", "r1"}
    keys = [s.key for s in read_samples(out)]
    assert sorted(keys) == sorted(c.name for c in DEMO_CLIPS)


def test_a_caption_past_the_text_encoders_limit_is_reported_once_per_clip(tmp_path: Path, caplog) -> None:
    videos = tmp_path / "videos"
    write_demo_clips(videos, DEMO_CLIPS[:2])
    (videos / "beach_waves.txt").write_text("a cat walks across a sunny garden " * 120)
    prep.run_shard(config(videos, tmp_path / "out", workers=0))
    warnings = [r.getMessage() for r in caplog.records if "tokens; the text encoder reads" in r.getMessage()]
    assert len(warnings) == 1
    assert re.fullmatch(
        r"beach_waves\.mp4 \(clip beach_waves\): its caption is \d+ tokens; the text encoder reads 512 and "
        r"the rest is cut off: shorten it to keep all of it",
        warnings[0],
    )


def test_a_mapping_never_gives_one_video_anothers_caption(tmp_path: Path, capsys, caplog) -> None:
    videos = tmp_path / "videos"
    write_demo_clips(videos / "a", DEMO_CLIPS[:1])
    write_demo_clips(videos / "b", DEMO_CLIPS[:1])
    mapping = tmp_path / "captions.jsonl"
    mapping.write_text(json.dumps({"file_name": "beach_waves.mp4", "caption": "which beach?"}) + "\n")
    out = tmp_path / "out"
    flags = [*FLAGS, "--captions", f"jsonl:{mapping}"]
    assert cli.main(["shard", str(videos), str(out), *flags]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"longcat-prep shard: error: {mapping}: entry 'beach_waves.mp4' could be a/beach_waves.mp4 or "
        "b/beach_waves.mp4; write its path relative to the videos folder"
    )
    assert not out.exists(), "refused before anything was written"

    lines = [
        {"file_name": "a/beach_waves.mp4", "caption": "beach a"},
        {"file_name": "gone.mp4", "caption": "?"},
    ]
    mapping.write_text("".join(json.dumps(line) + "\n" for line in lines))
    prep.run_shard(config(videos, out, captions=f"jsonl:{mapping}"))
    assert {s.key: s.caption for s in read_samples(out)} == {"a__beach_waves": "beach a"}
    (rejected,) = read_manifest(out)["rejected"]
    assert (
        rejected["source"] == "b/beach_waves.mp4" and "no entry in the caption mapping" in rejected["reason"]
    )
    assert f"{mapping}: 1 entries match no video ('gone.mp4')" in caplog.text


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_the_vae_encoder_is_compiled_on_cuda_unless_turned_off(tmp_path, device, monkeypatch) -> None:
    compiled: list[torch.nn.Module] = []
    monkeypatch.setattr(encode, "compile_vae_encoder", lambda vae: compiled.append(vae) or vae)
    for flag in (True, False):
        cfg = config(tmp_path, tmp_path / "out", device=device, compile_vae=flag)
        enc = prep.encoder_factory(cfg).build(prep.encoding_device(cfg), prep.encoding_dtype(cfg))
        assert (enc.vae in compiled) == (flag and device == "cuda")
    assert cli.build_parser().parse_args(["shard", "v", "o", "--no-compile-vae"]).compile_vae is False
