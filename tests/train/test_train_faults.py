"""A real job's seams: stop signals, kills, damaged checkpoints, bad settings, used output folders,
missing shards and failing validations, each on the tiny model on the CPU."""

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from longcat_train import cli, trainer
from longcat_train.checkpoints import CHECKSUMS_FILE, load_checkpoint
from longcat_train.cli import parse_train_args, train_main
from longcat_train.config import TrainConfig, save_config
from longcat_train.parallel import Dist
from longcat_train.runs import resume_candidates
from longcat_train.stopping import STOP_SIGNALS, StopSignals
from longcat_train.trainer import train

pytestmark = pytest.mark.usefixtures("single_thread")

TINY_FRAMES = 9  # the conftest's shards
STEPS = 6


def run_args(shards: Path, out: Path, *extra: str) -> list[str]:
    """A small run that exercises what resume must restore: two loader workers, accumulation, LoRA
    dropout, a checkpoint every two steps."""
    return [
        "--model",
        "tiny",
        "--shards",
        str(shards),
        "--frames",
        str(TINY_FRAMES),
        "--output-dir",
        str(out),
        "--max-train-steps",
        str(STEPS),
        "--checkpointing-steps",
        "2",
        "--gradient-accumulation-steps",
        "2",
        "--num-workers",
        "2",
        "--shuffle-buffer",
        "4",
        "--lora-dropout",
        "0.1",
        "--learning-rate",
        "1e-3",
        "--no-progress",
        "--report-to",
        "none",
        *extra,
    ]


# longcat-train with a fault injected by $FAULT: "sigterm:N" has kill(1) signal the process group
# (trainer and its loader workers, as a scheduler does) during the N-th micro-batch; "sigterm-rank1:N" signals rank 1 alone; "kill:N" SIGKILLs
# the trainer while checkpoint step N is written (all its files there, not yet renamed).
HOOKED_TRAIN = """
import os, signal, subprocess, sys
from longcat_train import checkpoints, trainer
from longcat_train.cli import train_main

fault, _, at = os.environ.get("FAULT", "none:0").partition(":")
calls = 0
loss = trainer.training_loss
checksums = checkpoints.write_checksums

def training_loss(*args, **kwargs):
    global calls
    calls += 1
    if calls == int(at):
        if fault == "sigterm":
            subprocess.run(["kill", "-s", "TERM", "--", f"-{os.getpgid(0)}"])
        elif fault == "sigterm-rank1" and os.environ.get("RANK") == "1":
            os.kill(os.getpid(), signal.SIGTERM)
    return loss(*args, **kwargs)

def write_checksums(directory):
    if fault == "kill" and directory.name == f"step-{int(at):07d}.partial":
        os.kill(os.getpid(), signal.SIGKILL)
    return checksums(directory)

trainer.training_loss = training_loss
checkpoints.write_checksums = write_checksums
sys.exit(train_main(sys.argv[1:]))
"""


