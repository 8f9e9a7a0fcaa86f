"""Numerical parity with the official LongCat-Video transformer (tiny config, CPU, fp32).

Skipped unless ``LONGCAT_OFFICIAL_DIR`` names a directory holding the official ``longcat_video`` package
(its modules import einops and triton). The official attention needs flash-attn / xformers, so its two
attention kernels are replaced here by plain SDPA with the same semantics; everything else runs as
released: embedders, modulation, norms, RoPE, I2V split, text zero-padding, final layer, unpatchify.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F

from longcat_train.dit_config import DiTConfig
from longcat_train.model import LongCatVideoTransformer

OFFICIAL_DIR = os.environ.get("LONGCAT_OFFICIAL_DIR")
pytestmark = pytest.mark.skipif(not OFFICIAL_DIR, reason="set LONGCAT_OFFICIAL_DIR to an official checkout")

TOLERANCE = 1e-5


def _sdpa_self_attention(self, q, k, v, shape):
    return F.scaled_dot_product_attention(q, k, v)  # [B, H, S, D] in and out


def _sdpa_cross_attention(self, x, cond, kv_seqlen):
    # The official packs every prompt's valid tokens into one sequence [1, sum(L_b), C] and runs varlen
    # attention: sample b's queries see only its own kv_seqlen[b] keys.
    B, N, C = x.shape
    q = self.q_norm(self.q_linear(x).view(B, N, self.num_heads, self.head_dim))
    k, v = self.kv_linear(cond).view(1, -1, 2, self.num_heads, self.head_dim).unbind(2)
    k = self.k_norm(k)
    outputs = []
    for b, (k_b, v_b) in enumerate(zip(k[0].split(kv_seqlen), v[0].split(kv_seqlen), strict=True)):
        outputs.append(
            F.scaled_dot_product_attention(q[b].transpose(0, 1), k_b.transpose(0, 1), v_b.transpose(0, 1))
        )  # [H, N, D]
    return self.proj(torch.stack(outputs).transpose(1, 2).reshape(B, N, C))


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def official_module(monkeypatch_module):
    pytest.importorskip("einops")
    pytest.importorskip("triton")
    monkeypatch_module.syspath_prepend(OFFICIAL_DIR)
    dit = pytest.importorskip("longcat_video.modules.longcat_video_dit")
    attention = sys.modules["longcat_video.modules.attention"]
    monkeypatch_module.setattr(attention.Attention, "_process_attn", _sdpa_self_attention)
    monkeypatch_module.setattr(
        attention.MultiHeadCrossAttention, "_process_cross_attn", _sdpa_cross_attention
    )
    return dit


def _pair(official_module, zero_pad: bool) -> tuple[torch.nn.Module, LongCatVideoTransformer]:
    config = DiTConfig.tiny()
    config.text_tokens_zero_pad = zero_pad
    torch.manual_seed(0)
    official = official_module.LongCatVideoTransformer3DModel(
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        hidden_size=config.hidden_size,
        depth=config.depth,
        num_heads=config.num_heads,
        caption_channels=config.caption_channels,
        mlp_ratio=config.mlp_ratio,
        adaln_tembed_dim=config.adaln_tembed_dim,
        frequency_embedding_size=config.frequency_embedding_size,
        patch_size=config.patch_size,
        cp_split_hw=[1, 1],
        text_tokens_zero_pad=zero_pad,
    ).eval()
    # Default init leaves norm weights at 1: perturb every parameter so a swapped one cannot hide.
    with torch.no_grad():
        for name, p in official.named_parameters():
            p.add_(torch.randn_like(p) * (0.2 if "norm" in name else 0.02))
    ours = LongCatVideoTransformer(config).eval()
    ours.load_state_dict(official.state_dict(), strict=True)
    return official, ours


def _inputs(config: DiTConfig, lengths: list[int], frames: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    B = len(lengths)
    latents = torch.randn(B, config.in_channels, frames, 4, 6, generator=g)
    text = torch.randn(B, config.text_max_length, config.caption_channels, generator=g)
    mask = (torch.arange(config.text_max_length)[None] < torch.tensor(lengths)[:, None]).long()
    timestep = torch.tensor([700.0, 250.0])[:B]
    return dict(latents=latents, text=text, mask=mask, timestep=timestep)


def _max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() / b.abs().max().item()


@pytest.mark.parametrize("num_cond_latents", [0, 1])
def test_matches_official_zero_pad(official_module, num_cond_latents: int) -> None:
    official, ours = _pair(official_module, zero_pad=True)
    x = _inputs(ours.config, lengths=[5, 9])
    frames = x["latents"].shape[2]
    t_frames = x["timestep"][:, None].repeat(1, frames)
    t_frames[:, :num_cond_latents] = 0  # the official pipeline zeroes the condition frame's timestep
    with torch.no_grad():
        expected = official(
            x["latents"],
            t_frames,
            x["text"][:, None],  # the official pipeline passes [B, 1, 512, C]
            x["mask"],
            num_cond_latents=num_cond_latents,
        )
        padded = ours(x["latents"], x["timestep"], x["text"], x["mask"], num_cond_latents=num_cond_latents)
        # Callers may also pass only the real tokens: the model pads to text_max_length itself.
        unpadded = ours(
            x["latents"], x["timestep"], x["text"][:, :9], x["mask"][:, :9], num_cond_latents=num_cond_latents
        )
    assert expected.dtype == padded.dtype == torch.float32
    error = max(_max_error(padded, expected), _max_error(unpadded, expected))
    print(f"official parity (zero-pad, num_cond_latents={num_cond_latents}): max rel error {error:.2e}")
    assert error < TOLERANCE


def test_matches_official_masked_text(official_module) -> None:
    official, ours = _pair(official_module, zero_pad=False)
    x = _inputs(ours.config, lengths=[5, 9])
    t_frames = x["timestep"][:, None].repeat(1, x["latents"].shape[2])
    t_frames[:, :1] = 0
    with torch.no_grad():
        expected = official(x["latents"], t_frames, x["text"][:, None], x["mask"], num_cond_latents=1)
        actual = ours(x["latents"], x["timestep"], x["text"][:, :9], x["mask"][:, :9], num_cond_latents=1)
    error = _max_error(actual, expected)
    print(f"official parity (masked text, num_cond_latents=1): max rel error {error:.2e}")
    assert error < TOLERANCE


def test_official_class_reads_our_config_json(official_module) -> None:
    config = DiTConfig.tiny()
    official = official_module.LongCatVideoTransformer3DModel.from_config(config.to_dict())
    LongCatVideoTransformer(config).load_state_dict(official.state_dict(), strict=True)
    assert DiTConfig.from_dict(config.to_dict()) == config


# ------------------------------------------------------------------------------------ LoRAs

# Official-layout LoRA modules: path -> row blocks n, n > 1 being the official loader's n_seperate.
SPLIT_MODULES = {
    "blocks.0.attn.qkv": 3,
    "blocks.1.cross_attn.kv_linear": 2,
    "blocks.0.adaLN_modulation.1": 6,
    "blocks.1.adaLN_modulation.1": 6,
    "final_layer.adaLN_modulation.1": 2,
    "final_layer.linear": 1,
    "blocks.1.ffn.w2": 1,
    "t_embedder.mlp.2": 1,
    "y_embedder.y_proj.0": 1,
}


def _forward(model: torch.nn.Module, x: dict, official: bool) -> torch.Tensor:
    t_frames = x["timestep"][:, None].repeat(1, x["latents"].shape[2])
    t_frames[:, :1] = 0
    with torch.no_grad():
        if official:
            return model(x["latents"], t_frames, x["text"][:, None], x["mask"], num_cond_latents=1)
        return model(x["latents"], x["timestep"], x["text"], x["mask"], num_cond_latents=1)


@pytest.mark.parametrize("merge", [False, True])
def test_split_official_loras_together_match_the_official_forward(
    official_module, official_lora_file, tmp_path, merge
) -> None:
    """Two official files at once (ranks 4 and 2; split qkv, kv, adaLN and final adaLN; the final layer,
    timestep and caption MLPs): our forward equals the official load_lora + enable_loras forward."""
    from longcat_train.lora_apply import load_loras

    official, ours = _pair(official_module, zero_pad=True)
    first = official_lora_file(tmp_path / "a.safetensors", ours, SPLIT_MODULES, rank=4, seed=3)
    every_other = dict(list(SPLIT_MODULES.items())[::2])
    second = official_lora_file(tmp_path / "b.safetensors", ours, every_other, rank=2, seed=4)
    x = _inputs(ours.config, lengths=[5, 9])
    base = _forward(ours, x, official=False)
    official.load_lora(first, "a", multiplier=0.8, lora_network_dim=4)
    official.load_lora(second, "b", multiplier=-1.5, lora_network_dim=2)
    for keys, loras in ([["a"], [(first, 0.8)]], [["a", "b"], [(first, 0.8), (second, -1.5)]]):
        official.enable_loras(keys)
        expected = _forward(official, x, official=True)
        loaded = load_loras(ours, loras, merge=merge)
        actual = _forward(ours, x, official=False)
        loaded.remove()
        error = _max_error(actual, expected)
        print(f"official LoRA parity ({'+'.join(keys)}, merge={merge}): max rel error {error:.2e}")
        assert error < TOLERANCE and _max_error(base, expected) > 100 * TOLERANCE
    torch.testing.assert_close(_forward(ours, x, official=False), base, rtol=1e-6, atol=1e-6)


def test_condition_cache_matches_the_official_kv_cache(official_module) -> None:
    """Our DiT with its condition cache against the official DiT's ``return_kv`` condition pass and
    ``kv_cache_dict`` forward (the official ``use_kv_cache``), on the same weights."""
    from longcat_train.kv_cache import cache_condition

    official, ours = _pair(official_module, zero_pad=True)
    x = _inputs(ours.config, lengths=[5, 9], frames=4)
    latents, text, mask = x["latents"], x["text"], x["mask"]
    with torch.no_grad():
        _, kv = official(
            latents[:, :, :2], torch.zeros(2, 2), text[:, None], mask, return_kv=True, skip_crs_attn=True
        )
        t_frames = x["timestep"][:, None].repeat(1, 2)
        expected = official(
            latents[:, :, 2:], t_frames, text[:, None], mask, num_cond_latents=2, kv_cache_dict=kv
        )
        cache = cache_condition(ours, latents[:, :, :2], text, mask)
        got = ours(latents[:, :, 2:], x["timestep"], text, mask, num_cond_latents=2, cond_cache=cache)
    error = _max_error(got, expected)
    print(f"official parity (condition cache): max rel error {error:.2e}")
    assert error < TOLERANCE
