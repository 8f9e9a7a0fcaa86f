"""Validation during training: pairs from folders and shards, contact sheets, run_validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from longcat_data.video import read_mp4
from longcat_train import parallel, validation
from longcat_train.config import VideoSettings
from longcat_train.sampling import SampleInputError
from longcat_train.validation import ValidationPair, contact_sheet, load_validation_pairs, run_validation

# ---------------------------------------------------------------- validation pairs


def test_validation_pairs_from_a_folder(tmp_path, make_image) -> None:
    for name, size in [("b_dog", (80, 120)), ("a_cat", (64, 64))]:
        Image.fromarray(make_image(*size)).save(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text(f"a {name[2:]} runs\n")
    pairs = load_validation_pairs(str(tmp_path), limit=5)
    assert [(p.key, p.prompt, p.image.shape) for p in pairs] == [
        ("a_cat", "a cat runs", (64, 64, 3)),
        ("b_dog", "a dog runs", (80, 120, 3)),
    ]
    assert len(load_validation_pairs(str(tmp_path), limit=1)) == 1
    (tmp_path / "c_bird.png").write_bytes((tmp_path / "a_cat.png").read_bytes())
    with pytest.raises(SampleInputError, match="c_bird.png has no caption"):
        load_validation_pairs(str(tmp_path), limit=5)


def test_validation_pairs_from_eval_shards(tmp_path, make_image) -> None:
    import webdataset as wds

    from longcat_data.shards import ShardSample

    with wds.TarWriter(str(tmp_path / "eval-000000.tar")) as tar:
        for i in range(3):
            image = np.roll(make_image(64, 64), i, axis=0)
            latents = torch.zeros(16, 3, 8, 8)
            tar.write(
                ShardSample(
                    f"clip{i}", latents, latents[:, :1], image, f"caption {i}", {"fps": 15}
                ).to_members()
            )
    pairs = load_validation_pairs(str(tmp_path), limit=2)
    assert [(p.key, p.prompt) for p in pairs] == [("clip0", "caption 0"), ("clip1", "caption 1")]
    np.testing.assert_array_equal(pairs[1].image, np.roll(make_image(64, 64), 1, axis=0))


def test_contact_sheet_layout(make_image) -> None:
    video = np.stack([np.full((32, 48, 3), 10 * i, np.uint8) for i in range(9)])
    sheet = contact_sheet(make_image(32, 48), [("base", video), ("LoRA", video)], columns=4, height=40)
    # Two rows of 40 px plus the header; a label column plus five cells of 60 px.
    assert sheet.shape == (18 + 2 * 44, 72 + 5 * 64, 3)


# ---------------------------------------------------------------- sampling the pairs


def test_run_validation_writes_videos_sheets_and_tensorboard(
    tiny: dict, tmp_path, make_image, monkeypatch
) -> None:
    from torch.utils.tensorboard import SummaryWriter

    from longcat_train.loading import tiny_dit
    from longcat_train.lora import apply_lora

    model = apply_lora(tiny_dit(), rank=4, targets=["attn.qkv"])
    model.train()
    pairs = [ValidationPair("cat", make_image(64, 64), "a cat walks across a sunny garden")]
    embeds = {pairs[0].prompt: tiny["prompt"], "": tiny["negative"]}
    calls: list[bool] = []
    real_generate = validation.generate_videos

    def counting(*args, **kwargs):
        calls.append(True)
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(validation, "generate_videos", counting)
    settings = VideoSettings(frames=5, steps=2, area=(64, 64))
    with SummaryWriter(str(tmp_path / "tb")) as writer:
        first = run_validation(
            model, tiny["vae"], pairs, embeds, settings, step=10, output_dir=tmp_path, tb_writer=writer
        )
        second = run_validation(
            model, tiny["vae"], pairs, embeds, settings, step=20, output_dir=tmp_path, tb_writer=writer
        )
    step_dir = tmp_path / "validation" / "step_000010"
    assert first == [step_dir / "cat.mp4", step_dir / "cat_sheet.png"]
    assert [p.name for p in second] == ["cat.mp4", "cat_sheet.png"]
    assert len(read_mp4(first[0])) == 5
    with Image.open(first[1]) as sheet:  # label column, start frame, four frames; base and LoRA rows
        assert sheet.size == (72 + 5 * 164, 34 + 2 * 164)  # the title line (step, LoRA) above the header
    assert len(list((tmp_path / "validation" / "base").glob("cat_*.mp4"))) == 1
    assert len(calls) == 3  # LoRA at both steps, the base model once
    assert model.training  # the trainer's mode comes back
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_distilled_validation_needs_no_negative_prompt_and_has_its_own_base_videos(
    tiny: dict, tmp_path, make_image, monkeypatch
) -> None:
    from longcat_train import sampling
    from longcat_train.loading import tiny_dit
    from longcat_train.lora import apply_lora

    schedules: list[bool] = []
    real = sampling.flow_scheduler
    monkeypatch.setattr(
        sampling,
        "flow_scheduler",
        lambda *a, distill=False, **k: schedules.append(distill) or real(*a, distill=distill, **k),
    )
    model = apply_lora(tiny_dit(), rank=2, targets=["attn.qkv"])
    pairs = [ValidationPair("cat", make_image(64, 64), "a cat walks")]
    distilled = VideoSettings(frames=5, steps=2, guidance=1.0, area=(64, 64), distill=True)
    run_validation(
        model, tiny["vae"], pairs, {"a cat walks": tiny["prompt"]}, distilled, step=1, output_dir=tmp_path
    )
    assert schedules == [True, True]  # the LoRA's video and the base one
    plain = VideoSettings(frames=5, steps=2, guidance=1.0, area=(64, 64))
    run_validation(
        model, tiny["vae"], pairs, {"a cat walks": tiny["prompt"]}, plain, step=2, output_dir=tmp_path
    )
    assert schedules == [True, True, False, False]
    assert len(list((tmp_path / "validation" / "base").glob("cat_*.mp4"))) == 2


def test_sharded_models_do_not_use_the_base_cache(tiny: dict, tmp_path, make_image, monkeypatch) -> None:
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
        monkeypatch.setattr(validation, "generate_videos", lambda *a, **k: calls.append(True) or video[None])
        pairs = [ValidationPair("cat", make_image(64, 64), "a cat")]
        embeds = {"a cat": tiny["prompt"], "": tiny["negative"]}
        for step in (1, 2):
            run_validation(
                model,
                tiny["vae"],
                pairs,
                embeds,
                VideoSettings(frames=5, steps=1, area=(64, 64)),
                step=step,
                output_dir=tmp_path,
                sharded=parallel.is_fsdp(model),
            )
        assert len(calls) == 4
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- continuation validation


def _write_clips(folder, sizes: dict[str, tuple[int, int, int]]) -> None:
    from longcat_data.demo import synthetic_frames
    from longcat_data.video import write_mp4

    folder.mkdir(exist_ok=True)
    for i, (name, (frames, h, w)) in enumerate(sizes.items()):
        write_mp4(synthetic_frames(h, w, frames, seed=i), folder / f"{name}.mp4", fps=15)
        (folder / f"{name}.txt").write_text(f"the {name} clip\n")


def test_continuation_pairs_from_a_folder_of_videos(tmp_path, make_image) -> None:
    _write_clips(tmp_path / "v", {"a": (9, 64, 96), "b": (12, 64, 64)})
    pairs = load_validation_pairs(str(tmp_path / "v"), limit=5, cond_frames=5)
    assert [(p.key, p.prompt, p.frames.shape) for p in pairs] == [
        ("a", "the a clip", (5, 64, 96, 3)),
        ("b", "the b clip", (5, 64, 64, 3)),
    ]
    assert all(np.array_equal(p.image, p.frames[0]) and p.continues for p in pairs)
    # Image-to-video from the same folder: the first frames are the start images.
    plain = load_validation_pairs(str(tmp_path / "v"), limit=5)
    assert not any(p.continues for p in plain) and np.array_equal(plain[0].image, pairs[0].frames[0])
    with pytest.raises(SampleInputError, match=r"a.mp4 has 9 frames, fewer than cond_frames = 13"):
        load_validation_pairs(str(tmp_path / "v"), limit=5, cond_frames=13)
    (tmp_path / "i").mkdir()
    Image.fromarray(make_image(64, 64)).save(tmp_path / "i" / "cat.png")
    (tmp_path / "i" / "cat.txt").write_text("a cat")
    with pytest.raises(SampleInputError, match="holds images: a continuation validation continues videos"):
        load_validation_pairs(str(tmp_path / "i"), limit=5, cond_frames=5)


def test_continuation_pairs_from_eval_shards_hold_the_clips_first_latents(tmp_path, make_image) -> None:
    import webdataset as wds

    from longcat_data.shards import ShardSample

    latents = torch.randn(16, 3, 8, 8)
    with wds.TarWriter(str(tmp_path / "eval-000000.tar")) as tar:
        tar.write(ShardSample("clip", latents, latents[:, :1], make_image(64, 64), "a clip", {}).to_members())
    (pair,) = load_validation_pairs(str(tmp_path), limit=2, cond_frames=5)
    assert torch.equal(pair.latents, latents[:, :2].bfloat16().float()) and pair.frames is None
    with pytest.raises(SampleInputError, match="has 3 latent frames, fewer than the 4 of cond_frames = 13"):
        load_validation_pairs(str(tmp_path), limit=2, cond_frames=13)


def test_continuation_latents_are_the_pairs_own_or_its_frames_fitted_and_encoded(
    tiny: dict, make_image
) -> None:
    from longcat_data.demo import synthetic_frames
    from longcat_data.encode import encode_video
    from longcat_data.video import resize_center_crop

    vae = tiny["vae"]
    frames = synthetic_frames(64, 96, 5)
    own = encode_video(vae, frames[None])[0]
    shard_pair = ValidationPair("s", frames[0], "p", latents=own)
    assert torch.equal(validation.continuation_latents(vae, shard_pair, (64, 96)), own[None])
    folder_pair = ValidationPair("f", frames[0], "p", frames=frames)
    fitted, _ = resize_center_crop(frames, 64, 64)
    expected = encode_video(vae, fitted[None])
    assert torch.equal(validation.continuation_latents(vae, folder_pair, (64, 64)), expected)
    # At another bucket the shard pair's latents are decoded to its frames, then fitted the same way.
    assert validation.continuation_latents(vae, shard_pair, (64, 64)).shape == (1, 16, 2, 8, 8)


def test_a_continuation_validation_continues_its_condition(tiny: dict, tmp_path, monkeypatch) -> None:
    from longcat_data.demo import synthetic_frames
    from longcat_train.loading import tiny_dit

    seen: list[torch.Tensor] = []
    real = validation.denoise
    monkeypatch.setattr(
        validation, "denoise", lambda m, cond, *a, **k: seen.append(cond) or real(m, cond, *a, **k)
    )
    frames = synthetic_frames(64, 64, 5)
    pairs = [ValidationPair("clip", frames[0], "a clip", frames=frames)]
    settings = VideoSettings(frames=9, steps=2, guidance=1.0, area=(64, 64))
    (video_path, _) = run_validation(
        tiny_dit(), tiny["vae"], pairs, {"a clip": tiny["prompt"]}, settings, step=1, output_dir=tmp_path
    )
    assert len(read_mp4(video_path)) == 9
    assert len(seen) == 1 and seen[0].shape == (1, 16, 2, 8, 8)
