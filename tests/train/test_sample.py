"""The I2V sampler: schedule, guidance, condition frame, video files, validation, CLI."""

from __future__ import annotations

import logging
import os
from types import SimpleNamespace

import av
import numpy as np
import pytest
import torch
from PIL import Image

from longcat_train import sample
from longcat_train.sample import (
    SampleInputError,
    cfg_zero_star,
    denoise,
    fit_start_image,
    flow_scheduler,
    load_image,
    round_frames,
    write_mp4,
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
        assert round_frames(96) == 97
    assert "4k+1" in caplog.text and "97" in caplog.text
    with pytest.raises(SampleInputError, match="at least 5"):
        round_frames(3)


# ---------------------------------------------------------------- start image


def _image(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], -1).astype(np.uint8)


@pytest.mark.parametrize(
    ("size", "bucket"),
    [((720, 1280), (480, 832)), ((1280, 720), (832, 480)), ((600, 600), (640, 640)), ((400, 700), (480, 832))],
)
def test_start_image_goes_to_the_nearest_bucket(size: tuple[int, int], bucket: tuple[int, int]) -> None:
    assert fit_start_image(_image(*size)).shape == (*bucket, 3)


def test_tiny_and_extreme_start_images_are_refused() -> None:
    with pytest.raises(SampleInputError, match="too small for --size 480x832.*at least 416x240"):
        fit_start_image(_image(60, 100))
    with pytest.raises(SampleInputError, match="extreme aspect ratio 20.0:1"):
        fit_start_image(_image(100, 2000))


def test_missing_and_non_image_files(tmp_path) -> None:
    with pytest.raises(SampleInputError, match="not found"):
        load_image(tmp_path / "nope.png")
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    with pytest.raises(SampleInputError, match="is not an image"):
        load_image(text)


# ---------------------------------------------------------------- denoising with a stand-in DiT


