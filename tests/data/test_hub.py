"""Hub round trip without a network: card + layout read back by `datasets`, upload seam, hf:// resolution."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import webdataset as wds
import yaml
from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
from PIL import Image
from safetensors.torch import save

from longcat_data import cli, hub, stream
from longcat_data.demo import CLIP_ENCODING, synthetic_frames
from longcat_data.files import write_json_atomic
from longcat_data.manifest import StreamState, state_path
from longcat_data.video import write_mp4

ENCODERS = {"vae": "tiny-vae@0", "text_encoder": "tiny-umt5@0"}


def _sample(key: str, h: int, w: int, frames: int, encoders: dict) -> dict:
    t = 1 + (frames - 1) // 4
    png = io.BytesIO()
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(png, format="PNG")
    return {
        "__key__": key,
        "latents.safetensors": save({"latents": torch.zeros(16, t, h // 8, w // 8, dtype=torch.bfloat16)}),
        "cond.safetensors": save({"cond_latents": torch.zeros(16, 1, h // 8, w // 8, dtype=torch.bfloat16)}),
        "cond.png": png.getvalue(),
        "txt": f"caption of {key}",
        "json": {"source": f"{key}.mp4", "bucket": [h, w, frames], "encoders": encoders},
    }


def make_out_dir(out: Path, *, shards: int = 2, per_shard: int = 3, complete: bool = True) -> dict:
    """An output dir in the design.md layout, written with webdataset.TarWriter."""
    out.mkdir(parents=True, exist_ok=True)
    listed, buckets = [], {}
    for s in range(shards):
        name = f"train-{s:06d}.tar"
        with wds.TarWriter(str(out / name)) as sink:
            for i in range(per_shard):
                h, w, f = (32, 64, 9) if i % 2 == 0 else (64, 32, 5)
                sink.write(_sample(f"clip{s}_{i}", h, w, f, ENCODERS))
                buckets[f"{h}x{w}x{f}"] = buckets.get(f"{h}x{w}x{f}", 0) + 1
        listed.append({"name": name, "samples": per_shard, "bytes": (out / name).stat().st_size})
    manifest = {
        "version": 1,
        "settings": {"frames": 9},
        "encoders": ENCODERS,
        "shards": listed,
        "buckets": buckets,
        "rejected": [{"source": "bad.mp4", "reason": "too short: 3 frames"}],
        "complete": complete,
    }
    (out / hub.MANIFEST).write_text(json.dumps(manifest))
    return manifest


class FakeUploadApi:
    """The HfApi methods a push calls, recording their arguments."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id: str, **kw) -> None:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kw}))

    def upload_folder(self, **kw) -> None:
        self.calls.append(("upload_folder", kw))


class FakeLargeUploadApi(FakeUploadApi):
    def upload_large_folder(self, **kw) -> None:
        self.calls.append(("upload_large_folder", kw))


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


def test_push_uploads_shards_manifest_and_card(tmp_path: Path) -> None:
    manifest = make_out_dir(tmp_path / "out")
    (tmp_path / "out" / "train-000002.tar.partial").write_bytes(b"partial")  # an unfinished shard stays local
    api = FakeUploadApi()
    uploaded = hub.push_dataset(tmp_path / "out", "me/clips", private=True, license="cc-by-4.0", api=api)

    assert api.calls[0] == (
        "create_repo",
        {"repo_id": "me/clips", "repo_type": "dataset", "private": True, "exist_ok": True},
    )
    name, kw = api.calls[1]
    assert name == "upload_folder"
    assert Path(kw["folder_path"]) == tmp_path / "out"
    assert kw["repo_id"] == "me/clips" and kw["repo_type"] == "dataset"
    assert (
        kw["allow_patterns"]
        == uploaded
        == ["manifest.json", "README.md", "train-000000.tar", "train-000001.tar"]
    )

    card = (tmp_path / "out" / "README.md").read_text()
    meta = front_matter(card)
    assert meta["license"] == "cc-by-4.0"
    assert meta["configs"] == [
        {"config_name": "default", "data_files": [{"split": "train", "path": "train-*.tar"}]}
    ]
    assert "longcat-train --shards hf://datasets/me/clips" in card
    assert all(f"`{k}`: `{v}`" in card for k, v in ENCODERS.items())
    assert "| 32 | 64 | 9 | 4 |" in card and "| 64 | 32 | 5 | 2 |" in card
    assert "6 clips in 2 WebDataset shards" in card and f"{4 * 9 + 2 * 5} video frames" in card
    assert manifest["rejected"] and "1 inputs were rejected" in card


