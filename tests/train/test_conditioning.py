"""Training conditioning: i2v, t2v, continuation and mixed tasks; their condition latents, loss masks,
task draws, and the checks that refuse clips too short for a continuation condition."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from longcat_data import cli as prep
from longcat_data.demo import DEMO_CLIPS, synthetic_frames
from longcat_data.shards import ShardError
from longcat_data.stream import ShardStream, StreamConfig, expand_shard_spec
from longcat_data.video import write_mp4
from longcat_train import conditioning
from longcat_train.cli import parse_train_args, train_main
from longcat_train.config import ConfigError, TrainConfig
from longcat_train.parallel import Dist
from longcat_train.trainer import train, train_step, training_loss

pytestmark = pytest.mark.usefixtures("single_thread")

CPU = torch.device("cpu")
TINY_FRAMES = 9  # the conftest's shards: 3 latent frames
COND_FRAMES = 5  # -> 2 condition latents, 1 noisy


def tiny_config(shards: Path, out: Path, **kw) -> TrainConfig:
    values = dict(
        model="tiny",
        shards=[str(shards)],
        frames=TINY_FRAMES,
        cond_frames=COND_FRAMES,
        output_dir=str(out),
        num_workers=0,
        progress=False,
        report_to="none",
        checkpointing_steps=0,
        max_train_steps=2,
        shuffle_buffer=4,
    )
    return TrainConfig(**{**values, **kw})


def one_batch(shards: Path, size: int = 2) -> dict:
    return next(iter(ShardStream(expand_shard_spec(str(shards)), StreamConfig(batch_size=size))))


# ---------------------------------------------------------------- pure parts


def test_the_mix_parses_into_every_task_with_its_weight():
    assert conditioning.parse_mix("i2v=0.6, continuation=0.3,t2v=0.1") == {
        "i2v": 0.6,
        "continuation": 0.3,
        "t2v": 0.1,
    }
    assert conditioning.parse_mix("continuation=2") == {"i2v": 0.0, "continuation": 2.0, "t2v": 0.0}
    assert conditioning.task_weights("mixed", "i2v=1,t2v=0,continuation=3") == {
        "i2v": 1.0,
        "continuation": 3.0,
    }
    assert conditioning.task_weights("continuation", "i2v=1") == {"continuation": 1.0}


@pytest.mark.parametrize(
    "text, problem",
    [
        ("i2v=0,t2v=0", "sum to 0"),
        ("dance=1", "unknown task 'dance'"),
        ("i2v=much", "not a number"),
        ("i2v", "not TASK=WEIGHT"),
        ("i2v=1,i2v=2", "named twice"),
        ("i2v=-1", ">= 0"),
        ("i2v=nan", ">= 0"),
        ("i2v=inf", ">= 0"),
    ],
)
def test_a_bad_mix_names_its_problem(text, problem):
    with pytest.raises(ValueError, match=problem):
        conditioning.parse_mix(text)


def test_condition_latent_counts_follow_the_vae_stride():
    counts = [conditioning.cond_latent_count("continuation", n) for n in (1, 5, 9, 13)]
    assert counts == [1, 2, 3, 4]
    assert conditioning.cond_latent_count("i2v", 13) == 1 and conditioning.cond_latent_count("t2v", 13) == 0
    assert conditioning.min_clip_frames({"continuation": 1.0}, 13) == 17
    assert conditioning.min_clip_frames({"i2v": 1.0, "t2v": 1.0}, 13) is None


def test_draws_follow_the_weights_and_a_single_task_draws_nothing():
    weights = {"i2v": 0.6, "continuation": 0.3, "t2v": 0.1}
    g = torch.Generator().manual_seed(0)
    counts = Counter(conditioning.draw_tasks(weights, 20000, g))
    for task, weight in weights.items():
        assert abs(counts[task] / 20000 - weight) < 0.015, counts
    assert set(conditioning.draw_tasks({"i2v": 1.0, "t2v": 3.0}, 200, g)) == {"i2v", "t2v"}
    state = g.get_state()
    assert conditioning.draw_tasks({"continuation": 1.0}, 5, g) == ["continuation"] * 5
    assert torch.equal(g.get_state(), state)
    assert conditioning.task_groups(["t2v", "i2v", "t2v"]) == [("i2v", [1]), ("t2v", [0, 2])]


# ---------------------------------------------------------------- what each task conditions and masks


class Oracle(torch.nn.Module):
    """Knows x0 and returns exactly x0 - eps, except ``garbage`` on the latent frames ``wrong``."""

    def __init__(self, x0: torch.Tensor, wrong: slice) -> None:
        super().__init__()
        self.x0, self.wrong = x0, wrong
        self.calls: list[dict] = []

    def forward(
        self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, num_cond_latents
    ):
        self.calls.append(dict(x_t=hidden_states.clone(), num_cond=num_cond_latents))
        s = (timestep / 1000).view(-1, 1, 1, 1, 1)
        out = self.x0 - (hidden_states - (1 - s) * self.x0) / s
        out[:, :, self.wrong] = 1e3
        return out


@pytest.mark.parametrize("task, n", [("i2v", 1), ("continuation", 2), ("t2v", 0)])
def test_each_task_gives_exactly_its_condition_latents_clean_and_out_of_the_loss(
    tiny_shards, tmp_path, task, n
):
    batch = one_batch(tiny_shards)
    cfg = tiny_config(tiny_shards, tmp_path, conditioning=task)
    x0 = batch["latents"].float()

    def loss(wrong: slice) -> tuple[float, dict]:
        oracle = Oracle(x0, wrong)
        value = training_loss(oracle, batch, cfg, torch.Generator().manual_seed(0), None, CPU)
        return value.item(), oracle.calls[0]

    on_condition, call = loss(slice(0, n))
    on_first_noisy, _ = loss(slice(n, n + 1))
    assert on_condition < 1e-6 and on_first_noisy > 1e4
    assert call["num_cond"] == n
    expected = {"i2v": batch["cond_latents"].float(), "continuation": x0[:, :, :n]}.get(task)
    if expected is not None:
        assert torch.equal(call["x_t"][:, :, :n], expected)
    assert not torch.isclose(call["x_t"][:, :, n:], x0[:, :, n:]).any()  # noised


class Spy(torch.nn.Module):
    """One trainable scale; records each call's sample count and condition length."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.calls: list[tuple[int, int]] = []

    def forward(
        self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, num_cond_latents
    ):
        self.calls.append((hidden_states.shape[0], num_cond_latents))
        return self.scale * hidden_states


