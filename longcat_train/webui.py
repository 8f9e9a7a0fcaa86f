"""Preview page: upload a start frame, type a prompt, watch progress, play and download the video.

A small Starlette app with one plain HTML page (no external scripts or styles: the page must work on
machines without network). Generation is slow and holds the GPU, so jobs go into a queue served by one
worker thread, one at a time; the page polls the job's state. The app knows nothing about models: it
calls a ``generate(request, on_step)`` function that returns the video frames, which makes the page
testable with a stand-in and lets the CLI plug in the real sampler.

Whoever reaches the page learns nothing of the server's files: LoRAs are offered by name (their paths
stay in ``sampler_generate``), and every message the app sends has its absolute paths cut to their last
part (``public_text``). An upload is decoded on a worker thread, so status polls keep answering.
"""

from __future__ import annotations

import html
import itertools
import json
import logging
import queue
import re
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import anyio
import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from longcat_data.defaults import DEFAULT_FPS
from longcat_data.video import write_mp4
from longcat_train.config import VideoSettings
from longcat_train.continuation import check_cond_frames, read_condition_video, segment_prompts
from longcat_train.sample_config import SAMPLE_LIMITS, SampleConfig
from longcat_train.sampler import Sampler, check_sample_config, lora_entries
from longcat_train.sampling import (
    SampleInputError,
    StepCallback,
    fit_start_image,
    read_start_image,
    round_frames,
)
from longcat_train.webui_page import LORA_SLOT, PAGE

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_MB = 20
MAX_QUEUED = 16
MAX_PROMPT_CHARS = 4000
# LoRA menus (each with its strength) the page shows, at most: a job may stack that many from the page.
MAX_LORA_SLOTS = 4
# Uploads decoded at once: each may be a 64-megapixel image, hundreds of MB while it is fitted.
DECODE_THREADS = 2

# An absolute path (POSIX, home-relative or Windows) in a message, up to a space, quote or bracket.
_ABSOLUTE_PATH = re.compile(r"""(?<![\w.~/\\:])(?:~|[A-Za-z]:)?[\\/][^\s'"<>|,;()\[\]{}]+""")


@dataclass(frozen=True)
class GenerationRequest:
    """One video to make, as the page asked for it (already validated)."""

    image: np.ndarray | None  # uint8 [H, W, 3], fitted to its bucket; None when continuing a video
    prompt: str
    loras: tuple[tuple[str, float], ...]  # (a name from the server's LoRA list, its strength); () = base
    steps: int
    seed: int
    frames: int
    guidance: float
    # The last condition frames of a video to continue, uint8 [N, H, W, 3] on a bucket (None: an image).
    video: np.ndarray | None = None
    segments: int = 1  # chained into one video, each continuing the one before


GenerateFn = Callable[[GenerationRequest, StepCallback], np.ndarray]


@dataclass
class Job:
    id: str
    prompt: str
    steps: int
    # Dropped when the job ends, so a long session does not keep every uploaded image in memory.
    request: GenerationRequest | None
    state: str = "queued"  # queued -> running -> done | error
    step: int = 0
    error: str | None = None
    video: Path | None = None
    seconds: float | None = None
    submitted: float = field(default_factory=time.monotonic)


