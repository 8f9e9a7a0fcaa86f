"""Where a ``longcat-prep shard`` run reads and stages: its paths checked, its videos listed (a local
folder or a store's URL), its caption mapping read, the staging folder and the local mirrors of remote
videos and start frames.

Both engines read the inputs through the ``ClipSpec`` that ``remote_inputs`` returns: a remote video is
fetched into its mirror by the stage that decodes it (``clips.fetch_inputs``), wherever that stage runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from longcat_data import storage
from longcat_data.captions import CaptionError, load_caption_mapping, match_captions
from longcat_data.clips import ClipSpec, list_media, list_remote_media
from longcat_data.config import PrepConfig
from longcat_data.files import OutputError

log = logging.getLogger(__name__)


def check_paths(cfg: PrepConfig) -> None:
    """A local videos folder that is missing, or a local output that is a file: refused before any work
    (remote ones are checked when they are read)."""
    if not storage.is_remote(cfg.videos_dir) and not storage.local_path(cfg.videos_dir).is_dir():
        raise FileNotFoundError(f"videos folder {storage.local_path(cfg.videos_dir)} does not exist")
    if not storage.is_remote(cfg.out_dir):
        out_dir = storage.local_path(cfg.out_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise OutputError(f"{out_dir} is a file, not a folder: choose another output folder")


@contextlib.contextmanager
def staging_folder(cfg: PrepConfig) -> Iterator[Path]:
    """``--staging-dir``, else a temporary folder removed at the end: where a remote output's shard in
    progress and remote videos being decoded wait on the local disk. Inside ``--staging-dir`` each
    output folder has a subfolder of its own, so runs into different outputs can share it."""
    if cfg.staging_dir is not None:
        output = hashlib.sha256(cfg.out_dir.rstrip("/").encode()).hexdigest()[:16]
        path = storage.local_path(cfg.staging_dir) / output
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OutputError(f"--staging-dir {storage.describe_error(err, path)}") from err
        yield path
        return
    path = Path(tempfile.mkdtemp(prefix="longcat-staging-"))
    try:
        yield path
    finally:
        storage.remove_tree(path)


def remote_inputs(cfg: PrepConfig, spec: ClipSpec, staging: Path, stream: str) -> ClipSpec:
    """``spec`` reading remote videos (and start frames) through mirrors in ``staging``."""
    if storage.is_remote(cfg.videos_dir):
        spec.videos_url = cfg.videos_dir.rstrip("/")
        spec.videos_dir = staging / f"videos-{stream}"
    if cfg.conditioning_dir is not None and storage.is_remote(cfg.conditioning_dir):
        spec.conditioning_url = cfg.conditioning_dir.rstrip("/")
        try:
            spec.conditioning_names = frozenset(storage.list_files(spec.conditioning_url))
        except FileNotFoundError:
            raise FileNotFoundError(f"start-frame folder {spec.conditioning_url} holds no files") from None
        spec.conditioning_dir = staging / f"start-frames-{stream}"
    return spec


def list_inputs(cfg: PrepConfig, report: bool = True) -> list[str]:
    """The videos of ``cfg.videos_dir`` (local or remote), the output folder left out; ``check_paths``
    first. Images among them are left out with one warning (``report``: by rank 0)."""
    if storage.is_remote(cfg.videos_dir):
        out = cfg.out_dir if storage.is_remote(cfg.out_dir) else None
        videos, images = list_remote_media(cfg.videos_dir, exclude=out)
    else:
        local_out = None if storage.is_remote(cfg.out_dir) else storage.local_path(cfg.out_dir)
        videos, images = list_media(storage.local_path(cfg.videos_dir), exclude=local_out)
    if cfg.conditioning_dir is not None:  # start frames kept beside or among the videos are no stray images
        images = _outside(images, cfg.videos_dir, cfg.conditioning_dir)
    if images and report:
        examples = ", ".join(images[:3]) + (", ..." if len(images) > 3 else "")
        log.warning(
            "%s: left out %d image%s (%s): clips are made from videos only; turn a still into a short "
            "video to train on it, or give start frames with --conditioning-dir",
            cfg.videos_dir,
            len(images),
            "" if len(images) == 1 else "s",
            examples,
        )
    return videos


def _outside(names: list[str], videos_dir: str, folder: str) -> list[str]:
    """The listed files ``names`` of ``videos_dir`` that do not lie in ``folder`` (a store's URL or local)."""
    if storage.is_remote(videos_dir) or storage.is_remote(folder):
        inside = folder.rstrip("/") + "/"
        return [name for name in names if not f"{videos_dir.rstrip('/')}/{name}".startswith(inside)]
    root, within = storage.local_path(videos_dir), storage.local_path(folder).resolve()
    return [name for name in names if not (root / name).resolve().is_relative_to(within)]


def caption_mapping(
    mapping_file: Path | str, sources: list[str], videos_dir: Path, report: bool, staging: Path
) -> dict[str, str]:
    """The mapping file's caption for each video of the listing (``captions.match_captions``); entries
    that match no video are reported once (``report``: by rank 0). A remote file is copied into
    ``staging`` first; messages name it by its URL."""
    if isinstance(mapping_file, str):
        local = staging / f"captions-{os.getpid()}" / Path(mapping_file.rstrip("/").rsplit("/", 1)[-1])
        try:
            if not storage.fetch(mapping_file, local):
                raise CaptionError(mapping_file, "caption mapping file not found")
            mapping = load_caption_mapping(local)
        except CaptionError as err:
            raise CaptionError(mapping_file, err.reason) from None
        finally:
            local.unlink(missing_ok=True)
    else:
        mapping = load_caption_mapping(mapping_file)
    matched = match_captions(mapping, sources, mapping_file, videos_dir)
    warning = matched.report(mapping_file)
    if report and warning:
        log.warning("%s", warning)
    return matched.captions
