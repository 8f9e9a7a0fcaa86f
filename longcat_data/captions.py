"""Captions for clips: a sidecar .txt, a jsonl/csv mapping, the file name, or a captioner.

Every caption goes through ``clean_caption``, which normalises text the way the official pipeline
cleans a prompt before its text encoder (broken encodings, HTML entities, whitespace), so training text
matches what users will type at inference.
``resolve_caption`` also returns where the caption came from, which prep records per sample.
"""

from __future__ import annotations

import csv
import html
import json
import logging
import re
import unicodedata
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal, Protocol

from longcat_data.video import InputError

log = logging.getLogger(__name__)

# Both the strategy asked for and the source recorded per sample.
CaptionSource = Literal["textfile", "mapping", "filename", "captioner", "prompt"]

# Column / field names accepted in mapping files; Hugging Face's metadata.jsonl uses file_name + text.
FILE_FIELDS = ("file_name", "file", "filename", "path", "video")
CAPTION_FIELDS = ("caption", "text", "prompt")

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class CaptionError(InputError):
    """A caption that is missing or unusable."""


class Captioner(Protocol):
    """Writes a caption for a video that has none (e.g. a vision-language model)."""

    def __call__(self, video: Path) -> str: ...


def clean_caption(text: str) -> str:
    """Normalise caption text: repair mojibake, unescape HTML, drop control characters, one-line it.

    Captions scraped from the web arrive as UTF-8 mis-decoded as Windows-1252 ("cafÃ©") and HTML
    entities escaped once or twice ("&amp;amp;"); both would reach the text encoder as noise.
    """
    text = _repair_mojibake(text)
    text = html.unescape(html.unescape(text))
    text = unicodedata.normalize("NFC", _CONTROL.sub(" ", text))
    return " ".join(text.split())


def caption_from_filename(video: str | Path) -> str:
    """SimpleTuner's ``filename`` strategy: the file stem with underscores and dashes as spaces."""
    return clean_caption(re.sub(r"[_\-]+", " ", Path(video).stem))


def read_sidecar(video: str | Path) -> str | None:
    """The caption in ``<video stem>.txt`` beside the video, cleaned; None when there is no such file.

    Several lines are joined into one caption: the clip gets one text embedding.
    """
    sidecar = Path(video).with_suffix(".txt")
    if not sidecar.is_file():
        return None
    return clean_caption(_read_text(sidecar))


