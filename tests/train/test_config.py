import json
import logging

import pytest

from longcat_train import config as C
from longcat_train import runs
from longcat_train.cli import load_config, parse_train_args
from longcat_train.config import ConfigError, TrainConfig, VideoSettings
from longcat_train.sample_config import SampleConfig
from longcat_train.simpletuner import from_simpletuner
from longcat_train.techniques import check_techniques

# The seed's LongCat-Video I2V quickstart: config.json plus multidatabackend.json, verbatim values.
SEED_CONFIG = {
    "model_family": "longcat_video",
    "model_flavour": "final",
    "model_type": "lora",
    "train_batch_size": 1,
    "gradient_checkpointing": True,
    "lora_rank": 8,
    "learning_rate": 1e-4,
    "validation_resolution": "480x832",
    "validation_num_video_frames": 93,
    "validation_num_inference_steps": 40,
    "validation_guidance": 4.0,
    "validation_using_datasets": True,
    "eval_dataset_id": "longcat-video-val",
}
SEED_BACKENDS = [
    {
        "id": "longcat-video-train",
        "type": "local",
        "dataset_type": "video",
        "is_i2v": True,
        "instance_data_dir": "/data/video-clips",
        "caption_strategy": "textfile",
        "resolution": 480,
        "cache_dir_vae": "/cache/vae/longcat/video",
        "conditioning_data": ["longcat-video-cond"],
    },
    {
        "id": "longcat-video-cond",
        "type": "local",
        "dataset_type": "conditioning",
        "instance_data_dir": "/data/video-start-frames",
        "caption_strategy": None,
        "resolution": 480,
        "cache_dir_vae": "/cache/vae/longcat/video-cond",
    },
]


def test_defaults_follow_the_seed():
    cfg = TrainConfig()
    cfg.validate()
    assert (cfg.frames, cfg.validation_frames, cfg.validation_area) == (None, None, None)  # the shards'
    cfg.take_shard_settings(None)  # shards without a manifest: the model's defaults
    assert (cfg.lora_rank, cfg.alpha, cfg.learning_rate, cfg.train_batch_size) == (8, 8.0, 1e-4, 1)
    assert (cfg.frames, cfg.flow_schedule_shift, cfg.validation_area) == (93, 12.0, "480x832")
    assert cfg.gradient_checkpointing != "none" and cfg.i2v
    assert cfg.lora_targets == list(C.DEFAULT_LORA_TARGETS)


def test_the_configs_name_their_video_settings():
    cfg = TrainConfig(validation_frames=9, validation_inference_steps=3, validation_guidance=1.5)
    cfg.flow_schedule_shift, cfg.validation_seed, cfg.validation_area = 7.0, 4, "64x96"
    assert cfg.validation_settings == VideoSettings(9, 3, 1.5, 7.0, 4, (64, 96))
    assert SampleConfig().video_settings == VideoSettings()
    sample = SampleConfig(model="tiny", steps=2, guidance=1.0, shift=3.0, seed=5)
    assert sample.video_settings == VideoSettings(17, 2, 1.0, 3.0, 5, (192, 320))


def test_every_field_has_help():
    import dataclasses

    for f in dataclasses.fields(TrainConfig):
        assert f.metadata.get("help"), f.name


def test_seed_simpletuner_import(tmp_path, caplog):
    (tmp_path / "multidatabackend.json").write_text(json.dumps(SEED_BACKENDS))
    values = {
        **SEED_CONFIG,
        "output_dir": "out/longcat",
        "max_train_steps": 500,
        "flow_schedule_shift": 12,
        "data_backend_config": "multidatabackend.json",
        "musubi_blocks_to_swap": 4,
        "base_model_precision": "int8-quanto",
        "validation_steps": 100,
        "report_to": "wandb",
    }
    (tmp_path / "config.json").write_text(json.dumps(values))
    with caplog.at_level(logging.INFO):
        cfg = load_config(tmp_path / "config.json")
    assert cfg.shards == ["/data/video-clips"] and cfg.i2v
    assert (cfg.lora_rank, cfg.learning_rate, cfg.train_batch_size, cfg.gradient_checkpointing) == (
        8,
        1e-4,
        1,
        "selective",
    )
    assert (cfg.output_dir, cfg.max_train_steps, cfg.flow_schedule_shift) == ("out/longcat", 500, 12.0)
    assert (cfg.validation_frames, cfg.validation_inference_steps, cfg.validation_guidance) == (93, 40, 4.0)
    assert (cfg.validation_every, cfg.validation_area) == (100, "480x832")
    assert (cfg.block_swap, cfg.base_model_precision, cfg.report_to) == (4, "int8-quanto", "wandb")
    assert cfg.validation_source is None  # longcat-video-val is not in the backend list
    log = caplog.text
    assert "longcat-video-val" in log and "not in" in log
    assert "longcat-video-cond" in log  # the conditioning set, told it is not needed
    assert "cache_dir_vae" in log and "caption_strategy" in log  # prep-side keys, named
    cfg.validate()