def test_contact_sheet_goes_up_and_onto_the_card(tmp_path: Path) -> None:
    make_out_dir(tmp_path / "out")
    Image.new("RGB", (8, 8)).save(tmp_path / "out" / "contact_sheet.png")
    uploaded = hub.push_dataset(tmp_path / "out", "me/clips", dry_run=True)
    assert "contact_sheet.png" in uploaded
    assert "![start frames and captions](contact_sheet.png)" in (tmp_path / "out" / "README.md").read_text()


def test_push_prefers_upload_large_folder_when_the_client_has_it(tmp_path: Path) -> None:
    make_out_dir(tmp_path / "out")
    api = FakeLargeUploadApi()
    hub.push_dataset(tmp_path / "out", "me/clips", api=api)
    name, kw = api.calls[1]
    assert name == "upload_large_folder"
    assert kw["repo_type"] == "dataset" and "README.md" in kw["allow_patterns"]


def test_dry_run_writes_the_card_and_uploads_nothing(tmp_path: Path) -> None:
    make_out_dir(tmp_path / "out")
    api = FakeUploadApi()
    hub.push_dataset(tmp_path / "out", "me/clips", dry_run=True, api=api)
    assert api.calls == []
    assert (tmp_path / "out" / "README.md").is_file()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda out: (out / "manifest.json").unlink(), "no manifest.json"),
        (lambda out: make_out_dir(out, complete=False), "not complete"),
        (lambda out: (out / "train-000001.tar").unlink(), "not on disk"),
        (lambda out: (out / "train-000009.tar").write_bytes(b""), "not in manifest.json"),
    ],
)
def test_push_refuses_unfinished_or_unclear_dirs(tmp_path: Path, damage, message: str) -> None:
    out = tmp_path / "out"
    make_out_dir(out)
    damage(out)
    with pytest.raises(hub.PushError, match=message):
        hub.push_dataset(out, "me/clips", api=FakeUploadApi())
    assert not (out / "README.md").exists()


def test_push_refuses_mixed_encoders(tmp_path: Path) -> None:
    out = tmp_path / "out"
    manifest = make_out_dir(out, shards=1)
    # A second run with other encoders appended its shard and rewrote the manifest to include it.
    with wds.TarWriter(str(out / "train-000001.tar")) as sink:
        sink.write(_sample("other", 32, 64, 9, {"vae": "real-vae@1", "text_encoder": "umt5-xxl@1"}))
    manifest["shards"].append({"name": "train-000001.tar", "samples": 1})
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(hub.PushError, match="mixes encoders"):
        hub.push_dataset(out, "me/clips", api=FakeUploadApi())


def test_push_refuses_writers_with_different_encoders(tmp_path: Path) -> None:
    out = tmp_path / "out"
    make_out_dir(out)
    for rank, encoders in enumerate([ENCODERS, {**ENCODERS, "vae": "real-vae@1"}]):
        state = StreamState(f"train-r{rank}", rank, 2, "listing", {"frames": 9}, encoders, complete=True)
        write_json_atomic(state_path(out, state.stream), state.to_dict())
    with pytest.raises(hub.PushError, match="mixes encoders or settings"):
        hub.push_dataset(out, "me/clips", api=FakeUploadApi())


def test_card_layout_loads_with_datasets_webdataset(tmp_path: Path) -> None:
    """The card's configs make `load_dataset(<repo>)` stream the webdataset samples; a local folder with
    the same README reads the same way, so this is what the hub does with the pushed repo."""
    from datasets import load_dataset

    out = tmp_path / "out"
    make_out_dir(out)
    hub.push_dataset(out, "me/clips", dry_run=True)
    pattern = front_matter((out / "README.md").read_text())["configs"][0]["data_files"][0]["path"]

    explicit = load_dataset(
        "webdataset", data_files={"train": str(out / pattern)}, split="train", streaming=True
    )
    via_card = load_dataset(str(out), split="train", streaming=True)
    for ds in (explicit, via_card):
        rows = list(ds)
        assert sorted(r["__key__"] for r in rows) == sorted(
            f"clip{s}_{i}" for s in range(2) for i in range(3)
        )
        first = rows[0]
        assert first["txt"] == f"caption of {first['__key__']}"
        assert first["json"]["encoders"] == ENCODERS
        assert isinstance(first["latents.safetensors"], bytes)
        assert first["cond.png"].size == (64, 32)


class FakeListingApi:
    """A hub dataset repo as a file listing, a commit and a manifest on disk."""

    def __init__(
        self, files: list[str], manifest: Path | None = None, sha: str = "c0ffee" * 6 + "abcd"
    ) -> None:
        self.files, self.manifest, self.sha = files, manifest, sha
        self.asked: dict = {}

    def dataset_info(self, repo_id: str, revision: str | None = None) -> SimpleNamespace:
        self.asked["info"] = (repo_id, revision)
        return SimpleNamespace(sha=self.sha)

    def list_repo_files(self, repo_id: str, repo_type: str, revision: str) -> list[str]:
        self.asked["list"] = (repo_id, repo_type, revision)
        return self.files

    def hf_hub_download(self, repo_id: str, filename: str, repo_type: str, revision: str) -> str:
        self.asked["download"] = (repo_id, filename, repo_type, revision)
        assert self.manifest is not None
        return str(self.manifest)


