import pickle
from pathlib import Path

import pytest

from longcat_data.captions import (
    CaptionError,
    caption_from_filename,
    clean_caption,
    load_caption_mapping,
    match_captions,
    resolve_caption,
)


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("  a cat\n\n on a  mat\t", "a cat on a mat"),
        ("fish &amp;amp; chips &lt;3", "fish & chips <3"),
        ("cafÃ© au lait", "café au lait"),
        ("café ’quoted’ 猫", "café ’quoted’ 猫"),
        ("bell\x07 and\x00null", "bell and null"),
        ("cafe\u0301", "café"),
    ],
)
def test_clean_caption(raw: str, clean: str) -> None:
    assert clean_caption(raw) == clean


def test_filename_caption() -> None:
    assert caption_from_filename("/x/red_fox-running__in snow.mp4") == "red fox running in snow"


def test_sidecar_wins_and_is_recorded(tmp_path: Path) -> None:
    video = tmp_path / "clip.mp4"
    video.with_suffix(".txt").write_text("A red fox\nruns through snow.\n", encoding="utf-8")
    assert resolve_caption(video) == ("A red fox runs through snow.", "textfile")


def test_missing_sidecar_is_an_error_unless_a_fallback_is_given(tmp_path: Path) -> None:
    video = tmp_path / "snowy_owl.mp4"
    with pytest.raises(CaptionError, match="snowy_owl.txt is missing") as err:
        resolve_caption(video)
    assert "\n" not in str(err.value) and str(video) in str(err.value)
    assert resolve_caption(video, filename_fallback=True) == ("snowy owl", "filename")
    assert resolve_caption(video, captioner=lambda path: f" an owl in {path.stem} ") == (
        "an owl in snowy_owl",
        "captioner",
    )


def test_caption_error_pickles(tmp_path: Path) -> None:
    error = CaptionError(tmp_path / "a.mp4", "no caption:\n a.txt is missing")
    copy = pickle.loads(pickle.dumps(error))
    assert str(copy) == str(error) == f"{tmp_path / 'a.mp4'}: no caption: a.txt is missing"


def test_empty_sidecar_counts_as_missing(tmp_path: Path) -> None:
    video = tmp_path / "clip.mp4"
    video.with_suffix(".txt").write_text(" \n", encoding="utf-8")
    with pytest.raises(CaptionError, match="clip.txt is empty"):
        resolve_caption(video)


def test_unreadable_sidecar_is_an_error_even_with_fallbacks(tmp_path: Path) -> None:
    video = tmp_path / "clip.mp4"
    video.with_suffix(".txt").write_bytes(b"caf\xe9\xff")
    with pytest.raises(CaptionError, match="not UTF-8"):
        resolve_caption(video, filename_fallback=True)


def test_captioner_strategy_and_empty_output(tmp_path: Path) -> None:
    video = tmp_path / "clip.mp4"
    video.with_suffix(".txt").write_text("ignored", encoding="utf-8")
    assert resolve_caption(video, "captioner", captioner=lambda _: "a scene") == ("a scene", "captioner")
    with pytest.raises(CaptionError, match="empty caption"):
        resolve_caption(video, "captioner", captioner=lambda _: "  ")


def test_jsonl_mapping_by_relative_path_name_and_stem(tmp_path: Path) -> None:
    mapping_file = tmp_path / "captions.jsonl"
    mapping_file.write_text(
        '{"file_name": "./sub/a.mp4", "caption": "first"}\n'
        "\n"
        '{"file": "b.mp4", "text": "second &amp; more"}\n'
        '{"video": "c", "prompt": "third"}\n',
        encoding="utf-8",
    )
    mapping = load_caption_mapping(mapping_file)
    videos = tmp_path / "videos"
    assert resolve_caption(videos / "sub" / "a.mp4", "mapping", mapping=mapping, videos_dir=videos) == (
        "first",
        "mapping",
    )
    assert resolve_caption(videos / "b.mp4", "mapping", mapping=mapping) == ("second & more", "mapping")
    assert resolve_caption(videos / "x" / "c.mov", "mapping", mapping=mapping) == ("third", "mapping")
    with pytest.raises(CaptionError, match="no entry"):
        resolve_caption(videos / "d.mp4", "mapping", mapping=mapping)


