"""The step other LongCat trainers run: the official ``LongCatVideoTransformer3DModel`` (imported from the
checkout ``LONGCAT_OFFICIAL_DIR`` names) with a peft LoRA on the same targets and its own (diffusers)
gradient checkpointing, on the same frozen weights as ours, called the way the official pipeline calls it.

Imported as ``from _peer import ...`` by ``benchmarks/train_step.py``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn

from longcat_train.dit_config import DiTConfig

# The official attention kernels, first installed wins; with none, SDPA stands in (the same math).
_KERNELS = (
    ("flash_attn_interface", "enable_flashattn3"),
    ("flash_attn", "enable_flashattn2"),
    ("xformers", "enable_xformers"),
)


def official_dit_module() -> ModuleType:
    """``longcat_video.modules.longcat_video_dit`` of the checkout ``LONGCAT_OFFICIAL_DIR`` names."""
    root = os.environ.get("LONGCAT_OFFICIAL_DIR")
    if not root:
        raise SystemExit(
            "the peer-style baseline needs LONGCAT_OFFICIAL_DIR (an official LongCat-Video checkout)"
        )
    sys.path.insert(0, root)
    from longcat_video.modules import longcat_video_dit

    return longcat_video_dit


def _sdpa_self_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)  # [B, H, S, D]


def _sdpa_cross_attention(self, x: torch.Tensor, cond: torch.Tensor, kv_seqlen: list[int]) -> torch.Tensor:
    # The official packs the prompts' tokens into one sequence [1, sum(L_b), C]: sample b sees its own.
    B, N, C = x.shape
    q = self.q_norm(self.q_linear(x).view(B, N, self.num_heads, self.head_dim))
    k, v = self.kv_linear(cond).view(1, -1, 2, self.num_heads, self.head_dim).unbind(2)
    k = self.k_norm(k)
    out = [
        F.scaled_dot_product_attention(q[b : b + 1].transpose(1, 2), kb.transpose(1, 2), vb.transpose(1, 2))
        for b, (kb, vb) in enumerate(zip(k.split(kv_seqlen, dim=1), v.split(kv_seqlen, dim=1), strict=True))
    ]
    return self.proj(torch.cat(out).transpose(1, 2).reshape(B, N, C))


def attention_kernel(module: ModuleType) -> str:
    """Switches the official attention to an installed kernel, or to SDPA; returns which."""
    for package, flag in _KERNELS:
        if importlib.util.find_spec(package) is not None:
            return flag
    attention = sys.modules[module.__name__.rsplit(".", 1)[0] + ".attention"]
    attention.Attention._process_attn = _sdpa_self_attention
    attention.MultiHeadCrossAttention._process_cross_attn = _sdpa_cross_attention
    return "sdpa"


class PipelineCall(nn.Module):
    """The official model behind our model's call, with what the official pipeline does before calling it:
    prompts padded to ``text_max_length`` (mask 0 on padding), the condition frames' timestep zeroed, the
    text as ``[B, 1, L, C]``."""

    def __init__(self, official: nn.Module, text_max_length: int) -> None:
        super().__init__()
        self.official, self.text_max_length = official, text_max_length

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor,
        num_cond_latents: int = 0,
    ) -> torch.Tensor:
        pad = self.text_max_length - encoder_hidden_states.shape[1]
        text = F.pad(encoder_hidden_states, (0, 0, 0, pad))[:, None]
        mask = F.pad(encoder_attention_mask, (0, pad))
        frames = timestep[:, None].repeat(1, hidden_states.shape[2])
        frames[:, :num_cond_latents] = 0
        return self.official(hidden_states, frames, text, mask, num_cond_latents=num_cond_latents)


def build_peer(
    state: dict[str, torch.Tensor], config: DiTConfig, *, rank: int, targets: list[str]
) -> tuple[PipelineCall, str]:
    """The peer model on ``state``'s tensors (shared, not copied): official class, peft LoRA (seeded as
    ours), diffusers gradient checkpointing. Returns it and the attention kernel it runs."""
    module = official_dit_module()
    kernel = attention_kernel(module)
    flags = {kernel: True} if kernel != "sdpa" else {}
    with torch.device("meta"):
        official = module.LongCatVideoTransformer3DModel.from_config(
            config.to_dict(), cp_split_hw=[1, 1], **flags
        )
    official.load_state_dict(state, strict=True, assign=True)
    official.enable_gradient_checkpointing()
    torch.manual_seed(0)
    lora_config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets))
    peft_model = get_peft_model(official, lora_config, autocast_adapter_dtype=True)
    device = next(iter(state.values())).device
    for name, p in peft_model.named_parameters():
        if p.device.type == "meta":
            raise RuntimeError(f"peer model: {name} has no weights in the state given")
    return PipelineCall(peft_model.to(device), config.text_max_length), kernel


def base_state(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """Our frozen base weights under their official names (LoRA layers' base layers unwrapped)."""
    return {
        k.replace(".base_layer", ""): v
        for k, v in peft_model.get_base_model().state_dict().items()
        if ".lora_" not in k
    }