class RecordingDiT(torch.nn.Module):
    """Answers a fixed smooth function of its inputs and records every call."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.5))
        self.calls: list[dict] = []

    def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, num_cond_latents):
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
        model, cond, prompts, negative, frames=9, steps=5, seeds=[0, 1], on_latents=lambda i, x: seen.append(x)
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
    noisy = sample.initial_noise((16, 2, 4, 6), [3])
    mask = torch.ones(1, prompts[0].shape[0], dtype=torch.long)
    for t in scheduler.timesteps:
        x = torch.cat([cond, noisy], dim=2)
        pred = model(x, t.expand(1), prompts[0][None], mask, 1)
        noisy = scheduler.step(-pred[:, :, 1:], t, noisy).prev_sample
    torch.testing.assert_close(out, torch.cat([cond, noisy], dim=2))


def test_a_video_depends_only_on_its_own_seed() -> None:
    cond, prompts, negative = _denoise_inputs(batch=2)
    both = denoise(RecordingDiT(), cond, prompts, negative, frames=9, steps=3, seeds=[5, 6], progress=False)
    alone = denoise(RecordingDiT(), cond[1:], prompts[1:], negative, frames=9, steps=3, seeds=[6], progress=False)
    torch.testing.assert_close(both[1:], alone)


def test_guidance_needs_the_negative_prompt() -> None:
    cond, prompts, _ = _denoise_inputs()
    with pytest.raises(ValueError, match="negative"):
        denoise(RecordingDiT(), cond, prompts, None, frames=5, steps=1, guidance=4.0)


# ---------------------------------------------------------------- files


def test_mp4_has_the_right_frames_size_and_rate(tmp_path) -> None:
    video = np.stack([_image(48, 80)] * 9)
    video[:, :, :, 2] = np.arange(9, dtype=np.uint8)[:, None, None] * 25
    path = write_mp4(video, tmp_path / "out.mp4", fps=15)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.average_rate == 15
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    assert len(frames) == 9 and frames[0].shape == (48, 80, 3)
    assert np.abs(np.stack(frames).astype(int) - video).mean() < 6  # lossy, but the same picture
    assert not list(tmp_path.glob(".*partial*"))


def test_gif_and_frames(tmp_path) -> None:
    video = np.stack([np.roll(_image(32, 48), 6 * i, axis=1) for i in range(5)])
    gif = sample.write_gif(video, tmp_path / "out.gif")
    with Image.open(gif) as image:
        assert image.n_frames == 5
    assert len(sample.write_frames(video, tmp_path / "frames")) == 5


# ---------------------------------------------------------------- the tiny model end to end


@pytest.fixture(scope="module")
def tiny() -> dict:
    from longcat_data.encode import encode_text, load_text_encoder, load_vae
    from longcat_train.loading import tiny_dit

    model = tiny_dit().eval()
    tokenizer, text_encoder = load_text_encoder("tiny")
    prompt, negative = encode_text(tokenizer, text_encoder, ["a cat walks across a sunny garden", ""])
    return dict(model=model, vae=load_vae("tiny"), prompt=prompt, negative=negative)


def test_tiny_condition_frame_equals_the_encoded_start_image(tiny: dict) -> None:
    from longcat_data.encode import encode_image

    start = fit_start_image(_image(96, 80), area=(64, 64))
    cond = encode_image(tiny["vae"], start[None])
    seen: list[torch.Tensor] = []
    out = denoise(
        tiny["model"], cond, [tiny["prompt"]], tiny["negative"], frames=9, steps=3,
        on_latents=lambda i, x: seen.append(x.clone()), progress=False,
    )  # fmt: skip
    assert len(seen) == 3 and out.shape == (1, 16, 3, 8, 8)
    for latents in [*seen, out]:
        assert torch.equal(latents[:, :, :1], cond)
    assert not torch.equal(seen[0][:, :, 1:], out[:, :, 1:])  # the noisy frames did move


def test_tiny_sample_i2v_is_a_video_of_the_bucket_size_set_by_the_seed(tiny: dict) -> None:
    kwargs = dict(frames=5, steps=2, area=(64, 64), progress=False)
    video = sample.sample_i2v(tiny["model"], tiny["vae"], _image(70, 70), tiny["prompt"], tiny["negative"], **kwargs)
    assert video.shape == (5, 64, 64, 3) and video.dtype == np.uint8
    other = sample.sample_i2v(
        tiny["model"], tiny["vae"], _image(70, 70), tiny["prompt"], tiny["negative"], seed=1, **kwargs
    )
    assert not np.array_equal(video, other)


# ---------------------------------------------------------------- validation pairs


def test_validation_pairs_from_a_folder(tmp_path) -> None:
    for name, size in [("b_dog", (80, 120)), ("a_cat", (64, 64))]:
        Image.fromarray(_image(*size)).save(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text(f"a {name[2:]} runs\n")
    pairs = sample.load_validation_pairs(str(tmp_path), limit=5)
    assert [(p.key, p.prompt, p.image.shape) for p in pairs] == [
        ("a_cat", "a cat runs", (64, 64, 3)),
        ("b_dog", "a dog runs", (80, 120, 3)),
    ]
    assert len(sample.load_validation_pairs(str(tmp_path), limit=1)) == 1
    (tmp_path / "c_bird.png").write_bytes((tmp_path / "a_cat.png").read_bytes())
    with pytest.raises(SampleInputError, match="c_bird.png has no caption"):
        sample.load_validation_pairs(str(tmp_path), limit=5)


def test_validation_pairs_from_eval_shards(tmp_path) -> None:
    import webdataset as wds

    from longcat_data.shards import ShardSample

    with wds.TarWriter(str(tmp_path / "eval-000000.tar")) as tar:
        for i in range(3):
            image = np.roll(_image(64, 64), i, axis=0)
            latents = torch.zeros(16, 3, 8, 8)
            tar.write(ShardSample(f"clip{i}", latents, latents[:, :1], image, f"caption {i}", {"fps": 15}).to_members())
    pairs = sample.load_validation_pairs(str(tmp_path), limit=2)
    assert [(p.key, p.prompt) for p in pairs] == [("clip0", "caption 0"), ("clip1", "caption 1")]
    np.testing.assert_array_equal(pairs[1].image, np.roll(_image(64, 64), 1, axis=0))


def test_contact_sheet_layout() -> None:
    video = np.stack([np.full((32, 48, 3), 10 * i, np.uint8) for i in range(9)])
    sheet = sample.contact_sheet(_image(32, 48), [("base", video), ("LoRA", video)], columns=4, height=40)
    # Two rows of 40 px plus the header; a label column plus five cells of 60 px.
    assert sheet.shape == (18 + 2 * 44, 72 + 5 * 64, 3)


# ---------------------------------------------------------------- the Sampler and LoRA files


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory) -> str:
    from longcat_train.loading import tiny_dit
    from longcat_train.lora import adapter_settings, apply_lora, lora_weights, save_diffusers

    model = apply_lora(tiny_dit(), rank=4, targets=["attn.qkv", "ffn.w1"])
    with torch.no_grad():  # lora_B starts at zero; a trained adapter does not
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.5)
    path = tmp_path_factory.mktemp("lora") / "lora.safetensors"
    return str(save_diffusers(lora_weights(model), path, adapter_settings(model)))


def _latents(sampler: sample.Sampler) -> torch.Tensor:
    cond, _, _ = _denoise_inputs()
    text = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))
    return denoise(sampler.dit, cond[:, :, :, :4, :4], [text], None, frames=5, steps=2, guidance=1.0, progress=False)


def test_lora_strength_swap_and_merge(lora_file: str) -> None:
    sampler = sample.Sampler("tiny", device="cpu")
    base = _latents(sampler)
    sampler.use_lora(lora_file, 1.0)
    full = _latents(sampler)
    assert not torch.allclose(full, base, atol=1e-3)
    sampler.use_lora(lora_file, 0.0)
    torch.testing.assert_close(_latents(sampler), base)
    sampler.use_lora(lora_file, 0.5)
    half = _latents(sampler)
    assert not torch.allclose(half, base, atol=1e-4) and not torch.allclose(half, full, atol=1e-4)
    sampler.use_lora(None)
    torch.testing.assert_close(_latents(sampler), base)

    merged = sample.Sampler("tiny", device="cpu")
    merged.use_lora(lora_file, 1.0, merge=True)
    assert not any("lora" in name for name, _ in merged.dit.named_parameters())
    torch.testing.assert_close(_latents(merged), full, atol=1e-4, rtol=1e-4)


def test_lora_of_another_model_is_refused(tmp_path) -> None:
    from safetensors.torch import save_file

    sampler = sample.Sampler("tiny", device="cpu")
    other = tmp_path / "sdxl_style.safetensors"
    save_file(
        {
            "transformer.down_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 320),
            "transformer.down_blocks.0.attn.to_q.lora_B.weight": torch.zeros(320, 4),
        },
        str(other),
    )
    with pytest.raises(SampleInputError, match="does not fit the DiT of --model tiny.*match no Linear"):
        sampler.use_lora(str(other))
    wrong_rank = tmp_path / "wrong_rank.safetensors"
    save_file(
        {
            "transformer.blocks.0.attn.qkv.lora_A.weight": torch.zeros(4, 128),
            "transformer.blocks.0.attn.qkv.lora_B.weight": torch.zeros(384, 8),
        },
        str(wrong_rank),
    )
    with pytest.raises(SampleInputError, match="does not fit.*shape"):
        sampler.use_lora(str(wrong_rank))
    with pytest.raises(SampleInputError, match="not found"):
        sampler.use_lora(str(tmp_path / "missing.safetensors"))


def test_sampler_makes_one_video_per_prompt() -> None:
    sampler = sample.Sampler("tiny", device="cpu")
    videos = sampler.generate(_image(64, 64), ["a cat", "a dog"], frames=5, steps=2, area=(64, 64), progress=False)
    assert videos.shape == (2, 5, 64, 64, 3)
    with pytest.raises(SampleInputError, match="prompt is empty"):
        sampler.generate(_image(64, 64), ["  "], frames=5, steps=2, area=(64, 64))


def test_run_validation_writes_videos_sheets_and_tensorboard(tiny: dict, tmp_path, monkeypatch) -> None:
    from torch.utils.tensorboard import SummaryWriter

    from longcat_train.loading import tiny_dit
    from longcat_train.lora import apply_lora

    model = apply_lora(tiny_dit(), rank=4, targets=["attn.qkv"])
    model.train()
    pairs = [sample.ValidationPair("cat", _image(64, 64), "a cat walks across a sunny garden")]
    embeds = {pairs[0].prompt: tiny["prompt"], "": tiny["negative"]}
    calls: list[bool] = []
    real_sample = sample.sample_i2v

    def counting(*args, **kwargs):
        calls.append(True)
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(sample, "sample_i2v", counting)
    settings = dict(output_dir=tmp_path, frames=5, steps=2, area=(64, 64))
    with SummaryWriter(str(tmp_path / "tb")) as writer:
        first = sample.run_validation(model, tiny["vae"], pairs, embeds, step=10, tb_writer=writer, **settings)
        second = sample.run_validation(model, tiny["vae"], pairs, embeds, step=20, tb_writer=writer, **settings)
    step_dir = tmp_path / "validation" / "step_000010"
    assert first == [step_dir / "cat.mp4", step_dir / "cat_sheet.png"]
    assert [p.name for p in second] == ["cat.mp4", "cat_sheet.png"]
    assert len(sample.read_mp4(first[0])) == 5
    with Image.open(first[1]) as sheet:  # label column, start frame, four frames; base and LoRA rows
        assert sheet.size == (72 + 5 * 164, 18 + 2 * 164)
    assert len(list((tmp_path / "validation" / "base").glob("cat_*.mp4"))) == 1
    assert len(calls) == 3  # LoRA at both steps, the base model once
    assert model.training  # the trainer's mode comes back
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


# ---------------------------------------------------------------- longcat-sample


def _png(path, h: int, w: int) -> str:
    Image.fromarray(_image(h, w)).save(path)
    return str(path)


def test_cli_writes_the_videos(tmp_path, caplog: pytest.LogCaptureFixture, capsys) -> None:
    from longcat_train.cli import sample_main

    image = _png(tmp_path / "start.png", 80, 96)
    out = tmp_path / "out" / "cat.mp4"
    argv = ["--model", "tiny", "--image", image, "--prompt", "a cat walks", "-o", str(out)]
    argv += ["--frames", "6", "--steps", "2", "--size", "64x64", "--guidance", "1", "--gif"]
    with caplog.at_level(logging.WARNING):
        assert sample_main(argv) == 0
    assert "frames must be 4k+1 for the VAE: using 5 instead of 6" in caplog.text
    assert capsys.readouterr().out.split() == [str(out), str(out.with_suffix(".gif"))]
    video = sample.read_mp4(out)
    assert video.shape == (5, 64, 64, 3)


def test_cli_block_sparse_attention(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("longcat_kernels")
    from longcat_train.cli import sample_main

    loaded = []
    real_load = sample.load_dit
    monkeypatch.setattr(sample, "load_dit", lambda *a, **k: loaded.append(real_load(*a, **k)) or loaded[-1])
    image = _png(tmp_path / "start.png", 80, 96)
    out = tmp_path / "cat.mp4"
    argv = ["--model", "tiny", "--image", image, "--prompt", "a cat walks", "-o", str(out), "--frames", "5"]
    assert sample_main([*argv, "--steps", "2", "--size", "64x64", "--attention", "block_sparse"]) == 0
    assert loaded[0].config.attention_implementation == "block_sparse"
    assert sample.read_mp4(out).shape == (5, 64, 64, 3)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--image": "missing.png"}, "start image not found"),
        ({"--image": "notes.png"}, "notes.png is not an image"),
        ({"--image": "tiny.png"}, "too small"),
        ({"--image": "strip.png"}, "extreme aspect ratio"),
        ({"--prompt": " "}, "--prompt is empty"),
        ({"-o": "out.avi"}, "must be an .mp4"),
        ({"--lora": "sdxl.safetensors"}, "does not fit the DiT of --model tiny"),
        ({"--lora": "nowhere.safetensors"}, "LoRA file not found"),
        ({"--model": "no/such/dir", "--size": "192x320"}, "no such directory"),
    ],
)
def test_cli_bad_input_is_one_clear_line(tmp_path, monkeypatch, capsys, change: dict, message: str) -> None:
    from safetensors.torch import save_file

    from longcat_train.cli import sample_main

    monkeypatch.chdir(tmp_path)
    _png(tmp_path / "start.png", 192, 320)
    _png(tmp_path / "tiny.png", 20, 30)
    _png(tmp_path / "strip.png", 40, 1000)
    (tmp_path / "notes.png").write_text("a shopping list")
    save_file({"transformer.down_blocks.0.to_q.lora_A.weight": torch.zeros(4, 320),
               "transformer.down_blocks.0.to_q.lora_B.weight": torch.zeros(320, 4)}, "sdxl.safetensors")  # fmt: skip
    args = {"--model": "tiny", "--image": "start.png", "--prompt": "a cat walks", "-o": "out.mp4", "--steps": "1"}
    args.update(change)
    assert sample_main([x for kv in args.items() for x in kv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("longcat-sample: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "out.mp4").exists()


def test_sharded_models_do_not_use_the_base_cache(tiny: dict, tmp_path, monkeypatch) -> None:
    # Under FSDP all ranks sample together but only rank 0 keeps the cache: every rank must make the same
    # calls, so a sharded model samples the base video every time.
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from longcat_train.loading import tiny_dit
    from longcat_train.lora import apply_lora

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        model = apply_lora(tiny_dit(), rank=2, targets=["attn.qkv"])
        fully_shard(model)
        calls: list[bool] = []
        video = np.zeros((5, 64, 64, 3), np.uint8)  # what is sampled does not matter here, how often does
        monkeypatch.setattr(sample, "sample_i2v", lambda *a, **k: calls.append(True) or video)
        pairs = [sample.ValidationPair("cat", _image(64, 64), "a cat")]
        embeds = {"a cat": tiny["prompt"], "": tiny["negative"]}
        for step in (1, 2):
            sample.run_validation(
                model, tiny["vae"], pairs, embeds, step=step, output_dir=tmp_path, frames=5, steps=1, area=(64, 64)
            )
        assert len(calls) == 4
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- parity with the official pipeline

OFFICIAL_DIR = os.environ.get("LONGCAT_OFFICIAL_DIR")


@pytest.mark.skipif(not OFFICIAL_DIR, reason="set LONGCAT_OFFICIAL_DIR to an official checkout")
def test_denoising_matches_the_official_pipeline(tiny: dict, monkeypatch) -> None:
    """The official ``generate_i2v`` loop, driving our tiny DiT, lands on the latents ``denoise`` does."""
    for module in ("einops", "ftfy", "loguru", "regex"):
        pytest.importorskip(module)
    monkeypatch.syspath_prepend(OFFICIAL_DIR)
    official = pytest.importorskip("longcat_video.pipeline_longcat_video")
    from longcat_data.encode import encode_text, load_text_encoder

    class OfficialFacing(torch.nn.Module):
        """Our DiT behind the official pipeline's call: prompt embeddings arrive as [B, 1, L, C]."""

        cp_split_hw = None
        dtype = torch.float32
        config = SimpleNamespace(in_channels=16)

        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, num_cond_latents):
            return self.model(
                hidden_states, timestep, encoder_hidden_states.squeeze(1), encoder_attention_mask, num_cond_latents
            )

    tokenizer, text_encoder = load_text_encoder("tiny")
    pipe = official.LongCatVideoPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=tiny["vae"],
        scheduler=official.FlowMatchEulerDiscreteScheduler(shift=12.0),
        dit=OfficialFacing(tiny["model"]),
    )
    pipe.device = "cpu"  # the official class assumes CUDA
    prompt = "a cat walks across a sunny garden"
    start = Image.fromarray(_image(128, 224))  # the official 480p bucket for 4:7 is 480x832: 60x104 latents
    noise = torch.randn(1, 16, 2, 60, 104, generator=torch.Generator().manual_seed(7))
    theirs = pipe.generate_i2v(
        image=start, prompt=prompt, num_frames=5, num_inference_steps=4, guidance_scale=4.0,
        latents=noise.clone(), generator=torch.Generator().manual_seed(0), output_type="latent",
    )  # fmt: skip

    monkeypatch.setattr(sample, "initial_noise", lambda shape, seeds: noise[:, :, 1:])
    embeds = encode_text(tokenizer, text_encoder, [prompt, ""])
    ours = denoise(tiny["model"], theirs[:, :, :1], embeds[:1], embeds[1], frames=5, steps=4, progress=False)
    assert not torch.allclose(theirs[:, :, 1:], noise[:, :, 1:])  # the official loop did move the latents
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)  # bitwise equal on CPU here
