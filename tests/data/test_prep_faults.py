"""A prep run at its seams (issue 14): killed (kill -9) or stopped (SIGTERM, SIGHUP, Ctrl-C) at chosen and
at random points, two writers into one folder, a full disk, unreadable records. After each, a rerun must
leave exactly the expected samples: none lost, none twice, and a manifest that verifies.

Faults at chosen points come from a wrapper script that patches one seam (a shard write, the state
save before a rename, an encode, a decode in a worker process) to signal the run at its Nth call; the
subprocess runs in its own session, so a signal to its process group reaches the decoding workers too.
"""

from __future__ import annotations

import errno
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from longcat_data import cli, prep
from longcat_data import writer as shard_writer
from longcat_data.config import PrepConfig
from longcat_data.demo import DEMO_CLIPS, write_demo_clips
from longcat_data.files import OutputError
from longcat_data.locks import Holder, StreamLock
from longcat_data.manifest import MANIFEST, check_manifest, read_manifest, verify_shards
from longcat_data.shards import ShardError
from longcat_data.tars import shard_keys

CLIPS = DEMO_CLIPS[:4]
EXPECTED = sorted(c.name for c in CLIPS)
AREA, FRAMES = "128x192", 9
# A demo sample is about 87 kB here, so a 100 kB shard rolls after every second sample.
FLAGS = ["--model", "tiny", "--area", AREA, "--frames", str(FRAMES), "--shard-size", "100KB"]
ONE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TIMEOUT = 240

pytestmark = pytest.mark.usefixtures("one_thread")

FAULT_SCRIPT = """
import os, signal, sys
from longcat_data import cli, clips, prep, writer

# As a shell starts a command, whatever the test runner ignores (nohup, a background job).
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGTERM, signal.SIG_DFL)
signal.signal(signal.SIGHUP, signal.SIG_DFL)

point, nth, name = os.environ["FAULT"].split(":")
sig, nth, calls = getattr(signal, "SIG" + name), int(nth), []

def due():
    calls.append(1)
    return len(calls) == nth

def patch(module, attr, before=True, group=False):
    original = getattr(module, attr)
    def patched(*args, **kwargs):
        fire = due()
        if fire and before:
            os.killpg(os.getpgrp(), sig) if group else os.kill(os.getpid(), sig)
        result = original(*args, **kwargs)
        if fire and not before:
            os.kill(os.getpid(), sig)
        return result
    setattr(module, attr, patched)

if point == "write":        # a clip handed to the tar writer (writer thread)
    patch(writer.ShardWriter, "_write")
elif point == "recorded":   # the state names a finished shard that is not renamed yet
    patch(writer.ShardWriter, "_save_state", before=False)
elif point == "encode":     # a batch about to be encoded (main thread)
    patch(prep, "encode_batch")
elif point == "decode":     # a clip about to be decoded, in a worker; the whole process group gets it
    patch(clips, "read_frames", group=True)
sys.exit(cli.main(sys.argv[1:]))
"""


def config(videos: Path, out: Path, **kw) -> PrepConfig:
    args = {"model": "tiny", "area": AREA, "frames": FRAMES, "shard_size": "100KB", "workers": 1, **kw}
    return PrepConfig(str(videos), str(out), **args)


def keys_on_disk(out: Path) -> list[str]:
    """Every sample key in the shards the manifest lists, from the tar headers (duplicates kept)."""
    keys = []
    for shard in read_manifest(out)["shards"]:
        found, damage = shard_keys(out / shard["name"])
        assert not damage, f"{shard['name']}: {damage}"
        keys += found
    return keys


def assert_exactly_expected(out: Path) -> None:
    manifest = read_manifest(out)
    keys = keys_on_disk(out)
    assert sorted(keys) == EXPECTED, "no clip lost, none written twice"
    assert manifest["complete"] and verify_shards(out, manifest["shards"], count_samples=True) == []
    assert not list(out.glob("*.partial"))
    assert not list((out / ".prep").glob(".*.tmp")) and not list(out.glob(".*.tmp"))
    assert (out / ".prep" / "train.lock").read_text() == "", "the lock was released"


