"""Sampling math: schedule, guidance, start image, the denoising loop, generate_videos, official parity."""

from __future__ import annotations

import logging
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from longcat_train import sampling
from longcat_train.config import VideoSettings
from longcat_train.sampling import (
    DISTILL_GRID,
    SampleInputError,
    cfg_zero_star,
    denoise,
    fit_start_image,
    flow_scheduler,
    generate_videos,
    read_start_image,
    round_frames,
)

# ---------------------------------------------------------------- pure parts


@pytest.mark.parametrize("steps", [1, 2, 40, 50])
def test_schedule_is_the_official_shifted_linspace(steps: int) -> None:
    scheduler = flow_scheduler(steps, shift=12.0)
    # Upstream: torch.linspace(1, 0.001, steps) in float32, then s' = shift*s / (1 + (shift-1)*s).
    s = torch.linspace(1, 0.001, steps)
    expected = 12.0 * s / (1 + 11.0 * s)
    assert torch.equal(scheduler.sigmas[:-1], expected)
    assert scheduler.sigmas[-1] == 0
    assert torch.equal(scheduler.timesteps, expected * 1000)
    exact = 12.0 * s.double() / (1 + 11.0 * s.double())
    assert torch.allclose(scheduler.sigmas[:-1].double(), exact, rtol=0, atol=1e-6)


def test_distill_sigmas_pick_evenly_from_the_fifty_point_grid() -> None:
    # 16 steps take grid points floor(j * 50 / 16) from the top: 0, 3, 6, ..., 43, 46 -> k / 50.
    expected = [50, 47, 44, 41, 38, 35, 32, 29, 25, 22, 19, 16, 13, 10, 7, 4]
    assert torch.equal(sampling.distill_sigmas(16), torch.tensor(expected, dtype=torch.float32) / 50)
    assert torch.equal(sampling.distill_sigmas(1), torch.tensor([1.0]))
    assert torch.equal(
        sampling.distill_sigmas(DISTILL_GRID), torch.arange(50, 0, -1, dtype=torch.float32) / 50
    )
    for steps in range(1, DISTILL_GRID + 1):
        sigmas = sampling.distill_sigmas(steps)
        assert len(sigmas) == steps and sigmas[0] == 1.0 and bool((sigmas.diff() < 0).all())
    for steps in (0, DISTILL_GRID + 1):
        with pytest.raises(SampleInputError, match="1 to 50 steps"):
            sampling.distill_sigmas(steps)


def test_distill_schedule_is_shifted_like_the_plain_one() -> None:
    scheduler = flow_scheduler(16, shift=12.0, distill=True)
    s = sampling.distill_sigmas(16)
    assert torch.equal(scheduler.sigmas[:-1], 12.0 * s / (1 + 11.0 * s))
    assert scheduler.sigmas[-1] == 0
    assert torch.equal(scheduler.timesteps, scheduler.sigmas[:-1] * 1000)


def test_euler_step_moves_along_the_velocity() -> None:
    scheduler = flow_scheduler(4, shift=12.0)
    x, v = torch.randn(1, 16, 2, 4, 4), torch.randn(1, 16, 2, 4, 4)
    s, s_next = scheduler.sigmas[0], scheduler.sigmas[1]
    out = scheduler.step(v, scheduler.timesteps[0], x).prev_sample
    torch.testing.assert_close(out, x + (s_next - s) * v)


def test_euler_recovers_x0_from_an_exact_prediction() -> None:
    # A model that always answers the true x0 - eps lands on x0 after the last step, whatever the schedule.
    x0, eps = torch.randn(1, 4, 3, 2, 2), torch.randn(1, 4, 3, 2, 2)
    scheduler = flow_scheduler(7, shift=12.0)
    x = eps.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(-(x0 - eps), t, x).prev_sample
    torch.testing.assert_close(x, x0, atol=1e-5, rtol=0)


