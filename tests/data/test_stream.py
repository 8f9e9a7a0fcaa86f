import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from webdataset import TarWriter

from longcat_data import stream
from longcat_data.manifest import find_manifest
from longcat_data.shards import ShardError, ShardSample
from longcat_data.stream import ShardStream, StreamConfig

ENCODERS = {"model": "tiny", "vae": "AutoencoderKLWan"}


def clip(key: str, shape=(16, 2, 2, 3), embeds: bool = True, value: float | None = None) -> dict:
    fill = float(int(key.rsplit("_", 1)[-1])) if value is None else value
    latents = torch.full(shape, fill)
    return ShardSample(
        key,
        latents,
        latents[:, :1].clone(),
        np.zeros((16, 16, 3), np.uint8),
        f"caption of {key}",
        {"bucket": [shape[2] * 8, shape[3] * 8, 1 + 4 * (shape[1] - 1)], "encoders": ENCODERS},
        torch.ones(3, 8) if embeds else None,
    ).to_members()


def write_shard(path: Path, samples: list[dict]) -> Path:
    with TarWriter(str(path), encoder=False) as tar:
        for s in samples:
            tar.write({k: v.encode() if isinstance(v, str) and k != "__key__" else v for k, v in s.items()})
    return path


def make_shards(directory: Path, n_shards: int, per_shard: int, **kw) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    urls = []
    for i in range(n_shards):
        samples = [clip(f"c_{i * per_shard + j}", **kw) for j in range(per_shard)]
        urls.append(str(write_shard(directory / f"train-{i:06d}.tar", samples)))
    return urls


def keys_of(batches) -> list[tuple[str, ...]]:
    return [tuple(b["keys"]) for b in batches]


def take(dataset, n: int, workers: int = 0) -> list[dict]:
    loader = stream.make_loader(dataset, num_workers=workers, pin_memory=False)
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


# ---------------------------------------------------------------- spec expansion


def test_expand_directory_brace_list_pipe(tmp_path):
    urls = make_shards(tmp_path / "d", 3, 1)
    assert stream.expand_shard_spec(str(tmp_path / "d")) == urls
    assert stream.expand_shard_spec(str(tmp_path / "d" / "train-{000000..000002}.tar")) == urls
    assert stream.expand_shard_spec(str(tmp_path / "d" / "train-*.tar")) == urls
    assert stream.expand_shard_spec(urls[:2]) == urls[:2]
    assert stream.expand_shard_spec(f"{urls[0]}::{urls[2]}") == [urls[0], urls[2]]
    piped = stream.expand_shard_spec("pipe:cat /x/train-{0..1}.tar")
    assert piped == ["pipe:cat /x/train-0.tar", "pipe:cat /x/train-1.tar"]


def test_directory_with_manifest_reads_only_listed_shards(tmp_path):
    urls = make_shards(tmp_path, 2, 1)
    (tmp_path / "train-000002.tar.partial").write_bytes(b"")
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": [{"name": "train-000001.tar"}]}))
    assert stream.expand_shard_spec(str(tmp_path)) == [urls[1]]
    assert find_manifest(urls)["shards"][0]["name"] == "train-000001.tar"


def test_bad_specs_are_clear_errors(tmp_path):
    with pytest.raises(ShardError, match="no shards"):
        stream.expand_shard_spec([])
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "a.mp4").write_bytes(b"")
    with pytest.raises(ShardError, match="longcat-prep shard"):
        stream.expand_shard_spec(str(tmp_path / "videos"))
    with pytest.raises(ShardError, match="does not exist"):
        stream.expand_shard_spec(str(tmp_path / "train-{0..3}.tar"))
    with pytest.raises(ShardError, match="empty shard list"):
        ShardStream([], StreamConfig())


def test_hf_spec_goes_to_the_hub_resolver(monkeypatch):
    seen = []
    monkeypatch.setattr(stream, "resolve_hf_shards", lambda spec: seen.append(spec) or ["pipe:curl x"])
    assert stream.expand_shard_spec("hf://datasets/user/clips") == ["pipe:curl x"]
    assert stream.expand_shard_spec("user/clips") == ["pipe:curl x"]
    assert seen == ["hf://datasets/user/clips", "user/clips"]


# ---------------------------------------------------------------- order, buckets, splitting


