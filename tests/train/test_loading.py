"""DiT checkpoints in the official layout: save sharded, load strict and streamed, resolve dirs and hub ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from longcat_data.flags import parse_size
from longcat_train.dit_config import DiTConfig
from longcat_train.loading import (
    INDEX_NAME,
    load_dit,
    resolve_dit_dir,
    save_official_layout,
    save_tiny_checkpoint,
    tiny_dit,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k].to(sa[k].dtype)) for k in sa)


def _copy_dit(checkpoint: Path, tmp_path: Path) -> Path:
    dit = tmp_path / "dit"
    dit.mkdir()
    for file in (checkpoint / "dit").iterdir():
        (dit / file.name).write_bytes(file.read_bytes())
    return dit


def test_tiny_checkpoint_has_the_official_layout(checkpoint: Path) -> None:
    assert {p.name for p in checkpoint.iterdir()} >= {"dit", "vae", "text_encoder", "tokenizer"}
    dit = checkpoint / "dit"
    index = json.loads((dit / INDEX_NAME).read_text())
    shards = sorted(p.name for p in dit.glob("*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    assert shards[0] == f"diffusion_pytorch_model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"]) == set(tiny_dit().state_dict())
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for p in dit.glob("*.safetensors") for t in load_file(p).values()
    )
    config = json.loads((dit / "config.json").read_text())
    assert config["_class_name"] == "LongCatVideoTransformer3DModel"
    assert DiTConfig.from_dict(config) == DiTConfig.tiny()


def test_load_back_strict_from_dir_and_from_dit_folder(checkpoint: Path) -> None:
    reference = tiny_dit()
    from_root = load_dit(str(checkpoint), dtype=torch.float32)
    from_dit = load_dit(str(checkpoint / "dit"), dtype=torch.float32)
    assert _same_weights(from_root, reference) and _same_weights(from_dit, reference)
    assert not any(p.is_meta for p in from_root.parameters())
    assert all(p.requires_grad for p in from_root.parameters())


def test_load_casts_as_it_reads(checkpoint: Path) -> None:
    dit = load_dit(str(checkpoint), dtype=torch.bfloat16)
    assert {p.dtype for p in dit.parameters()} == {torch.bfloat16}
    assert _same_weights(dit, tiny_dit().to(torch.bfloat16))


def test_tiny_is_seeded_and_does_not_touch_the_global_rng() -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = load_dit("tiny", dtype=torch.float32)
    after = torch.rand(1)
    assert torch.equal(before, after)
    assert _same_weights(a, load_dit("tiny", dtype=torch.float32))


def test_missing_key_is_reported(checkpoint: Path, tmp_path: Path) -> None:
    dit = _copy_dit(checkpoint, tmp_path)
    shard = next(dit.glob("*00002-of-*.safetensors"))
    tensors = load_file(shard)
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, shard)
    with pytest.raises(ValueError, match=rf"1 missing: {dropped}"):
        load_dit(str(dit))


def test_unexpected_duplicated_and_misshaped_keys_are_reported(checkpoint: Path, tmp_path: Path) -> None:
    dit = _copy_dit(checkpoint, tmp_path)
    first, second = sorted(dit.glob("*.safetensors"))[:2]
    tensors = load_file(second)
    name = sorted(tensors)[0]
    extra = {
        "blocks.0.attn.rope.freqs": torch.zeros(4),  # a key the model does not have
        name: tensors[name],  # the same key in a second file
    }
    first_tensors = load_file(first) | extra
    bad = sorted(k for k in first_tensors if k.endswith("q_norm.weight"))[0]
    first_tensors[bad] = torch.ones(3)
    save_file(first_tensors, first)
    with pytest.raises(ValueError) as error:
        load_dit(str(dit))
    message = str(error.value)
    assert "1 unexpected: blocks.0.attn.rope.freqs" in message
    assert f"1 in several files: {name}" in message
    assert f"1 wrong shape: {bad}: (3,)" in message


def test_save_official_layout_shards_by_size(tmp_path: Path) -> None:
    model = tiny_dit()
    save_official_layout(model, tmp_path / "one", max_shard_size="1GB")
    save_official_layout(model, tmp_path / "many", max_shard_size=200_000)
    assert len(list((tmp_path / "one").glob("*.safetensors"))) == 1
    many = list((tmp_path / "many").glob("*.safetensors"))
    largest_tensor = max(t.numel() * 4 for t in model.state_dict().values())
    assert len(many) > 5
    assert all(p.stat().st_size < max(200_000, largest_tensor) + 10_000 for p in many)
    assert _same_weights(load_dit(str(tmp_path / "many"), dtype=torch.float32), model)


def test_hub_id_downloads_only_the_dit(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_snapshot_download(repo_id: str, allow_patterns: list[str], **_: object) -> str:
        calls.append((repo_id, allow_patterns))
        return str(checkpoint)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    assert resolve_dit_dir("someone/LongCat-Video") == checkpoint / "dit"
    assert calls == [("someone/LongCat-Video", ["dit/*"])]


def test_parse_size() -> None:
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500 MB") == 500 * 10**6
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size(1234) == 1234
    with pytest.raises(ValueError):
        parse_size("big")
