import io
import os
import struct
import zlib
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs CUDA (run with -m gpu on the device)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_warnings():
    """Each test sees the one-time warnings (a frame count rounded to 4k+1) as a fresh command would."""
    from longcat_data.buckets import _warn_once

    _warn_once.cache_clear()


def _gradient_image(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], -1).astype(
        np.uint8
    )


@pytest.fixture
def make_image() -> Callable[[int, int], np.ndarray]:
    """``make_image(h, w)``: a smooth uint8 [h, w, 3] gradient, a test picture of any size."""
    return _gradient_image


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def _jpeg_with_size(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 16)).save(out, format="JPEG")
    data = bytearray(out.getvalue())
    sof = data.index(b"\xff\xc0")  # baseline frame header: length, precision, height, width
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.fixture
def huge_image() -> Callable[[str, int, int], bytes]:
    """``huge_image(format, width, height)``: a small PNG or JPEG file whose header declares that size
    (its pixel data is nowhere near: a decompression bomb, or just a broken file)."""
    return lambda fmt, width, height: (_png_header_only if fmt == "PNG" else _jpeg_with_size)(width, height)