@pytest.mark.parametrize(
    ("spec", "repo", "rev", "sub"),
    [
        ("me/clips", "me/clips", None, ""),
        ("me/clips@v1", "me/clips", "v1", ""),
        ("hf://datasets/me/clips", "me/clips", None, ""),
        ("hf://datasets/me/clips@refs%2Fpr%2F2/part-a/", "me/clips", "refs%2Fpr%2F2", "part-a"),
        ("hf://datasets/org.x/my_data-2/a/b", "org.x/my_data-2", None, "a/b"),
    ],
)
def test_parse_hf_spec(spec: str, repo: str, rev: str | None, sub: str) -> None:
    assert hub.parse_hf_spec(spec) == hub.HubSpec(repo, rev, sub)
    assert hub.is_hf_spec(spec)


@pytest.mark.parametrize("spec", ["hf://models/me/clips", "me", "/data/shards", "me/clips/sub"])
def test_parse_hf_spec_rejects_non_datasets(spec: str) -> None:
    with pytest.raises(ValueError):
        hub.parse_hf_spec(spec)


def test_resolve_orders_by_manifest_and_pins_the_commit(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    manifest = tmp_path / "manifest.json"
    manifest.write_text(
        json.dumps({"complete": True, "shards": [{"name": "train-000010.tar"}, {"name": "train-000002.tar"}]})
    )
    files = [
        "README.md",
        "sub/manifest.json",
        "sub/train-000002.tar",
        "sub/train-000010.tar",
        "train-000000.tar",
    ]
    api = FakeListingApi(files, manifest)

    urls = hub.resolve_hf_shards("hf://datasets/me/clips@main/sub", api=api)

    assert api.asked["info"] == ("me/clips", "main")
    assert api.asked["list"] == ("me/clips", "dataset", api.sha)
    assert api.asked["download"] == ("me/clips", "sub/manifest.json", "dataset", api.sha)
    assert urls == [
        f'pipe:curl -s -S -L -f --retry 3 -H "Authorization: Bearer $HF_TOKEN" '
        f"https://huggingface.co/datasets/me/clips/resolve/{api.sha}/sub/{name}"
        for name in ("train-000010.tar", "train-000002.tar")
    ]
    assert all("hf_secret_value" not in url for url in urls)


def test_resolve_without_manifest_lists_tars_in_name_order_anonymously(monkeypatch) -> None:
    monkeypatch.setattr(hub, "get_token", lambda: None)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    api = FakeListingApi(["train-000001.tar", "README.md", "train-000000.tar", "old/train-000000.tar"])
    urls = hub.resolve_hf_shards("me/clips", api=api)
    assert api.asked["info"] == ("me/clips", None)
    assert [u.rsplit("/", 1)[1] for u in urls] == ["train-000000.tar", "train-000001.tar"]
    assert all("Authorization" not in u for u in urls)


def test_token_from_login_reaches_the_pipe_environment(monkeypatch) -> None:
    # setenv first so the teardown removes the variable the resolver sets
    monkeypatch.setenv("HF_TOKEN", "unset-me")
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(hub, "get_token", lambda: "hf_from_login")
    urls = hub.resolve_hf_shards("me/clips", api=FakeListingApi(["train-000000.tar"]))
    assert "$HF_TOKEN" in urls[0] and "hf_from_login" not in urls[0]
    assert os.environ["HF_TOKEN"] == "hf_from_login"


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (RepositoryNotFoundError, "no such local folder, and no dataset me/clips"),
        (RevisionNotFoundError, "no revision 'v9'"),
    ],
)
def test_resolve_names_a_missing_repo_or_revision(error: type, message: str) -> None:
    class Missing(FakeListingApi):
        def dataset_info(self, repo_id: str, revision: str | None = None) -> SimpleNamespace:
            raise error("404", response=SimpleNamespace(headers={}, request=None))

    with pytest.raises(ValueError, match=message):
        hub.resolve_hf_shards("me/clips@v9", api=Missing([]))


