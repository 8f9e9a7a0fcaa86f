"""Encoders: tiny models are deterministic and load back from disk identically; latent and text maths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from longcat_data import encode

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny() -> tuple:
    tokenizer, text_encoder = encode.load_text_encoder("tiny")
    return encode.load_vae("tiny"), tokenizer, text_encoder


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return encode.save_tiny_encoders(tmp_path_factory.mktemp("ckpt"))


def video(batch: int = 2, frames: int = 9, h: int = 32, w: int = 48, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, frames, h, w, 3), dtype=torch.uint8, generator=gen)


def test_tiny_is_the_real_classes_at_the_contract_sizes(tiny) -> None:
    vae, tokenizer, text_encoder = tiny
    assert type(vae).__name__ == "AutoencoderKLWan" and vae.config.z_dim == 16
    assert type(text_encoder).__name__ == "UMT5EncoderModel" and text_encoder.config.d_model == 64
    assert text_encoder.config.num_layers == 2 and tokenizer.model_max_length == 512
    assert len(tokenizer) == text_encoder.config.vocab_size
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 1


def test_tiny_is_deterministic(tiny) -> None:
    vae, tokenizer, text_encoder = tiny
    torch.manual_seed(123)  # the global stream must not matter
    tokenizer2, text_encoder2 = encode.load_text_encoder("tiny")
    for a, b in zip(vae.state_dict().values(), encode.load_vae("tiny").state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(text_encoder.state_dict().values(), text_encoder2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert tokenizer.get_vocab() == tokenizer2.get_vocab()
    assert encode.tiny_vocab() == encode.tiny_vocab()


def test_saved_tiny_loads_through_the_checkpoint_path_identically(tiny, saved: Path) -> None:
    vae, tokenizer, text_encoder = tiny
    assert {p.name for p in saved.iterdir()} == {"vae", "text_encoder", "tokenizer"}
    vae2 = encode.load_vae(str(saved))
    tokenizer2, text_encoder2 = encode.load_text_encoder(str(saved))
    clip = video()
    assert torch.equal(encode.encode_video(vae, clip), encode.encode_video(vae2, clip))
    prompts = ["a dog runs on the beach", "Zebra crossing, 42 umbrellas!"]
    assert tokenizer(prompts).input_ids == tokenizer2(prompts).input_ids
    for a, b in zip(
        encode.encode_text(tokenizer, text_encoder, prompts),
        encode.encode_text(tokenizer2, text_encoder2, prompts),
        strict=True,
    ):
        assert torch.equal(a, b)
    ids_tiny, ids_dir = encode.encoder_ids("tiny"), encode.encoder_ids(str(saved))
    assert ids_dir["model"] == str(saved.resolve())
    assert {k: v for k, v in ids_tiny.items() if k != "model"} == {
        k: v for k, v in ids_dir.items() if k != "model"
    }


def test_encode_video_shape_and_causal_start_frame(tiny) -> None:
    vae = tiny[0]
    clip = video(batch=2, frames=9)
    latents = encode.encode_video(vae, clip)
    assert latents.shape == (2, 16, 3, 4, 6) and latents.dtype == torch.float32
    cond = encode.encode_image(vae, clip[:, 0])
    assert cond.shape == (2, 16, 1, 4, 6)
    # The Wan VAE encodes frame 0 on its own, so the start frame alone gives latent frame 0 exactly.
    assert torch.equal(cond, latents[:, :, :1])
    assert torch.equal(encode.encode_video(vae, clip.numpy()), latents)


@pytest.mark.parametrize("cond_frames", [1, 5, 9, 13])
def test_the_first_latents_are_the_first_frames_encoded_alone(tiny, cond_frames) -> None:
    # Continuation training takes a clip's first (N-1)/4+1 latents as its condition: they must equal
    # the first N frames encoded on their own (what the continuation sampler encodes), exactly.
    clip = video(batch=2, frames=17)
    latents = encode.encode_video(tiny[0], clip)
    n = 1 + (cond_frames - 1) // 4
    alone = encode.encode_video(tiny[0], clip[:, :cond_frames])
    assert alone.shape[2] == n
    assert torch.equal(alone, latents[:, :, :n])


@pytest.mark.gpu
def test_first_latents_are_the_first_frames_alone_on_cuda_bf16() -> None:
    torch.backends.cudnn.benchmark = True
    vae = encode.tiny_vae().to("cuda", torch.bfloat16)
    clip = video(batch=1, frames=25, h=64, w=96)
    latents = encode.encode_video(vae, clip)
    torch.testing.assert_close(
        encode.encode_video(vae, clip[:, :13]), latents[:, :, :4], rtol=1e-2, atol=1e-2
    )


@pytest.mark.gpu
def test_causal_start_frame_on_cuda_bf16() -> None:
    # What prep relies on where it runs for real: frame 0 of the clip's latents stands in for the start
    # frame encoded alone, in bf16 with cuDNN choosing algorithms per shape.
    torch.backends.cudnn.benchmark = True
    vae = encode.tiny_vae().to("cuda", torch.bfloat16)
    clip = video(batch=1, frames=17, h=64, w=96)
    latents = encode.encode_video(vae, clip)
    cond = encode.encode_image(vae, clip[:, 0])
    torch.testing.assert_close(cond, latents[:, :, :1], rtol=1e-2, atol=1e-2)


def test_encode_video_rejects_floats(tiny) -> None:
    with pytest.raises(ValueError, match="uint8"):
        encode.encode_video(tiny[0], video().float())


def test_normalisation_uses_the_vae_config(tiny) -> None:
    vae = tiny[0]
    z = torch.randn(1, 16, 2, 3, 3)
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    assert torch.allclose(encode.normalize_latents(z, vae), (z - mean) / std)
    assert torch.allclose(encode.denormalize_latents(encode.normalize_latents(z, vae), vae), z, atol=1e-5)


def test_decode_latents_gives_uint8_video(tiny) -> None:
    vae = tiny[0]
    out = encode.decode_latents(vae, encode.encode_video(vae, video(batch=1)))
    assert out.shape == (1, 9, 32, 48, 3) and out.dtype == torch.uint8


def test_encode_text_keeps_real_tokens_only(tiny) -> None:
    _, tokenizer, text_encoder = tiny
    prompts = ["a cat", "a red car drives along a wet road at night"]
    embeds = encode.encode_text(tokenizer, text_encoder, prompts)
    lengths = [len(tokenizer(p).input_ids) for p in prompts]  # includes </s>
    assert [e.shape for e in embeds] == [(n, 64) for n in lengths]
    # Padding is masked out, so a prompt's embedding does not depend on its batch mates.
    alone = encode.encode_text(tokenizer, text_encoder, prompts[:1])[0]
    assert torch.allclose(alone, embeds[0], atol=1e-5)
    # Prompts are cleaned as the official pipeline does before tokenising.
    messy = encode.encode_text(tokenizer, text_encoder, ["  a \n cat  "])[0]
    assert torch.allclose(messy, alone, atol=1e-6)


def test_encode_text_truncates_to_max_length(tiny) -> None:
    _, tokenizer, text_encoder = tiny
    (embeds,) = encode.encode_text(tokenizer, text_encoder, ["word " * 50], max_length=16)
    assert embeds.shape == (16, 64)


def test_pad_text_embeds() -> None:
    embeds = [torch.ones(2, 4), torch.ones(3, 4)]
    padded, mask = encode.pad_text_embeds(embeds)
    assert padded.shape == (2, 3, 4) and mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert padded[0, 2].abs().sum() == 0
    padded, mask = encode.pad_text_embeds(embeds, length=5)
    assert padded.shape == (2, 5, 4) and mask.dtype == torch.long
    with pytest.raises(ValueError):
        encode.pad_text_embeds(embeds, length=2)


def test_checkpoint_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "vae").mkdir()
    assert encode.resolve_checkpoint(str(tmp_path), ["vae"]) == tmp_path
    with pytest.raises(FileNotFoundError, match="missing text_encoder/"):
        encode.resolve_checkpoint(str(tmp_path), ["vae", "text_encoder"])
    with pytest.raises(FileNotFoundError, match="no such directory"):
        encode.resolve_checkpoint(str(tmp_path / "nope"), ["vae"])

    calls = []

    def fake_snapshot(repo_id: str, allow_patterns: list[str]) -> str:
        calls.append((repo_id, allow_patterns))
        return str(tmp_path)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    assert encode.resolve_checkpoint("user/model", ["vae"]) == tmp_path
    assert calls == [("user/model", ["vae/*"])]
