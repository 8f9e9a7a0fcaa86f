"""The Sampler (models loaded once, LoRA files) and the longcat-sample command."""

from __future__ import annotations

import logging
import socket
import tempfile
from pathlib import Path

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
    sampler.use_loras([(lora_file, 1.0)])
    full = _latents(sampler)
    assert not torch.allclose(full, base, atol=1e-3)
    sampler.use_loras([(lora_file, 0.0)])
    torch.testing.assert_close(_latents(sampler), base)
    sampler.use_loras([(lora_file, 0.5)])
    half = _latents(sampler)
    assert not torch.allclose(half, base, atol=1e-4) and not torch.allclose(half, full, atol=1e-4)
    sampler.use_loras([])
    torch.testing.assert_close(_latents(sampler), base)

    merged = Sampler("tiny", device="cpu")
    merged.use_loras([(lora_file, 1.0)], merge=True)
    assert not any("lora" in name for name, _ in merged.dit.named_parameters())
    torch.testing.assert_close(_latents(merged), full, atol=1e-4, rtol=1e-4)


def test_merged_loras_switch_and_come_off_again(lora_file: str, official_lora_file, tmp_path) -> None:
    sampler = Sampler("tiny", device="cpu")
    base = _latents(sampler)
    split = official_lora_file(tmp_path / "o.safetensors", sampler.dit, {"blocks.0.attn.qkv": 3}, 2, 1)
    sampler.use_loras([(lora_file, 1.0), (split, -0.5)], merge=True)
    both = _latents(sampler)
    hooked = Sampler("tiny", device="cpu")
    hooked.use_loras([(lora_file, 1.0), (split, -0.5)])
    torch.testing.assert_close(_latents(hooked), both, atol=1e-4, rtol=1e-4)
    sampler.use_loras([(split, -0.5)], merge=True)  # the first one out again, the second kept
    hooked.use_loras([(split, -0.5)])
    torch.testing.assert_close(_latents(sampler), _latents(hooked), atol=1e-4, rtol=1e-4)
    sampler.use_loras([], merge=True)
    torch.testing.assert_close(_latents(sampler), base, atol=1e-5, rtol=1e-5)
    with pytest.raises(SampleInputError, match=r"strength nan must be a finite number in \[-4, 4\]"):
        sampler.use_loras([(lora_file, float("nan"))])


def test_cli_samples_with_several_loras_at_their_strengths(
    tmp_path, make_image, monkeypatch, lora_file: str
) -> None:
    import shutil

    from longcat_train.cli import sample_main

    used = []
    real = Sampler.use_loras
    monkeypatch.setattr(
        Sampler, "use_loras", lambda self, loras, **kw: used.append((loras, kw)) or real(self, loras, **kw)
    )
    folder = tmp_path / "run:2"  # a ':' inside the path is part of it
    folder.mkdir()
    style = shutil.copy(lora_file, folder / "style.safetensors")
    image = _png(tmp_path / "start.png", make_image(64, 64))
    argv = ["--model", "tiny", "--image", image, "--prompt", "a cat", "-o", str(tmp_path / "out.mp4")]
    argv += ["--frames", "5", "--steps", "1", "--size", "64x64", "--lora-strength", "-0.25"]
    assert sample_main([*argv, "--lora", f"{style}:0.5", "--lora", lora_file]) == 0
    assert used == [([(str(style), 0.5), (lora_file, -0.25)], {"merge": True})]