def test_resolve_refuses_a_half_uploaded_repo(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.json"
    manifest.write_text(
        json.dumps({"complete": True, "shards": [{"name": "train-000000.tar"}, {"name": "train-000001.tar"}]})
    )
    api = FakeListingApi(["manifest.json", "train-000000.tar"], manifest)
    with pytest.raises(ValueError, match="not in the repo"):
        hub.resolve_hf_shards("me/clips", api=api)


# ---------------------------------------------------------------- round trip with shards from longcat-prep


@pytest.fixture(scope="module")
def prepped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards written by `longcat-prep shard --model tiny` from three small captioned clips, one per shard."""
    root = tmp_path_factory.mktemp("prep")
    videos = root / "videos"
    videos.mkdir()
    for name, (h, w), seed in [("a", (64, 96), 1), ("b", (96, 64), 2), ("c", (64, 64), 3)]:
        write_mp4(synthetic_frames(h, w, 9, seed=seed), videos / f"{name}.mp4", fps=8, **CLIP_ENCODING)
        (videos / f"{name}.txt").write_text(f"clip {name} moves")
    args = ["shard", str(videos), str(root / "out"), "--model", "tiny", "--area", "64x64", "--frames", "5"]
    assert cli.main([*args, "--workers", "0", "--shard-size", "1KB"]) == 0
    return root / "out"


class FakeHub:
    """A dataset repo on disk: uploads copy the allowed files under resolve/<commit>/, where the
    hub's file URLs point once HUGGINGFACE_CO_URL_TEMPLATE is a file:// template."""

    def __init__(self, root: Path) -> None:
        self.root, self.sha = root, "0123456789abcdef" * 2 + "01234567"

    def repo_dir(self, repo_id: str) -> Path:
        return self.root / "datasets" / repo_id / "resolve" / self.sha

    def create_repo(self, repo_id: str, **kw) -> None:
        self.repo_dir(repo_id).mkdir(parents=True, exist_ok=True)

    def upload_folder(self, *, repo_id: str, folder_path: Path, allow_patterns: list[str], **kw) -> None:
        for name in allow_patterns:
            shutil.copy(Path(folder_path) / name, self.repo_dir(repo_id) / name)

    def dataset_info(self, repo_id: str, revision: str | None = None) -> SimpleNamespace:
        return SimpleNamespace(sha=self.sha)

    def list_repo_files(self, repo_id: str, repo_type: str, revision: str) -> list[str]:
        return sorted(p.name for p in self.repo_dir(repo_id).iterdir())

    def hf_hub_download(self, repo_id: str, filename: str, repo_type: str, revision: str) -> str:
        return str(self.repo_dir(repo_id) / filename)


def test_prepped_shards_round_trip_through_the_hub(
    prepped: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from datasets import load_dataset
    from huggingface_hub import constants

    out = tmp_path / "out"
    shutil.copytree(prepped, out)
    manifest = json.loads((out / "manifest.json").read_text())
    names = [shard["name"] for shard in manifest["shards"]]
    assert len(names) > 1 and manifest["complete"]
    fake = FakeHub(tmp_path / "hub")
    hub.push_dataset(out, "me/clips", api=fake)
    served = fake.repo_dir("me/clips")
    assert sorted(p.name for p in served.iterdir()) == sorted(["README.md", "manifest.json", *names])

    # What `load_dataset("me/clips", streaming=True)` reads: the repo's files and its card.
    rows = list(load_dataset(str(served), split="train", streaming=True))
    assert sorted(r["__key__"] for r in rows) == ["a", "b", "c"]
    assert {r["txt"] for r in rows} == {"clip a moves", "clip b moves", "clip c moves"}
    assert all(r["json"]["bucket"][2] == 5 for r in rows)

    # What `longcat-train --shards hf://datasets/me/clips` streams: curl pipes, here from file:// URLs.
    monkeypatch.setattr(
        constants,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        f"file://{fake.root}/{{repo_id}}/resolve/{{revision}}/{{filename}}",
    )
    monkeypatch.setattr(hub, "get_token", lambda: None)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    urls = hub.resolve_hf_shards("hf://datasets/me/clips", api=fake)
    assert [u.rsplit("/", 1)[1].rstrip("'") for u in urls] == names
    reader = stream.ShardStream(
        urls, stream.StreamConfig(batch_size=1, shuffle_buffer=1, encoders=manifest["encoders"])
    )
    batches = [batch for batch, _ in zip(reader, range(3), strict=False)]
    assert sorted(key for b in batches for key in b["keys"]) == ["a", "b", "c"]
    first = batches[0]
    assert first["latents"].shape[:3] == (1, 16, 2) and first["cond_latents"].shape[2] == 1


def test_push_command(prepped: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    shutil.copytree(prepped, out)
    shard_count = len(json.loads((out / "manifest.json").read_text())["shards"])
    assert cli.main(["push", str(out), "me/clips", "--dry-run", "--license", "cc-by-4.0"]) == 0
    assert f"a push would upload {shard_count + 2} files" in capsys.readouterr().out
    assert front_matter((out / "README.md").read_text())["license"] == "cc-by-4.0"

    (out / "manifest.json").unlink()
    assert cli.main(["push", str(out), "me/clips", "--dry-run"]) == 2
    assert "no manifest.json; run longcat-prep shard" in capsys.readouterr().err