def load_caption_mapping(path: str | Path) -> dict[str, str]:
    """Read a ``.jsonl`` or ``.csv`` file mapping video names (or relative paths) to captions.

    jsonl: one object per line, e.g. ``{"file_name": "clips/a.mp4", "caption": "..."}``. csv: a header
    row with a file column and a caption column. Accepted names: file ``file_name``/``file``/
    ``filename``/``path``/``video``; caption ``caption``/``text``/``prompt``. Any malformed line raises
    CaptionError naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise CaptionError(path, "caption mapping file not found")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise CaptionError(path, f"unknown caption mapping format {suffix!r}; use .jsonl or .csv")
    text = _read_text(path)
    rows = _jsonl_rows(path, text) if suffix == ".jsonl" else _csv_rows(path, text)

    mapping: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for line, row in rows:
        name = _pick(path, line, row, FILE_FIELDS, "file")
        caption = clean_caption(_pick(path, line, row, CAPTION_FIELDS, "caption"))
        key = _normalise_key(name)
        if key in mapping and mapping[key] != caption:
            raise CaptionError(
                path, f"line {line}: {name!r} already has a different caption on line {first_line[key]}"
            )
        mapping[key] = caption
        first_line.setdefault(key, line)
    log.info("loaded %d captions from %s", len(mapping), path)
    return mapping


def resolve_caption(
    video: str | Path,
    strategy: CaptionSource = "textfile",
    *,
    videos_dir: str | Path | None = None,
    mapping: Mapping[str, str] | None = None,
    captioner: Captioner | None = None,
    filename_fallback: bool = False,
    prompt: str | None = None,
) -> tuple[str, CaptionSource]:
    """The caption for ``video`` and its source.

    ``strategy`` picks the primary source: ``textfile`` (sidecar .txt), ``mapping`` (captions by the
    path relative to ``videos_dir``, as ``match_captions`` gives them for a listing; with or without
    extension; without ``videos_dir``, the file name), ``filename``, ``captioner`` (always caption), or
    ``prompt`` (the one caption ``prompt`` for every video: SimpleTuner's instanceprompt). When
    the primary source has nothing for this video, ``captioner`` then ``filename_fallback`` are tried;
    otherwise CaptionError says what is missing. An unreadable sidecar is an error, never skipped.
    """
    video = Path(video)
    if strategy == "captioner":
        return _run_captioner(video, captioner), "captioner"
    if strategy == "prompt":
        return _non_empty(video, clean_caption(prompt or ""), "the prompt is empty"), "prompt"
    if strategy == "filename":
        return _non_empty(video, caption_from_filename(video), "its file name has no words"), "filename"

    if strategy == "textfile":
        caption = read_sidecar(video)
        missing = f"{video.with_suffix('.txt').name} is {'missing' if caption is None else 'empty'}"
    elif strategy == "mapping":
        if mapping is None:
            raise ValueError("strategy 'mapping' needs mapping=load_caption_mapping(FILE)")
        caption = lookup_caption(mapping, video, videos_dir)
        missing = "it has no entry in the caption mapping"
    else:
        raise ValueError(
            f"unknown caption strategy {strategy!r}; expected textfile, mapping, filename or captioner"
        )
    if caption:
        return caption, strategy

    if captioner is not None:
        return _run_captioner(video, captioner), "captioner"
    if filename_fallback:
        log.debug("%s: %s, captioning it from its file name", video, missing)
        return _non_empty(
            video, caption_from_filename(video), f"{missing} and its file name has no words"
        ), "filename"
    raise CaptionError(video, f"no caption: {missing}; add it, or caption clips with longcat-prep caption")


def _repair_mojibake(text: str) -> str:
    """Undo one round of UTF-8 bytes decoded as Windows-1252 or Latin-1, when that is what happened.

    Genuine non-ASCII text almost never re-encodes to valid UTF-8, so a successful round trip that
    changes the text is taken as proof of mojibake.
    """
    for wrong_codec in ("cp1252", "latin-1"):
        try:
            repaired = text.encode(wrong_codec).decode("utf-8")
        except UnicodeError:
            continue
        if repaired != text:
            return repaired
    return text


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise CaptionError(
            path, f"not UTF-8 text (bad byte at offset {err.start}); re-save it as UTF-8"
        ) from err
    except OSError as err:
        raise CaptionError(path, f"cannot be read ({err.strerror}); check its permissions") from err


def _jsonl_rows(path: Path, text: str) -> list[tuple[int, dict[str, object]]]:
    rows = []
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as err:
            raise CaptionError(
                path, f"line {line}: not valid JSON ({err.msg} at column {err.colno})"
            ) from err
        if not isinstance(row, dict):
            raise CaptionError(path, f"line {line}: expected a JSON object, got {type(row).__name__}")
        rows.append((line, row))
    return rows


def _csv_rows(path: Path, text: str) -> list[tuple[int, dict[str, object]]]:
    reader = csv.DictReader(text.splitlines())
    header = [name.strip().lower() for name in reader.fieldnames or []]
    if not any(name in header for name in FILE_FIELDS) or not any(name in header for name in CAPTION_FIELDS):
        raise CaptionError(
            path,
            f"header {header} needs a file column ({'/'.join(FILE_FIELDS)}) and a caption column ({'/'.join(CAPTION_FIELDS)})",
        )
    reader.fieldnames = header
    try:
        return [(reader.line_num, row) for row in reader]
    except csv.Error as err:
        raise CaptionError(path, f"line {reader.line_num}: malformed CSV ({err})") from err


def _pick(path: Path, line: int, row: Mapping[str, object], fields: tuple[str, ...], what: str) -> str:
    for field in fields:
        value = row.get(field)
        if isinstance(value, str) and value.strip():
            return value
    raise CaptionError(
        path, f"line {line}: no {what} (expected a non-empty string in one of {', '.join(fields)})"
    )


def _normalise_key(name: str) -> str:
    return name.strip().replace("\\", "/").removeprefix("./")


def lookup_caption(mapping: Mapping[str, str], video: Path, videos_dir: str | Path | None) -> str | None:
    """The entry for ``video``'s path relative to ``videos_dir`` (default: its own folder), with or
    without its extension. Bare names of videos in subfolders are ``match_captions``' business."""
    relative = video.relative_to(videos_dir) if videos_dir is not None else Path(video.name)
    keys = (relative.as_posix(), relative.with_suffix("").as_posix())
    return next((mapping[key] for key in keys if key in mapping), None)


@dataclass
class MatchedCaptions:
    """``match_captions``' result: captions by source path, and the mapping keys that matched nothing."""

    captions: dict[str, str]
    unmatched: list[str]

    def report(self, mapping_file: str | Path) -> str | None:
        """The warning about entries that caption no video, or None."""
        if not self.unmatched:
            return None
        shown = ", ".join(repr(k) for k in self.unmatched[:5]) + (", ..." if len(self.unmatched) > 5 else "")
        return (
            f"{mapping_file}: {len(self.unmatched)} entries match no video ({shown}); "
            "check their paths (relative to the videos folder)"
        )


def match_captions(
    mapping: Mapping[str, str], sources: Sequence[str], mapping_file: str | Path, videos_dir: str | Path
) -> MatchedCaptions:
    """Each video's caption from a mapping (``load_caption_mapping``), decided once for the whole listing.

    An entry names a video by its path relative to ``videos_dir`` (or an absolute path inside it),
    with or without the extension; that always wins. An entry without a folder may also name a video
    in a subfolder by its file name or stem, but only when exactly one video of the listing has that
    name. CaptionError (before any encoding) when an entry could be two videos, or when two entries of
    the same kind give one video different captions.
    """
    root = Path(videos_dir).resolve()
    exact: dict[str, list[str]] = defaultdict(list)
    loose: dict[str, list[str]] = defaultdict(list)
    for source in sources:
        path = PurePosixPath(source)
        exact[source].append(source)
        exact[str(path.with_suffix(""))].append(source)
        loose[path.name].append(source)
        loose[path.stem].append(source)
    by_path: dict[str, tuple[str, str]] = {}  # source -> (entry key, caption)
    by_name: dict[str, tuple[str, str]] = {}
    unmatched: list[str] = []

    def assign(chosen: dict[str, tuple[str, str]], source: str, key: str, caption: str) -> None:
        if source in chosen and chosen[source][1] != caption:
            raise CaptionError(
                mapping_file,
                f"entries {chosen[source][0]!r} and {key!r} both caption {source}, differently; keep one",
            )
        chosen.setdefault(source, (key, caption))

    bare = []
    for key, caption in mapping.items():
        name = _relative_key(key, root)
        targets = sorted(set(exact.get(name, ())))
        if len(targets) > 1:
            raise CaptionError(
                mapping_file, f"entry {key!r} could be {targets[0]} or {targets[1]}; give its extension"
            )
        if targets:
            assign(by_path, targets[0], key, caption)
        elif "/" not in name and name in loose:
            bare.append((key, name, caption))
        else:
            unmatched.append(key)
    for key, name, caption in bare:
        targets = sorted(set(loose[name]))
        if len(targets) == 1:
            if targets[0] not in by_path:
                assign(by_name, targets[0], key, caption)
            continue
        uncaptioned = [t for t in targets if t not in by_path]
        if not uncaptioned:
            unmatched.append(key)  # every video of that name has an entry by path
            continue
        other = next(t for t in targets if t != uncaptioned[0])
        raise CaptionError(
            mapping_file,
            f"entry {key!r} could be {uncaptioned[0]} or {other}; write its path relative to the videos folder",
        )
    captions = {source: caption for source, (_, caption) in {**by_name, **by_path}.items()}
    return MatchedCaptions(captions, sorted(unmatched))


def _relative_key(key: str, root: Path) -> str:
    """A mapping key as a path relative to the videos folder (absolute paths inside it included)."""
    if key.startswith("/"):
        try:
            return Path(key).resolve().relative_to(root).as_posix()
        except ValueError:
            return key
    return key


def _run_captioner(video: Path, captioner: Captioner | None) -> str:
    if captioner is None:
        raise ValueError("strategy 'captioner' needs a captioner")
    return _non_empty(video, clean_caption(captioner(video)), "the captioner returned an empty caption")


def _non_empty(video: Path, caption: str, reason: str) -> str:
    if not caption:
        raise CaptionError(video, f"no caption: {reason}")
    return caption
