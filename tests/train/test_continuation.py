"""Video continuation and long videos: the condition cache, the loop, official parity, chaining, the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from longcat_data.demo import synthetic_frames
from longcat_data.video import read_mp4, resize_center_crop, write_mp4
from longcat_train import continuation, sampling
from longcat_train import sampler as sampler_module
from longcat_train.config import VideoSettings
from longcat_train.continuation import (
    check_cond_frames,
    continue_videos,
    generate_long_video,
    read_condition_video,
    segment_prompts,
)
from longcat_train.kv_cache import ConditionCache, cache_condition
from longcat_train.sampling import SampleInputError, denoise, flow_scheduler, high_frequency_tail

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tiny() -> dict:
    from longcat_data.encode import encode_text, load_text_encoder, load_vae
    from longcat_train.loading import tiny_dit

    tokenizer, text_encoder = load_text_encoder("tiny")
    prompts = ["a cat walks across a sunny garden", "the cat sits down", ""]
    *embeds, negative = encode_text(tokenizer, text_encoder, prompts)
    return dict(model=tiny_dit().eval(), vae=load_vae("tiny"), embeds=embeds, negative=negative)


def _inputs(batch: int = 2, frames: int = 5) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, 16, frames, 8, 12, generator=g)
    text = torch.randn(batch, 7, 64, generator=g)
    mask = (torch.arange(7)[None] < torch.tensor([7, 4])[:batch, None]).long()
    return latents, text, mask, torch.tensor([700.0, 300.0])[:batch]


# ---------------------------------------------------------------- the condition cache


def test_the_cache_is_refused_where_it_does_not_fit(tiny: dict) -> None:
    model = tiny["model"]
    latents, text, mask, t = _inputs()
    with torch.no_grad():
        with pytest.raises(ValueError, match="to be filled, those frames alone"):
            model(latents, t, text, mask, num_cond_latents=2, cond_cache=ConditionCache(2))
        cache = cache_condition(model, latents[:, :, :2], text, mask)
        with pytest.raises(ValueError, match="takes num_cond_latents=2"):
            model(latents[:, :, 2:], t, text, mask, num_cond_latents=1, cond_cache=cache)
        with pytest.raises(ValueError, match=r"grid"):
            model(latents[:, :, 2:, :4], t, text, mask, num_cond_latents=2, cond_cache=cache)


# ---------------------------------------------------------------- the loop


def test_high_frequency_tail_replaces_the_low_steps() -> None:
    tail = high_frequency_tail(flow_scheduler(40, 12.0))
    plain = flow_scheduler(40, 12.0).timesteps
    kept = plain[plain > 500]
    assert torch.equal(tail.timesteps[: len(kept)], kept)
    assert tail.timesteps[len(kept) :].tolist() == [500.0 - 50 * i for i in range(10)]
    assert torch.equal(tail.sigmas, torch.cat([tail.timesteps / 1000, torch.zeros(1)]))


@pytest.mark.parametrize("kv_cache", [False, True])
def test_condition_latents_stay_the_encoded_frames_at_every_step(tiny: dict, kv_cache: bool) -> None:
    cond = torch.randn(1, 16, 2, 4, 6, generator=torch.Generator().manual_seed(3))
    seen: list[torch.Tensor] = []
    out = denoise(
        tiny["model"],
        cond,
        tiny["embeds"][:1],
        tiny["negative"],
        frames=13,
        steps=3,
        guidance=4.0,
        hf_tail=True,
        kv_cache=kv_cache,
        on_latents=lambda i, latents: seen.append(latents.clone()),
        progress=False,
    )
    assert len(seen) == len(high_frequency_tail(flow_scheduler(3, 12.0)).timesteps)
    for latents in [*seen, out]:
        assert latents.shape == (1, 16, 4, 4, 6) and torch.equal(latents[:, :, :2], cond)
    assert not torch.allclose(seen[-1][:, :, 2:], seen[0][:, :, 2:])


def test_cached_loop_equals_the_uncached_one_without_guidance(tiny: dict) -> None:
    """Without guidance the cache changes nothing; with it, CFG-Zero* weighs the new frames only (as the
    official cached loop does), which the parity tests below pin down."""
    cond = torch.randn(1, 16, 2, 4, 6, generator=torch.Generator().manual_seed(4))
    runs = [
        denoise(tiny["model"], cond, tiny["embeds"][:1], None, frames=13, steps=4, guidance=1.0, kv_cache=kv)
        for kv in (False, True)
    ]
    torch.testing.assert_close(runs[1], runs[0], atol=1e-5, rtol=0)


# ---------------------------------------------------------------- parity with the official pipeline


@pytest.mark.parametrize("use_kv_cache", [False, True])
def test_continuation_matches_the_official_pipeline(
    tiny: dict, official, make_image, monkeypatch, use_kv_cache: bool
) -> None:
    """The official ``generate_vc`` loop (its default high-frequency tail, guidance 4), driving our tiny
    DiT, lands on the latents ``denoise`` does, with the condition cache on and off."""
    from longcat_data.encode import encode_text

    prompt = "a cat walks across a sunny garden"
    # The official 480p bucket for 4:7 is 480x832: 60x104 latents; 9 frames, the last 5 the condition.
    video = [Image.fromarray(np.roll(make_image(128, 224), 9 * i, axis=1)) for i in range(7)]
    noise = torch.randn(1, 16, 3, 60, 104, generator=torch.Generator().manual_seed(7))
    theirs = official.pipe.generate_vc(
        video=video,
        prompt=prompt,
        num_frames=9,
        num_cond_frames=5,
        num_inference_steps=4,
        guidance_scale=4.0,
        latents=noise.clone(),
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        use_kv_cache=use_kv_cache,
    )
    monkeypatch.setattr(sampling, "initial_noise", lambda shape, seeds: noise[:, :, 2:])
    embeds = encode_text(official.tokenizer, official.text_encoder, [prompt, ""])
    ours = denoise(
        tiny["model"],
        theirs[:, :, :2],
        embeds[:1],
        embeds[1],
        frames=9,
        steps=4,
        hf_tail=True,
        kv_cache=use_kv_cache,
        progress=False,
    )
    assert len(official.pipe.dit.inputs) == 13  # 3 plain steps above t=500, then the 10-step tail
    assert not torch.allclose(theirs[:, :, 2:], noise[:, :, 2:])
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- continuation and chaining


SMALL = VideoSettings(frames=9, steps=2, guidance=1.0, area=(64, 64), distill=True, cond_frames=5)


def test_continuation_keeps_its_condition_frames(tiny: dict) -> None:
    cond = synthetic_frames(64, 64, 5)
    video = continue_videos(tiny["model"], tiny["vae"], cond, tiny["embeds"][:1], None, SMALL, progress=False)
    assert video.shape == (1, 9, 64, 64, 3) and video.dtype == np.uint8
    assert np.array_equal(video[0, :5], cond)


@pytest.mark.parametrize("start", ["image", "video"])
def test_segments_chain_on_the_last_frames(tiny: dict, make_image, monkeypatch, start: str) -> None:
    encoded: list[np.ndarray] = []
    encode = continuation.encode_video
    monkeypatch.setattr(
        continuation,
        "encode_video",
        lambda vae, frames: encoded.append(frames[0].copy()) or encode(vae, frames),
    )
    so_far: list[int] = []
    steps: list[tuple[int, int]] = []
    source = synthetic_frames(64, 64, 5) if start == "video" else None
    long = generate_long_video(
        tiny["model"],
        tiny["vae"],
        [tiny["embeds"][0], tiny["embeds"][1], tiny["embeds"][0]],
        None,
        SMALL,
        image=make_image(64, 64) if start == "image" else None,
        video=source,
        on_step=lambda i, total: steps.append((i, total)),
        on_segment=lambda frames: so_far.append(len(frames)),
        progress=False,
    )
    assert long.shape == (9 + 2 * (9 - 5), 64, 64, 3)
    assert so_far == [9, 13, 17]
    assert steps[-1] == (6, 6) and len(steps) == 6
    # Each continuation is conditioned on the last 5 frames of the video so far.
    conditions = encoded if start == "image" else encoded[1:]
    assert np.array_equal(conditions[0], long[4:9]) and np.array_equal(conditions[1], long[8:13])
    if start == "video":
        assert np.array_equal(encoded[0], source) and np.array_equal(long[:5], source)


def test_refusals_of_the_pure_checks() -> None:
    with pytest.raises(SampleInputError, match=r"--cond-frames 12: must be 4k\+1 .*use 9 or 13"):
        check_cond_frames(12, 93)
    with pytest.raises(SampleInputError, match="--cond-frames 93 is not fewer than --frames 93"):
        check_cond_frames(93, 93)
    assert segment_prompts(["a"], 3) == ["a", "a", "a"]
    with pytest.raises(SampleInputError, match="4 prompts for 3 segments"):
        segment_prompts(["a", "b", "c", "d"], 3)


def test_condition_video_is_its_last_frames_fitted(tmp_path) -> None:
    frames = synthetic_frames(96, 160, 20)
    path = write_mp4(frames, tmp_path / "clip.mp4", fps=15)
    cond = read_condition_video(path, 5, 15, (64, 64))
    bucket = sampling.fitting_bucket(96, 160, (64, 64), "video")
    assert cond.shape == (5, *bucket, 3) and bucket != (96, 160)
    assert np.array_equal(cond, resize_center_crop(read_mp4(path)[-5:], *bucket)[0])


# ---------------------------------------------------------------- the command


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (
            ["--video", "short.mp4"],
            "--video short.mp4 has 8 frames at 15 fps, fewer than --cond-frames 13: give a longer video or a smaller --cond-frames",
        ),
        (["--video", "bad.mp4"], "--video bad.mp4: not a readable video"),
        (["--video", "missing.mp4"], "--video missing.mp4: not found; give the path of a video file"),
        (["--video", "clip.mp4", "--cond-frames", "12"], "--cond-frames 12: must be 4k+1"),
        (["--video", "clip.mp4", "--cond-frames", "17"], "--cond-frames 17 is not fewer than --frames 17"),
        (
            ["--video", "clip.mp4", "--prompt", "b"],
            "2 prompts for 1 segment: give one --prompt for every segment",
        ),
        (
            ["--image", "start.png", "--segments", "2", "--prompt", "b", "--prompt", "c"],
            "3 prompts for 2 segments",
        ),
        (
            ["--video", "clip.mp4", "--image", "start.png"],
            "--image and --video: a video starts from one of them",
        ),
        (["--segments", "0", "--image", "start.png"], "--segments 0: must be a finite number in [1, 100]"),
    ],
)
def test_cli_refuses_bad_continuations_before_any_model_loads(
    tmp_path, make_image, monkeypatch, capsys, args: list[str], error: str
) -> None:
    from longcat_train.cli import sample_main

    def no_models(*args, **kwargs):
        raise AssertionError("the models were loaded before the input was checked")

    monkeypatch.setattr(sampler_module.Sampler, "__init__", no_models)
    monkeypatch.chdir(tmp_path)
    Image.fromarray(make_image(192, 320)).save(tmp_path / "start.png")
    write_mp4(synthetic_frames(192, 320, 20), tmp_path / "clip.mp4", fps=15)
    write_mp4(synthetic_frames(192, 320, 8), tmp_path / "short.mp4", fps=15)
    (tmp_path / "bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    assert sample_main(["--model", "tiny", "--prompt", "a cat", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"longcat-sample: error: {error}") and err.count("\n") == 1


def test_cli_continues_a_video(tmp_path, monkeypatch) -> None:
    from longcat_train.cli import sample_main

    monkeypatch.chdir(tmp_path)
    source = synthetic_frames(64, 64, 12)
    write_mp4(source, tmp_path / "clip.mp4", fps=15)
    common = [
        "--model",
        "tiny",
        "--video",
        "clip.mp4",
        "--size",
        "64x64",
        "--frames",
        "9",
        "--cond-frames",
        "5",
    ]
    fast = ["--distill", "--steps", "1", "--prompt", "a cat"]
    assert sample_main([*common, *fast, "-o", "one.mp4"]) == 0
    assert sample_main([*common, *fast, "--segments", "3", "-o", "long.mp4"]) == 0
    one, long = read_mp4("one.mp4"), read_mp4("long.mp4")
    assert one.shape == (9, 64, 64, 3) and long.shape == (9 + 2 * 4, 64, 64, 3)