def test_a_mixed_batch_runs_one_call_per_drawn_task(tiny_shards, tmp_path):
    batch = one_batch(tiny_shards)
    cfg = tiny_config(
        tiny_shards,
        tmp_path,
        conditioning="mixed",
        conditioning_mix="continuation=1,t2v=1",
        train_batch_size=2,
    )
    for seed in range(20):  # until the two samples draw different tasks
        drawn = conditioning.draw_tasks(cfg.tasks, 2, torch.Generator().manual_seed(seed))
        if len(set(drawn)) == 2:
            break
    spy = Spy()
    optimizer = torch.optim.SGD(spy.parameters(), lr=0.0)
    g = torch.Generator().manual_seed(seed)
    result = train_step(spy, iter([batch]), optimizer, [spy.scale], cfg, g, None, Dist())
    counts = {"continuation": 2, "t2v": 0}
    assert spy.calls == [(1, counts[t]) for t, _ in conditioning.task_groups(drawn)]
    assert result.updated and result.samples == 2 and sorted(result.keys) == sorted(batch["keys"])


# ---------------------------------------------------------------- runs


def test_continuation_and_mixed_runs_train(tiny_shards, tmp_path):
    for task in ("continuation", "mixed"):
        result = train(tiny_config(tiny_shards, tmp_path / task, conditioning=task))
        assert sorted(result.losses) == [1, 2] and all(np.isfinite(v) for v in result.losses.values())


@pytest.fixture(scope="module")
def shards_with_a_short_clip(tmp_path_factory) -> Path:
    """The two conftest clips (9 frames) and one of 5 frames, in one shard with its prep state."""
    root = tmp_path_factory.mktemp("short")
    videos = root / "videos"
    videos.mkdir()
    for clip in DEMO_CLIPS[:2]:
        write_mp4(synthetic_frames(128, 128, 12), videos / f"{clip.name}.mp4", fps=24)
        (videos / f"{clip.name}.txt").write_text(clip.caption or "a clip")
    write_mp4(synthetic_frames(128, 128, 6), videos / "short.mp4", fps=24)
    (videos / "short.txt").write_text("a short clip")
    out = root / "shards"
    args = [
        "shard",
        str(videos),
        str(out),
        "--model",
        "tiny",
        "--frames",
        "9",
        "--area",
        "64x64",
        "--workers",
        "0",
    ]
    assert prep.main(args) == 0
    return out


