"""Tar members from a byte stream, reading on past a damaged header.

``tarfile`` stops at the first bad header, so one flipped byte would drop the rest of a shard. Here a
header that fails its checksum (or a run of zero blocks that is not the archive's end) is skipped
block by block to the next valid header, and reported as a ``Damage``; only the members in between are
lost. Shards are written by ``longcat_data.writer`` (PAX headers, one sample = consecutive members with
one key); readers group members into samples with webdataset's ``group_by_keys``.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from webdataset.tariterators import base_plus_ext

BLOCK = 512
MAGIC = (b"ustar\x0000", b"ustar  \x00")
REGULAR = (b"0", b"\x00", b"7")


@dataclass(frozen=True)
class Damage:
    """Bytes ``start``..``end`` of a tar held no readable member; ``end`` None: nothing readable followed."""

    start: int
    end: int | None

    def describe(self) -> str:
        if self.end is None:
            return f"unreadable from byte {self.start} to the end"
        return f"damaged between bytes {self.start} and {self.end}, read on after it"


def _octal(field: bytes) -> int:
    text = field.split(b"\x00", 1)[0].strip()
    return int(text, 8) if text else 0


def _is_header(block: bytes) -> bool:
    if len(block) < BLOCK or block[257:265] not in MAGIC:
        return False
    try:
        stored = _octal(block[148:156])
        _octal(block[124:136])
    except ValueError:
        return False
    blank = block[:148] + b" " * 8 + block[156:]
    if stored == sum(blank):
        return True
    return stored == sum(blank) - 256 * sum(1 for b in blank if b > 127)  # old tars summed signed bytes


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def _pax_records(data: bytes) -> dict[str, str]:
    records, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += length
    return records


class _Reader:
    def __init__(self, stream: IO[bytes], skip_data: bool) -> None:
        self.stream, self.offset = stream, 0
        self.seek = skip_data and _seekable(stream)

    def read(self, n: int) -> bytes:
        data = self.stream.read(n)
        while len(data) < n:
            more = self.stream.read(n - len(data))
            if not more:
                break
            data += more
        self.offset += len(data)
        return data

    def skip(self, n: int) -> bool:
        """Skip ``n`` bytes; False when the stream ended first."""
        if not self.seek:
            return len(self.read(n)) == n
        self.stream.seek(n, io.SEEK_CUR)
        self.offset += n
        return True


def _seekable(stream: IO[bytes]) -> bool:
    try:
        return stream.seekable()
    except (AttributeError, OSError, ValueError):
        return False


def tar_members(
    stream: IO[bytes], on_damage: Callable[[Damage], None], *, skip_data: bool = False
) -> Iterator[tuple[str, bytes | None]]:
    """(name, data) of each regular member in order; data None with ``skip_data`` (seeks when it can)."""
    reader = _Reader(stream, skip_data)
    name: str | None = None  # from a PAX or GNU long-name header, for the member that follows
    size: int | None = None
    gap: int | None = None  # where unreadable bytes began since the last good header
    zeros: int | None = None  # where a run of zero blocks began: the end, unless a header follows
    while True:
        start = reader.offset
        block = reader.read(BLOCK)
        if len(block) < BLOCK:
            if gap is not None or zeros is None or block:  # garbage, no end marker, or cut mid-block
                on_damage(Damage(min(x for x in (gap, zeros, start) if x is not None), None))
            return
        if not block.strip(b"\x00"):
            if zeros is None and gap is None:
                zeros = start
            continue
        if not _is_header(block):
            if gap is None:
                gap = zeros if zeros is not None else start
            continue
        if gap is not None or zeros is not None:
            on_damage(Damage(min(x for x in (gap, zeros) if x is not None), start))
            gap = zeros = name = size = None
        member_size = size if size is not None else _octal(block[124:136])
        member_name = name or _ustar_name(block)
        kind = block[156:157]
        name = size = None
        if kind in (b"x", b"g", b"L"):
            data = reader.read(_padded(member_size))
            if len(data) < member_size:
                on_damage(Damage(start, None))
                return
            if kind == b"x":
                try:
                    records = _pax_records(data[:member_size])
                except ValueError:
                    records = {}  # garbled: the ustar header's own name and size stand
                name = records.get("path")
                size = int(records["size"]) if "size" in records else None
            elif kind == b"L":
                name = data[:member_size].rstrip(b"\x00").decode("utf-8", "replace")
            continue
        if kind in REGULAR and not skip_data:
            data = reader.read(_padded(member_size))
            if len(data) < member_size:
                on_damage(Damage(start, None))
                return
            yield member_name, data[:member_size]
        elif not reader.skip(_padded(member_size)):
            on_damage(Damage(start, None))
            return
        elif kind in REGULAR:
            yield member_name, None


def _ustar_name(block: bytes) -> str:
    name = block[:100].split(b"\x00", 1)[0]
    prefix = block[345:500].split(b"\x00", 1)[0] if block[257:263] == b"ustar\x00" else b""
    return (prefix + b"/" + name if prefix else name).decode("utf-8", "replace")


def shard_keys(path: Path) -> tuple[list[str], list[Damage]]:
    """The sample keys of a local shard, in order, from its headers alone, and the damage found."""
    with open(path, "rb") as f:
        return stream_keys(f)


def stream_keys(stream: IO[bytes]) -> tuple[list[str], list[Damage]]:
    """``shard_keys`` of a shard opened for reading (a local or a remote file)."""
    keys: list[str] = []
    damage: list[Damage] = []
    for name, _ in tar_members(stream, damage.append, skip_data=True):
        key, _ = base_plus_ext(name)
        if key is not None and (not keys or keys[-1] != key):
            keys.append(key)
    return keys, damage
