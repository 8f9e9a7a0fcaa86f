"""The preview page: HTTP behaviour with a stand-in generator, and the page itself in headless Chromium."""

from __future__ import annotations

import io
import json
import shutil
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from av import open as av_open
from PIL import Image

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")

from longcat_train.config import VideoSettings  # noqa: E402
from longcat_train.webui import GenerationRequest, create_app  # noqa: E402

AREA = (256, 256)


def fake_generate(request: GenerationRequest, on_step) -> np.ndarray:
    """Nine frames sliding the start image sideways, one step at a time."""
    for step in range(1, request.steps + 1):
        time.sleep(0.01)
        on_step(step, request.steps)
    if request.prompt == "explode":
        raise RuntimeError("the sampler ran out of memory")
    return np.stack([np.roll(request.image, 8 * i, axis=1) for i in range(9)])


def png_bytes(h: int, w: int, noise: bool = False) -> bytes:
    yy, xx = np.mgrid[0:h, 0:w]
    pixels = np.stack([xx % 256, yy % 256, (xx * yy) % 256], -1).astype(np.uint8)
    if noise:
        pixels = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@contextmanager
def running(app) -> Iterator[str]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(20)


@pytest.fixture
def server(tmp_path) -> Iterator[str]:
    app = create_app(
        fake_generate,
        output_dir=tmp_path / "videos",
        loras=["style.safetensors"],
        max_upload_mb=0.25,
        defaults=VideoSettings(area=AREA),
    )
    with running(app) as url:
        yield url


@pytest.fixture(scope="module")
def lora_path(tmp_path_factory) -> str:
    from longcat_train.loading import tiny_dit
    from longcat_train.lora import adapter_settings, apply_lora, lora_weights, save_diffusers

    model = apply_lora(tiny_dit(), rank=2, targets=["attn.qkv"])
    path = tmp_path_factory.mktemp("lora") / "style.safetensors"
    return str(save_diffusers(lora_weights(model), path, adapter_settings(model)))


