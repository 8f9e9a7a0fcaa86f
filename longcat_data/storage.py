"""Where files live: a local folder, or a folder of an object store or other file system through fsspec.

Every path the toolkit takes may be a local path, ``file://PATH`` or a URL fsspec knows (``s3://``,
``gs://``, ``hf://``, ``az://``, ...). ``folder(location)`` gives a ``LocalFolder`` (plain ``pathlib``
calls: local runs keep their speed and their exact behaviour) or a ``RemoteFolder`` (fsspec calls); both
answer the same few questions by names relative to the folder (``.prep/train.json``), so the writer, the
manifest and the readers never ask which kind they have.

Credentials come from each store's own configuration: s3fs reads ``AWS_*`` variables (including
``AWS_ENDPOINT_URL_S3`` for another endpoint) and ``~/.aws``; gcsfs the Google application default
credentials; ``hf://`` the Hugging Face login; fsspec's ``FSSPEC_<PROTOCOL>_<OPTION>`` variables reach any.

Atomic writes: on object stores a single put (or a multipart upload) is visible only once complete, so
a file goes straight to its name; on other remote file systems (sftp, ...) it is written under a
temporary name ``.NAME.PID.tmp`` and moved into place.
"""

from __future__ import annotations

import functools
import os
import shutil
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import IO, Any

from longcat_data.files import (
    OutputError,
    describe_os_error,
    parse_json,
    read_json,
    replace_atomic,
    stray_temporaries,
    write_atomic,
)

# Stores whose put shows the object only once all of it has arrived (one request, or a multipart
# upload completed at the end): nothing there is ever half written.
ATOMIC_PUT_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "hf"})
READ_BLOCK = 8 * 2**20  # bytes fetched per request when streaming a shard


def is_remote(location: str | Path) -> bool:
    """True for a URL of another file system than the local one (``file://`` is local)."""
    text = str(location)
    return "://" in text and not text.startswith("file://") and not text.startswith("pipe:")


def knows_protocol(url: str) -> bool:
    """True when fsspec has a file system for the URL's protocol (its package may still be missing)."""
    import fsspec

    return url.split("://", 1)[0] in fsspec.available_protocols()


def local_path(location: str | Path) -> Path:
    """A local location as a path (``file://`` taken off)."""
    return Path(str(location).removeprefix("file://"))


def join(location: str, *names: str) -> str:
    """``location/name/...`` for a URL or a local path, written as given (no resolving)."""
    if not is_remote(location):
        return str(local_path(location).joinpath(*names))
    return "/".join([location.rstrip("/"), *(n.strip("/") for n in names if n)])


def parent(location: str) -> str:
    """The folder holding ``location``."""
    if not is_remote(location):
        return str(local_path(location).parent)
    return location.rstrip("/").rsplit("/", 1)[0]


def remote_fs(url: str) -> tuple[Any, str]:
    """(fsspec file system, path inside it) for a remote URL; OutputError for an unknown protocol or
    one whose package is missing."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as err:
        protocol = url.split("://", 1)[0]
        hint = ' (pip install -e ".[s3]")' if protocol in ("s3", "s3a") else ""
        raise OutputError(f"{url}: cannot open {protocol}:// ({err}){hint}") from err


def describe_remote_error(err: BaseException, url: str) -> str:
    """One line for a failed store call: the URL, the store's answer, where to look."""
    what = str(err).splitlines()[0] if str(err) else type(err).__name__
    if isinstance(err, PermissionError):
        fix = "check the credentials (for s3: AWS_* variables or ~/.aws) and the bucket's permissions"
    elif isinstance(err, FileNotFoundError):
        fix = "check the bucket and the path"
    else:
        fix = "check the endpoint, the connection and the credentials"
    return f"{url}: {what}; {fix}"


