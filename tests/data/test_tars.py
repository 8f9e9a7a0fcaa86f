"""Tar members read past damage (longcat_data.tars): a clean archive reads exactly as tarfile reads it."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from longcat_data.tars import shard_keys, tar_members

MEMBERS = {
    "a.txt": b"x" * 700,
    "clips__" + "long_name_" * 12 + ".latents.safetensors": b"\x00\x01" * 300,
    "café_☕.json": b'{"k": 1}',
    "dir/b.cond.png": b"",
}


def archive(fmt: int) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        for name, data in MEMBERS.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_700_000_000.5
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT], ids=["pax", "gnu"])
def test_a_clean_archive_reads_as_tarfile_reads_it(fmt: int, tmp_path: Path) -> None:
    data = archive(fmt)
    damage: list = []
    assert list(tar_members(io.BytesIO(data), damage.append)) == list(MEMBERS.items())
    assert damage == []
    path = tmp_path / "t.tar"
    path.write_bytes(data)
    names = [name for name, _ in tar_members(open(path, "rb"), damage.append, skip_data=True)]
    assert names == list(MEMBERS) and damage == []
    assert shard_keys(path) == (["a", "clips__" + "long_name_" * 12, "café_☕", "dir/b"], [])


def test_an_archive_without_its_end_is_reported(tmp_path: Path) -> None:
    data = archive(tarfile.PAX_FORMAT)
    end = data.rindex(b"{") + 512  # just past the json member's data block
    damage: list = []
    read = [name for name, _ in tar_members(io.BytesIO(data[:end]), damage.append)]
    assert read == list(MEMBERS)[:3]
    assert len(damage) == 1 and damage[0].end is None
