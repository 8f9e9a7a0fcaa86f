"""Issue 19, as a newcomer and a SimpleTuner user meet it: each item through the command line."""

import json
import logging
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from longcat_data import cli as prep_cli
from longcat_data.video import read_frames, read_mp4
from longcat_train import cli as train_cli
from longcat_train.cli import sample_main, train_main
from longcat_train.config import ConfigError
from longcat_train.simpletuner import from_simpletuner

pytestmark = pytest.mark.usefixtures("single_thread")

QUIET = ["--model", "tiny", "--num-workers", "0", "--no-progress", "--report-to", "none"]


def _train(capsys, *argv: str) -> tuple[int, str]:
    code = train_main([*QUIET, *argv])
    return code, capsys.readouterr().err


def test_frames_and_validation_settings_come_from_the_shards(tiny_shards, tmp_path, capsys, caplog):
    # Made with --frames 9 --area 64x64; nothing typed: the trainer takes both from the manifest.
    out = tmp_path / "run"
    argv = ["--shards", str(tiny_shards), "--output-dir", str(out), "--max-train-steps", "1"]
    with caplog.at_level(logging.INFO):
        code, err = _train(capsys, *argv)
    assert code == 0, err
    saved = json.loads((out / "train_config.json").read_text())
    assert (saved["frames"], saved["validation_frames"], saved["validation_area"]) == (9, 9, "64x64")
    assert "frames = 9 (the shards')" in caplog.text


def test_a_frame_count_that_is_not_4k_plus_1_is_rounded_down_once(tiny_shards, tmp_path, capsys, caplog):
    out = tmp_path / "run"
    argv = ["--shards", str(tiny_shards), "--output-dir", str(out), "--max-train-steps", "1"]
    with caplog.at_level(logging.WARNING):
        code, err = _train(capsys, *argv, "--frames", "11", "--validation-frames", "7")
    assert code == 0, err
    saved = json.loads((out / "train_config.json").read_text())
    assert (saved["frames"], saved["validation_frames"]) == (9, 5)
    lines = [r.getMessage() for r in caplog.records if "4k+1" in r.getMessage()]
    assert lines == [
        "frames must be 4k+1 for the VAE: using 9 instead of 11",
        "validation_frames must be 4k+1 for the VAE: using 5 instead of 7",
    ]


def test_the_sampler_rounds_down_too(tmp_path, capsys, caplog):
    image = tmp_path / "start.png"
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(image)
    out = tmp_path / "v.mp4"
    argv = ["--model", "tiny", "--image", str(image), "--prompt", "a cat", "-o", str(out), "--frames", "8"]
    with caplog.at_level(logging.WARNING):
        assert sample_main([*argv, "--steps", "1", "--size", "64x64", "--guidance", "1"]) == 0
    assert "using 5 instead of 8" in caplog.text
    assert read_mp4(out).shape[0] == 5


def test_interrupted_before_anything_was_saved_says_run_it_again(tiny_shards, tmp_path, capsys, monkeypatch):
    from longcat_train import trainer

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "train", interrupted)
    code, err = _train(capsys, "--shards", str(tiny_shards), "--output-dir", str(tmp_path / "o"))
    assert code == 130 and "nothing was saved yet: run the same command again" in err


def test_interrupted_after_the_config_was_saved_gives_a_resume_command_that_works(
    tiny_shards, tmp_path, capsys
):
    # A run stopped before its first checkpoint: the output folder holds its train_config.json only.
    out = tmp_path / "my run"
    argv = ["--shards", str(tiny_shards), "--output-dir", str(out), "--max-train-steps", "1"]
    assert _train(capsys, *argv, "--checkpointing-steps", "0")[0] == 0
    shutil.rmtree(out / "checkpoints")
    for name in ("lora.safetensors", "metrics.jsonl"):
        (out / name).unlink()
    hint = train_cli.resume_hint(train_cli.parse_train_args([*QUIET, *argv]))
    assert hint == f"continue with: longcat-train --resume latest --output-dir '{out}'"
    # The command, as printed (the shell's quoting), continues the run from its saved settings alone.
    assert _train(capsys, "--resume", "latest", "--output-dir", str(out))[0] == 0
    assert (out / "lora.safetensors").is_file()


