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


def post(url: str, fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[int, dict]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        )
    for name, (filename, data) in files.items():
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
        parts.append(head.encode() + b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    req = urllib.request.Request(
        url, data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


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


def test_page_uploads_generates_and_plays(server: str, browser_page, tmp_path: Path) -> None:
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


def test_the_real_tiny_sampler_behind_the_page(tmp_path, lora_path: str) -> None:
    from longcat_train.config import SampleConfig
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
