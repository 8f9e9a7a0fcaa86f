"""``longcat-prep shard --engine ray``: the prep as a Ray Data pipeline, on the Ray instance this process
is connected to, else the cluster in ``$RAY_ADDRESS``, else a local instance started for the run::

    inputs -> [Ray tasks, 1 CPU each]  clips.prepare_input: probe, bucket/trim, caption, start frame, decode
           -> [encoder actors]         prep.encode_inputs: same_shape_batches + encode_batch (VAE, umT5)
           -> [this process]           prep.clips_of_inputs + prep.write_clips, streamed as results arrive

The stages are the local engine's own functions; Ray only decides where they run. An encoder actor
takes a GPU where the cluster has GPUs, a CPU otherwise. Records travel pickled in one column, so Ray
Data never converts their fields to Arrow; only the decoded frames travel as a tensor column of their
own, which the actor reads in place. Only this process writes: the output folder, its lock
and its resume state are the local engine's, so either engine continues the other's run.

A task whose worker dies (a crash, a lost node) is retried, and a dead encoder actor is restarted and
its batch retried, ``RETRIES`` times each; an input still failing then comes out as a ``lost``
rejection (re-run to try it again), so no input can end the run. A bad file is a rejection already in
the stage, as in the local engine. Nothing here imports ``longcat_data.prep``: it hands its functions in.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from longcat_data.clips import ClipSpec, prepare_input, rejection
from longcat_data.config import PrepConfig
from longcat_data.flags import ConfigError
from longcat_data.interrupts import STOP_SIGNALS

try:
    import ray
    import ray.data
except ImportError as err:
    raise ConfigError("--engine ray needs Ray: pip install -e '.[ray]' (or pip install 'ray[data]')") from err

if TYPE_CHECKING:
    from longcat_data.prep import EncoderFactory, Encoders

log = logging.getLogger(__name__)

# Per task and per actor. Ray's own default retries without end, which a file that crashes its decoder
# every time would turn into a run that never finishes.
RETRIES = 3
# Fault injection for the tests: a folder. A file STAGE there: the first worker to reach that stage
# removes it and dies at once, as a worker on a lost node would. A file STAGE.KEY: every worker that
# reaches the stage with input KEY dies (a file that crashes its decoder).
FAULTS_ENV = "LONGCAT_PREP_FAULTS"


@dataclass(frozen=True)
class EncodeJob:
    """What an encoder actor needs: how to build the encoders (on its device, in ``dtype``) and how to
    encode a batch of prepared inputs (``prep.encode_inputs``)."""

    factory: EncoderFactory
    device: str
    dtype: torch.dtype
    batch_size: int
    encode: Callable[[list[dict], Encoders, int], list[dict]]


def _fault_point(stage: str, key: str) -> None:
    folder = os.environ.get(FAULTS_ENV)
    if not folder:
        return
    if os.path.exists(os.path.join(folder, f"{stage}.{key}")):
        os._exit(1)
    try:
        os.remove(os.path.join(folder, stage))
    except FileNotFoundError:
        return
    os._exit(1)


def _pickled(record: dict) -> bytes:
    return pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL)


# A prepared input's frames travel beside its pickled record as a tensor column: the object store holds
# them as one buffer the encoder actor reads in place, where a pickled record would be copied out of the
# store and again by unpickling, on the actor's side of the pipeline. An input without clips (a
# rejection, or every clip written already) has none.
_NO_FRAMES = np.empty((0, 1, 1, 1, 3), np.uint8)


def _frames_apart(record: dict) -> dict[str, Any]:
    """A prepared input as a row: the record without its clips' frames, and the frames stacked (an
    input's clips share its bucket)."""
    clips = record.get("clips") or []
    if not clips:
        return {"record": _pickled(record), "frames": _NO_FRAMES}
    frames = np.stack([clip["frames"].numpy() for clip in clips])
    return {
        "record": _pickled({**record, "clips": [{**clip, "frames": None} for clip in clips]}),
        "frames": frames,
    }


def _frames_back(data: bytes, frames: np.ndarray) -> dict:
    """:func:`_frames_apart` undone, the frames left where Ray keeps them (read only: encoding only
    reads them)."""
    record = pickle.loads(data)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for clip, clip_frames in zip(record.get("clips") or [], frames, strict=True):
            clip["frames"] = torch.from_numpy(clip_frames)
    return record


def _prepare(row: dict[str, Any], spec: ClipSpec) -> dict[str, Any]:
    sample = pickle.loads(row["record"])
    _fault_point("decode", sample["__key__"])
    return _frames_apart(prepare_input(sample, spec))


