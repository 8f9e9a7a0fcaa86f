"""longcat-prep inspect (longcat_data.inspection): the summary of a shard folder and its contact sheet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from longcat_data import cli
from longcat_data.demo import DEMO_CLIPS, write_demo_clips
from longcat_data.inspection import contact_sheet

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def prepped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    videos, out = tmp_path_factory.mktemp("videos"), tmp_path_factory.mktemp("shards")
    write_demo_clips(videos)
    flags = [
        "--model",
        "tiny",
        "--area",
        "128x192",
        "--frames",
        "9",
        "--shard-size",
        "100KB",
        "--workers",
        "1",
    ]
    assert cli.main(["shard", str(videos), str(out), *flags]) == 0
    return out


def test_inspect_writes_a_contact_sheet(prepped: Path, capsys: pytest.CaptureFixture) -> None:
    out = prepped
    assert cli.main(["inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"{len(DEMO_CLIPS)} samples" in printed and "bucket" in printed
    with Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.width > 0 and sheet.height > 0


def test_inspect_refuses_a_folder_without_manifest(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["inspect", str(tmp_path)]) == 2
    assert "manifest.json not found" in capsys.readouterr().err


def test_contact_sheet_grid() -> None:
    tall, wide = np.full((300, 100, 3), 200, np.uint8), np.zeros((50, 400, 3), np.uint8)
    sheet = contact_sheet([(tall, "a tall frame"), (wide, "a wide one")] * 4, cell=100, columns=3)
    assert sheet.size == (3 * 100, 3 * (100 + 4 * 12)), "eight cells fill three rows of three"
    pixels = np.asarray(sheet)
    assert (pixels[50, 50] == 200).all(), "the first thumbnail sits centred in its cell"
    assert contact_sheet([]).size == (6 * 192, 192 + 4 * 12), "no samples: one empty row"