def _wider_model_lora(path) -> str:
    """A LoRA with LongCat-Video's module names for a wider DiT than the tiny one."""
    import json

    from safetensors.torch import save_file

    save_file(
        {
            "transformer.blocks.0.attn.qkv.lora_A.weight": torch.zeros(4, 320),
            "transformer.blocks.0.attn.qkv.lora_B.weight": torch.zeros(960, 4),
        },
        str(path),
        metadata={"lora_adapter_metadata": json.dumps({"transformer.lora_alpha": 4})},
    )
    return str(path)


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
    with pytest.raises(SampleInputError, match="not a LongCat-Video LoRA in any layout this tool reads"):
        sampler.use_loras([(str(other), 1.0)])
    wider = _wider_model_lora(tmp_path / "wider.safetensors")
    with pytest.raises(
        SampleInputError, match=r"does not fit the DiT of --model tiny.*\[960, 320\] in the LoRA"
    ):
        sampler.use_loras([(wider, 1.0)])
    wrong_rank = tmp_path / "wrong_rank.safetensors"
    save_file(
        {
            "transformer.blocks.0.attn.qkv.lora_A.weight": torch.zeros(4, 128),
            "transformer.blocks.0.attn.qkv.lora_B.weight": torch.zeros(384, 8),
        },
        str(wrong_rank),
    )
    with pytest.raises(SampleInputError, match=r"wrong_rank.safetensors: .*down \(4, 128\) up \(384, 8\)"):
        sampler.use_loras([(str(wrong_rank), 1.0)])
    with pytest.raises(SampleInputError, match="not found"):
        sampler.use_loras([(str(tmp_path / "missing.safetensors"), 1.0)])


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


def test_distill_sets_its_steps_and_guidance_and_warns_against_guidance(tmp_path, make_image, caplog) -> None:
    from longcat_train.cli import parse_sample_args

    image = _png(tmp_path / "start.png", make_image(192, 320))
    base = ["--model", "tiny", "--image", image, "--prompt", "a cat walks", "-o", str(tmp_path / "out.mp4")]
    distilled = parse_sample_args([*base, "--distill"])
    assert (distilled.steps, distilled.guidance, distilled.video_settings.distill) == (16, 1.0, True)
    plain = parse_sample_args(base)
    assert (plain.steps, plain.guidance, plain.video_settings.distill) == (40, 4.0, False)
    given = parse_sample_args([*base, "--distill", "--steps", "8", "--guidance", "1.5"])
    assert (given.steps, given.guidance) == (8, 1.5)
    with caplog.at_level(logging.WARNING):
        sampler_module.check_sample_config(distilled)
        assert not caplog.records
        sampler_module.check_sample_config(given)
    [record] = caplog.records
    assert "--distill with --guidance 1.5: the distilled model was trained without guidance" in record.message
    assert "\n" not in record.message


def test_cli_distilled_video(tmp_path, make_image, monkeypatch) -> None:
    from longcat_train.cli import sample_main

    schedules: list[bool] = []
    real = sampling.flow_scheduler
    monkeypatch.setattr(
        sampling,
        "flow_scheduler",
        lambda *a, distill=False, **k: schedules.append(distill) or real(*a, distill=distill, **k),
    )
    out = tmp_path / "cat.mp4"
    image = _png(tmp_path / "start.png", make_image(64, 64))
    argv = ["--model", "tiny", "--image", image, "--prompt", "a cat walks", "-o", str(out), "--frames", "5"]
    assert sample_main([*argv, "--size", "64x64", "--distill", "--steps", "2"]) == 0
    assert schedules == [True] and read_mp4(out).shape == (5, 64, 64, 3)


def test_cli_refine_keeps_the_first_video_and_writes_the_refined_one(
    tmp_path, make_image, lora_file: str, single_thread
) -> None:
    from longcat_data.video import probe
    from longcat_train.cli import sample_main

    out = tmp_path / "cat.mp4"
    image = _png(tmp_path / "start.png", make_image(40, 40))
    argv = ["--model", "tiny", "--image", image, "--prompt", "a cat walks", "-o", str(out), "--frames", "5"]
    argv += ["--steps", "2", "--size", "32x32", "--lora", lora_file, "--refine", "--refine-lora", lora_file]
    assert sample_main([*argv, "--refine-area", "64x64", "--refine-temporal", "--gif"]) == 0
    assert read_mp4(tmp_path / "cat_32p.mp4").shape == (5, 32, 32, 3)
    assert read_mp4(out).shape == (10, 64, 64, 3) and probe(out).fps == 30
    assert (tmp_path / "cat.gif").is_file() and not (tmp_path / "cat_32p.gif").exists()