class InputEncoder:
    """An encoder actor: builds the encoders once, then encodes batches of prepared inputs."""

    def __init__(self, job: EncodeJob) -> None:
        self.job = job
        self.encoders = job.factory.build(torch.device(job.device), job.dtype)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        records = [
            _frames_back(data, frames) for data, frames in zip(batch["record"], batch["frames"], strict=True)
        ]
        for record in records:
            _fault_point("encode", record["__key__"])
        encoded = self.job.encode(records, self.encoders, self.job.batch_size)
        column = np.empty(len(encoded), dtype=object)
        column[:] = [_pickled(record) for record in encoded]
        return {"record": column}


def actor_device(cfg: PrepConfig) -> str:
    """``cuda`` when ``--device`` says so or, without it, when the cluster has GPUs; else ``cpu``. An
    actor sees only its own GPU, so no index."""
    gpus = ray.cluster_resources().get("GPU", 0)
    device = torch.device(cfg.device).type if cfg.device is not None else ("cuda" if gpus else "cpu")
    if device == "cuda" and not gpus:
        raise ConfigError(
            "--device cuda: the Ray cluster has no GPUs; add GPU nodes or drop --device to encode on CPUs"
        )
    if device == "cuda" and gpus < cfg.ray_encoders:
        log.warning(
            "--ray-encoders %d but the Ray cluster has %g GPUs: the other encoders wait for GPUs",
            cfg.ray_encoders,
            gpus,
        )
    return device


@contextmanager
def connected(cfg: PrepConfig) -> Iterator[PrepConfig]:
    """Ray for one run; yields ``cfg`` with the actors' device as ``device``, so the recorded settings
    name the dtype the actors encode in. A local instance started here is stopped after the run, and
    the SIGTERM handler ``ray.init`` replaces is put back."""
    ours = not ray.is_initialized()
    main = threading.current_thread() is threading.main_thread()
    sigterm = signal.getsignal(signal.SIGTERM) if main else None
    if ours:
        address = os.environ.get("RAY_ADDRESS")
        # A local instance's processes join this process group, so a stop signal to the group (Ctrl-C,
        # a scheduler's SIGTERM) would end them before this process has closed its shard. Started with
        # the stop signals blocked (inherited), they leave the stopping to this process and ray.shutdown.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
        except ConnectionError as err:
            raise ConfigError(
                f"cannot reach the Ray cluster at RAY_ADDRESS={address} ({err}); start it "
                "(ray start --head) or unset RAY_ADDRESS for a local instance"
            ) from err
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    try:
        yield replace(cfg, device=actor_device(cfg))
    finally:
        if ours:
            ray.shutdown()
            if main:
                signal.signal(signal.SIGTERM, sigterm)


def encoded_inputs(todo: list[dict], spec: ClipSpec, job: EncodeJob, encoders: int) -> Iterator[dict]:
    """``todo`` prepared by Ray tasks and encoded by ``encoders`` actors, each input as it is done (in
    any order); an input whose task failed on every retry comes last, as a ``lost`` rejection."""
    if not todo:
        return
    rows = [{"record": _pickled(sample)} for sample in todo]
    with warnings.catch_warnings():
        # Bounded retries have no named parameter in Ray Data yet; its default retries forever.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        dataset = (
            # One input per block: a block lost after its retries costs that input alone.
            ray.data.from_items(rows, override_num_blocks=len(rows))
            .map(
                _prepare, fn_kwargs={"spec": replace(spec, decode_threads=1)}, num_cpus=1, max_retries=RETRIES
            )
            .map_batches(
                InputEncoder,
                fn_constructor_kwargs={"job": job},
                batch_size=job.batch_size,
                compute=ray.data.ActorPoolStrategy(size=encoders),
                num_cpus=1,
                num_gpus=1 if job.device == "cuda" else 0,
                max_restarts=RETRIES,
                max_task_retries=RETRIES,
            )
        )
    context = dataset.context
    context.enable_progress_bars = False  # the run's own bar is the one line of progress
    context.print_on_execution_start = False
    context.max_errored_blocks = -1  # what a lost block held is reported below, never the end of the run
    waiting = {sample["__key__"]: sample for sample in todo}
    for row in dataset.iter_rows():
        record = pickle.loads(row["record"])
        waiting.pop(record["__key__"], None)
        yield record
    for sample in waiting.values():
        yield rejection(
            sample,
            "lost",
            f"its Ray task failed {RETRIES + 1} times (a crash on this file, or lost nodes: see the Ray "
            "log); re-run to try it again",
        )