def test_cfg_zero_star_on_hand_made_vectors() -> None:
    cond = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    uncond = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    # sample 0: st = <c,u>/|u|^2 = 2/4 = 0.5; v = 0.5u + 4(c - 0.5u) = [1,0] + 4*[0,2] = [1, 8]
    # sample 1: st = 8/4 = 2;                  v = 2u + 4(c - 2u)     = [0,4] + 4*[3,0] = [12, 4]
    out = cfg_zero_star(cond, uncond, 4.0)
    torch.testing.assert_close(out, torch.tensor([[1.0, 8.0], [12.0, 4.0]]))
    torch.testing.assert_close(cfg_zero_star(cond, uncond, 1.0), cond)
    # A zero unconditional prediction leaves st finite (the epsilon) and guidance scales the condition.
    torch.testing.assert_close(cfg_zero_star(cond, torch.zeros_like(uncond), 3.0), 3.0 * cond)


def test_round_frames_to_4k_plus_1(caplog: pytest.LogCaptureFixture) -> None:
    assert round_frames(93) == 93
    assert not caplog.records
    with caplog.at_level(logging.WARNING):
        assert round_frames(94) == 93
        assert round_frames(96) == 93  # down, as prep and the trainer round (issue 19)
    assert "4k+1" in caplog.text and "using 93 instead of 96" in caplog.text
    with pytest.raises(SampleInputError, match="at least 5"):
        round_frames(3)


# ---------------------------------------------------------------- start image


@pytest.mark.parametrize(
    ("size", "bucket"),
    [
        ((720, 1280), (480, 832)),
        ((1280, 720), (832, 480)),
        ((600, 600), (640, 640)),
        ((400, 700), (480, 832)),
    ],
)
def test_start_image_goes_to_the_nearest_bucket(
    make_image, size: tuple[int, int], bucket: tuple[int, int]
) -> None:
    assert fit_start_image(make_image(*size)).shape == (*bucket, 3)


def test_tiny_and_extreme_start_images_are_refused(make_image) -> None:
    with pytest.raises(SampleInputError, match="too small for --size 480x832.*at least 416x240"):
        fit_start_image(make_image(60, 100))
    with pytest.raises(SampleInputError, match="extreme aspect ratio 20.0:1"):
        fit_start_image(make_image(100, 2000))


def test_missing_and_non_image_files(tmp_path) -> None:
    with pytest.raises(SampleInputError, match="not found"):
        read_start_image(tmp_path / "nope.png")
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    with pytest.raises(SampleInputError, match="is not an image"):
        read_start_image(text)


# ---------------------------------------------------------------- denoising with a stand-in DiT


