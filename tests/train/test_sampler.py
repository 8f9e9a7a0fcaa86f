"""The Sampler (models loaded once, LoRA files) and the longcat-sample command."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from longcat_data.video import read_mp4
from longcat_train import sampler as sampler_module
from longcat_train import sampling, validation
from longcat_train.config import VideoSettings
from longcat_train.sampler import Sampler
from longcat_train.sampling import SampleInputError, denoise

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


def _latents(sampler: Sampler) -> torch.Tensor:
    cond = torch.randn(1, 16, 1, 4, 6, generator=torch.Generator().manual_seed(1))
    text = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))
    return denoise(
        sampler.dit, cond[:, :, :, :4, :4], [text], None, frames=5, steps=2, guidance=1.0, progress=False
    )


def test_lora_strength_swap_and_merge(lora_file: str) -> None:
    sampler = Sampler("tiny", device="cpu")
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

    merged = Sampler("tiny", device="cpu")
    merged.use_lora(lora_file, 1.0, merge=True)
    assert not any("lora" in name for name, _ in merged.dit.named_parameters())
    torch.testing.assert_close(_latents(merged), full, atol=1e-4, rtol=1e-4)


def test_lora_of_another_model_is_refused(tmp_path) -> None:
    from safetensors.torch import save_file

    sampler = Sampler("tiny", device="cpu")
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


def test_sampler_makes_one_video_per_prompt(make_image) -> None:
    sampler = Sampler("tiny", device="cpu")
    settings = VideoSettings(frames=5, steps=2, area=(64, 64))
    videos = sampler.generate(make_image(64, 64), ["a cat", "a dog"], settings, progress=False)
    assert videos.shape == (2, 5, 64, 64, 3)
    with pytest.raises(SampleInputError, match="prompt is empty"):
        sampler.generate(make_image(64, 64), ["  "], settings)


def test_the_sampler_and_validation_sample_through_generate_videos(tmp_path, make_image, monkeypatch) -> None:
    from longcat_data.encode import encode_text

    made: list[np.ndarray] = []

    def recording(*args, **kwargs) -> np.ndarray:
        made.append(sampling.generate_videos(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(sampler_module, "generate_videos", recording)
    monkeypatch.setattr(validation, "generate_videos", recording)
    sampler = Sampler("tiny", device="cpu")
    prompt, image = "a cat walks", make_image(64, 64)
    settings = VideoSettings(frames=5, steps=2, area=(64, 64))
    video = sampler.generate(image, [prompt], settings, progress=False)[0]
    embeds = dict(
        zip([prompt, ""], encode_text(sampler.tokenizer, sampler.text_encoder, [prompt, ""]), strict=True)
    )
    pairs = [validation.ValidationPair("cat", image, prompt)]
    validation.run_validation(sampler.dit, sampler.vae, pairs, embeds, settings, step=1, output_dir=tmp_path)
    assert len(made) == 2  # one call from each
    np.testing.assert_array_equal(made[1][0], video)  # the same inputs make the same frames either way


# ---------------------------------------------------------------- longcat-sample


def _png(path, image: np.ndarray) -> str:
    Image.fromarray(image).save(path)
    return str(path)


def test_cli_writes_the_videos(tmp_path, make_image, caplog: pytest.LogCaptureFixture, capsys) -> None:
    from longcat_train.cli import sample_main

    image = _png(tmp_path / "start.png", make_image(80, 96))
    out = tmp_path / "out" / "cat.mp4"
    argv = ["--model", "tiny", "--image", image, "--prompt", "a cat walks", "-o", str(out)]
    argv += ["--frames", "6", "--steps", "2", "--size", "64x64", "--guidance", "1", "--gif"]
    with caplog.at_level(logging.WARNING):
        assert sample_main(argv) == 0
    assert "frames must be 4k+1 for the VAE: using 5 instead of 6" in caplog.text
    assert capsys.readouterr().out.split() == [str(out), str(out.with_suffix(".gif"))]
    video = read_mp4(out)
    assert video.shape == (5, 64, 64, 3)


def test_cli_block_sparse_attention(tmp_path, make_image, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("longcat_kernels")
    from longcat_train.cli import sample_main

    loaded = []
    real_load = sampler_module.load_dit
    monkeypatch.setattr(
        sampler_module, "load_dit", lambda *a, **k: loaded.append(real_load(*a, **k)) or loaded[-1]
    )
    image = _png(tmp_path / "start.png", make_image(80, 96))
    out = tmp_path / "cat.mp4"
    argv = ["--model", "tiny", "--image", image, "--prompt", "a cat walks", "-o", str(out), "--frames", "5"]
    assert sample_main([*argv, "--steps", "2", "--size", "64x64", "--attention", "block_sparse"]) == 0
    assert loaded[0].attention_implementation == "block_sparse"
    assert read_mp4(out).shape == (5, 64, 64, 3)


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
def test_cli_bad_input_is_one_clear_line(
    tmp_path, make_image, monkeypatch, capsys, change: dict, message: str
) -> None:
    from safetensors.torch import save_file

    from longcat_train.cli import sample_main

    monkeypatch.chdir(tmp_path)
    _png(tmp_path / "start.png", make_image(192, 320))
    _png(tmp_path / "tiny.png", make_image(20, 30))
    _png(tmp_path / "strip.png", make_image(40, 1000))
    (tmp_path / "notes.png").write_text("a shopping list")
    save_file(
        {
            "transformer.down_blocks.0.to_q.lora_A.weight": torch.zeros(4, 320),
            "transformer.down_blocks.0.to_q.lora_B.weight": torch.zeros(320, 4),
        },
        "sdxl.safetensors",
    )
    args = {
        "--model": "tiny",
        "--image": "start.png",
        "--prompt": "a cat walks",
        "-o": "out.mp4",
        "--steps": "1",
    }
    args.update(change)
    assert sample_main([x for kv in args.items() for x in kv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("longcat-sample: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "out.mp4").exists()
