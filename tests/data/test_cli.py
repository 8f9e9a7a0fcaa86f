"""longcat-prep's command line: help that teaches and loads no model stack, config checks, demo."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from longcat_data import cli
from longcat_data.config import PrepConfig, parse_captions
from longcat_data.demo import DEMO_CLIPS


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="HxW"):
        PrepConfig("v", "o", area="480")
    with pytest.raises(ValueError, match="--captions"):
        PrepConfig("v", "o", captions="yaml:x")
    with pytest.raises(ValueError, match="clips-per-video 1"):
        PrepConfig("v", "o", conditioning_dir="frames", clips_per_video=2)
    assert parse_captions("jsonl:meta.jsonl") == ("mapping", Path("meta.jsonl"))
    assert parse_captions("qwen") == ("captioner", None)


def test_help_teaches() -> None:
    text = cli.build_parser()._subparsers._group_actions[0].choices["shard"].format_help()
    assert "examples:" in text and "--shard-size" in text and "--no-text-embeds" in text


def test_help_answers_without_importing_the_model_libraries() -> None:
    code = (
        "import sys\nfrom longcat_data.cli import main\ntry:\n    main(['shard', '--help'])\n"
        "except SystemExit:\n    pass\nprint(sorted(m for m in ('diffusers', 'transformers', 'torchao') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == ""
    assert "--shard-size" in proc.stdout and proc.stdout.strip().endswith("[]")


@pytest.mark.parametrize("argv", [["--help"], ["shard", "--help"], ["inspect", "--help"]])
def test_help_imports_no_torch(argv: list[str]) -> None:
    code = (
        f"import sys\nfrom longcat_data.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("False")


def test_demo_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["demo", str(tmp_path / "demo")]) == 0
    assert len(list((tmp_path / "demo").glob("*.mp4"))) == len(DEMO_CLIPS)
    assert "longcat-prep shard" in capsys.readouterr().out


def test_engine_ray_without_ray_says_which_extra_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import longcat_data

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails, as where it is not installed
    monkeypatch.delitem(sys.modules, "longcat_data.ray_engine", raising=False)
    monkeypatch.delattr(longcat_data, "ray_engine", raising=False)
    (tmp_path / "videos").mkdir()
    argv = ["shard", str(tmp_path / "videos"), str(tmp_path / "out"), "--model", "tiny", "--engine", "ray"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install -e '.[ray]'" in err
    assert not (tmp_path / "out").exists()


def test_engine_ray_is_not_sliced_by_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="--engine ray spreads the work"):
        PrepConfig("v", "o", engine="ray", world_size=2)
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match="torchrun"):
        PrepConfig("v", "o", engine="ray")
    with pytest.raises(ValueError, match="ray-encoders"):
        PrepConfig("v", "o", engine="ray", ray_encoders=0)
