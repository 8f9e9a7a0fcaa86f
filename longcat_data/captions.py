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
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, Protocol

log = logging.getLogger(__name__)

# Both the strategy asked for and the source recorded per sample.
CaptionSource = Literal["textfile", "mapping", "filename", "captioner"]

# Column / field names accepted in mapping files; Hugging Face's metadata.jsonl uses file_name + text.
FILE_FIELDS = ("file_name", "file", "filename", "path", "video")
CAPTION_FIELDS = ("caption", "text", "prompt")

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class CaptionError(Exception):
    """A caption that is missing or unusable; the message is one line: file, reason, fix."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = " ".join(reason.split())
        super().__init__(f"{self.path}: {self.reason}")

    def __reduce__(self) -> tuple[type, tuple[Path, str]]:
        # Prep decodes in worker processes; the default pickling would call __init__ with the message only.
        return type(self), (self.path, self.reason)


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
) -> tuple[str, CaptionSource]:
    """The caption for ``video`` and its source.

    ``strategy`` picks the primary source: ``textfile`` (sidecar .txt), ``mapping`` (from
    ``load_caption_mapping``; keys are matched as the path relative to ``videos_dir``, with and without
    extension, then the bare file name and stem), ``filename``, or ``captioner`` (always caption). When
    the primary source has nothing for this video, ``captioner`` then ``filename_fallback`` are tried;
    otherwise CaptionError says what is missing. An unreadable sidecar is an error, never skipped.
    """
    video = Path(video)
    if strategy == "captioner":
        return _run_captioner(video, captioner), "captioner"
    if strategy == "filename":
        return _non_empty(video, caption_from_filename(video), "its file name has no words"), "filename"

    if strategy == "textfile":
        caption = read_sidecar(video)
        missing = f"{video.with_suffix('.txt').name} is {'missing' if caption is None else 'empty'}"
    elif strategy == "mapping":
        if mapping is None:
            raise ValueError("strategy 'mapping' needs mapping=load_caption_mapping(FILE)")
        caption = _lookup(mapping, video, videos_dir)
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


def _lookup(mapping: Mapping[str, str], video: Path, videos_dir: str | Path | None) -> str | None:
    keys = []
    if videos_dir is not None:
        relative = video.relative_to(videos_dir)
        keys += [relative.as_posix(), relative.with_suffix("").as_posix()]
    keys += [video.name, video.stem]
    return next((mapping[key] for key in keys if key in mapping), None)


def _run_captioner(video: Path, captioner: Captioner | None) -> str:
    if captioner is None:
        raise ValueError("strategy 'captioner' needs a captioner")
    return _non_empty(video, clean_caption(captioner(video)), "the captioner returned an empty caption")


def _non_empty(video: Path, caption: str, reason: str) -> str:
    if not caption:
        raise CaptionError(video, f"no caption: {reason}")
    return caption