def test_validation_shows_progress_and_the_sheet_names_step_and_lora(tiny_shards, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--model", "tiny", "--num-workers", "0", "--report-to", "none", "--shards", str(tiny_shards)]
    argv += ["--output-dir", str(out), "--max-train-steps", "2", "--validation-source", str(tiny_shards)]
    argv += ["--validation-limit", "1", "--validation-inference-steps", "3", "--validation-frames", "5"]
    assert train_main(argv) == 0
    err = capsys.readouterr().err
    assert "3/3 [" in err  # the validation's denoising bar (the training bar counts 2): steps, time left
    sheets = sorted((out / "validation").rglob("*_sheet.png"))
    assert sheets and Image.open(sheets[-1]).size[1] == 2 * (160 + 4) + 34  # base and LoRA rows + title
    curve = out / "validation" / "loss_curve.png"
    assert curve.is_file() and Image.open(curve).size == (640, 360)


def test_help_teaches(capsys):
    for main, name in ((train_main, "longcat-train"), (sample_main, "longcat-sample")):
        with pytest.raises(SystemExit):
            main(["--help"])
        text = capsys.readouterr().out
        assert "examples:" in text and f"{name} --model tiny" in text, name
    with pytest.raises(SystemExit):
        sample_main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ("[default: 7860]", "[default: 127.0.0.1]", "[default: longcat_previews]", "default 40"):
        assert default in text
    for command in prep_cli.COMMANDS:
        with pytest.raises(SystemExit):
            prep_cli.main([command, "--help"])
        assert "example" in capsys.readouterr().out, command


def test_help_imports_no_torch():
    code = "import sys; from longcat_train import cli; cli.train_parser(); print('torch' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    )


# ---------------------------------------------------------------- SimpleTuner keys


@pytest.mark.parametrize(
    ("key", "value", "ours"),
    [("mixed_precision", "no", "fp32"), ("mixed_precision", "bf16", "bf16"), ("report_to", "wandb", "wandb")],
)
def test_simpletuner_values_with_one_meaning_map_silently(key, value, ours, caplog):
    with caplog.at_level(logging.WARNING):
        out = from_simpletuner({"model_family": "longcat_video", key: value})
    assert out[key] == ours and not caplog.records


@pytest.mark.parametrize(
    ("key", "value", "ours"),
    [
        ("mixed_precision", "fp16", "bf16"),
        ("optimizer", "adamw_schedulefree", "adamw"),
        ("lr_scheduler", "cosine_with_restarts", "cosine"),
        ("report_to", "comet_ml", "tensorboard"),
    ],
)
def test_simpletuner_approximations_are_named(key, value, ours, caplog):
    with caplog.at_level(logging.WARNING):
        out = from_simpletuner({"model_family": "longcat_video", key: value})
    assert out[key] == ours and key in caplog.text and value in caplog.text


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"mixed_precision": "int4"}, "mixed_precision = 'int4': must be one of"),
        ({"model_flavour": "i2v-480p"}, "model_flavour = 'i2v-480p': LongCat-Video has one flavour, final"),
        ({"lora_type": "lycoris"}, "lora_type = 'lycoris'"),
    ],
)
def test_simpletuner_values_without_a_counterpart_are_refused(values, message):
    with pytest.raises(ConfigError, match=message):
        from_simpletuner({"model_family": "longcat_video", **values})