class JobQueue:
    """Jobs in submission order, run one at a time by a worker thread."""

    def __init__(self, generate: GenerateFn, output_dir: Path, fps: int = DEFAULT_FPS) -> None:
        self.generate = generate
        self.output_dir = output_dir
        self.fps = fps
        self.jobs: dict[str, Job] = {}
        self._pending: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._work, name="longcat-generate", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._pending.put(None)
            # A generation in progress cannot be interrupted; shutting down does not wait minutes for it,
            # the daemon thread ends with the process.
            self._thread.join(timeout=5)
            self._thread = None

    def submit(self, request: GenerationRequest) -> Job:
        with self._lock:
            waiting = sum(j.state == "queued" for j in self.jobs.values())
            if waiting >= MAX_QUEUED:
                raise HTTPException(429, f"the queue is full ({waiting} videos waiting); try again later")
            # A counter, not a random id: the server is local and single-user, ids only need to be unique.
            job = Job(
                id=f"{next(self._ids):05d}", prompt=request.prompt, steps=request.steps, request=request
            )
            self.jobs[job.id] = job
        self._pending.put(job)
        log.info("job %s queued: %r", job.id, request.prompt[:80])
        return job

    def position(self, job: Job) -> int:
        """How many jobs run or wait before this one."""
        with self._lock:
            return sum(
                j.state in ("queued", "running") and j.submitted < job.submitted for j in self.jobs.values()
            )

    def _work(self) -> None:
        while (job := self._pending.get()) is not None:
            job.state = "running"
            started = time.monotonic()

            def on_step(step: int, total: int, job: Job = job) -> None:
                job.step, job.steps = step, total

            try:
                video = self.generate(job.request, on_step)
                job.video = write_mp4(video, self.output_dir / f"longcat_{job.id}.mp4", fps=self.fps)
                state = "done"
            except (
                Exception
            ) as err:  # the page shows any failure; the worker must stay alive for the next job
                log.exception("job %s failed", job.id)
                job.error = public_text(str(err) or type(err).__name__)
                state = "error"
            job.seconds = time.monotonic() - started
            job.request = None
            job.state = state  # last: a poll that sees the final state finds the rest already set


def _job_json(jobs: JobQueue, job: Job) -> dict:
    return {
        "id": job.id,
        "state": job.state,
        "step": job.step,
        "steps": job.steps,
        "position": jobs.position(job) if job.state == "queued" else 0,
        "error": job.error,
        "video": f"/videos/{job.id}.mp4" if job.state == "done" else None,
        "seconds": job.seconds,
        "prompt": job.prompt,
    }


def public_text(text: str) -> str:
    """``text`` with every absolute path cut to its last part, for a message that leaves the server."""
    return _ABSOLUTE_PATH.sub(lambda m: re.split(r"[\\/]", m.group().rstrip("\\/"))[-1] or "/", text)


def lora_names(paths: Sequence[str]) -> dict[str, str]:
    """The page's name for each LoRA file -> its path: the file's stem; a stem already taken gets
    ``-2``, ``-3``, ... in the order given. The same file given twice is offered once."""
    names: dict[str, str] = {}
    seen: set[Path] = set()
    for path in paths:
        if (real := Path(path).resolve()) in seen:
            continue
        seen.add(real)
        stem = Path(path).stem or "lora"
        name, n = stem, 1
        while name in names:
            n += 1
            name = f"{stem}-{n}"
        names[name] = path
    return names


def _number(raw: object, name: str, default: float) -> float:
    """A form value within ``SAMPLE_LIMITS[name]`` (an int field where the limits are ints)."""
    low, high = SAMPLE_LIMITS[name]
    if raw is None or str(raw).strip() == "":
        return default
    try:
        value = type(low)(str(raw).strip())
    except ValueError:
        raise HTTPException(400, f"{name} must be a number, got {str(raw)[:40]!r}") from None
    if not low <= value <= high:
        raise HTTPException(400, f"{name} must be between {low} and {high}, got {value}")
    return value


def _field(form, name: str, default: float) -> float:
    return _number(form.get(name), name, default)


def _chosen_loras(form, offered: Mapping[str, float]) -> tuple[tuple[str, float], ...]:
    """The job's LoRAs: the i-th ``lora`` field (a name, or empty for none) with the i-th
    ``lora_strength`` (missing: that LoRA's default strength), as the page's menus send them."""
    strengths = form.getlist("lora_strength")
    chosen: dict[str, float] = {}
    for i, name in enumerate(str(n) for n in form.getlist("lora")):
        if name and name not in offered:
            raise HTTPException(400, f"unknown LoRA {name!r}: choose one the page offers")
        if name in chosen:
            raise HTTPException(400, f"LoRA {name!r} is chosen twice: choose it once, with one strength")
        strength = _number(
            strengths[i] if i < len(strengths) else None, "lora_strength", offered.get(name, 1.0)
        )
        if name:
            chosen[name] = strength
    for raw in strengths:  # a strength without a LoRA is still checked
        _number(raw, "lora_strength", 1.0)
    return tuple(chosen.items())


def _start_image(data: bytes, filename: str, area: tuple[int, int]) -> np.ndarray:
    """An upload decoded and fitted to its bucket; runs on a worker thread (seconds for a large image)."""
    try:
        return fit_start_image(read_start_image(data, name=re.split(r"[\\/]", filename)[-1]), area)
    except SampleInputError as err:
        raise HTTPException(400, str(err)) from None