# Packages whose errors mean "the store call failed" (no connection, no credentials), not a bug of ours.
_STORE_PACKAGES = frozenset(
    {"botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "google", "fsspec", "huggingface_hub", "requests"}
)


class StoreError(OSError):
    """A call to a remote store failed for another reason than a missing or forbidden file."""


def store_call(function: Callable) -> Callable:
    """Errors of the store's client libraries (a refused connection, missing credentials) raised as
    ``StoreError``, an OSError, so callers handle them with the file system's errors."""

    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except OSError:
            raise
        except Exception as err:
            if type(err).__module__.split(".")[0] not in _STORE_PACKAGES:
                raise
            raise StoreError(str(err).splitlines()[0] if str(err) else type(err).__name__) from err

    return call


def describe_error(err: OSError, where: str | Path | None = None) -> str:
    """``files.describe_os_error`` for a local path, ``describe_remote_error`` for a URL."""
    if where is not None and is_remote(where):
        return describe_remote_error(err, str(where))
    return describe_os_error(err, where)


class LocalFolder:
    """A folder on the local file system, by ``pathlib``."""

    def __init__(self, path: str | Path) -> None:
        self.path = local_path(path)
        self.local: Path | None = self.path

    def url(self, name: str = "") -> str:
        return str(self.path / name) if name else str(self.path)

    def size(self, name: str) -> int | None:
        """The file's size, None when there is none (OSError when it cannot be asked)."""
        try:
            return (self.path / name).stat().st_size
        except FileNotFoundError:
            return None

    def is_file(self, name: str) -> bool:
        return (self.path / name).is_file()

    def names(self, pattern: str) -> list[str]:
        """Names (relative, ``/``-separated) of the files matching a glob pattern, sorted."""
        return sorted(p.relative_to(self.path).as_posix() for p in self.path.glob(pattern))

    def read_bytes(self, name: str) -> bytes:
        return (self.path / name).read_bytes()

    def open(self, name: str) -> IO[bytes]:
        return open(self.path / name, "rb")

    def write_atomic(self, name: str, data: str | bytes) -> None:
        write_atomic(self.path / name, data)

    def write_file_atomic(self, name: str, write: Callable[[Path], None]) -> None:
        """``write(path)`` makes the file; it appears under ``name`` whole or not at all."""
        replace_atomic(self.path / name, write)

    def publish(self, staged: Path, name: str) -> None:
        """A finished local file moved to ``name`` (a rename here)."""
        os.replace(staged, self.path / name)

    def rename(self, old: str, new: str) -> None:
        os.replace(self.path / old, self.path / new)

    def remove(self, name: str) -> None:
        (self.path / name).unlink(missing_ok=True)

    def temporaries(self, name: str) -> list[str]:
        """Temporaries a killed atomic write of ``name`` left behind."""
        return [p.relative_to(self.path).as_posix() for p in stray_temporaries(self.path / name)]

    def abort_uploads(self, owned: Callable[[str], bool]) -> int:
        return 0  # a local write is never an upload in flight

    def modified(self, name: str) -> float:
        return (self.path / name).stat().st_mtime


class RemoteFolder:
    """A folder of an fsspec file system (an object store bucket, the hub, sftp, ...)."""

    def __init__(self, url: str) -> None:
        self.base = url.rstrip("/")
        self.fs, self.root = remote_fs(self.base)
        self.root = self.root.rstrip("/")
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.atomic_put = bool(ATOMIC_PUT_PROTOCOLS.intersection(protocols))
        self.is_s3 = bool({"s3", "s3a"}.intersection(protocols))
        self.local: Path | None = None

    def url(self, name: str = "") -> str:
        return f"{self.base}/{name}" if name else self.base

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}" if name else self.root

    @store_call
    def size(self, name: str) -> int | None:
        path = self._path(name)
        self.fs.invalidate_cache(path)
        try:
            info = self.fs.info(path)
        except FileNotFoundError:
            return None
        return int(info["size"]) if info.get("type") == "file" else None

    @store_call
    def is_file(self, name: str) -> bool:
        return self.size(name) is not None

    @store_call
    def top_sizes(self) -> dict[str, int]:
        """Size of every file directly in the folder, from one listing (not a request per file)."""
        self.fs.invalidate_cache(self.root)
        try:
            entries = self.fs.ls(self.root, detail=True)
        except FileNotFoundError:
            return {}
        return {PurePosixPath(e["name"]).name: int(e["size"]) for e in entries if e.get("type") == "file"}

    @store_call
    def names(self, pattern: str) -> list[str]:
        self.fs.invalidate_cache(self.root)
        found = self.fs.glob(self._path(pattern))
        return sorted(str(PurePosixPath(p).relative_to(self.root)) for p in found)

    @store_call
    def read_bytes(self, name: str) -> bytes:
        return self.fs.cat_file(self._path(name))

    @store_call
    def open(self, name: str) -> IO[bytes]:
        opened = self.fs.open(self._path(name), "rb", block_size=READ_BLOCK, cache_type="readahead")
        return StoreFile(opened)  # type: ignore[return-value]

    @store_call
    def write_atomic(self, name: str, data: str | bytes) -> None:
        payload = data.encode("utf-8") if isinstance(data, str) else data
        if self.atomic_put:
            self.fs.pipe_file(self._path(name), payload)
        else:
            temporary = self._temporary(name)
            self.fs.pipe_file(self._path(temporary), payload)
            self.fs.mv(self._path(temporary), self._path(name))
        self.fs.invalidate_cache(self._path(name))

    @store_call
    def write_file_atomic(self, name: str, write: Callable[[Path], None]) -> None:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="longcat-upload-") as scratch:
            staged = Path(scratch) / PurePosixPath(name).name
            write(staged)
            self.publish(staged, name)

    @store_call
    def publish(self, staged: Path, name: str) -> None:
        """Upload a finished local file to ``name`` (visible only once whole), then delete it locally."""
        if self.atomic_put:
            self.fs.put_file(str(staged), self._path(name))
        else:
            temporary = self._temporary(name)
            self.fs.put_file(str(staged), self._path(temporary))
            self.fs.mv(self._path(temporary), self._path(name))
        self.fs.invalidate_cache(self._path(name))
        staged.unlink()

    @store_call
    def rename(self, old: str, new: str) -> None:
        self.fs.mv(self._path(old), self._path(new))
        self.fs.invalidate_cache(self.root)

    @store_call
    def remove(self, name: str) -> None:
        try:
            self.fs.rm_file(self._path(name))
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache(self._path(name))

    @store_call
    def temporaries(self, name: str) -> list[str]:
        pure = PurePosixPath(name)
        pattern = str(pure.with_name(f".{pure.name}.*.tmp"))
        return [n for n in self.names(pattern) if PurePosixPath(n).name[len(pure.name) + 2 : -4].isdigit()]

    @store_call
    def abort_uploads(self, owned: Callable[[str], bool]) -> int:
        """Abort the multipart uploads into this folder whose name is ``owned`` that a killed run left
        unfinished (S3 bills their parts though no object shows); the count aborted. Only call it while
        no writer uploads those names."""
        if not self.is_s3:
            return 0
        bucket, _, key = self.root.partition("/")
        prefix = f"{key}/" if key else ""
        listed = self.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix)
        uploads = [u for u in listed.get("Uploads", []) if owned(u["Key"][len(prefix) :])]
        for upload in uploads:
            self.fs.call_s3(
                "abort_multipart_upload", Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"]
            )
        return len(uploads)

    @store_call
    def modified(self, name: str) -> float:
        path = self._path(name)
        self.fs.invalidate_cache(path)
        info = self.fs.info(path)
        stamp = info.get("LastModified", info.get("mtime", info.get("last_modified")))
        if isinstance(stamp, datetime):
            return stamp.timestamp()
        if isinstance(stamp, str):
            return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
        return float(stamp) if stamp is not None else time.time()

    @store_call
    def create(self, name: str, data: bytes) -> bool:
        """Write ``name`` only if it does not exist: True when written, False when it existed. Exclusive
        where the store has a conditional put (S3's If-None-Match, the local file system); elsewhere
        checked first, so two creators racing within a request's time may both succeed."""
        path = self._path(name)
        try:
            self.fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        except (NotImplementedError, TypeError):
            # the store has no conditional put: its pipe_file refuses mode="create" (NotImplementedError)
            # or takes no mode at all (TypeError)
            self.fs.invalidate_cache(path)
            if self.fs.exists(path):
                return False
            self.fs.pipe_file(path, data)
        self.fs.invalidate_cache(path)
        return True

    def _temporary(self, name: str) -> str:
        pure = PurePosixPath(name)
        return str(pure.with_name(f".{pure.name}.{os.getpid()}.tmp"))