def test_cli_refine_failing_keeps_the_first_video(tmp_path, make_image, capsys, single_thread) -> None:

    from longcat_train.cli import sample_main

    other = _wider_model_lora(tmp_path / "wider.safetensors")
    out = tmp_path / "cat.mp4"
    image = _png(tmp_path / "start.png", make_image(32, 32))
    argv = ["--model", "tiny", "--image", image, "--prompt", "a cat walks", "-o", str(out), "--frames", "5"]
    assert (
        sample_main(
            [
                *argv,
                "--steps",
                "1",
                "--size",
                "32x32",
                "--refine",
                "--refine-lora",
                str(other),
                "--refine-area",
                "64x64",
            ]
        )
        == 2
    )
    assert "does not fit the DiT of --model tiny" in capsys.readouterr().err
    assert read_mp4(tmp_path / "cat_32p.mp4").shape == (5, 32, 32, 3) and not out.exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--image": "missing.png"}, "start image not found"),
        ({"--image": "notes.png"}, "notes.png is not an image"),
        ({"--image": "tiny.png"}, "too small"),
        ({"--image": "strip.png"}, "extreme aspect ratio"),
        ({"--prompt": " "}, "--prompt is empty"),
        ({"-o": "out.avi"}, "must be an .mp4"),
        ({"--lora": "sdxl.safetensors"}, "not a LongCat-Video LoRA in any layout this tool reads"),
        ({"--lora": "wider.safetensors"}, "does not fit the DiT of --model tiny"),
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
    _wider_model_lora(tmp_path / "wider.safetensors")
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