def _condition_video(data: bytes, filename: str, settings: VideoSettings, fps: int) -> np.ndarray:
    """An uploaded video's last ``settings.cond_frames`` frames fitted to their bucket (worker thread)."""
    name = re.split(r"[\\/]", filename)[-1]
    with tempfile.NamedTemporaryFile(suffix=Path(name).suffix or ".mp4") as file:
        file.write(data)
        file.flush()
        try:
            return read_condition_video(file.name, settings.cond_frames, fps, settings.area)
        except SampleInputError as err:
            raise HTTPException(400, str(err).replace(f"--video {file.name}", f"video {name}")) from None


def _upload(form, name: str) -> UploadFile | None:
    upload = form.get(name)
    return upload if isinstance(upload, UploadFile) and upload.filename else None


def create_app(
    generate: GenerateFn,
    *,
    output_dir: str | Path,
    loras: Sequence[str] | Mapping[str, float] | None = None,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    defaults: VideoSettings = VideoSettings(),
    fps: int = DEFAULT_FPS,
) -> Starlette:
    """The preview app. ``loras`` are the names offered in the page's LoRA menus (besides none), or
    name -> the strength a menu suggests for it (1 for names given as a list). ``defaults``: the area
    start images are fitted to, and the frames, steps and guidance a job asks for unless the page says
    otherwise."""
    jobs = JobQueue(generate, Path(output_dir), fps=fps)
    offered = dict(loras) if isinstance(loras, Mapping) else dict.fromkeys(loras or [], 1.0)
    max_bytes = int(max_upload_mb * 1024 * 1024)
    area = defaults.area
    per_job = {"steps": defaults.steps, "seed": 0, "guidance": defaults.guidance}
    decoding = anyio.CapacityLimiter(DECODE_THREADS)

    async def page(request: Request) -> Response:
        options = "".join(f'<option value="{html.escape(n)}">{html.escape(n)}</option>' for n in offered)
        slots = "".join(
            LORA_SLOT.replace("{{ID}}", "lora" if i == 0 else f"lora-{i + 1}").replace("{{OPTIONS}}", options)
            for i in range(min(len(offered), MAX_LORA_SLOTS))
        )
        suggested = json.dumps(offered).replace("<", "\\u003c")  # inside <script>
        body = (
            PAGE.replace("{{LORA_SLOTS}}", slots)
            .replace("{{LORA_STRENGTHS}}", suggested)
            .replace("{{MAX_MB}}", f"{max_upload_mb:g}")
            .replace("{{AREA}}", f"{area[0]}x{area[1]}")
            .replace("{{FRAMES}}", str(defaults.frames))
            .replace("{{STEPS}}", str(defaults.steps))
            .replace("{{GUIDANCE}}", f"{defaults.guidance:g}")
            .replace("{{COND_FRAMES}}", str(defaults.cond_frames))
        )
        return HTMLResponse(body)

    async def submit(request: Request) -> Response:
        # Refuse big uploads before reading them; the header is what a browser's form upload sends.
        length = request.headers.get("content-length")
        if length is None:
            raise HTTPException(411, "the upload must state its size (Content-Length)")
        if int(length) > max_bytes + 64 * 1024:
            raise HTTPException(
                413, f"the upload is {int(length) / 2**20:.1f} MB; the limit is {max_upload_mb:g} MB"
            )
        async with request.form(max_files=2, max_fields=16 + 2 * len(offered)) as form:
            upload, clip = _upload(form, "image"), _upload(form, "video")
            if upload and clip:
                raise HTTPException(400, "choose a start image or a video to continue, not both")
            upload = upload or clip
            if upload is None:
                raise HTTPException(400, "choose a start image (or a video to continue) first")
            data = await upload.read()
            if len(data) > max_bytes:
                raise HTTPException(
                    413, f"the image is {len(data) / 2**20:.1f} MB; the limit is {max_upload_mb:g} MB"
                )
            prompt = str(form.get("prompt") or "").strip()
            if not prompt:
                raise HTTPException(400, "type a prompt describing the motion")
            if len(prompt) > MAX_PROMPT_CHARS:
                raise HTTPException(
                    400, f"the prompt is {len(prompt)} characters; at most {MAX_PROMPT_CHARS}"
                )
            chosen = _chosen_loras(form, offered)
            wanted_frames = _field(form, "frames", defaults.frames)
            settings = {name: _field(form, name, default) for name, default in per_job.items()}
            segments = int(_field(form, "segments", 1))
            frames = round_frames(wanted_frames)
            if clip or segments > 1:
                try:
                    check_cond_frames(defaults.cond_frames, frames)
                except SampleInputError as err:
                    raise HTTPException(400, str(err)) from None
            if clip:
                image, video = (
                    None,
                    await anyio.to_thread.run_sync(
                        _condition_video, data, upload.filename, defaults, fps, limiter=decoding
                    ),
                )
            else:
                image = await anyio.to_thread.run_sync(
                    _start_image, data, upload.filename, area, limiter=decoding
                )
                video = None
            request_ = GenerationRequest(
                image=image,
                prompt=prompt,
                loras=chosen,
                frames=frames,
                video=video,
                segments=segments,
                **settings,
            )
        job = jobs.submit(request_)
        payload = _job_json(jobs, job)
        if request_.frames != wanted_frames:
            payload["note"] = f"frames must be 4k+1: using {request_.frames}"
        return JSONResponse(payload, status_code=202)

    async def status(request: Request) -> Response:
        job = jobs.jobs.get(request.path_params["job_id"])
        if job is None:
            raise HTTPException(404, "no such job")
        return JSONResponse(_job_json(jobs, job))

    async def video(request: Request) -> Response:
        job = jobs.jobs.get(request.path_params["job_id"])
        if job is None or job.video is None:
            raise HTTPException(404, "no such video")
        return FileResponse(job.video, media_type="video/mp4", filename=job.video.name)

    async def error(request: Request, exc: HTTPException) -> Response:
        return JSONResponse({"error": public_text(exc.detail)}, status_code=exc.status_code)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        jobs.start()
        try:
            yield
        finally:
            jobs.stop()

    app = Starlette(
        routes=[
            Route("/", page),
            Route("/api/jobs", submit, methods=["POST"]),
            Route("/api/jobs/{job_id}", status),
            Route("/videos/{job_id}.mp4", video),
        ],
        exception_handlers={HTTPException: error},
        lifespan=lifespan,
    )
    app.state.jobs = jobs
    return app