def test_batches_hold_one_bucket_and_tensors_decode(tmp_path):
    small = [clip(f"s_{i}") for i in range(5)]
    big = [clip(f"b_{i}", shape=(16, 2, 4, 3)) for i in range(5)]
    url = write_shard(tmp_path / "mixed.tar", [x for pair in zip(small, big, strict=True) for x in pair])
    batches = take(ShardStream([str(url)], StreamConfig(batch_size=2, shuffle_buffer=4)), 8)
    for b in batches:
        assert len({k[0] for k in b["keys"]}) == 1
        assert b["latents"].shape[0] == 2 and b["latents"].dtype == torch.bfloat16
        assert b["cond_latents"].shape == (2, 16, 1, *b["latents"].shape[3:])
        assert b["embeds"].shape == (2, 3, 8) and b["embeds_mask"].sum() == 6
        for key, lat in zip(b["keys"], b["latents"], strict=True):
            assert lat.flatten()[0].item() == int(key.split("_")[1])
    assert {b["latents"].shape[3] for b in batches} == {2, 4}


def test_order_is_a_function_of_the_seed(tmp_path):
    urls = make_shards(tmp_path, 4, 5)
    a = keys_of(take(ShardStream(urls, StreamConfig(seed=1)), 40))
    b = keys_of(take(ShardStream(urls, StreamConfig(seed=1)), 40))
    c = keys_of(take(ShardStream(urls, StreamConfig(seed=2)), 40))
    assert a == b and a != c
    # Without a sample shuffle buffer passes are exact: each sample once per pass, shard order reshuffled.
    passes = keys_of(take(ShardStream(urls, StreamConfig(seed=1, shuffle_buffer=1)), 40))
    assert set(Counter(passes[:20]).values()) == {1} and set(Counter(passes[20:]).values()) == {1}
    assert passes[:20] != passes[20:]