def test_simpletuner_validation_using_datasets_is_checked(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        from_simpletuner({"model_family": "longcat_video", "validation_using_datasets": True})
    assert "validation_using_datasets = true without a usable eval_dataset_id" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        from_simpletuner({"model_family": "longcat_video", "validation_using_datasets": False})
    assert "validation_using_datasets = false" in caplog.text


# ---------------------------------------------------------------- the seed's example, end to end


def test_the_seed_simpletuner_example_preps_and_trains_as_is(tiny_shards, tmp_path, capsys):
    """The seed guide's config.json + multidatabackend.json (clips, their start frames), at tiny sizes:
    ``longcat-prep shard --simpletuner config.json --output-dir OUT`` then ``longcat-train --config
    OUT/config.json``, nothing else changed."""
    demo = tiny_shards.parent / "two_clips"
    clips, starts = tmp_path / "video-clips", tmp_path / "video-start-frames"
    clips.mkdir()
    starts.mkdir()
    for video in sorted(demo.glob("*.mp4")):
        (clips / video.name).write_bytes(video.read_bytes())
        (clips / f"{video.stem}.txt").write_text(video.with_suffix(".txt").read_text())
        Image.fromarray(read_frames(video, 2, 1)[0]).save(starts / f"{video.stem}.png")
    backends = [
        {
            "id": "longcat-video-train",
            "type": "local",
            "dataset_type": "video",
            "is_i2v": True,
            "instance_data_dir": str(clips),
            "caption_strategy": "textfile",
            "resolution": 64,
            "cache_dir_vae": "/cache/vae/longcat/video",
            "conditioning_data": ["longcat-video-cond"],
            "video": {"num_frames": 9},
        },
        {
            "id": "longcat-video-cond",
            "type": "local",
            "dataset_type": "conditioning",
            "instance_data_dir": str(starts),
            "caption_strategy": None,
            "resolution": 64,
            "cache_dir_vae": "/cache/vae/longcat/video-cond",
        },
    ]
    (tmp_path / "multidatabackend.json").write_text(json.dumps(backends))
    config = {
        "model_family": "longcat_video",
        "model_flavour": "final",
        "model_type": "lora",
        "pretrained_model_name_or_path": "tiny",
        "train_batch_size": 1,
        "gradient_checkpointing": True,
        "lora_rank": 8,
        "learning_rate": 1e-4,
        "mixed_precision": "bf16",
        "max_train_steps": 1,
        "output_dir": str(tmp_path / "run"),
        "data_backend_config": "multidatabackend.json",
        "report_to": "none",
        "dataloader_num_workers": 0,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    out = tmp_path / "shards"
    argv = ["shard", "--simpletuner", str(tmp_path / "config.json"), "--output-dir", str(out)]
    assert prep_cli.main([*argv, "--model", "tiny", "--workers", "0"]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert f"train: longcat-train --config {out / 'config.json'}" in printed
    rewritten = json.loads((out / "multidatabackend.json").read_text())
    assert [(d["id"], d["instance_data_dir"], d["is_i2v"]) for d in rewritten] == [
        ("longcat-video-train", str((out / "longcat-video-train").resolve()), True)
    ]
    manifest = json.loads((out / "longcat-video-train" / "manifest.json").read_text())
    assert manifest["settings"]["frames"] == 9 and manifest["settings"]["area"] == [64, 64]
    assert manifest["settings"]["conditioning_dir"] == str(starts.resolve())
    assert train_main(["--config", str(out / "config.json"), "--no-progress"]) == 0
    assert (tmp_path / "run" / "lora.safetensors").is_file()


def test_every_shard_folder_is_checked_not_only_the_first(tiny_shards, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(tiny_shards, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["settings"]["frames"] = 13
    (other / "manifest.json").write_text(json.dumps(manifest))
    argv = [
        "--shards",
        str(tiny_shards),
        str(other),
        "--output-dir",
        str(tmp_path / "o"),
        "--max-train-steps",
        "1",
    ]
    code, err = _train(capsys, *argv)
    assert code == 2 and f"{other} were made with --frames 13 but the config trains on 9 frames" in err


def test_a_simpletuner_value_without_a_counterpart_is_one_line_from_the_cli(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"--model_family": "longcat_video", "--mixed_precision": "int4"}))
    code, err = _train(capsys, "--config", str(config), "--output-dir", str(tmp_path / "o"))
    assert code == 2 and err.strip().splitlines() == [
        "longcat-train: error: SimpleTuner mixed_precision = 'int4': must be one of bf16, no, fp32, fp16, fp8"
    ]


def test_a_simpletuner_config_on_raw_videos_says_to_prep_them_first(tmp_path, capsys):
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "a.mp4").write_bytes(b"not decoded here")
    backends = [
        {
            "id": "clips",
            "type": "local",
            "dataset_type": "video",
            "instance_data_dir": str(tmp_path / "clips"),
        }
    ]
    (tmp_path / "multidatabackend.json").write_text(json.dumps(backends))
    config = {"model_family": "longcat_video", "data_backend_config": "multidatabackend.json"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    code, err = _train(capsys, "--config", str(tmp_path / "config.json"), "--output-dir", str(tmp_path / "o"))
    assert code == 2 and "holds no shards; prep the datasets first: longcat-prep shard --simpletuner" in err