def assert_consistent(out: Path) -> int:
    """What an interrupted run leaves: whole, recorded shards only; returns their sample count."""
    manifest = read_manifest(out)
    if manifest is None:
        return 0
    assert not manifest["complete"]
    assert verify_shards(out, manifest["shards"], count_samples=True) == []
    keys = keys_on_disk(out)
    assert len(keys) == len(set(keys)) and set(keys) <= set(EXPECTED)
    return len(keys)


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("videos")
    write_demo_clips(folder, CLIPS)
    return folder


def start(script: Path, videos: Path, out: Path, fault: str, *flags: str) -> subprocess.Popen:
    command = [sys.executable, str(script), "shard", str(videos), str(out), *FLAGS, "--workers", "1", *flags]
    env = {**ONE_THREAD_ENV, "FAULT": fault}
    return subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)


@pytest.fixture
def fault_script(tmp_path: Path) -> Path:
    script = tmp_path / "fault.py"
    script.write_text(textwrap.dedent(FAULT_SCRIPT))
    return script


# (fault, exit code, samples the interrupted run must have kept: at least, or exactly when exact)
FAULTS = [
    ("write:4:KILL", -signal.SIGKILL, 2, False),
    ("recorded:2:KILL", -signal.SIGKILL, 0, False),
    ("write:3:TERM", 143, 3, False),
    ("encode:2:TERM", 143, 1, True),
    ("encode:4:HUP", 129, 3, True),
    ("decode:3:TERM", 143, 0, False),
    ("decode:2:INT", 130, 0, False),
]


@pytest.mark.parametrize(("fault", "code", "kept", "exact"), FAULTS, ids=[f[0] for f in FAULTS])
def test_killed_or_stopped_at_a_seam_then_rerun(
    videos: Path, tmp_path: Path, fault_script: Path, fault: str, code: int, kept: int, exact: bool
) -> None:
    out = tmp_path / "out"
    run = start(fault_script, videos, out, fault)
    _, err = run.communicate(timeout=TIMEOUT)
    assert run.returncode == code, err
    if code > 0:
        signame = fault.rsplit(":", 1)[1]
        last = err.strip().splitlines()[-1]
        assert last == f"interrupted (SIG{signame}); re-run the same command to continue", err
        assert "Traceback" not in err, err
        assert not list(out.glob("*.partial")), "the shard in progress was closed, not left half-written"
    if fault.startswith("recorded"):
        assert (out / "train-000000.tar.partial").is_file() and not (out / "train-000000.tar").exists()
    else:
        on_disk = assert_consistent(out)
        assert on_disk == kept if exact else on_disk >= kept
    stats = prep.run_shard(config(videos, out))
    assert stats.written + stats.skipped == len(CLIPS)
    assert_exactly_expected(out)