def multipart(
    fields: dict[str, str] | list[tuple[str, str]], files: dict[str, tuple[str, bytes]]
) -> tuple[bytes, str]:
    """A form body; ``fields`` as a list of pairs may repeat a name."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items() if isinstance(fields, dict) else fields:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        )
    for name, (filename, data) in files.items():
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
        parts.append(head.encode() + b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def fetch(
    url: str, method: str = "GET", body: bytes | None = None, content_type: str = ""
) -> tuple[int, str, bytes]:
    """(status, headers, body) of any answer, errors included."""
    headers = {"Content-Type": content_type} if content_type else {}
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, str(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, str(err.headers), err.read()


def post(
    url: str, fields: dict[str, str] | list[tuple[str, str]], files: dict[str, tuple[str, bytes]]
) -> tuple[int, dict]:
    status, _, body = fetch(url, "POST", *multipart(fields, files))
    return status, json.loads(body)


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def wait_done(url: str, job_id: str) -> dict:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        job = get_json(f"{url}/api/jobs/{job_id}")
        if job["state"] in ("done", "error"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish")


def test_jobs_run_one_at_a_time_and_serve_an_mp4(server: str) -> None:
    image = {"image": ("start.png", png_bytes(256, 256))}
    status, first = post(
        f"{server}/api/jobs", {"prompt": "a cat walks", "steps": "20", "frames": "10"}, image
    )
    assert status == 202, first
    assert first["note"] == "frames must be 4k+1: using 9"
    _, second = post(
        f"{server}/api/jobs", {"prompt": "a dog runs", "steps": "3", "lora": "style.safetensors"}, image
    )
    # The second waits behind the first (queued or running, never both running).
    assert get_json(f"{server}/api/jobs/{second['id']}")["state"] == "queued"
    assert second["position"] == 1
    done = wait_done(server, first["id"])
    assert done["state"] == "done" and done["step"] == 20
    assert wait_done(server, second["id"])["state"] == "done"
    with urllib.request.urlopen(server + done["video"], timeout=30) as response:
        assert response.headers["content-type"] == "video/mp4"
        assert response.read(12)[4:8] == b"ftyp"


def test_a_job_stacks_several_loras_each_at_its_strength(tmp_path: Path) -> None:
    asked: list[tuple] = []

    def generate(request: GenerationRequest, on_step) -> np.ndarray:
        asked.append(request.loras)
        return fake_generate(request, on_step)

    offered = {"style": 0.6, "distill": 1.0, "detail": -0.5}
    app = create_app(generate, output_dir=tmp_path, loras=offered, defaults=VideoSettings(area=AREA))
    image = {"image": ("start.png", png_bytes(256, 256))}
    with running(app) as url:
        page = fetch(f"{url}/")[2].decode()
        assert page.count('<select id="lora') == 3 and json.dumps(offered) in page  # the suggested strengths
        menus = [("lora", "distill"), ("lora_strength", "1"), ("lora", ""), ("lora_strength", "2")]
        for fields in (
            [*menus, ("lora", "style"), ("lora_strength", "0.3")],
            [("lora", "detail")],  # no strength sent: the one suggested for it
            [("lora", ""), ("lora_strength", "")],
        ):
            status, job = post(f"{url}/api/jobs", [("prompt", "a cat"), ("steps", "1"), *fields], image)
            assert status == 202, job
            assert wait_done(url, job["id"])["state"] == "done"
        for fields, error in [
            (
                [("lora", "style"), ("lora", "style")],
                "LoRA 'style' is chosen twice: choose it once, with one strength",
            ),
            (
                [("lora", "style"), ("lora_strength", "1"), ("lora", "distill"), ("lora_strength", "9")],
                "lora_strength must be between -4.0 and 4.0, got 9.0",
            ),
        ]:
            assert post(f"{url}/api/jobs", [("prompt", "a cat"), *fields], image) == (400, {"error": error})
    assert asked == [(("distill", 1.0), ("style", 0.3)), (("detail", -0.5),), ()]


def test_a_failed_generation_reports_and_the_queue_goes_on(server: str) -> None:
    image = {"image": ("start.png", png_bytes(256, 256))}
    _, bad = post(f"{server}/api/jobs", {"prompt": "explode", "steps": "2"}, image)
    _, good = post(f"{server}/api/jobs", {"prompt": "fine", "steps": "2"}, image)
    failed = wait_done(server, bad["id"])
    assert failed["state"] == "error" and "out of memory" in failed["error"]
    assert wait_done(server, good["id"])["state"] == "done"


@pytest.mark.parametrize(
    ("fields", "files", "code", "message"),
    [
        ({"prompt": "x"}, {}, 400, "choose a start image"),
        ({"prompt": "x"}, {"image": ("notes.png", b"just some text")}, 400, "is not an image"),
        ({"prompt": "x"}, {"image": ("big.png", png_bytes(400, 400, noise=True))}, 413, "limit is 0.25 MB"),
        ({"prompt": "x"}, {"image": ("tiny.png", png_bytes(40, 40))}, 400, "too small"),
        ({"prompt": "x"}, {"image": ("strip.png", png_bytes(100, 2000))}, 400, "extreme aspect ratio"),
        ({"prompt": "  "}, {"image": ("a.png", png_bytes(256, 256))}, 400, "type a prompt"),
        (
            {"prompt": "x", "steps": "many"},
            {"image": ("a.png", png_bytes(256, 256))},
            400,
            "steps must be a number",
        ),
        (
            {"prompt": "x", "steps": "0"},
            {"image": ("a.png", png_bytes(256, 256))},
            400,
            "steps must be between",
        ),
        ({"prompt": "x", "lora": "other"}, {"image": ("a.png", png_bytes(256, 256))}, 400, "unknown LoRA"),
    ],
)
def test_bad_uploads_get_a_message(server: str, fields, files, code: int, message: str) -> None:
    status, body = post(f"{server}/api/jobs", fields, files)
    assert status == code
    assert message in body["error"]


def test_unknown_job_is_404(server: str) -> None:
    with pytest.raises(urllib.error.HTTPError) as err:
        get_json(f"{server}/api/jobs/99999")
    assert err.value.code == 404


def mp4_bytes(tmp_path: Path) -> bytes:
    from longcat_data.video import write_mp4

    return write_mp4(np.zeros((5, 64, 64, 3), np.uint8), tmp_path / "clip.mp4").read_bytes()


def pdf_bytes() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (300, 300), (200, 200, 200)).save(out, format="PDF")
    return out.getvalue()


BOMB = "bomb.png: 30000x30000 is 900.0 megapixels, more than the 64 a start image may have; resize it"


@pytest.mark.parametrize(
    ("fields", "upload", "error"),
    [
        ({}, "bomb", BOMB),
        ({}, "windows path", BOMB),
        ({}, "video", "clip.mp4 is not an image that can be read (PNG, JPEG or WebP expected)"),
        ({}, "pdf", "report.pdf is not an image that can be read (PNG, JPEG or WebP expected)"),
        ({"steps": "nan"}, "good", "steps must be a number, got 'nan'"),
        ({"seed": "1e3"}, "good", "seed must be a number, got '1e3'"),
        ({"seed": str(2**64)}, "good", f"seed must be between 0 and {2**63 - 1}, got {2**64}"),
        ({"guidance": "nan"}, "good", "guidance must be between 0.0 and 20.0, got nan"),
        ({"lora_strength": "-inf"}, "good", "lora_strength must be between -4.0 and 4.0, got -inf"),
        ({"frames": "100001"}, "good", "frames must be between 5 and 257, got 100001"),
        ({"frames": "9.5"}, "good", "frames must be a number, got '9.5'"),
        (
            {"lora": "/srv/loras/style.safetensors"},
            "good",
            "unknown LoRA 'style.safetensors': choose one the page offers",
        ),
    ],
)
def test_refused_uploads_and_fields_are_400_with_one_line(
    server: str, huge_image, tmp_path: Path, fields: dict, upload: str, error: str
) -> None:
    files = {
        "bomb": ("bomb.png", huge_image("PNG", 30000, 30000)),
        "windows path": ("C:\\Users\\me\\bomb.png", huge_image("PNG", 30000, 30000)),
        "video": ("clip.mp4", mp4_bytes(tmp_path)),
        "pdf": ("report.pdf", pdf_bytes()),
        "good": ("start.png", png_bytes(256, 256)),
    }
    status, body = post(f"{server}/api/jobs", {"prompt": "a cat walks", **fields}, {"image": files[upload]})
    assert (status, body) == (400, {"error": error})


def test_unknown_jobs_and_videos_are_404(server: str) -> None:
    for path, error in [
        ("/api/jobs/99999", "no such job"),
        ("/api/jobs/not-a-job", "no such job"),
        ("/videos/99999.mp4", "no such video"),
        ("/videos/..%2F..%2Fetc%2Fpasswd.mp4", "Not Found"),
        ("/nowhere", "Not Found"),
    ]:
        status, _, body = fetch(server + path)
        assert (status, json.loads(body)) == (404, {"error": error}), path


@contextmanager
def held_generator(tmp_path: Path, **app_options) -> Iterator[tuple[str, threading.Event]]:
    """A server whose generations wait for the event: jobs stay queued while a test looks."""
    release = threading.Event()

    def generate(request: GenerationRequest, on_step) -> np.ndarray:
        release.wait(30)
        return fake_generate(request, on_step)

    app = create_app(
        generate, output_dir=tmp_path / "videos", defaults=VideoSettings(area=AREA), **app_options
    )
    with running(app) as url:
        try:
            yield url, release
        finally:
            release.set()


def test_concurrent_submissions_past_the_queue_limit_are_429(tmp_path: Path) -> None:
    from longcat_train.webui import MAX_QUEUED

    image = {"image": ("start.png", png_bytes(256, 256))}
    with held_generator(tmp_path) as (url, _):
        _, first = post(f"{url}/api/jobs", {"prompt": "first", "steps": "1"}, image)
        deadline = time.monotonic() + 10
        while get_json(f"{url}/api/jobs/{first['id']}")["state"] != "running":
            assert time.monotonic() < deadline, "the first job never started"
            time.sleep(0.02)
        answers: list[tuple[int, dict]] = []
        threads = [
            threading.Thread(
                target=lambda: answers.append(
                    post(f"{url}/api/jobs", {"prompt": "more", "steps": "1"}, image)
                )
            )
            for _ in range(MAX_QUEUED + 4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert sorted(status for status, _ in answers) == [202] * MAX_QUEUED + [429] * 4
    refusals = {body["error"] for status, body in answers if status == 429}
    assert refusals == {f"the queue is full ({MAX_QUEUED} videos waiting); try again later"}


def test_an_upload_is_decoded_off_the_event_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from longcat_train import webui

    decoding, finish = threading.Event(), threading.Event()
    real = webui.read_start_image

    def slow_decode(data: bytes, name: str) -> np.ndarray:
        decoding.set()
        finish.wait(10)  # a huge image's seconds of decoding
        return real(data, name)

    monkeypatch.setattr(webui, "read_start_image", slow_decode)
    app = create_app(fake_generate, output_dir=tmp_path / "videos", defaults=VideoSettings(area=AREA))
    with running(app) as url:
        answer: list[tuple[int, dict]] = []
        upload = threading.Thread(
            target=lambda: answer.append(
                post(
                    f"{url}/api/jobs",
                    {"prompt": "a cat", "steps": "1"},
                    {"image": ("a.png", png_bytes(256, 256))},
                )
            )
        )
        upload.start()
        assert decoding.wait(10)
        # While that upload is decoded, the server answers others at once.
        started = time.monotonic()
        status, _, _ = fetch(f"{url}/")
        poll, _, _ = fetch(f"{url}/api/jobs/00042")
        assert (status, poll) == (200, 404) and time.monotonic() - started < 5
        assert not answer  # the upload is still being decoded
        finish.set()
        upload.join(30)
    assert answer[0][0] == 202


def test_lora_names_are_stems_made_unique_in_order() -> None:
    from longcat_train.webui import lora_names

    paths = ["/a/style.safetensors", "/b/style.safetensors", "/c/style-2.safetensors", "/a/style.safetensors"]
    assert lora_names(paths) == {
        "style": "/a/style.safetensors",
        "style-2": "/b/style.safetensors",
        "style-2-2": "/c/style-2.safetensors",
    }
    assert lora_names(list(reversed(paths)))["style"] == "/a/style.safetensors"


def test_no_answer_names_a_path_of_the_server(tmp_path: Path, lora_path: str) -> None:
    """Every answer the app gives (page, submissions, polls, videos, errors) is free of server paths: LoRAs
    by name, failures with their paths cut, however the failure arose."""
    from longcat_train.sample_config import SampleConfig
    from longcat_train.sampler import check_lora
    from longcat_train.webui import lora_names, sampler_generate

    broken = tmp_path / "loras" / "broken.safetensors"
    broken.parent.mkdir()
    broken.write_bytes(b"not a safetensors file")

    class StandInSampler:
        """Checks the LoRA as the real one does, then slides the image."""

        def use_loras(self, loras: list[tuple[str, float]]) -> None:
            for path, _ in loras:
                check_lora(path)

        def generate(self, image, prompts, settings, **kwargs) -> np.ndarray:
            return fake_generate(GenerationRequest(image, prompts[0], (), 1, 0, 9, 1.0), lambda i, n: None)[
                None
            ]

    loras = lora_names([lora_path, str(broken)])
    config = SampleConfig(model="tiny", area=AREA, lora=list(loras.values()))
    out = tmp_path / "videos"
    out.mkdir()
    (out / "longcat_00003.mp4").mkdir()  # the third video cannot be written: the OS error names both paths
    app = create_app(
        sampler_generate(StandInSampler(), config, loras),
        output_dir=out,
        loras=list(loras),
        defaults=VideoSettings(area=AREA),
    )
    answers: list[tuple[int, str, bytes]] = []
    image = {"image": ("start.png", png_bytes(256, 256))}
    with running(app) as url:
        answers.append(fetch(f"{url}/"))
        jobs = []
        for fields in ({"lora": "style"}, {"lora": "broken"}, {}, {"lora": "nothing"}, {"steps": "x"}):
            answers.append(fetch(f"{url}/api/jobs", "POST", *multipart({"prompt": "a cat", **fields}, image)))
            if answers[-1][0] == 202:
                jobs.append(json.loads(answers[-1][2])["id"])
        finished = [wait_done(url, job) for job in jobs]
        for job in jobs:
            answers.append(fetch(f"{url}/api/jobs/{job}"))
            answers.append(fetch(f"{url}/videos/{job}.mp4"))
        answers += [
            fetch(f"{url}/api/jobs"),
            fetch(f"{url}/", "POST", b"x", "text/plain"),
            fetch(f"{url}/missing"),
        ]
    assert [job["state"] for job in finished] == ["done", "error", "error"]
    assert finished[1]["error"] == f"--lora broken.safetensors: {NOT_SAFETENSORS}"
    assert finished[2]["error"].startswith("[Errno 21] Is a directory: ")
    assert (
        '<option value="style">style</option><option value="broken">broken</option>' in answers[0][2].decode()
    )
    server_paths = {str(tmp_path), str(Path(lora_path).parent), str(Path.cwd()), str(Path.home()), "/tmp/"}
    for status, headers, body in answers:
        for text in (headers, body.decode("utf-8", "replace")):
            assert not any(p in text for p in server_paths), (status, text[:300])
        assert status < 500


NOT_SAFETENSORS = (
    "not a safetensors file; LoRAs are read from .safetensors only "
    "(convert a .ckpt or .bin with safetensors.torch.save_file)"
)


# ---------------------------------------------------------------- the page in a real browser

CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def browser_page(tmp_path):
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
    )
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        try:
            # A fresh profile per test; headless is playwright's default.
            context = p.chromium.launch_persistent_context(
                str(tmp_path / "profile"), executable_path=chromium, args=CHROMIUM_FLAGS, timeout=60_000
            )
        except sync_api.Error as err:
            pytest.skip(f"chromium could not start: {str(err).splitlines()[0]}")
        page = context.pages[0] if context.pages else context.new_page()
        page.set_viewport_size({"width": 1100, "height": 800})
        try:
            yield page
        finally:
            context.close()


def test_page_uploads_generates_and_plays(server: str, browser_page, tmp_path: Path, huge_image) -> None:
    page = browser_page
    start = tmp_path / "start.png"
    start.write_bytes(png_bytes(256, 256))
    page.goto(server)
    assert page.title() == "longcat preview"
    assert page.locator("#lora option").all_inner_texts() == ["none (base model)", "style.safetensors"]

    # A non-image gets its message on the page, and nothing is queued.
    notes = tmp_path / "notes.png"
    notes.write_text("not a picture")
    page.set_input_files("#image", str(notes))
    page.fill("#prompt", "a cat walks")
    page.click("#submit")
    page.wait_for_selector("#message.error")
    assert "is not an image" in page.inner_text("#message")
    assert page.locator(".job").count() == 0
    # So does an image over the upload limit.
    big = tmp_path / "big.png"
    big.write_bytes(png_bytes(400, 400, noise=True))
    page.set_input_files("#image", str(big))
    page.click("#submit")
    page.wait_for_function("document.querySelector('#message').textContent.includes('limit')")
    assert "the limit is 0.25 MB" in page.inner_text("#message")
    page.screenshot(path=str(tmp_path / "refused.png"))
    # And a decompression bomb: its one line, on the page.
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(huge_image("PNG", 30000, 30000))
    page.set_input_files("#image", str(bomb))
    page.click("#submit")
    page.wait_for_function("document.querySelector('#message').textContent.includes('megapixels')")
    assert page.inner_text("#message") == BOMB
    page.screenshot(path=str(tmp_path / "bomb-refused.png"))

    page.set_input_files("#image", str(start))
    page.fill("#steps", "5")
    page.click("#submit")
    video = page.wait_for_selector(".job video", timeout=30_000)
    assert page.inner_text("#message") == ""
    assert video.get_attribute("src").endswith(".mp4")
    assert page.locator(".job a[download]").count() == 1
    # The browser loads the MP4's metadata: it is a video it can read, of the bucket's size.
    page.wait_for_function("document.querySelector('.job video').readyState >= 1", timeout=20_000)
    size = page.evaluate(
        "[document.querySelector('.job video').videoWidth, document.querySelector('.job video').videoHeight]"
    )
    assert size == [256, 256]
    page.screenshot(path=str(tmp_path / "preview.png"), full_page=True)
    assert (tmp_path / "preview.png").stat().st_size > 10_000


def test_choosing_a_lora_on_the_page_suggests_its_strength(tmp_path: Path, browser_page) -> None:
    app = create_app(
        fake_generate,
        output_dir=tmp_path,
        loras={"style": 0.6, "distill": -1.5},
        defaults=VideoSettings(area=AREA),
    )
    with running(app) as url:
        browser_page.goto(url)
        assert browser_page.locator("select[name=lora]").count() == 2
        browser_page.select_option("#lora-2", "distill")
        browser_page.select_option("#lora", "style")
        assert browser_page.input_value("#lora-strength") == "0.6"
        assert browser_page.input_value("#lora-2-strength") == "-1.5"


def test_the_real_tiny_sampler_behind_the_page(tmp_path, lora_path: str) -> None:
    from longcat_train.sample_config import SampleConfig
    from longcat_train.sampler import Sampler
    from longcat_train.webui import lora_names, sampler_generate

    config = SampleConfig(model="tiny", area=(64, 64), frames=5, steps=2, lora=[lora_path])
    loras = lora_names(config.lora)
    generate = sampler_generate(Sampler("tiny", device="cpu"), config, loras)
    app = create_app(
        generate,
        output_dir=tmp_path / "videos",
        loras=list(loras),
        defaults=config.video_settings,
    )
    with running(app) as url:
        fields = {"prompt": "a cat walks", "lora": "style", "lora_strength": "0.8"}
        status, job = post(f"{url}/api/jobs", fields, {"image": ("start.png", png_bytes(64, 64))})
        assert status == 202, job
        done = wait_done(url, job["id"])
    assert done["state"] == "done", done["error"]
    with av_open(tmp_path / "videos" / f"longcat_{job['id']}.mp4") as container:
        frames = list(container.decode(video=0))
    assert len(frames) == 5 and (frames[0].height, frames[0].width) == (64, 64)


def test_the_page_samples_distilled_under_distill() -> None:
    from longcat_train.sample_config import SampleConfig
    from longcat_train.webui import sampler_generate

    seen: list[VideoSettings] = []

    class StandInSampler:
        def use_loras(self, loras) -> None:
            pass

        def generate(self, image, prompts, settings, **kwargs) -> np.ndarray:
            seen.append(settings)
            return np.zeros((1, 5, 64, 64, 3), np.uint8)

    config = SampleConfig(model="tiny", area=AREA, distill=True)
    generate = sampler_generate(StandInSampler(), config, {})
    generate(
        GenerationRequest(np.zeros((64, 64, 3), np.uint8), "a cat", (), 8, 3, 5, 1.0),
        lambda i, n: None,
    )
    assert seen[0].distill and (seen[0].steps, seen[0].seed, seen[0].guidance) == (8, 3, 1.0)
    assert (config.video_settings.steps, config.video_settings.guidance) == (16, 1.0)  # the page's defaults


# ---------------------------------------------------------------- continuation and long videos


def clip_bytes(tmp_path: Path, frames: int, name: str = "clip.mp4") -> bytes:
    from longcat_data.demo import synthetic_frames
    from longcat_data.video import write_mp4

    return write_mp4(synthetic_frames(256, 256, frames), tmp_path / name, fps=15).read_bytes()


@pytest.fixture
def continuing(tmp_path) -> Iterator[tuple[str, list[GenerationRequest]]]:
    asked: list[GenerationRequest] = []

    def generate(request: GenerationRequest, on_step) -> np.ndarray:
        asked.append(request)
        return np.zeros((9, 64, 64, 3), np.uint8)

    app = create_app(generate, output_dir=tmp_path / "videos", defaults=VideoSettings(area=AREA, frames=17))
    with running(app) as url:
        yield url, asked


def test_a_video_upload_is_continued_from_its_last_frames(continuing, tmp_path: Path) -> None:
    url, asked = continuing
    files = {"video": ("clip.mp4", clip_bytes(tmp_path, 20))}
    status, job = post(f"{url}/api/jobs", {"prompt": "a cat walks", "segments": "3"}, files)
    assert status == 202, job
    assert wait_done(url, job["id"])["state"] == "done"
    assert asked[0].image is None and asked[0].segments == 3
    assert asked[0].video.shape == (13, 256, 256, 3)


@pytest.mark.parametrize(
    ("fields", "files", "error"),
    [
        (
            {},
            {"video": "short"},
            "video short.mp4 has 8 frames at 15 fps, fewer than --cond-frames 13: give a longer video or a "
            "smaller --cond-frames",
        ),
        ({}, {"video": "garbage"}, "video bad.mp4: not a readable video"),
        ({}, {"video": "clip", "image": "png"}, "choose a start image or a video to continue, not both"),
        ({"frames": "9", "segments": "2"}, {"image": "png"}, "--cond-frames 13 is not fewer than --frames 9"),
        ({"segments": "0"}, {"image": "png"}, "segments must be between 1 and 100, got 0"),
        ({"segments": "2.5"}, {"image": "png"}, "segments must be a number, got '2.5'"),
    ],
)
def test_refused_continuations_are_400_with_one_line(
    continuing, tmp_path: Path, fields: dict, files: dict, error: str
) -> None:
    url, asked = continuing
    uploads = {
        "short": ("short.mp4", clip_bytes(tmp_path, 8, "short.mp4")),
        "garbage": ("bad.mp4", b"\x00\x00\x00\x18ftypmp42"),
        "clip": ("clip.mp4", clip_bytes(tmp_path, 20)),
        "png": ("start.png", png_bytes(256, 256)),
    }
    chosen = {field: uploads[kind] for field, kind in files.items()}
    status, body = post(f"{url}/api/jobs", {"prompt": "a cat walks", **fields}, chosen)
    assert status == 400 and body["error"].startswith(error) and "\n" not in body["error"], body
    assert str(tmp_path) not in body["error"] and "/tmp" not in body["error"]
    assert not asked


def test_the_real_tiny_sampler_chains_segments_behind_the_page(tmp_path) -> None:
    from longcat_train.sample_config import SampleConfig
    from longcat_train.sampler import Sampler
    from longcat_train.webui import sampler_generate

    config = SampleConfig(model="tiny", area=(64, 64), frames=9, cond_frames=5, steps=1, distill=True)
    app = create_app(
        sampler_generate(Sampler("tiny", device="cpu"), config, {}),
        output_dir=tmp_path / "videos",
        defaults=config.video_settings,
    )
    with running(app) as url:
        fields = {"prompt": "a cat walks", "segments": "2", "steps": "1"}
        status, job = post(f"{url}/api/jobs", fields, {"image": ("start.png", png_bytes(64, 64))})
        assert status == 202, job
        done = wait_done(url, job["id"])
    assert done["state"] == "done", done["error"]
    assert done["steps"] == done["step"] == 2
    with av_open(tmp_path / "videos" / f"longcat_{job['id']}.mp4") as container:
        assert len(list(container.decode(video=0))) == 9 + (9 - 5)


def test_page_jobs_keep_the_commands_step_cache(make_image) -> None:
    from longcat_train.sample_config import SampleConfig
    from longcat_train.webui import sampler_generate

    seen: list[VideoSettings] = []

    class RecordingSampler:
        def use_loras(self, loras) -> None:
            pass

        def generate(self, image, prompts, settings, **kwargs) -> np.ndarray:
            seen.append(settings)
            return np.zeros((1, 5, 16, 16, 3), np.uint8)

    config = SampleConfig(model="tiny", step_cache=0.08)
    generate = sampler_generate(RecordingSampler(), config, {})
    generate(GenerationRequest(make_image(64, 64), "a cat", (), 3, 7, 5, 2.0), lambda i, n: None)
    [settings] = seen
    assert (settings.step_cache, settings.steps, settings.seed) == (0.08, 3, 7)