@pytest.mark.parametrize("n_shards", [8, 1])
def test_ranks_and_workers_read_disjoint_shares(tmp_path, n_shards):
    """8 shards: split by shard over 2 ranks x 2 workers; 1 shard: split by sample."""
    urls = make_shards(tmp_path, n_shards, 16 // n_shards)
    seen = []
    for rank in range(2):
        batches = take(
            ShardStream(urls, StreamConfig(rank=rank, world_size=2, shuffle_buffer=2)), 4, workers=2
        )
        seen.append([k for b in batches for k in b["keys"]])
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == 8


def test_resampled_is_infinite_and_deterministic(tmp_path):
    urls = make_shards(tmp_path, 2, 2)
    cfg = StreamConfig(resampled=True, seed=3)
    a = keys_of(take(ShardStream(urls, cfg), 30))
    assert a == keys_of(take(ShardStream(urls, cfg), 30))
    assert len(set(a)) == 4


# ---------------------------------------------------------------- exact resume


@pytest.mark.parametrize("workers", [0, 3])
@pytest.mark.parametrize("resampled", [False, True])
def test_resume_continues_exactly(tmp_path, workers, resampled):
    urls = make_shards(tmp_path, 3, 7)
    cfg = StreamConfig(batch_size=2, seed=5, resampled=resampled, shuffle_buffer=5)
    full = keys_of(take(ShardStream(urls, cfg), 30, workers))
    for k in (1, 7, 11):
        resumed = keys_of(take(ShardStream(urls, cfg, start_batch=k), 30 - k, workers))
        assert resumed == full[k:], k


def test_resume_skips_without_decoding(tmp_path, monkeypatch):
    urls = make_shards(tmp_path, 2, 10)
    calls = []
    real = stream.decode_batch
    monkeypatch.setattr(stream, "decode_batch", lambda b, c: calls.append(1) or real(b, c))
    take(ShardStream(urls, StreamConfig(), start_batch=15), 3)
    assert len(calls) == 3


def test_logical_worker_rotation():
    # Resuming at batch 5 with 3 workers: slot 0 must produce global batch 5, i.e. logical worker 2,
    # which made batches 2 (done) and 5 (next): one done.
    assert stream.logical_worker(0, 3, 5) == (2, 1)
    assert stream.logical_worker(1, 3, 5) == (0, 2)
    assert stream.logical_worker(2, 3, 5) == (1, 2)
    assert stream.logical_worker(0, 1, 9) == (0, 9)


# ---------------------------------------------------------------- bad data


def test_corrupt_member_is_skipped_and_counted(tmp_path):
    samples = [clip(f"c_{i}") for i in range(6)]
    samples[2]["latents.safetensors"] = samples[2]["latents.safetensors"][:-10]  # truncated
    samples[4]["cond.safetensors"] = b"garbage"
    url = write_shard(tmp_path / "bad.tar", samples)
    batches = take(ShardStream([str(url)], StreamConfig(shuffle_buffer=1)), 8)
    keys = {k for b in batches for k in b["keys"]}
    assert keys == {"c_0", "c_1", "c_3", "c_5"}
    assert batches[-1]["skipped"] >= 2


def test_truncated_tar_keeps_the_whole_samples(tmp_path):
    url = write_shard(tmp_path / "t.tar", [clip(f"c_{i}") for i in range(4)])
    data = Path(url).read_bytes()
    Path(url).write_bytes(data[: len(data) * 3 // 5])
    batches = take(ShardStream([str(url)], StreamConfig(shuffle_buffer=1)), 6)
    keys = {k for b in batches for k in b["keys"]}
    assert 1 <= len(keys) < 4 and batches[-1]["skipped"] >= 1


def test_shards_without_samples_raise_instead_of_hanging(tmp_path):
    url = write_shard(tmp_path / "empty.tar", [])
    with pytest.raises(ShardError, match="no readable sample"):
        take(ShardStream([str(url)], StreamConfig()), 1)


def test_longer_clip_or_other_encoder_in_a_sample_is_refused(tmp_path):
    url = str(write_shard(tmp_path / "a.tar", [clip("c_0")]))
    assert take(ShardStream([url], StreamConfig(max_latent_frames=2)), 1)
    with pytest.raises(ShardError, match="2 latent frames, more than the config's 1"):
        take(ShardStream([url], StreamConfig(max_latent_frames=1)), 1)
    with pytest.raises(ShardError, match="other encoders"):
        take(ShardStream([url], StreamConfig(encoders={"model": "x"})), 1)


# ---------------------------------------------------------------- text embeddings absent from shards


def test_captions_encoded_into_a_cache_when_shards_lack_embeddings(tmp_path):
    url = str(write_shard(tmp_path / "a.tar", [clip(f"c_{i}", embeds=False) for i in range(3)]))
    captions = stream.captions_without_embeds([url])
    assert captions == [f"caption of c_{i}" for i in range(3)]
    with pytest.raises(ShardError, match="no t5.safetensors"):
        take(ShardStream([url], StreamConfig()), 1)
    cache = stream.write_text_cache(
        tmp_path / "text.safetensors", {c: torch.full((i + 1, 8), i) for i, c in enumerate(captions)}
    )
    batches = take(ShardStream([url], StreamConfig(batch_size=3), text_cache=cache), 1, workers=1)
    b = batches[0]
    for caption, emb, mask in zip(b["captions"], b["embeds"], b["embeds_mask"], strict=True):
        i = int(caption[-1])
        assert mask.sum() == i + 1 and (emb[: i + 1] == i).all()


# ---------------------------------------------------------------- damaged tar headers


def shard_with_manifest(directory: Path, n: int) -> Path:
    url = Path(write_shard(directory / "train-000000.tar", [clip(f"c_{i}") for i in range(n)]))
    (directory / "manifest.json").write_text(json.dumps({"shards": [{"name": url.name, "samples": n}]}))
    return url


def header_offset(url: Path, member: str) -> int:
    with tarfile.open(url) as tar:
        return tar.getmember(member).offset_data - 512


def trained_keys(url: Path, good: int) -> tuple[set[str], int]:
    """Keys of one pass over the shard, and what the reader counts as lost in that pass (read at the
    first batch of the next pass, once the damage has been reported)."""
    batches = take(ShardStream([str(url)], StreamConfig(shuffle_buffer=1)), good + 1)
    return {k for b in batches[:good] for k in b["keys"]}, batches[-1]["skipped"]


def test_a_damaged_header_loses_only_its_member(tmp_path):
    url = shard_with_manifest(tmp_path, 6)
    data = bytearray(url.read_bytes())
    data[header_offset(url, "c_2.latents.safetensors") + 20] ^= 0xFF  # its checksum no longer adds up
    url.write_bytes(bytes(data))
    keys, skipped = trained_keys(url, 5)
    assert keys == {"c_0", "c_1", "c_3", "c_4", "c_5"}, "the samples after the damage are read"
    assert skipped == 1, "c_2, incomplete without its latents"


def test_a_sample_wiped_out_is_counted_from_the_manifest(tmp_path, caplog):
    url = shard_with_manifest(tmp_path, 6)
    data = bytearray(url.read_bytes())
    start, end = header_offset(url, "c_2.cond.png"), header_offset(url, "c_3.cond.png")
    data[start:end] = bytes(end - start)  # zeroed, like a lost disk block
    url.write_bytes(bytes(data))
    keys, skipped = trained_keys(url, 5)
    assert keys == {"c_0", "c_1", "c_3", "c_4", "c_5"} and skipped == 1
    assert f"{url}: damaged between bytes {start} and {end}, read on after it; 1 samples lost" in caplog.text


def test_a_cut_off_shard_reports_the_samples_it_lost(tmp_path):
    url = shard_with_manifest(tmp_path, 6)
    data = url.read_bytes()
    url.write_bytes(data[: header_offset(url, "c_3.latents.safetensors") + 700])
    keys, skipped = trained_keys(url, 3)
    assert keys == {"c_0", "c_1", "c_2"}
    assert skipped == 3, "c_3 cut short, c_4 and c_5 never read"