@pytest.mark.parametrize(("seed", "name"), [(0, "KILL"), (1, "TERM")])
def test_killed_at_a_random_moment_then_rerun(
    videos: Path, tmp_path: Path, fault_script: Path, seed: int, name: str
) -> None:
    out = tmp_path / "out"
    run = start(fault_script, videos, out, f"none:0:{name}")
    lock = out / ".prep" / "train.lock"
    deadline = time.monotonic() + TIMEOUT
    while run.poll() is None and not (lock.is_file() and lock.read_text()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(random.Random(seed).uniform(0.0, 3.0))
    if name == "KILL":
        run.kill()  # the main process only, as kill -9 PID does; its workers die with it
    else:
        os.killpg(run.pid, signal.SIGTERM)  # the whole job, as a scheduler does
    _, err = run.communicate(timeout=TIMEOUT)
    assert run.returncode in (0, -signal.SIGKILL if name == "KILL" else 143), err
    if run.returncode != 0 and not (read_manifest(out) or {}).get("complete"):
        assert_consistent(out)  # else it was killed after its last shard, on its way out
    prep.run_shard(config(videos, out))
    assert_exactly_expected(out)


def test_two_runs_into_one_folder(videos: Path, tmp_path: Path, fault_script: Path) -> None:
    out = tmp_path / "out"
    runs = [start(fault_script, videos, out, "none:0:TERM") for _ in range(2)]
    results = [(run.communicate(timeout=TIMEOUT)[1], run.returncode)[::-1] for run in runs]
    codes = sorted(code for code, _ in results)
    refused = [err for code, err in results if code == 2]
    # Whichever took the lock first writes; the other is refused, or (when it came after the end)
    # finds every clip done.
    assert codes in ([0, 2], [0, 0]), results
    for err in refused:
        line = err.strip().splitlines()[-1]
        assert line.startswith(f"longcat-prep shard: error: {out} is being written by pid ")
        assert line.endswith(
            f"(stream train); wait for it to finish or stop it; if it no longer runs, delete {out}/.prep/train.lock"
        )
    assert_exactly_expected(out)


def holder(stream: str = "train", world_size: int = 1, listing: str = "") -> Holder:
    return Holder.me(stream, world_size, listing)


def test_a_live_writer_is_refused_with_its_name(videos: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    held = StreamLock(out / ".prep", holder())
    with held:
        assert cli.main(["shard", str(videos), str(out), *FLAGS]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == (
        f"longcat-prep shard: error: {out} is being written by {held.holder.describe()} (stream train); "
        f"wait for it to finish or stop it; if it no longer runs, delete {out}/.prep/train.lock"
    )
    assert not read_manifest(out) and not list(out.glob("*.tar"))


def test_another_run_with_another_split_is_refused(videos: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    other = StreamLock(out / ".prep", holder("train-r0", world_size=2))
    with other:
        assert cli.main(["shard", str(videos), str(out), *FLAGS]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == (
        f"longcat-prep shard: error: {out} is being written by another run, {other.holder.describe()} "
        "(stream train-r0) with --world-size 2, this one with 1: both would write the same clips; "
        "wait for it to finish, then re-run"
    )


def test_a_stale_lock_of_a_dead_process_is_taken_over(videos: Path, tmp_path: Path, caplog) -> None:
    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".prep").mkdir(parents=True)
    stale = Holder(holder().host, dead.pid, time.time(), "train", 1, "")
    (out / ".prep" / "train.lock").write_text(json.dumps(stale.__dict__))
    prep.run_shard(config(videos, out))
    assert f"taking over the lock of {stale.describe()}, which no longer runs (killed?)" in caplog.text
    assert_exactly_expected(out)


# ---------------------------------------------------------------- a full disk


@pytest.fixture
def small_disk(tmp_path: Path):
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


DISK_FULL = (
    r"longcat-prep shard: error: .+: No space left on device; free some space, then re-run the same "
    r"command to continue \(the shards finished so far are kept; the one in progress is dropped and "
    r"encoded again\)"
)


def test_a_full_disk_stops_cleanly_and_a_rerun_continues(videos: Path, small_disk: Path, capsys) -> None:
    out = small_disk / "out"
    assert cli.main(["shard", str(videos), str(out), *FLAGS, "--workers", "0"]) == 2
    assert re.fullmatch(DISK_FULL, capsys.readouterr().err.strip().splitlines()[-1])
    kept = assert_consistent(out)
    assert kept < len(CLIPS) and not list(out.glob("*.partial"))
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)
    stats = prep.run_shard(config(videos, out))
    assert (stats.skipped, stats.written) == (kept, len(CLIPS) - kept), "nothing lost, nothing twice"
    assert_exactly_expected(out)


class FillingFile(io.FileIO):
    """A shard file on a disk with ``room`` bytes left (shared by every file opened)."""

    room = 0

    def write(self, data) -> int:
        if len(data) > FillingFile.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        FillingFile.room -= len(data)
        return super().write(data)


def test_no_space_while_writing_a_shard(
    videos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    FillingFile.room = 300_000  # the first shard (two samples) and part of the second
    monkeypatch.setattr(shard_writer, "open", lambda path, mode: FillingFile(path, "w"), raising=False)
    with pytest.raises(OutputError) as err:
        prep.run_shard(config(videos, out))
    partial = out / "train-000001.tar.partial"
    assert str(err.value) == (
        f"{partial}: No space left on device; free some space, then re-run the same command to continue "
        "(the shards finished so far are kept; the one in progress is dropped and encoded again)"
    )
    assert assert_consistent(out) == 2 and not partial.exists()
    monkeypatch.undo()
    stats = prep.run_shard(config(videos, out))
    assert (stats.skipped, stats.written) == (2, 2)
    assert_exactly_expected(out)


# ---------------------------------------------------------------- records that cannot be read


@pytest.fixture(scope="module")
def finished(videos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "out"
    prep.run_shard(config(videos, out))
    return out


def copy_of(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    return out


def shard_line(videos: Path, out: Path, capsys) -> str:
    assert cli.main(["shard", str(videos), str(out), *FLAGS]) == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_a_garbled_manifest_names_the_fix(videos: Path, finished: Path, tmp_path: Path, capsys) -> None:
    out = copy_of(finished, tmp_path)
    (out / MANIFEST).write_text('{"version": 1, "shards": [')
    assert shard_line(videos, out, capsys) == (
        f"longcat-prep shard: error: {out / MANIFEST} is not valid JSON (Expecting value at line 1 column 27); "
        f"rebuild it from the prep states with `longcat-prep merge {out}`"
    )
    assert cli.main(["merge", str(out)]) == 0
    stats = prep.run_shard(config(videos, out))
    assert stats.written == 0
    assert_exactly_expected(out)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (lambda state: state[: len(state) // 2], "is not valid JSON"),
        (lambda state: "", "is empty"),
        (
            lambda state: state.replace('"samples": 2', '"samples": "2"'),
            ": shards[0].samples is str, expected int",
        ),
        (lambda state: json.dumps({**json.loads(state), "shards": {}}), ": shards is dict, expected list"),
        (lambda state: "[1, 2]", ": the content is list, expected an object"),
    ],
)
def test_an_unusable_state_names_the_fix_and_the_fix_loses_nothing(
    videos: Path, finished: Path, tmp_path: Path, capsys, content, problem: str
) -> None:
    out = copy_of(finished, tmp_path)
    state = out / ".prep" / "train.json"
    state.write_text(content(state.read_text()))
    line = shard_line(videos, out, capsys)
    assert line.startswith(f"longcat-prep shard: error: {state}") and problem in line
    assert line.endswith(
        f"; move it out of {out / '.prep'} and re-run the longcat-prep shard command that wrote it "
        "(the shards it finished are read back from disk, nothing is encoded twice)"
    )
    state.rename(tmp_path / "train.json.bad")
    stats = prep.run_shard(config(videos, out))
    assert (stats.written, stats.skipped) == (0, len(CLIPS)), "the finished shards were read back"
    assert_exactly_expected(out)


def test_an_output_path_that_is_a_file(videos: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    out.write_text("not a folder")
    assert shard_line(videos, out, capsys) == (
        f"longcat-prep shard: error: {out} is a file, not a folder: choose another output folder"
    )


def test_a_damaged_shard_is_caught_by_inspect_by_the_trainer_and_repaired_by_a_rerun(
    videos: Path, finished: Path, tmp_path: Path, capsys
) -> None:
    out = copy_of(finished, tmp_path)
    manifest = read_manifest(out)
    shard = out / manifest["shards"][0]["name"]
    recorded = manifest["shards"][0]["bytes"]
    shard.write_bytes(shard.read_bytes()[: recorded // 2])
    problem = (
        f"{shard} is {recorded // 2} bytes, manifest.json records {recorded}; re-run longcat-prep shard into "
        f"{out} to encode its clips again, or `longcat-prep merge {out}` if the shards were replaced after "
        "the manifest was written"
    )
    assert cli.main(["inspect", str(out)]) == 2
    assert capsys.readouterr().err.strip() == f"longcat-prep inspect: error: {problem}"
    with pytest.raises(ShardError) as err:
        check_manifest(manifest, encoders=None, frames=None, directory=out)
    assert str(err.value) == problem
    assert cli.main(["merge", str(out)]) == 0 and not read_manifest(out)["complete"]
    stats = prep.run_shard(config(videos, out))
    assert stats.written == manifest["shards"][0]["samples"], "the damaged shard's clips, encoded again"
    assert_exactly_expected(out)
    assert (out / f"{shard.name}.unlisted").is_file(), "set aside, not deleted"