def test_csv_mapping(tmp_path: Path) -> None:
    mapping_file = tmp_path / "captions.csv"
    mapping_file.write_text('File_Name,Caption\na.mp4,"a fox, running"\nb.mp4,owl\n', encoding="utf-8")
    assert load_caption_mapping(mapping_file) == {"a.mp4": "a fox, running", "b.mp4": "owl"}


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        (
            "m.jsonl",
            '{"file_name": "a.mp4", "caption": "x"}\n{"file_name": "b.mp4", \n',
            "line 2: not valid JSON",
        ),
        ("m.jsonl", '["a.mp4", "x"]\n', "line 1: expected a JSON object"),
        ("m.jsonl", '{"caption": "x"}\n', "line 1: no file"),
        ("m.jsonl", '{"file_name": "a.mp4", "caption": 3}\n', "line 1: no caption"),
        (
            "m.jsonl",
            '{"file_name": "a.mp4", "caption": "x"}\n{"file_name": "a.mp4", "caption": "y"}\n',
            "line 2: 'a.mp4' already has a different caption on line 1",
        ),
        ("m.csv", "name,words\na.mp4,x\n", "needs a file column"),
        ("m.csv", "file,caption\na.mp4\n", "line 2: no caption"),
        ("m.txt", "a.mp4 x\n", "use .jsonl or .csv"),
    ],
)
def test_malformed_mapping_files_name_the_line(tmp_path: Path, name: str, content: str, reason: str) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(CaptionError, match=reason) as err:
        load_caption_mapping(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_mapping_file(tmp_path: Path) -> None:
    with pytest.raises(CaptionError, match="not found"):
        load_caption_mapping(tmp_path / "nope.jsonl")


# ---------------------------------------------------------------- a mapping matched over a listing

LISTING = ["clip00.mp4", "a/clip00.mp4", "b/clip00.mp4", "b/solo.mp4", "c/x.mp4", "c/x.mov"]


def matched(entries: dict[str, str], sources=LISTING):
    return match_captions(entries, sources, "m.jsonl", "/videos")


def test_a_bare_name_never_captions_a_video_in_a_subfolder_that_has_its_own_path() -> None:
    result = matched({"clip00.mp4": "root", "a/clip00": "in a", "solo": "only one", "b/clip00.mp4": "in b"})
    assert result.captions == {
        "clip00.mp4": "root",
        "a/clip00.mp4": "in a",
        "b/clip00.mp4": "in b",
        "b/solo.mp4": "only one",
    }
    assert result.unmatched == []


def test_an_ambiguous_bare_name_is_an_error_naming_both_files() -> None:
    with pytest.raises(CaptionError) as err:
        matched({"clip00.mp4": "which one?"}, ["a/clip00.mp4", "b/clip00.mp4"])
    assert str(err.value) == (
        "m.jsonl: entry 'clip00.mp4' could be a/clip00.mp4 or b/clip00.mp4; "
        "write its path relative to the videos folder"
    )
    with pytest.raises(CaptionError, match="entry 'c/x' could be c/x.mov or c/x.mp4; give its extension"):
        matched({"c/x": "?"})
    with pytest.raises(
        CaptionError, match="entries 'solo' and 'solo.mp4' both caption b/solo.mp4, differently"
    ):
        matched({"solo": "one", "solo.mp4": "two"})


def test_a_bare_name_of_videos_that_all_have_paths_is_unused_and_so_are_strangers() -> None:
    entries = {"a/clip00.mp4": "a", "b/clip00.mp4": "b", "clip00.mp4": "root"}
    result = matched({**entries, "gone.mp4": "?", "x/clip00.mp4": "?"}, LISTING[1:3])
    assert result.captions == {"a/clip00.mp4": "a", "b/clip00.mp4": "b"}
    assert result.unmatched == ["clip00.mp4", "gone.mp4", "x/clip00.mp4"]
    assert result.report("m.jsonl") == (
        "m.jsonl: 3 entries match no video ('clip00.mp4', 'gone.mp4', 'x/clip00.mp4'); "
        "check their paths (relative to the videos folder)"
    )
    assert matched({"/videos/a/clip00.mp4": "absolute"}, LISTING[1:2]).captions == {
        "a/clip00.mp4": "absolute"
    }