def sampler_generate(sampler: Sampler, config: SampleConfig, loras: Mapping[str, str]) -> GenerateFn:
    """The page's generate function on a loaded sampler; ``loras`` maps the page's LoRA names to files.
    Each job's LoRAs are hooked on (not merged), so switching them between jobs is exact."""

    def generate(request: GenerationRequest, on_step: StepCallback) -> np.ndarray:
        sampler.use_loras([(loras[name], strength) for name, strength in request.loras])
        # The page asks for these per job; the shift and the area are the command's.
        settings = replace(
            config.video_settings,
            frames=request.frames,
            steps=request.steps,
            guidance=request.guidance,
            seed=request.seed,
        )
        if request.video is not None or request.segments > 1:
            return sampler.generate_long(
                segment_prompts([request.prompt], request.segments),
                settings,
                image=request.image,
                video=request.video,
                negative_prompt=config.negative_prompt,
                on_step=on_step,
            )
        videos = sampler.generate(
            request.image,
            [request.prompt],
            settings,
            negative_prompt=config.negative_prompt,
            on_step=on_step,
        )
        return videos[0]

    return generate


def serve_sampler(config: SampleConfig) -> None:
    """``longcat-sample --serve``: load the models once, then serve the page until interrupted."""
    check_sample_config(config)
    sampler = Sampler.from_config(config)
    strengths = dict(reversed(lora_entries(config)))  # the first strength a file is given
    loras = lora_names(list(strengths))
    app = create_app(
        sampler_generate(sampler, config, loras),
        output_dir=config.serve_dir,
        loras={name: strengths[path] for name, path in loras.items()},
        max_upload_mb=config.max_upload_mb,
        defaults=config.video_settings,
        fps=config.fps,
    )
    log.info("preview page on http://%s:%d (videos in %s)", config.host, config.port, config.serve_dir)
    uvicorn.run(app, host=config.host, port=config.port, log_level="info")