def test_simpletuner_ignored_keys_are_named(caplog):
    with caplog.at_level(logging.WARNING):
        out = from_simpletuner(
            {
                "--model_family": "longcat_video",
                "--lora_rank": "16",
                "--sageattention_usage": "x",
                "--optimizer": "prodigy",
                "--lr_scheduler": "cosine",
            }
        )
    assert out["lora_rank"] == 16 and out["lr_scheduler"] == "cosine" and out["optimizer"] == "adamw"
    assert "sageattention_usage" in caplog.text and "prodigy" in caplog.text


def test_simpletuner_eval_dataset_and_hub_dataset(tmp_path):
    backends = [
        {
            "id": "train",
            "type": "huggingface",
            "dataset_type": "video",
            "dataset_name": "me/clips",
            "is_i2v": False,
        },
        {"id": "val", "type": "local", "dataset_type": "video", "instance_data_dir": "/data/val"},
    ]
    (tmp_path / "db.json").write_text(json.dumps(backends))
    out = from_simpletuner(
        {
            "model_family": "longcat_video",
            "data_backend_config": str(tmp_path / "db.json"),
            "eval_dataset_id": "val",
        }
    )
    assert out == {"shards": ["hf://datasets/me/clips"], "i2v": False, "validation_source": "/data/val"}


def test_simpletuner_refuses_other_models_and_full_finetune(tmp_path):
    with pytest.raises(ConfigError, match="longcat_video only"):
        from_simpletuner({"model_family": "flux"})
    with pytest.raises(ConfigError, match="LoRA only"):
        from_simpletuner({"model_family": "longcat_video", "model_type": "full"})
    with pytest.raises(ConfigError, match="not found"):
        from_simpletuner(
            {"model_family": "longcat_video", "data_backend_config": str(tmp_path / "nope.json")}
        )


def test_toml_and_cli_overrides(tmp_path):
    (tmp_path / "train.toml").write_text(
        'model = "tiny"\nshards = ["/s/a.tar", "/s/b.tar"]\nlora_rank = 4\ngradient_checkpointing = false\n'
    )
    cfg = parse_train_args(
        [
            "--config",
            str(tmp_path / "train.toml"),
            "--lora-rank",
            "16",
            "--learning_rate",
            "3e-4",
            "--no-i2v",
            "--lora-targets",
            "attn.qkv",
            "ffn.w1",
            "--resume",
        ]
    )
    assert cfg.model == "tiny" and cfg.shards == ["/s/a.tar", "/s/b.tar"]
    assert (cfg.lora_rank, cfg.learning_rate, cfg.i2v, cfg.gradient_checkpointing) == (
        16,
        3e-4,
        False,
        "none",
    )
    assert cfg.lora_targets == ["attn.qkv", "ffn.w1"] and cfg.resume == "latest"
    checkpoint = tmp_path / "run" / "checkpoints" / "step-0000005"  # a resume path must exist
    checkpoint.mkdir(parents=True)
    assert parse_train_args(["--resume", str(checkpoint)]).resume == str(checkpoint)
    assert parse_train_args([]).resume is None


def test_unknown_key_suggests_the_right_one(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"lora_rnak": 4}))
    with pytest.raises(ConfigError, match="did you mean lora_rank"):
        load_config(tmp_path / "c.json")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"frames": 3}, "4k\\+1"),  # 92 is rounded down to 89 now (issue 19)
        ({"lora_rank": 0}, "lora_rank"),
        ({"optimizer": "sgd"}, "optimizer"),
        ({"max_train_steps": 0}, "num_train_epochs"),
        ({"fsdp": True, "block_swap": 2}, "fsdp"),
        ({"compile_tune": True}, "compile_tune"),
        ({"fp8_matmuls": True, "base_model_precision": "int8-quanto"}, "fp8_matmuls"),
    ],
)
def test_validate_errors(kw, message):
    # Field values are validate()'s to refuse, settings that do not combine check_techniques'.
    with pytest.raises(ConfigError, match=message):
        cfg = TrainConfig(**kw)
        cfg.validate()
        check_techniques(cfg)


def test_resume_mismatch_names_the_trajectory_keys_only():
    saved = TrainConfig(learning_rate=1e-4, lora_rank=8).to_dict()
    now = TrainConfig(learning_rate=2e-4, lora_rank=8, max_train_steps=5000, output_dir="elsewhere")
    assert runs.resume_mismatch(saved, now) == ["learning_rate: 0.0001 -> 0.0002"]
    assert runs.resume_mismatch(saved, TrainConfig(max_train_steps=10)) == []


def test_save_and_load_round_trip(tmp_path):
    cfg = TrainConfig(model="tiny", shards=["/a"], lora_rank=4)
    path = C.save_config(cfg, tmp_path / "train_config.json")
    assert load_config(path) == cfg