def hooked(args: list[str], fault: str = "", timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FAULT": fault or "none:0"}
    return subprocess.run(
        [sys.executable, "-c", HOOKED_TRAIN, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,  # its own process group: a group signal reaches only it and its workers
    )


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tiny_shards, tmp_path_factory) -> dict:
    """The uninterrupted run: step -> loss, and its LoRA."""
    out = tmp_path_factory.mktemp("reference")
    proc = hooked(run_args(tiny_shards, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {
        "losses": {m["step"]: m["loss"] for m in metrics(out)},
        "lora": load_file(out / "lora.safetensors"),
    }


def assert_matches_reference(out: Path, reference: dict) -> None:
    steps = [m["step"] for m in metrics(out)]
    assert steps == list(range(1, STEPS + 1)), steps  # one line per step, none repeated
    assert {m["step"]: m["loss"] for m in metrics(out)} == reference["losses"]
    lora = load_file(out / "lora.safetensors")
    assert all(torch.equal(lora[k], reference["lora"][k]) for k in reference["lora"])


# ---------------------------------------------------------------- signals and kills


@pytest.mark.parametrize("seed", [0, 1])
def test_sigterm_saves_at_the_step_boundary_and_resume_latest_alone_is_exact(
    tiny_shards, tmp_path, reference, seed
):
    micro_batch = random.Random(seed).randrange(1, 2 * (STEPS - 1))  # any but the last step's
    stop_step = (micro_batch + 1) // 2
    out = tmp_path / "run"
    stopped = hooked(run_args(tiny_shards, out), f"sigterm:{micro_batch}")
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    last = stopped.stderr.strip().splitlines()[-1]
    checkpoint = out / "checkpoints" / f"step-{stop_step:07d}"
    assert last == (
        f"longcat-train: stopped at step {stop_step} (SIGTERM): checkpoint saved to {checkpoint}; "
        f"resume with --resume latest --output-dir {out}"
    )
    assert json.loads((checkpoint / "state.json").read_text())["step"] == stop_step
    assert "Traceback" not in stopped.stderr  # the loader workers did not die of the signal

    resumed = hooked(["--resume", "latest", "--output-dir", str(out)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_matches_reference(out, reference)


def test_kill_9_while_a_checkpoint_is_written_leaves_the_previous_one(tiny_shards, tmp_path, reference):
    out = tmp_path / "run"
    killed = hooked(run_args(tiny_shards, out), "kill:4")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (out / "checkpoints" / "step-0000004.partial").is_dir()
    assert [p.name for p in resume_candidates(TrainConfig(output_dir=str(out), resume="latest"))] == [
        "step-0000002"
    ]
    # The killed run logged steps 3 and 4 after its checkpoint at 2: resuming drops them.
    resumed = hooked(["--resume", "latest", "--output-dir", str(out)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_matches_reference(out, reference)
    assert not (out / "checkpoints" / "step-0000004.partial").exists()


def test_one_rank_signalled_alone_stops_every_rank_at_the_same_step(tiny_shards, tmp_path):
    script = tmp_path / "hooked_train.py"
    script.write_text(HOOKED_TRAIN)
    out = tmp_path / "ddp"
    args = run_args(tiny_shards, out, "--num-workers", "1", "--gradient-accumulation-steps", "1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = subprocess.run(
        [*cmd, str(script), *args],
        env={**os.environ, "OMP_NUM_THREADS": "1", "FAULT": "sigterm-rank1:2"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "longcat-train: stopped at step 2 (SIGTERM)" in proc.stderr, proc.stderr[-3000:]
    checkpoint = out / "checkpoints" / "step-0000002"
    assert (checkpoint / "rng-rank00000.pt").is_file() and (checkpoint / "rng-rank00001.pt").is_file()
    assert (checkpoint / CHECKSUMS_FILE).is_file()
    assert [m["step"] for m in metrics(out)] == [1, 2]


def test_stop_signals_are_recorded_then_the_previous_handlers_come_back():
    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    with StopSignals(quit_after=0.5) as stop:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal changes nothing
        os.kill(os.getpid(), signal.SIGINT)  # nor an immediate Ctrl-C (torchrun passing one on)
        assert stop.signum == signal.SIGUSR1
        time.sleep(0.5)
        with pytest.raises(KeyboardInterrupt):  # but a later Ctrl-C stops at once
            os.kill(os.getpid(), signal.SIGINT)
    assert {s: signal.getsignal(s) for s in STOP_SIGNALS} == before


# ---------------------------------------------------------------- damaged checkpoints


def tiny_config(shards: Path, out: Path, **kw) -> TrainConfig:
    values = dict(
        model="tiny",
        shards=[str(shards)],
        frames=TINY_FRAMES,
        output_dir=str(out),
        num_workers=0,
        progress=False,
        report_to="none",
        checkpointing_steps=1,
        checkpoints_total_limit=0,
        max_train_steps=3,
        shuffle_buffer=4,
    )
    return TrainConfig(**{**values, **kw})


@pytest.fixture(scope="module")
def three_checkpoints(tiny_shards, tmp_path_factory) -> tuple[Path, dict[int, float]]:
    out = tmp_path_factory.mktemp("three") / "run"
    result = train(tiny_config(tiny_shards, out))
    return out, result.losses


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated optimizer": lambda c: truncate(c / "optimizer.pt"),
    "truncated lora": lambda c: truncate(c / "lora.safetensors"),
    "truncated official lora": lambda c: truncate(c / "lora_longcat.safetensors"),
    "flipped byte in lora": lambda c: flip_a_byte(c / "lora.safetensors"),
    "bad state.json": lambda c: (c / "state.json").write_text("{"),
    "missing state.json": lambda c: (c / "state.json").unlink(),
    "missing rng file": lambda c: (c / "rng-rank00000.pt").unlink(),
    "bad checksums.json": lambda c: (c / CHECKSUMS_FILE).write_text("[]"),
    "older run, bad config": lambda c: [
        (c / CHECKSUMS_FILE).unlink(),
        (c / "train_config.json").write_text("{"),
    ],
    "older run, truncated optimizer": lambda c: [(c / CHECKSUMS_FILE).unlink(), truncate(c / "optimizer.pt")],
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_latest_checkpoint_is_named_and_the_one_before_used(
    three_checkpoints, tmp_path, caplog, damage
):
    out = Path(shutil.copytree(three_checkpoints[0], tmp_path / "run"))
    DAMAGE[damage](out / "checkpoints" / "step-0000003")
    cfg = TrainConfig(output_dir=str(out), resume="latest")
    with caplog.at_level(logging.WARNING):
        resumed = load_checkpoint(resume_candidates(cfg), Dist())
    assert resumed.path.name == "step-0000002" and resumed.state.step == 2
    assert "step-0000003 is not usable" in caplog.text


def test_an_older_checkpoint_without_checksums_is_accepted(three_checkpoints, tmp_path):
    out = Path(shutil.copytree(three_checkpoints[0], tmp_path / "run"))
    (out / "checkpoints" / "step-0000003" / CHECKSUMS_FILE).unlink()
    resumed = load_checkpoint(resume_candidates(TrainConfig(output_dir=str(out), resume="latest")), Dist())
    assert resumed.path.name == "step-0000003"


def test_training_resumes_from_the_newest_intact_checkpoint(tiny_shards, three_checkpoints, tmp_path):
    out = Path(shutil.copytree(three_checkpoints[0], tmp_path / "run"))
    truncate(out / "checkpoints" / "step-0000003" / "optimizer.pt")
    result = train(tiny_config(tiny_shards, out, resume="latest"))
    assert result.losses == {3: three_checkpoints[1][3]}
    assert [m["step"] for m in metrics(out)] == [1, 2, 3]
    assert (out / "checkpoints" / "step-0000003.superseded").is_dir()  # the damaged one, set aside


def test_no_intact_checkpoint_is_one_line(three_checkpoints, tmp_path, capsys):
    out = Path(shutil.copytree(three_checkpoints[0], tmp_path / "run"))
    for checkpoint in (out / "checkpoints").iterdir():
        truncate(checkpoint / "lora.safetensors")
    assert train_main(["--resume", "latest", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no intact checkpoint" in err[0] and "step-0000001" in err[0], err


def test_a_checkpoint_the_disk_refuses_is_a_warning_and_training_goes_on(
    tiny_shards, tmp_path, monkeypatch, caplog
):
    save = torch.save

    def disk_full_at_step_2(obj, path, *args, **kwargs):
        if Path(path).parent.name == "step-0000002.partial" and Path(path).name == "optimizer.pt":
            raise OSError(28, "No space left on device")
        return save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_at_step_2)
    with caplog.at_level(logging.WARNING):
        result = train(tiny_config(tiny_shards, tmp_path))
    assert sorted(result.losses) == [1, 2, 3] and result.lora_path.is_file()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000001", "step-0000003"]
    assert "step-0000002 not saved (OSError: [Errno 28] No space left on device)" in caplog.text


# ---------------------------------------------------------------- settings


BAD_FLAGS = [
    ("learning_rate", ["--learning-rate", "inf"]),
    ("learning_rate", ["--learning-rate", "nan"]),
    ("learning_rate", ["--learning-rate=-1e-4"]),
    ("learning_rate", ["--learning-rate", "0"]),
    ("lora_rank", ["--lora-rank", "0"]),
    ("lora_alpha", ["--lora-alpha", "-1"]),
    ("lora_dropout", ["--lora-dropout", "1"]),
    ("lora_dropout", ["--lora-dropout", "-0.1"]),
    ("caption_dropout", ["--caption-dropout", "1.5"]),
    ("num_workers", ["--num-workers", "-1"]),
    ("max_train_steps", ["--max-train-steps", "-5"]),
    ("num_train_epochs", ["--num-train-epochs", "-1"]),
    ("max_train_steps", ["--max-train-steps", "0"]),  # and no epochs
    ("train_batch_size", ["--train-batch-size", "0"]),
    ("gradient_accumulation_steps", ["--gradient-accumulation-steps", "0"]),
    ("adam_beta1", ["--adam-beta1", "1"]),
    ("adam_beta2", ["--adam-beta2", "-0.5"]),
    ("adam_epsilon", ["--adam-epsilon", "0"]),
    ("weight_decay", ["--weight-decay", "-0.01"]),
    ("max_grad_norm", ["--max-grad-norm", "-1"]),
    ("flow_schedule_shift", ["--flow-schedule-shift", "0"]),
    ("logit_std", ["--logit-std", "0"]),
    ("logit_mean", ["--logit-mean", "inf"]),
    ("checkpointing_steps", ["--checkpointing-steps", "-1"]),
    ("checkpoints_total_limit", ["--checkpoints-total-limit", "-2"]),
    ("lr_warmup_steps", ["--lr-warmup-steps", "-1"]),
    ("seed", ["--seed", "-1"]),
    ("frames", ["--frames", "3"]),  # 4k+1 counts are rounded down (issue 19): too few is refused
    ("validation_frames", ["--validation-frames", "4"]),
    ("validation_inference_steps", ["--validation-inference-steps", "0"]),
    ("validation_guidance", ["--validation-guidance", "inf"]),
    ("validation_guidance", ["--validation-guidance", "-1"]),
    ("validation_limit", ["--validation-limit", "0"]),
    ("validation_area", ["--validation-area", "480x830"]),
    ("validation_area", ["--validation-resolution", "big"]),
    ("validation_source", ["--validation-source", "/no/such/pairs"]),
    ("resume", ["--resume", "/no/such/run"]),
    ("output_dir", ["--output-dir", "{file}/run"]),
    ("overwrite", ["--overwrite", "--resume"]),
]
BAD_FILES = [
    ("learning_rate", {"learning_rate": "fast"}),
    ("lora_rank", {"lora_rank": 8.5}),
    ("i2v", {"i2v": "false"}),
    ("lora_targets", {"lora_targets": 5}),
    ("num_workers", {"num_workers": True}),
    ("validation_area", {"validation_resolution": 480}),
    ("lora_rank", {"model_family": "longcat_video", "--lora_rank": "8.5"}),  # SimpleTuner, as text
    ("lora_dropout", {"model_family": "longcat_video", "--lora_dropout": "fast"}),
]


@pytest.fixture
def refused(tmp_path, capsys, monkeypatch):
    """``refused(argv)``: the one error line of ``longcat-train ARGV``, checking it exits 2 quickly and
    never reaches the trainer."""
    started = []
    monkeypatch.setattr(trainer, "train", lambda cfg: started.append(cfg))
    (tmp_path / "file").write_text("")

    def run(argv: list[str]) -> str:
        begin = time.perf_counter()
        code = cli.train_main([a.replace("{file}", str(tmp_path / "file")) for a in argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and not started, err
        assert time.perf_counter() - begin < 5
        return err[0]

    return run


@pytest.mark.parametrize("key, flags", BAD_FLAGS, ids=[" ".join(f) for _, f in BAD_FLAGS])
def test_a_bad_flag_is_one_line_before_anything_loads(tiny_shards, tmp_path, refused, key, flags):
    line = refused(
        ["--model", "tiny", "--shards", str(tiny_shards), "--output-dir", str(tmp_path / "o"), *flags]
    )
    # A typed value is named by its flag; a rule between settings by their keys.
    named = (f"longcat-train: error: --{key.replace('_', '-')} ", f"longcat-train: error: {key} ")
    assert line.startswith(named) and ("must" in line or "exclude" in line), line


@pytest.mark.parametrize("key, values", BAD_FILES, ids=[json.dumps(v) for _, v in BAD_FILES])
def test_a_bad_config_file_value_is_one_line_before_anything_loads(tmp_path, refused, key, values):
    (tmp_path / "c.json").write_text(json.dumps(values))
    line = refused(["--config", str(tmp_path / "c.json"), "--output-dir", str(tmp_path / "o")])
    assert f"error: {key} = " in line and "must be" in line, line


def test_several_bad_values_are_one_line_each(tmp_path, capsys):
    code = train_main(["--lora-rank", "0", "--learning-rate", "nan", "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and [line.split(" ")[2] for line in err] == ["--lora-rank", "--learning-rate"]


@pytest.mark.parametrize(
    "flags, key",
    [
        (["--steps", "0"], "--steps 0"),
        (["--guidance", "nan"], "--guidance nan"),
        (["--size", "480x830"], "--area 480x830"),
    ],
)
def test_longcat_sample_refuses_bad_values_in_one_line(capsys, flags, key):
    assert cli.sample_main(["--model", "tiny", "--prompt", "a cat", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"longcat-sample: error: {key}: must be "), err


def test_refusing_a_bad_value_imports_no_model_library(tmp_path):
    code = (
        "import sys\nfrom longcat_train.cli import train_main\n"
        f"code = train_main(['--lora-dropout', '2', '--output-dir', {str(tmp_path)!r}])\n"
        "print(code, sorted(m for m in ('torch', 'diffusers', 'peft') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "2 []", proc.stderr
    assert (
        proc.stderr.strip() == "longcat-train: error: --lora-dropout 2.0: must be a finite number in [0, 1)"
    )


def test_a_validation_source_without_pairs_is_one_line_at_start(tiny_shards, tmp_path, capsys, make_image):
    from PIL import Image

    pairs = tmp_path / "pairs"
    pairs.mkdir()
    Image.fromarray(make_image(64, 64)).save(pairs / "a.png")  # and no a.txt
    args = ["--model", "tiny", "--shards", str(tiny_shards), "--frames", str(TINY_FRAMES)]
    code = train_main([*args, "--output-dir", str(tmp_path / "o"), "--validation-source", str(pairs)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "has no caption" in err[0], err
    assert not (tmp_path / "o" / "train_config.json").exists()


# ---------------------------------------------------------------- resume takes the saved config


def saved_run(tmp_path: Path, **kw) -> Path:
    """An output folder with one checkpoint whose saved config is ``kw`` over the defaults."""
    out = tmp_path / "run"
    checkpoint = out / "checkpoints" / "step-0000002"
    checkpoint.mkdir(parents=True)
    save_config(TrainConfig(output_dir=str(out), **kw), checkpoint / "train_config.json")
    return out


def test_resume_starts_from_the_saved_config_then_file_then_typed_flags(tmp_path):
    out = saved_run(tmp_path, model="tiny", lora_rank=4, learning_rate=3e-4, seed=7, max_train_steps=9)
    cfg = parse_train_args(["--resume", "latest", "--output-dir", str(out)])
    assert (cfg.model, cfg.lora_rank, cfg.learning_rate, cfg.seed, cfg.max_train_steps) == (
        "tiny",
        4,
        3e-4,
        7,
        9,
    )
    (tmp_path / "more.toml").write_text("max_train_steps = 20\nseed = 8\n")
    cfg = parse_train_args(
        [
            "--resume",
            "latest",
            "--output-dir",
            str(out),
            "--config",
            str(tmp_path / "more.toml"),
            "--seed",
            "9",
        ]
    )
    assert (cfg.lora_rank, cfg.max_train_steps, cfg.seed, cfg.resume) == (4, 20, 9, "latest")
    # A checkpoint path: the run's own output folder comes with it.
    cfg = parse_train_args(["--resume", str(out / "checkpoints" / "step-0000002")])
    assert cfg.output_dir == str(out) and cfg.lora_rank == 4


def test_resume_refuses_only_typed_changes(tiny_shards, tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "--model",
        "tiny",
        "--shards",
        str(tiny_shards),
        "--frames",
        str(TINY_FRAMES),
        "--output-dir",
        str(out),
    ]
    quiet = ["--no-progress", "--report-to", "none", "--num-workers", "0", "--max-train-steps", "1"]
    assert train_main([*args, *quiet, "--lora-rank", "4"]) == 0
    assert train_main(["--resume", "latest", "--output-dir", str(out), "--max-train-steps", "2"]) == 0
    assert [m["step"] for m in metrics(out)] == [1, 2]
    capsys.readouterr()
    assert train_main(["--resume", "latest", "--output-dir", str(out), "--lora-rank", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lora_rank: 4 -> 8" in err[0], err


# ---------------------------------------------------------------- output folders


def test_a_folder_holding_a_run_is_refused_then_overwritten(tiny_shards, tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "--model",
        "tiny",
        "--shards",
        str(tiny_shards),
        "--frames",
        str(TINY_FRAMES),
        "--output-dir",
        str(out),
    ]
    args += ["--no-progress", "--report-to", "none", "--num-workers", "0", "--checkpointing-steps", "1"]
    assert train_main([*args, "--max-train-steps", "2"]) == 0
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert train_main([*args, "--max-train-steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(out) in err[0] and "--resume latest" in err[0] and "--overwrite" in err[0]
    assert train_main([*args, "--max-train-steps", "1", "--overwrite"]) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000001"]
    assert [m["step"] for m in metrics(out)] == [1]
    assert (out / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------- shards and validation


def test_a_missing_shard_is_refused_unless_allowed(shard_copy, tmp_path, capsys, caplog):
    manifest = json.loads((shard_copy / "manifest.json").read_text())
    manifest["shards"].append({"name": "train-000009.tar", "samples": 5, "bytes": 1000})
    (shard_copy / "manifest.json").write_text(json.dumps(manifest))
    args = ["--model", "tiny", "--shards", str(shard_copy), "--frames", str(TINY_FRAMES), "--no-progress"]
    args += ["--report-to", "none", "--num-workers", "0", "--max-train-steps", "1"]
    assert train_main([*args, "--output-dir", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and "1 of them missing (train-000009.tar)" in err[0] and "longcat-prep shard" in err[0]
    )
    with caplog.at_level(logging.WARNING):
        assert train_main([*args, "--output-dir", str(tmp_path / "b"), "--allow-missing-shards"]) == 0
    assert "1 of them missing" in caplog.text


def test_a_failing_validation_is_logged_and_training_goes_on(tiny_shards, tmp_path, monkeypatch, caplog):
    from longcat_train import validation

    calls = []

    def out_of_memory(*args, **kwargs):
        calls.append((tmp_path / "lora.safetensors").is_file())
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(validation, "generate_videos", out_of_memory)
    cfg = tiny_config(
        tiny_shards,
        tmp_path,
        checkpointing_steps=0,
        validation_source=str(tiny_shards),
        validation_limit=1,
        validation_every=1,
        validation_frames=5,
        validation_inference_steps=2,
        validation_area="64x64",
    )
    with caplog.at_level(logging.WARNING):
        result = train(cfg)
    assert sorted(result.losses) == [1, 2, 3] and result.lora_path.is_file()
    assert calls == [False, False, True]  # the final LoRA was on disk before the last validation
    failed = [r.getMessage() for r in caplog.records if "validation at step" in r.getMessage()]
    assert len(failed) == 3 and failed[0].startswith("validation at step 1 failed (OutOfMemoryError")