def _read_only_folder(tmp_path) -> str:
    """A folder this process cannot create files in: a 0o555 one, or for root (whom modes do not stop)
    /sys, which refuses new files."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, Path("/sys")):
        try:
            with tempfile.TemporaryFile(dir=candidate):
                pass
        except OSError:
            return str(candidate)
    pytest.skip("no folder here refuses new files")


NOT_SAFETENSORS = (
    "not a safetensors file; LoRAs are read from .safetensors only "
    "(convert a .ckpt or .bin with safetensors.torch.save_file)"
)


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (
            {"--image": "bomb.png"},
            "bomb.png: 30000x30000 is 900.0 megapixels, more than the 64 a start image may have; resize it",
        ),
        ({"--image": "clip.mp4"}, "clip.mp4 is not an image that can be read (PNG, JPEG or WebP expected)"),
        ({"--image": "."}, "start image . is a folder; give an image file"),
        ({"--lora": "style.ckpt"}, f"--lora style.ckpt: {NOT_SAFETENSORS}"),
        ({"--lora": "garbage.safetensors"}, f"--lora garbage.safetensors: {NOT_SAFETENSORS}"),
        (
            {"-o": "notes.txt/out.mp4"},
            "-o notes.txt/out.mp4: notes.txt is a file, so no folder can be made in it; choose another path",
        ),
        (
            {"-o": "notes.txt/new/out.mp4"},
            "-o notes.txt/new/out.mp4: notes.txt is a file, so no folder can be made in it; choose another path",
        ),
        ({"-o": "taken.mp4"}, "-o taken.mp4: taken.mp4 is a folder, not a file; choose another path"),
        (
            {"-o": "READ_ONLY/out.mp4"},
            "-o READ_ONLY/out.mp4: cannot write in READ_ONLY (Permission denied); choose another path",
        ),
        (
            {"-o": "READ_ONLY/new/out.mp4"},
            "-o READ_ONLY/new/out.mp4: cannot write in READ_ONLY (Permission denied); choose another path",
        ),
        (
            {"-o": "x" * 250 + ".mp4"},
            f"-o {'x' * 250}.mp4: the name {'x' * 40}... is longer than . allows (255 bytes); choose another path",
        ),
        (
            {"--prompt": ["a cat", "a dog"], "-o": "pair.mp4"},
            "-o pair_1.mp4: pair_1.mp4 is a folder, not a file; choose another path",
        ),
        (
            {"--gif": None, "-o": "clip.mp4"},
            "--gif clip.gif: clip.gif is a folder, not a file; choose another path",
        ),
        (
            {"--save-frames": None, "-o": "notes.mp4"},
            "--save-frames notes: notes is a file, not a folder; choose another path",
        ),
        ({"--guidance": "nan"}, "--guidance nan: must be a finite number in [0, 20]"),
        ({"--lora-strength": "inf"}, "--lora-strength inf: must be a finite number in [-4, 4]"),
        (
            {"--lora": "style.safetensors:inf"},
            "--lora 'style.safetensors:inf': must be PATH or PATH:STRENGTH, STRENGTH a finite number in [-4, 4]",
        ),
        ({"--shift": "inf"}, "--shift inf: must be a finite number > 0"),
        ({"--shift": "0"}, "--shift 0.0: must be a finite number > 0"),
        ({"--frames": "100001"}, "--frames 100001: must be a finite number in [5, 257]"),
        ({"--steps": "0"}, "--steps 0: must be a finite number in [1, 200]"),
        ({"--seed": str(2**64)}, f"--seed {2**64}: must be a finite number in [0, {2**63 - 1}]"),
        ({"--fps": "0"}, "--fps 0: must be a finite number in [1, 240]"),
        ({"--block-swap": "-1"}, "--block-swap -1: must be >= 0"),
        (
            {"--prompt": "a cat \udcff"},
            "--prompt 'a cat \\udcff': must be UTF-8 text (set a UTF-8 locale or type it again)",
        ),
        (
            {"--negative-prompt": "\udcfe"},
            "--negative-prompt '\\udcfe': must be UTF-8 text (set a UTF-8 locale or type it again)",
        ),
        ({"--device": "gpu0"}, "--device gpu0: not a device name (cpu, cuda, cuda:N)"),
        (
            {"--distill": None, "--steps": "60"},
            "distilled sampling takes 1 to 50 steps (its sigma grid), got 60; 16 is the official setting",
        ),
        (
            {"--refine": None},
            "--refine needs --refine-lora PATH, the refinement LoRA (the official checkpoint's "
            "lora/refinement_lora.safetensors)",
        ),
        (
            {"--refine": None, "--refine-lora": "missing.safetensors"},
            "LoRA file not found: missing.safetensors",
        ),
        (
            {"--refine": None, "--refine-lora": "garbage.safetensors"},
            f"--refine-lora garbage.safetensors: {NOT_SAFETENSORS}",
        ),
        (
            {"--refine": None, "--refine-lora": "lora.safetensors", "--block-swap": "2"},
            "--refine with --block-swap: block swap fixes the weights, so the refinement LoRA cannot take "
            "the video's place; leave out one of them",
        ),
        (
            {"--refine": None, "--refine-lora": "lora.safetensors", "--serve": None},
            "--refine with --serve: the preview page does not refine; leave out --refine",
        ),
        (
            {"--refine": None, "--refine-lora": "lora.safetensors", "--size": "64x64"},
            "--refine: the 64x64 (WxH) video is too small for --refine-area 384x640: its bucket 512x512 is "
            "8.0x larger (at most 2x: the refinement adds detail, not size); sample it at a larger --area or "
            "give a smaller --refine-area",
        ),
        (
            {"--refine": None, "--refine-lora": "lora.safetensors", "--refine-area": "192x320"},
            "--refine: the 320x192 (WxH) video is already as large as its bucket 320x192 of --refine-area "
            "192x320; refine a smaller video (--area) or give a larger --refine-area",
        ),
        (
            {"--refine": None, "--refine-lora": "lora.safetensors", "--refine-area": "8x8"},
            "--refine-area 8x8: must be HxW with both sides multiples of 16 (the model's pixel grid), e.g. 480x832",
        ),
        (
            {"--refine-lora": "lora.safetensors"},
            "--refine-lora is a setting of --refine: add --refine, or leave --refine-lora out",
        ),
        (
            {"--refine-temporal": None},
            "--refine-temporal is a setting of --refine: add --refine, or leave --refine-temporal out",
        ),
        (
            {"--refine": None, "--refine-lora": "lora.safetensors", "-o": "mid.mp4"},
            "--refine mid_192p.mp4: mid_192p.mp4 is a folder, not a file; choose another path",
        ),
        (
            {"--size": "8x8"},
            "--area 8x8: must be HxW with both sides multiples of 16 (the model's pixel grid), e.g. 480x832",
        ),
    ],
)
def test_cli_refuses_before_any_model_loads(
    tmp_path, make_image, huge_image, monkeypatch, capsys, change: dict, error: str
) -> None:
    from safetensors.torch import save_file

    from longcat_train.cli import sample_main

    def no_models(*args, **kwargs):
        raise AssertionError("the models were loaded before the input was checked")

    monkeypatch.setattr(sampler_module.Sampler, "__init__", no_models)
    monkeypatch.chdir(tmp_path)
    _png(tmp_path / "start.png", make_image(192, 320))
    (tmp_path / "bomb.png").write_bytes(huge_image("PNG", 30000, 30000))
    (tmp_path / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    torch.save({"lora": torch.zeros(2, 2)}, "style.ckpt")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    save_file({"transformer.blocks.0.attn.qkv.lora_A.weight": torch.zeros(2, 128)}, "lora.safetensors")
    (tmp_path / "notes.txt").write_text("a shopping list")
    (tmp_path / "notes").write_text("a file where the frames folder would go")
    for folder in ("taken.mp4", "pair_1.mp4", "clip.gif", "mid_192p.mp4"):
        (tmp_path / folder).mkdir()
    read_only = _read_only_folder(tmp_path) if any("READ_ONLY" in str(v) for v in change.values()) else ""
    args: dict = {"--model": "tiny", "--image": "start.png", "--prompt": "a cat walks", "-o": "out.mp4"}
    args.update(
        {k: v.replace("READ_ONLY", read_only) if isinstance(v, str) else v for k, v in change.items()}
    )
    argv = []
    for flag, value in args.items():
        for item in value if isinstance(value, list) else [value]:
            argv += [flag] if item is None else [flag, item]
    assert sample_main(argv) == 2
    assert capsys.readouterr().err == f"longcat-sample: error: {error.replace('READ_ONLY', read_only)}\n"
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".mp4", ".gif")) == [
        "clip.gif",
        "clip.mp4",
        "mid_192p.mp4",
        "pair_1.mp4",
        "taken.mp4",
    ]


def test_serve_refuses_before_any_model_loads(tmp_path, monkeypatch, capsys) -> None:
    from longcat_train.cli import sample_main

    def no_models(*args, **kwargs):
        raise AssertionError("the models were loaded before the input was checked")

    monkeypatch.setattr(sampler_module.Sampler, "__init__", no_models)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("a shopping list")
    (tmp_path / "style.bin").write_bytes(b"PK\x03\x04 a torch zip")
    serve = ["--model", "tiny", "--serve", "--port", "0"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases = [
            (
                ["--serve-dir", "notes.txt"],
                "--serve-dir notes.txt: notes.txt is a file, not a folder; choose another path",
            ),
            (
                ["--serve-dir", "notes.txt/videos"],
                "--serve-dir notes.txt/videos: notes.txt is a file, so no folder can be made in it; choose another path",
            ),
            (["--lora", "style.bin"], f"--lora style.bin: {NOT_SAFETENSORS}"),
            (
                ["--port", str(port)],
                f"--host 127.0.0.1 --port {port}: cannot listen there (Address already in use); choose another --port or --host",
            ),
            (
                ["--host", "203.0.113.7"],
                "--host 203.0.113.7 --port 0: cannot listen there (Cannot assign requested address); choose another --port or --host",
            ),
            (["--max-upload-mb", "0"], "--max-upload-mb 0.0: must be a finite number > 0"),
        ]
        for extra, error in cases:
            assert sample_main(serve + extra) == 2, extra
            assert capsys.readouterr().err == f"longcat-sample: error: {error}\n"
    assert not (tmp_path / "longcat_previews").exists()