def test_a_shard_too_short_for_the_condition_is_one_line_at_start(shards_with_a_short_clip, tmp_path, capsys):
    argv = [
        "--model",
        "tiny",
        "--shards",
        str(shards_with_a_short_clip),
        "--frames",
        "9",
        "--num-workers",
        "0",
    ]
    argv += [
        "--output-dir",
        str(tmp_path / "o"),
        "--report-to",
        "none",
        "--no-progress",
        "--max-train-steps",
        "1",
    ]
    for task in (["--conditioning", "continuation"], ["--conditioning", "mixed"]):
        assert train_main([*argv, *task, "--cond-frames", "5"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "train-000000.tar holds 1 clip(s) of 5 frames" in err[0], err
        assert "set cond_frames <= 1" in err[0]
        assert not (tmp_path / "o" / "checkpoints").exists()
    # Without its prep state the manifest still knows the bucket: the folder is named.
    bare = tmp_path / "bare"
    shutil.copytree(shards_with_a_short_clip, bare, ignore=shutil.ignore_patterns(".prep"))
    with pytest.raises(ShardError, match=f"{bare} holds 1 clip"):
        train(tiny_config(bare, tmp_path / "b", conditioning="continuation", max_train_steps=1))
    # The other tasks train on it, and continuation does with a condition that fits.
    result = train(
        tiny_config(shards_with_a_short_clip, tmp_path / "c", cond_frames=1, conditioning="continuation")
    )
    assert sorted(result.losses) == [1, 2]


def test_the_stream_refuses_a_sample_too_short_for_the_condition(tiny_shards):
    stream = ShardStream(
        expand_shard_spec(str(tiny_shards)), StreamConfig(min_latent_frames=4, need_cond=False)
    )
    with pytest.raises(ShardError, match="has 3 latent frames, fewer than the 4 the config needs"):
        next(iter(stream))


# ---------------------------------------------------------------- settings


def test_i2v_switch_and_old_configs_map_onto_conditioning(tmp_path):
    assert parse_train_args([]).conditioning == "i2v"
    assert parse_train_args(["--no-i2v"]).conditioning == "t2v"
    assert parse_train_args(["--conditioning", "mixed", "--i2v"]).conditioning == "i2v"
    (tmp_path / "old.json").write_text('{"i2v": false}')
    assert parse_train_args(["--config", str(tmp_path / "old.json")]).conditioning == "t2v"
    cfg = parse_train_args(["--config", str(tmp_path / "old.json"), "--conditioning", "continuation"])
    assert cfg.conditioning == "continuation" and "i2v" not in cfg.to_dict()


@pytest.mark.parametrize(
    "argv, problem",
    [
        (["--cond-frames", "12"], "--cond-frames 12: must be 4k+1"),
        (["--cond-frames", "0"], "--cond-frames 0: must be 4k+1"),
        (["--conditioning", "continuation", "--frames", "13"], "cond_frames = 13: continuation needs fewer"),
        (["--conditioning", "mixed", "--cond-frames", "17", "--frames", "17"], "cond_frames = 17"),
        (["--conditioning-mix", "i2v=0,t2v=0"], "--conditioning-mix 'i2v=0,t2v=0': must be TASK=WEIGHT"),
        (["--conditioning-mix", "dance=1"], "--conditioning-mix 'dance=1': must be"),
    ],
)
def test_bad_conditioning_settings_are_one_line(argv, problem, capsys):
    assert train_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert problem in err[-1], err


def test_a_mix_is_checked_only_where_it_can_be_used():
    with pytest.raises(ConfigError, match="fewer than frames"):
        TrainConfig(conditioning="mixed", conditioning_mix="continuation=1", frames=13).validate()
    # cond_frames does not matter to runs that never draw continuation.
    TrainConfig(conditioning="mixed", conditioning_mix="i2v=1,t2v=1", frames=13).validate()
    TrainConfig(conditioning="i2v", frames=13).validate()


def test_a_continuation_run_validates_continuations_of_its_eval_clips(tiny_shards, tmp_path):
    from longcat_data.video import read_mp4

    cfg = tiny_config(
        tiny_shards,
        tmp_path,
        conditioning="continuation",
        max_train_steps=1,
        validation_source=str(tiny_shards),
        validation_limit=1,
        validation_frames=TINY_FRAMES,
        validation_inference_steps=1,
        validation_guidance=1.0,
        validation_area="64x64",
    )
    assert cfg.validation_task == "continuation"
    train(cfg)
    (video,) = (tmp_path / "validation" / "step_000001").glob("*.mp4")
    assert len(read_mp4(video)) == TINY_FRAMES
    refused = dict(cfg.to_dict(), validation_frames=5, output_dir=str(tmp_path / "again"))
    with pytest.raises(ConfigError, match="cond_frames = 5: a continuation validation needs fewer"):
        TrainConfig(**refused).validate()


def test_a_run_saved_with_the_i2v_key_resumes_as_its_conditioning():
    from longcat_train.runs import resume_mismatch

    old = {k: v for k, v in TrainConfig().to_dict().items() if k not in ("conditioning", "cond_frames")}
    assert resume_mismatch({**old, "i2v": True}, TrainConfig()) == []
    assert resume_mismatch({**old, "i2v": False}, TrainConfig()) == ["conditioning: 't2v' -> 'i2v'"]
    changed = TrainConfig(conditioning="mixed")
    assert resume_mismatch(TrainConfig().to_dict(), changed) == ["conditioning: 'i2v' -> 'mixed'"]


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["sdpa", "block_sparse"])
def test_continuation_and_mixed_train_on_the_gpu(tiny_shards, tmp_path, attention):
    # bf16 autocast and the block-sparse kernel with several condition latent frames (their own blocks).
    for task in ("continuation", "mixed"):
        cfg = tiny_config(
            tiny_shards, tmp_path / task, conditioning=task, attention=attention, train_batch_size=2
        )
        result = train(cfg)
        assert sorted(result.losses) == [1, 2] and all(np.isfinite(v) for v in result.losses.values())
        assert result.skipped_steps == 0