class RecordingDiT(torch.nn.Module):
    """Answers a fixed smooth function of its inputs and records every call."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.5))
        self.calls: list[dict] = []

    def forward(
        self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, num_cond_latents
    ):
        self.calls.append(
            dict(batch=hidden_states.shape[0], timestep=timestep.clone(), num_cond_latents=num_cond_latents)
        )
        text = (encoder_hidden_states * encoder_attention_mask[..., None]).sum((1, 2)) / 100
        return self.scale * hidden_states + text.view(-1, 1, 1, 1, 1) + timestep.view(-1, 1, 1, 1, 1) / 1000


def _denoise_inputs(batch: int = 1) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    cond = torch.randn(batch, 16, 1, 4, 6, generator=g)
    prompts = [torch.randn(3 + i, 8, generator=g) for i in range(batch)]
    return cond, prompts, torch.randn(1, 8, generator=g)


def test_condition_frame_is_the_start_image_at_every_step() -> None:
    model = RecordingDiT()
    cond, prompts, negative = _denoise_inputs(batch=2)
    seen: list[torch.Tensor] = []
    out = denoise(
        model,
        cond,
        prompts,
        negative,
        frames=9,
        steps=5,
        seeds=[0, 1],
        on_latents=lambda i, x: seen.append(x),
    )
    assert len(seen) == 5
    for latents in [*seen, out]:
        assert latents.shape == (2, 16, 3, 4, 6)
        assert torch.equal(latents[:, :, :1], cond)
    # Every call batches conditional and unconditional passes and marks one condition latent.
    assert [c["batch"] for c in model.calls] == [4] * 5
    assert all(c["num_cond_latents"] == 1 for c in model.calls)


def test_guidance_one_is_the_plain_conditional_prediction() -> None:
    cond, prompts, _ = _denoise_inputs()
    model = RecordingDiT()
    out = denoise(model, cond, prompts, None, frames=9, steps=4, guidance=1.0, seeds=[3])
    assert [c["batch"] for c in model.calls] == [1] * 4  # no unconditional pass at all

    # The same loop written out by hand: conditional prediction only, Euler on the noisy frames.
    scheduler = flow_scheduler(4)
    noisy = sampling.initial_noise((16, 2, 4, 6), [3])
    mask = torch.ones(1, prompts[0].shape[0], dtype=torch.long)
    for t in scheduler.timesteps:
        x = torch.cat([cond, noisy], dim=2)
        pred = model(x, t.expand(1), prompts[0][None], mask, 1)
        noisy = scheduler.step(-pred[:, :, 1:], t, noisy).prev_sample
    torch.testing.assert_close(out, torch.cat([cond, noisy], dim=2))


def test_distilled_denoising_steps_through_the_distill_schedule_without_guidance() -> None:
    cond, prompts, _ = _denoise_inputs()
    model = RecordingDiT()
    denoise(model, cond, prompts, None, frames=9, steps=5, guidance=1.0, distill=True, progress=False)
    assert [c["batch"] for c in model.calls] == [1] * 5
    seen = torch.stack([c["timestep"][0] for c in model.calls])
    assert torch.equal(seen, flow_scheduler(5, distill=True).timesteps)
    assert not torch.equal(seen, flow_scheduler(5).timesteps)


def test_a_video_depends_only_on_its_own_seed() -> None:
    cond, prompts, negative = _denoise_inputs(batch=2)
    both = denoise(RecordingDiT(), cond, prompts, negative, frames=9, steps=3, seeds=[5, 6], progress=False)
    alone = denoise(
        RecordingDiT(), cond[1:], prompts[1:], negative, frames=9, steps=3, seeds=[6], progress=False
    )
    torch.testing.assert_close(both[1:], alone)


def test_guidance_needs_the_negative_prompt() -> None:
    cond, prompts, _ = _denoise_inputs()
    with pytest.raises(ValueError, match="negative"):
        denoise(RecordingDiT(), cond, prompts, None, frames=5, steps=1, guidance=4.0)


# ---------------------------------------------------------------- the tiny model end to end


def test_tiny_condition_frame_equals_the_encoded_start_image(tiny: dict, make_image) -> None:
    from longcat_data.encode import encode_image

    start = fit_start_image(make_image(96, 80), area=(64, 64))
    cond = encode_image(tiny["vae"], start[None])
    seen: list[torch.Tensor] = []
    out = denoise(
        tiny["model"],
        cond,
        [tiny["prompt"]],
        tiny["negative"],
        frames=9,
        steps=3,
        on_latents=lambda i, x: seen.append(x.clone()),
        progress=False,
    )
    assert len(seen) == 3 and out.shape == (1, 16, 3, 8, 8)
    for latents in [*seen, out]:
        assert torch.equal(latents[:, :, :1], cond)
    assert not torch.equal(seen[0][:, :, 1:], out[:, :, 1:])  # the noisy frames did move


def test_tiny_generate_videos_follows_the_distill_setting(tiny: dict, make_image) -> None:
    timesteps: list[torch.Tensor] = []

    class Watched(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = tiny["model"]

        def forward(self, *, timestep, **inputs):
            timesteps.append(timestep[0])
            return self.inner(timestep=timestep, **inputs)

    settings = VideoSettings(frames=5, steps=3, guidance=1.0, area=(64, 64), distill=True)
    generate_videos(
        Watched(), tiny["vae"], make_image(64, 64), [tiny["prompt"]], None, settings, progress=False
    )
    assert torch.equal(torch.stack(timesteps), flow_scheduler(3, distill=True).timesteps)


def test_tiny_generate_videos_is_a_video_of_the_bucket_size_set_by_the_seed(tiny: dict, make_image) -> None:
    settings = VideoSettings(frames=5, steps=2, area=(64, 64))
    video = generate_videos(
        tiny["model"],
        tiny["vae"],
        make_image(70, 70),
        [tiny["prompt"]],
        tiny["negative"],
        settings,
        progress=False,
    )[0]
    assert video.shape == (5, 64, 64, 3) and video.dtype == np.uint8
    other = generate_videos(
        tiny["model"],
        tiny["vae"],
        make_image(70, 70),
        [tiny["prompt"]],
        tiny["negative"],
        replace(settings, seed=1),
        progress=False,
    )[0]
    assert not np.array_equal(video, other)


# ---------------------------------------------------------------- parity with the official pipeline


def test_denoising_matches_the_official_pipeline(tiny: dict, official, make_image, monkeypatch) -> None:
    """The official ``generate_i2v`` loop, driving our tiny DiT, lands on the latents ``denoise`` does."""
    from longcat_data.encode import encode_text

    prompt = "a cat walks across a sunny garden"
    start = Image.fromarray(
        make_image(128, 224)
    )  # the official 480p bucket for 4:7 is 480x832: 60x104 latents
    noise = torch.randn(1, 16, 2, 60, 104, generator=torch.Generator().manual_seed(7))
    theirs = official.pipe.generate_i2v(
        image=start,
        prompt=prompt,
        num_frames=5,
        num_inference_steps=4,
        guidance_scale=4.0,
        latents=noise.clone(),
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    )

    monkeypatch.setattr(sampling, "initial_noise", lambda shape, seeds: noise[:, :, 1:])
    embeds = encode_text(official.tokenizer, official.text_encoder, [prompt, ""])
    ours = denoise(tiny["model"], theirs[:, :, :1], embeds[:1], embeds[1], frames=5, steps=4, progress=False)
    assert not torch.allclose(theirs[:, :, 1:], noise[:, :, 1:])  # the official loop did move the latents
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)  # bitwise equal on CPU here


def test_distill_sigmas_match_the_official_schedule(official) -> None:
    counts = SimpleNamespace(num_distill_sample_steps=DISTILL_GRID, num_timesteps=1000)
    for steps in range(1, DISTILL_GRID + 1):
        theirs = official.module.LongCatVideoPipeline.get_timesteps_sigmas(counts, steps, use_distill=True)
        assert torch.equal(sampling.distill_sigmas(steps), theirs), steps


def test_distilled_denoising_matches_the_official_pipeline(
    tiny: dict, official, make_image, monkeypatch
) -> None:
    """The official ``generate_i2v(use_distill=True)`` loop as its demo runs it (16 steps, guidance 1, no
    negative prompt), driving our tiny DiT, lands on the latents ``denoise(distill=True)`` does."""
    from longcat_data.encode import encode_text

    prompt = "a cat walks across a sunny garden"
    noise = torch.randn(1, 16, 2, 60, 104, generator=torch.Generator().manual_seed(7))
    theirs = official.pipe.generate_i2v(
        image=Image.fromarray(make_image(128, 224)),
        prompt=prompt,
        num_frames=5,
        num_inference_steps=16,
        use_distill=True,
        guidance_scale=1.0,
        latents=noise.clone(),
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    )
    assert len(official.pipe.dit.inputs) == 16 and all(len(x) == 1 for x in official.pipe.dit.inputs)

    monkeypatch.setattr(sampling, "initial_noise", lambda shape, seeds: noise[:, :, 1:])
    embeds = encode_text(official.tokenizer, official.text_encoder, [prompt])
    ours = denoise(
        tiny["model"],
        theirs[:, :, :1],
        embeds,
        None,
        frames=5,
        steps=16,
        guidance=1.0,
        distill=True,
        progress=False,
    )
    assert not torch.allclose(theirs[:, :, 1:], noise[:, :, 1:])
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
