"""Files written so that a reader, or a rerun after a crash, sees the old content or the new, never half.

Prep's resume state, the manifest, caption sidecars and the dataset card all go through ``write_atomic``;
files another library writes (safetensors) through ``replace_atomic``. A write that fails (a full disk)
leaves the old file and no temporary behind; one killed half-way leaves a temporary named
``.NAME.PID.tmp``, which ``stray_temporaries`` finds for the next run to remove.
``check_writable`` asks, before long work, whether its result could be written at all.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


class OutputError(RuntimeError):
    """A file of an output folder cannot be read or written; the message names it and the fix."""


class FileFormatError(ValueError):
    """A file that exists but does not hold what it should (not JSON, wrong types)."""


# What to do about an OSError, by errno: the common causes on a shared cluster filesystem.
IO_FIXES = {
    errno.ENOSPC: "free some space",
    errno.EDQUOT: "free some space or raise your quota",
    errno.EACCES: "check its permissions",
    errno.EPERM: "check its permissions",
    errno.EROFS: "the filesystem is read-only: choose another output folder",
    errno.ENOTDIR: "a path above it is a file, not a folder: choose another output folder",
    errno.EISDIR: "it is a folder where a file belongs: move it away",
    errno.EEXIST: "it is a file where a folder belongs: move it away or choose another output folder",
}


def describe_os_error(err: OSError, path: str | Path | None = None) -> str:
    """One line for an OSError: the file, what went wrong and what to do about it."""
    where = path if path is not None else err.filename
    fix = IO_FIXES.get(err.errno or 0, "check the disk and the path")
    cause = f"{err.strerror or err}; {fix}"
    return cause if where is None else f"{where}: {cause}"


def temporary_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def stray_temporaries(path: Path) -> list[Path]:
    """Temporaries ``write_atomic`` left for ``path`` when a process was killed mid-write."""
    return sorted(
        p for p in path.parent.glob(f".{path.name}.*.tmp") if p.name[len(path.name) + 2 : -4].isdigit()
    )


def replace_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` makes the file under a temporary name beside ``path``; it is flushed to the disk and
    renamed over ``path``. A write that fails leaves ``path`` as it was and removes the temporary file; an
    OSError names ``path``, not the temporary."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OSError(err.errno, err.strerror, str(path)) from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write to a temporary file beside ``path``, fsync, rename over ``path`` (text as UTF-8)."""
    replace_atomic(path, lambda tmp: tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data))


def write_json_atomic(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=1, ensure_ascii=False))


def read_json(path: Path) -> Any | None:
    """The parsed file, or None when it does not exist; FileFormatError when it is not JSON, OutputError
    when it cannot be read."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise OutputError(describe_os_error(err, path)) from err
    return parse_json(data, str(path))


def parse_json(data: bytes, where: str) -> Any:
    """The parsed bytes of a JSON file; FileFormatError naming ``where`` when they are not JSON."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise FileFormatError(f"{where} is not UTF-8 text (bad byte at offset {err.start})") from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        what = (
            "empty"
            if not text.strip()
            else f"not valid JSON ({err.msg} at line {err.lineno} column {err.colno})"
        )
        raise FileFormatError(f"{where} is {what}") from err


class NotWritable(ValueError):
    """A path a command would write but cannot; the message is one line saying what is in the way."""


# Writers put a temporary name beside the file (".NAME.partial.mp4", ".NAME.1234.tmp"): this much longer.
_TEMPORARY_NAME_MARGIN = 16


def check_writable(path: str | Path, *, folder: bool = False) -> None:
    """Raise NotWritable unless a file (``folder``: a folder of files) can be written at ``path`` now.

    Nothing of the other kind may be there; the folders still missing must be creatable: the nearest
    existing ancestor is a folder this process can create files in, and every name fits the file
    system. Leaves nothing behind (a probe file is removed at once), so a command can ask before its
    work instead of losing the result at the end.
    """
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise NotWritable(f"{path} is a file, not a folder")
    if not folder and path.is_dir():
        raise NotWritable(f"{path} is a folder, not a file")
    existing = path if folder and path.is_dir() else path.parent
    missing = [] if existing == path else [path.name]
    while not existing.exists():
        missing.append(existing.name)
        existing = existing.parent
    if not existing.is_dir():
        raise NotWritable(f"{existing} is a file, so no folder can be made in it")
    try:
        name_max = os.pathconf(existing, "PC_NAME_MAX")
    except (AttributeError, OSError, ValueError):  # no pathconf (Windows) or no answer: the common limit
        name_max = 255
    for name in missing:
        if len(os.fsencode(name)) + _TEMPORARY_NAME_MARGIN > name_max:
            raise NotWritable(f"the name {name[:40]}... is longer than {existing} allows ({name_max} bytes)")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise NotWritable(f"cannot write in {existing} ({err.strerror or err})") from None
