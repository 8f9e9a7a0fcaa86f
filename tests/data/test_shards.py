"""The shard sample schema (longcat_data.shards): every member round-trips, the bytes keep their format,
and the header check validates members without decoding a tensor."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load

from longcat_data import shards
from longcat_data.shards import ShardSample


def sample(key: str = "clip_a", text: bool = True) -> ShardSample:
    gen = torch.Generator().manual_seed(0)
    return ShardSample(
        key=key,
        latents=torch.randn(16, 3, 4, 6, generator=gen),
        cond_latents=torch.randn(16, 1, 4, 6, generator=gen),
        cond_image=np.random.default_rng(0).integers(0, 255, (32, 48, 3), dtype=np.uint8),
        caption="un café ☕ au bord de l'eau",
        meta={"source": "clips/café.mp4", "bucket": [32, 48, 9], "crop": [0.5, 0.0, 47.5, 32.0]},
        text_embeds=torch.randn(5, 8, generator=gen) if text else None,
    )


@pytest.mark.parametrize(
    ("latents", "cond", "key"),
    [
        ((15, 3, 8, 8), (15, 1, 8, 8), "k"),
        ((16, 3, 8, 8), (16, 1, 8, 4), "k"),
        ((16, 3, 8, 8), (16, 1, 8, 8), "has.dot"),
        ((16, 3, 8, 8), (16, 1, 8, 8), "has space"),
    ],
)
def test_to_members_rejects_bad_shapes_and_keys(latents, cond, key) -> None:
    with pytest.raises(ValueError):
        ShardSample(
            key, torch.zeros(latents), torch.zeros(cond), np.zeros((8, 8, 3), np.uint8), "", {}
        ).to_members()


def test_every_member_round_trips() -> None:
    original = sample()
    back = ShardSample.from_members(original.to_members())
    assert back.key == original.key and back.caption == original.caption and back.meta == original.meta
    for name in ("latents", "cond_latents", "text_embeds"):
        stored, given = getattr(back, name), getattr(original, name)
        assert stored.dtype == torch.bfloat16 and torch.equal(stored, given.to(torch.bfloat16)), name
    assert back.cond_image.dtype == np.uint8 and np.array_equal(back.cond_image, original.cond_image)
    assert ShardSample.from_members(sample(text=False).to_members()).text_embeds is None


def test_members_keep_the_on_disk_format() -> None:
    original = sample()
    members = original.to_members()
    assert members["__key__"] == "clip_a"
    assert set(members) == {
        "__key__",
        "latents.safetensors",
        "cond.safetensors",
        "cond.png",
        "txt",
        "t5.safetensors",
        "json",
    }
    assert all(isinstance(v, bytes) for k, v in members.items() if k != "__key__")
    assert list(load(members["latents.safetensors"])) == ["latents"]
    assert list(load(members["cond.safetensors"])) == ["cond_latents"]
    assert list(load(members["t5.safetensors"])) == ["embeds"]
    assert members["txt"] == original.caption.encode("utf-8")
    assert members["json"] == json.dumps(original.meta, ensure_ascii=False, sort_keys=True).encode("utf-8")
    with Image.open(io.BytesIO(members["cond.png"])) as image:
        assert image.format == "PNG" and image.mode == "RGB"
    assert "t5.safetensors" not in sample(text=False).to_members()


def test_check_members_reads_the_shape_without_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    members = sample().to_members()
    monkeypatch.setattr(shards, "load_safetensors", lambda _: pytest.fail("a tensor was decoded"))
    assert ShardSample.check_members(members) == (16, 3, 4, 6)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda m: m.update({"latents.safetensors": m["latents.safetensors"][:-10]}), "bytes, header says"),
        (
            lambda m: m.update({"latents.safetensors": m["latents.safetensors"][:5]}),
            "shorter than its header",
        ),
        (lambda m: m.update({"cond.safetensors": b"\xff" * 8 + b"{}"}), "header runs past the end"),
        (lambda m: m.pop("latents.safetensors"), "missing latents.safetensors"),
        (lambda m: m.update({"cond.safetensors": m["t5.safetensors"]}), "has no tensor 'cond_latents'"),
        (lambda m: [m.pop("t5.safetensors"), m.pop("txt")], "neither t5.safetensors nor a caption"),
    ],
)
def test_check_members_rejects_damaged_members(damage, message: str) -> None:
    members = sample().to_members()
    damage(members)
    with pytest.raises(ValueError, match=message):
        ShardSample.check_members(members)


def test_check_members_compares_the_start_frame_latents_only_when_asked() -> None:
    members = sample().to_members()
    members["cond.safetensors"] = ShardSample(
        "k", torch.zeros(16, 1, 4, 4), torch.zeros(16, 1, 4, 4), np.zeros((8, 8, 3), np.uint8), "", {}
    ).to_members()["cond.safetensors"]
    with pytest.raises(ValueError, match="do not match latents"):
        ShardSample.check_members(members)
    del members["cond.safetensors"]
    assert ShardSample.check_members(members, need_cond=False) == (16, 3, 4, 6)


def test_decode_tensors_leaves_the_image_alone() -> None:
    members = sample().to_members()
    members["cond.png"] = b"not a png"
    tensors = shards.decode_tensors(members)
    assert set(tensors) == {"latents", "cond_latents", "text_embeds"}
    assert tensors["latents"].shape == (16, 3, 4, 6)
