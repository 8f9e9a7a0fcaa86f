"""The 720p refinement: its schedule, buckets, frame layout, upsampling, the stage on the tiny model, and
bitwise parity of the whole stage with the official ``generate_refine``."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from longcat_data.buckets import make_buckets
from longcat_data.encode import decode_latents, normalize_latents
from longcat_data.video import resize_center_crop
from longcat_train import refine
from longcat_train.config import RefineSettings
from longcat_train.refine import (
    MAX_STRETCH,
    RefineLayout,
    refine_bucket,
    refine_layout,
    refine_start_frame,
    refine_videos,
    upsample_video,
)
from longcat_train.sampling import SampleInputError, flow_scheduler, refine_scheduler

# ---------------------------------------------------------------- the schedule


def test_refine_schedule_enters_the_plain_one_at_the_strength() -> None:
    plain = flow_scheduler(50, shift=12.0)
    cut = refine_scheduler(50, 12.0, 0.5)
    below = plain.timesteps[plain.timesteps < 500]
    assert len(below) == 4  # the shifted linspace(1, 0.001, 50) has four sigmas under 0.5
    assert torch.equal(cut.timesteps, torch.cat([torch.tensor([500.0]), below]))
    assert torch.equal(cut.sigmas, torch.cat([cut.timesteps / 1000, torch.zeros(1)]))
    # Entered at the top, it is the plain schedule.
    top = refine_scheduler(7, 12.0, 1.0)
    torch.testing.assert_close(top.sigmas, flow_scheduler(7, shift=12.0).sigmas, atol=1e-7, rtol=0)
    for strength in (0.0, 1.5):
        with pytest.raises(SampleInputError, match=r"strength must be in \(0, 1\]"):
            refine_scheduler(50, 12.0, strength)


def test_refine_steps_go_from_the_strength_to_zero() -> None:
    scheduler = refine_scheduler(50, 12.0, 0.5)
    x, velocity = torch.zeros(1), torch.ones(1)
    for t in scheduler.timesteps:
        x = scheduler.step(velocity, t, x).prev_sample
    torch.testing.assert_close(x, torch.tensor([-0.5]))  # the steps add up to sigma 0.5 -> 0


# ---------------------------------------------------------------- buckets and frames


def test_every_480p_bucket_refines_at_a_720p_bucket_near_its_shape() -> None:
    assert refine_bucket(480, 832, (720, 1280)) == (704, 1280)
    assert refine_bucket(832, 480, (720, 1280)) == (1280, 704)
    for h, w in make_buckets((480, 832)):
        bucket = refine_bucket(h, w, (720, 1280))
        assert bucket[0] % 64 == bucket[1] % 64 == 0
        assert 1.3 < (bucket[0] * bucket[1] / (h * w)) ** 0.5 < 1.6
        assert max(bucket[0] / h, bucket[1] / w) / min(bucket[0] / h, bucket[1] / w) <= MAX_STRETCH


@pytest.mark.parametrize(
    ("size", "area", "message"),
    [
        ((64, 64), (720, 1280), "too small for --refine-area 720x1280.*at most 2x"),
        ((720, 1280), (720, 1280), "already as large as its bucket 1280x704"),
        ((704, 1280), (480, 832), "already as large"),
        (
            (192, 1024),
            (720, 1280),
            "no bucket of --refine-area 720x1280 near its aspect ratio.*1792x512, would stretch it 52%",
        ),
        ((16, 16), (16, 16), "holds no size with sides on the 64-pixel grid"),
    ],
)
def test_videos_that_cannot_refine_at_a_bucket_are_one_line(size, area, message) -> None:
    with pytest.raises(SampleInputError, match=message) as err:
        refine_bucket(*size, area)
    assert "\n" not in str(err.value)


def test_refine_layout_fills_whole_attention_blocks() -> None:
    # The official demo's video: 93 frames; the condition block and the noisy blocks 4 latent frames each.
    assert refine_layout(93, temporal=False) == RefineLayout(frames=93, front=12, back=4, cond_latents=4)
    assert refine_layout(93, temporal=False).latent_frames == 28
    assert refine_layout(93, temporal=True) == RefineLayout(frames=186, front=12, back=7, cond_latents=4)
    assert refine_layout(93, temporal=True).latent_frames == 52
    for frames in range(5, 258, 4):
        for temporal in (False, True):
            layout = refine_layout(frames, temporal=temporal)
            padded = layout.front + layout.frames + layout.back
            assert (padded - 1) % 4 == 0 and layout.latent_frames % 4 == 0
            assert 0 <= layout.back < 16 and layout.frames == frames * (2 if temporal else 1)
    with pytest.raises(SampleInputError, match="at least 5 frames"):
        refine_layout(1, temporal=False)


def test_upsampling_keeps_corners_and_end_frames(make_image) -> None:
    frames = np.stack([np.roll(make_image(16, 24), 5 * i, axis=1) for i in range(5)])
    video = upsample_video(frames, (32, 48), 10)
    assert video.shape == (1, 3, 10, 32, 48) and video.dtype == torch.float32
    pixels = torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 255 * 2 - 1
    for t_in, t_out in ((0, 0), (4, 9)):
        for y_in, y_out, x_in, x_out in ((0, 0, 0, 0), (15, 31, 23, 47)):
            torch.testing.assert_close(video[0, :, t_out, y_out, x_out], pixels[:, t_in, y_in, x_in])
    assert upsample_video(frames, (32, 48), 5).shape[2] == 5


def test_refine_start_frame_is_the_part_the_video_began_from(make_image) -> None:
    image = make_image(300, 500)
    # Same aspect ratio as the video: the video's centre crop, at the refine size.
    np.testing.assert_array_equal(
        refine_start_frame(image, (48, 64), (96, 128)), resize_center_crop(image, 96, 128)[0]
    )
    # A bucket of another shape: that crop stretched to it (the upsampled video is stretched alike).
    stretched = refine_start_frame(image, (48, 64), (96, 160))
    expected = Image.fromarray(resize_center_crop(image, 300, 400)[0]).resize(
        (160, 96), Image.Resampling.BICUBIC
    )
    difference = np.abs(stretched.astype(int) - np.asarray(expected).astype(int))
    assert (
        difference.mean() < 0.5
    )  # resampled once or twice; the crop of the bucket's own shape differs by far more
    cropped_to_bucket = resize_center_crop(image, 96, 160)[0]
    assert np.abs(stretched.astype(int) - cropped_to_bucket.astype(int)).mean() > 5


# ---------------------------------------------------------------- the stage on the tiny model


def _stage1(make_image, frames: int = 5) -> np.ndarray:
    """One 32x32 video (refined at 64x64: the smallest 720p stand-in on the 64-pixel grid)."""
    return np.stack([np.roll(make_image(32, 32), 3 * i, axis=1) for i in range(frames)])[None]


AREA = (64, 64)


def test_tiny_refinement_upsamples_and_keeps_the_frame_count(
    tiny: dict, make_image, caplog, single_thread
) -> None:
    settings = RefineSettings(area=AREA, seed=3)
    dit = tiny["model"]
    with caplog.at_level(logging.WARNING):
        video = refine_videos(
            dit,
            tiny["vae"],
            _stage1(make_image),
            make_image(90, 90),
            [tiny["prompt"]],
            settings,
            progress=False,
        )
    assert video.shape == (1, 5, 64, 64, 3) and video.dtype == np.uint8
    # No kernel on the CPU: dense attention, said once; the model's own setting is back afterwards.
    assert "no block-sparse attention kernel here" in caplog.text and "dense attention" in caplog.text
    assert dit.attention_implementation == "sdpa"
    double = refine_videos(
        dit,
        tiny["vae"],
        _stage1(make_image),
        make_image(90, 90),
        [tiny["prompt"]],
        RefineSettings(area=AREA, temporal=True),
        progress=False,
    )
    assert double.shape == (1, 10, 64, 64, 3)


def test_tiny_refinement_of_a_batch_is_video_by_video(tiny: dict, make_image, single_thread) -> None:
    settings = RefineSettings(area=AREA, seed=5)
    stage1 = np.concatenate([_stage1(make_image), _stage1(make_image)[:, ::-1]])
    steps: list[tuple[int, int]] = []
    both = refine_videos(
        tiny["model"],
        tiny["vae"],
        stage1,
        make_image(64, 64),
        [tiny["prompt"]] * 2,
        settings,
        on_step=lambda i, n: steps.append((i, n)),
        progress=False,
    )
    assert steps == [(i, 5) for i in range(1, 6)] * 2  # 50 plain steps entered at 0.5: 1 + 4 model calls
    second = refine_videos(
        tiny["model"],
        tiny["vae"],
        stage1[1:],
        make_image(64, 64),
        [tiny["prompt"]],
        RefineSettings(area=AREA, seed=6),
        progress=False,
    )
    np.testing.assert_array_equal(both[1], second[0])
    with pytest.raises(ValueError, match="2 videos need as many prompts"):
        refine_videos(tiny["model"], tiny["vae"], stage1, make_image(64, 64), [tiny["prompt"]], settings)


def test_block_sparse_attention_is_used_where_its_kernel_runs(
    tiny: dict, make_image, monkeypatch, single_thread
) -> None:
    seen: list[str] = []
    monkeypatch.setattr(refine, "block_sparse_kernel_missing", lambda device, dtype, head_dim: None)
    original = refine.euler_loop

    def loop(model, *args, **kwargs):
        seen.append(model.attention_implementation)
        return original(model, *args, **kwargs)

    monkeypatch.setattr(refine, "euler_loop", loop)
    refine_videos(
        tiny["model"],
        tiny["vae"],
        _stage1(make_image),
        make_image(64, 64),
        [tiny["prompt"]],
        RefineSettings(area=AREA),
        progress=False,
    )
    assert seen == ["block_sparse"] and tiny["model"].attention_implementation == "sdpa"


# ---------------------------------------------------------------- parity with the official pipeline


@pytest.mark.parametrize("temporal", [False, True])
def test_refinement_matches_the_official_pipeline(
    tiny: dict, official, make_image, monkeypatch, single_thread, temporal: bool
) -> None:
    """The official ``generate_refine`` (as its demo calls it: the start image, one condition frame, 50
    steps, t_thresh 0.5), driving our tiny DiT from the same 480p frames, start image and seed, visits the
    same latents at every step and ends on the latents ``refine_videos`` decodes, bit for bit.

    Two differences are taken out of the comparison: upstream samples the VAE posterior where this
    project encodes its mean, and it divides by the latent std as a multiplication by 1/std (a last-bit
    difference)."""
    vae = tiny["vae"]
    monkeypatch.setattr(official.module, "torch_gc", lambda: None)  # it assumes CUDA
    monkeypatch.setattr(
        official.module, "retrieve_latents", lambda out, generator=None: out.latent_dist.mode()
    )
    monkeypatch.setattr(official.pipe, "normalize_latents", lambda z: normalize_latents(z, vae))
    monkeypatch.setattr(official.pipe, "get_condition_shape", lambda *args, **kwargs: AREA)  # 720p on the CPU
    stage1, image = _stage1(make_image), make_image(64, 64)
    prompt, seed = "a cat walks across a sunny garden", 11

    torch.manual_seed(seed)  # upstream's re-noising draws from the global generator
    theirs = official.pipe.generate_refine(
        image=Image.fromarray(image),
        prompt=prompt,
        stage1_video=[Image.fromarray(f) for f in stage1[0]],
        num_cond_frames=1,
        num_inference_steps=50,
        spatial_refine_only=not temporal,
        output_type="latent",
    )
    their_inputs = official.pipe.dit.inputs

    class Recorded(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module, self.inputs = tiny["model"], []

        def forward(self, *, hidden_states, **inputs):
            self.inputs.append(hidden_states.clone())
            return self.module(hidden_states=hidden_states, **inputs)

    decoded: list[torch.Tensor] = []
    decode = refine.decode_videos
    monkeypatch.setattr(
        refine,
        "decode_videos",
        lambda vae, latents, **kw: decoded.append(latents) or decode(vae, latents, **kw),
    )
    ours = Recorded()
    from longcat_data.encode import encode_text

    embeds = encode_text(official.tokenizer, official.text_encoder, [prompt])
    video = refine_videos(
        ours,
        vae,
        stage1,
        image,
        embeds,
        RefineSettings(area=AREA, temporal=temporal, seed=seed),
        progress=False,
    )

    assert len(ours.inputs) == len(their_inputs) == 5
    for step, (mine, upstream) in enumerate(zip(ours.inputs, their_inputs, strict=True)):
        torch.testing.assert_close(mine, upstream, atol=0, rtol=0, msg=f"step {step}")
    torch.testing.assert_close(decoded[0], theirs, atol=0, rtol=0)
    layout = refine_layout(5, temporal=temporal)
    np.testing.assert_array_equal(
        video[0], decode_latents(vae, theirs)[0, layout.front : layout.front + layout.frames].numpy()
    )


@pytest.mark.gpu
def test_the_kernel_runs_every_720p_bucket_a_480p_video_refines_at() -> None:
    """The refinement's block-sparse attention on each 720p bucket's token grid (4 condition latent
    frames, as the refinement has) equals dense attention with the condition rows kept to themselves
    when every tile is chosen: the kernel handles each grid, partial edge tiles included."""
    from longcat_data.defaults import DEFAULT_AREA, DEFAULT_REFINE_AREA
    from longcat_kernels import block_sparse_attention

    targets = {refine_bucket(*b, DEFAULT_REFINE_AREA) for b in make_buckets(DEFAULT_AREA)}
    g = torch.Generator(device="cuda").manual_seed(0)
    for h, w in sorted(targets):
        shape, cond = (6, h // 16, w // 16), 4
        tokens, cond_tokens = shape[0] * shape[1] * shape[2], cond * shape[1] * shape[2]
        q, k, v = (
            torch.randn(1, 2, tokens, 128, generator=g, device="cuda", dtype=torch.bfloat16) for _ in "qkv"
        )
        out = block_sparse_attention(
            q, k, v, shape, density=1.0, num_cond_latents=cond, implementation="triton"
        )
        allowed = torch.ones(tokens, tokens, dtype=torch.bool, device="cuda")
        allowed[:cond_tokens, cond_tokens:] = False
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), attn_mask=allowed
        )
        error = (out.float() - ref).norm() / ref.norm()
        assert error < 1e-2, f"bucket {h}x{w}: relative error {error:.3g}"