class StoreFile:
    """A remote file opened for reading whose store errors (a connection lost mid-shard) are
    ``StoreError``s, as a local read's are OSErrors."""

    def __init__(self, file: Any) -> None:
        self._file = file
        self.read = store_call(file.read)
        self.readinto = store_call(file.readinto)
        self.seek = store_call(file.seek)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)

    def __enter__(self) -> StoreFile:
        return self

    def __exit__(self, *_: object) -> None:
        self._file.close()


Folder = LocalFolder | RemoteFolder


def folder(location: str | Path | Folder) -> Folder:
    """The folder at ``location`` (a Folder is returned as it is)."""
    if isinstance(location, LocalFolder | RemoteFolder):
        return location
    return RemoteFolder(str(location)) if is_remote(location) else LocalFolder(location)


def read_json_in(store: Folder, name: str) -> Any | None:
    """``name`` of ``store`` parsed (``files.read_json``): None when missing, FileFormatError when it
    is not JSON, OutputError when it cannot be read."""
    if store.local is not None:
        return read_json(store.local / name)
    try:
        data = store.read_bytes(name)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise OutputError(describe_remote_error(err, store.url(name))) from err
    return parse_json(data, store.url(name))


@store_call
def open_input(url: str) -> IO[bytes]:
    """A remote file opened for streaming reads (blocks fetched as they are read, never all at once)."""
    fs, path = remote_fs(url)
    return StoreFile(fs.open(path, "rb", block_size=READ_BLOCK, cache_type="readahead"))  # type: ignore[return-value]


@store_call
def list_files(url: str) -> list[str]:
    """Relative paths of every file under a remote folder, sorted; FileNotFoundError when it has none."""
    fs, root = remote_fs(url)
    root = root.rstrip("/")
    fs.invalidate_cache(root)
    found = fs.find(root)
    if not found and not fs.isdir(root):
        raise FileNotFoundError(f"{url} does not exist or holds no files")
    return sorted(str(PurePosixPath(p).relative_to(root)) for p in found)


@store_call
def fetch(url: str, target: Path) -> bool:
    """Copy a remote file to ``target`` (folders made); False when there is no such file."""
    fs, path = remote_fs(url)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        fs.get_file(path, str(target))
    except FileNotFoundError:
        target.unlink(missing_ok=True)
        return False
    return True


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
