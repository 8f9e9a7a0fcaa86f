"""The LongCat-Video DiT (13.6B, single stream), with image-to-video conditioning.

One file, bottom-up: rotary tables, numerics helpers, embedders, attention, feed-forward, the block, the
final layer, the model. Its hyper-parameters and config.json are ``longcat_train.dit_config``; how a
block runs under activation checkpointing and torch.compile is ``longcat_train.block_step``. Parameter
names and shapes are those of the official ``dit/`` checkpoint, so it loads with ``strict=True``; the
arithmetic follows the official model, including where it runs in fp32 (timestep embedding, adaLN
modulation, the modulated LayerNorms, q/k RMSNorm and RoPE, the output layer).

Image-to-video: the first ``num_cond_latents`` latent frames are the clean condition. Their timestep is
forced to 0 (``LongCatVideoTransformer._frame_timesteps``); in self-attention they attend only to each
other while noisy tokens attend to all tokens (``longcat_train.attention.attention``, called with the grid
by :class:`SelfAttention`); they get no text cross-attention (:class:`LongCatBlock`). So their keys and
values never change over the steps: ``longcat_train.kv_cache`` computes them once per video.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from longcat_train.architecture import BLOCK_LINEARS, CHECKPOINT_MODES
from longcat_train.attention import BACKENDS, attention, warn_if_unavailable
from longcat_train.block_step import CheckpointMode, block_step, compile_block_step
from longcat_train.dit_config import DiTConfig
from longcat_train.kv_cache import ConditionCache, LayerKV, block_caches

if TYPE_CHECKING:
    from longcat_train.step_cache import StepCache


# ------------------------------------------------------------------------------------------ 3D RoPE


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Channels of one head given to the t / h / w axes: 44 / 42 / 42 for ``head_dim`` 128."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_tables(
    latent_shape: tuple[int, int, int], head_dim: int, device: torch.device | str, base: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine and sign-folded sine tables for 3D RoPE over a ``(T, H, W)`` patch grid, fp32.

    Each axis rotates its own channel range (t first, then h, then w) with frequencies
    ``base ** (-2j / axis_dim)`` at integer grid positions. Channels rotate in adjacent pairs
    ``(2i, 2i + 1)``, so both tables repeat each angle twice; the sine table carries the sign of the pair
    rotation (``-sin`` on even, ``+sin`` on odd channels) so that :func:`apply_rope` is one multiply-add.

    Returns:
        ``(cos, sin)``, each ``[T*H*W, 1, head_dim]`` (the 1 broadcasts over heads).
    """
    angles = []
    for axis, (size, dim) in enumerate(zip(latent_shape, rope_split(head_dim), strict=True)):
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
        axis_angles = (
            torch.arange(size, dtype=torch.float32, device=device)[:, None] * inv_freq
        )  # [size, dim/2]
        view = [1, 1, 1, dim // 2]
        view[axis] = size
        angles.append(axis_angles.view(view).expand(*latent_shape, dim // 2))
    angles = torch.cat(angles, dim=-1).flatten(0, 2)  # [N, head_dim/2]
    cos = angles.cos().repeat_interleave(2, dim=-1)  # [N, head_dim]
    sin = angles.sin()
    sin = torch.stack((-sin, sin), dim=-1).flatten(-2)  # [N, head_dim]
    return cos[:, None], sin[:, None]


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate channel pairs of ``x`` ``[B, N, H, D]`` (fp32) by the angles of :func:`rope_tables`."""
    cos, sin = rope
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x1, x0, x3, x2, ...)
    return torch.addcmul(x * cos, swapped, sin)


# ------------------------------------------------------------------------------------------ numerics


class FP32Linear(nn.Linear):
    """A linear the official model runs under fp32 autocast (its timestep MLP, adaLN projections and
    output layer): fp32 arithmetic on weights that may be stored in bf16. The model calls these modules
    (never their weights directly) inside :func:`fp32_region`, so a LoRA wrapped around one, or hooked
    onto one, acts there and computes in fp32 too, as the official LoRA forward does under that autocast.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias)


def fp32_region(device: torch.device) -> torch.autocast:
    """Autocast off: inside, ops keep the dtypes they are given. The stand-in for the official fp32
    autocast that also works on the CPU, and keeps a caller's bf16 autocast (training) out."""
    return torch.autocast(device.type, enabled=False)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Affine-free LayerNorm then ``* (1 + scale) + shift`` in fp32; result in ``x``'s dtype.

    x: ``[B, T, S, C]``; shift, scale: ``[B, T, 1, C]`` fp32 (one modulation per latent frame).
    """
    normed = F.layer_norm(x.float(), x.shape[-1:], eps=1e-6)
    return torch.addcmul(shift, normed, 1 + scale).to(x.dtype)


def _gated_residual(x: torch.Tensor, gate: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """``x + gate * update`` with the sum in fp32 (gate is fp32), as the official model; back to x's dtype."""
    return torch.addcmul(x, gate, update).to(x.dtype)


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the activation and weight dtypes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm over each head's channels. Returns fp32: callers fuse it with RoPE or cast it themselves."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps)


# ------------------------------------------------------------------------------------------ embedders


class PatchEmbed3D(nn.Module):
    """Latent video to tokens: one Conv3d whose kernel equals its stride."""

    def __init__(self, patch_size: tuple[int, int, int], in_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # [B, C, T, H/ph, W/pw]
        return x.flatten(2).transpose(1, 2).contiguous()  # [B, N, C], tokens ordered (t, h, w)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t in [0, 1000] through a SiLU MLP, in fp32."""

    def __init__(self, embed_dim: int, frequency_embedding_size: int) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            FP32Linear(frequency_embedding_size, embed_dim),
            nn.SiLU(),
            FP32Linear(embed_dim, embed_dim),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_embedding_size // 2
        freqs = torch.exp(
            -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = t.float()[..., None] * freqs  # [..., half]
        features = torch.cat([args.cos(), args.sin()], dim=-1)  # [..., frequency_embedding_size]
        with fp32_region(t.device):
            return self.mlp(features)


class CaptionEmbedder(nn.Module):
    """Text-encoder states to the model width (in the compute dtype)."""

    def __init__(self, caption_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.y_proj = nn.Sequential(
            nn.Linear(caption_channels, hidden_size),
            nn.GELU(approximate="tanh"),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.y_proj(y)


# ------------------------------------------------------------------------------------------ attention


class SelfAttention(nn.Module):
    """Video self-attention: fused qkv, per-head RMSNorm on q and k, 3D RoPE, I2V visibility rule."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)
        # Set through LongCatVideoTransformer.attention_implementation and .block_sparse_params.
        self.attention_implementation = "sdpa"
        self.block_sparse_params: dict[str, Any] | None = None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        latent_shape: tuple[int, int, int],
        num_cond_latents: int,
        cond_kv: LayerKV | None = None,
    ) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).unbind(2)  # [B, N, H, D] views
        # Norm and rotation in fp32 in one pass each (the official rounds between them; this is as exact).
        q = apply_rope(self.q_norm(q), rope).to(x.dtype)
        k = apply_rope(self.k_norm(k), rope).to(x.dtype)
        if cond_kv is not None:
            out = cond_kv.attend(
                *(t.transpose(1, 2) for t in (q, k, v)),
                implementation=self.attention_implementation,
                block_sparse_params=self.block_sparse_params,
            )
            return self.proj(out.transpose(1, 2).reshape(B, N, C))
        # The I2V visibility rule (condition tokens see only the condition, noisy tokens see everything)
        # is applied inside attention(), where the block-sparse kernel needs the whole sequence at once.
        out = attention(
            q.transpose(1, 2),  # [B, H, N, D] views
            k.transpose(1, 2),
            v.transpose(1, 2),
            implementation=self.attention_implementation,
            latent_shape=latent_shape,
            num_cond_latents=num_cond_latents,
            block_sparse_params=self.block_sparse_params,
        )  # [B, H, N, D]
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class CrossAttention(nn.Module):
    """Video tokens (queries) attend to text tokens; q and k get per-head RMSNorm, no RoPE."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.q_linear = nn.Linear(config.hidden_size, config.hidden_size)
        self.kv_linear = nn.Linear(config.hidden_size, 2 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)
        # Set through LongCatVideoTransformer.attention_implementation.
        self.attention_implementation = "sdpa"

    def forward(self, x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None) -> torch.Tensor:
        B, M, C = x.shape
        L = text.shape[1]
        q = self.q_norm(self.q_linear(x).view(B, M, self.num_heads, self.head_dim)).to(x.dtype)
        k, v = self.kv_linear(text).view(B, L, 2, self.num_heads, self.head_dim).unbind(2)  # [B, L, H, D]
        k = self.k_norm(k).to(x.dtype)
        out = attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            implementation=self.attention_implementation,
            attn_mask=text_mask,
        )  # [B, H, M, D]
        return self.proj(out.transpose(1, 2).reshape(B, M, C))


# ------------------------------------------------------------------------------------------ block


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``, no biases."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class LongCatBlock(nn.Module):
    """adaLN-modulated self-attention, text cross-attention, adaLN-modulated SwiGLU."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        C = config.hidden_size
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), FP32Linear(config.adaln_tembed_dim, 6 * C))
        self.pre_crs_attn_norm = FP32LayerNorm(C, eps=1e-6)
        self.attn = SelfAttention(config)
        self.cross_attn = CrossAttention(config)
        self.ffn = FeedForward(C, config.ffn_hidden_size)
        # Set through LongCatVideoTransformer.feed_forward_chunks and .gradient_checkpointing.
        self.feed_forward_chunks = 1
        self.checkpointing: CheckpointMode = "full"

    def forward(
        self,
        x: torch.Tensor,
        temb: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor],
        latent_shape: tuple[int, int, int],
        num_cond_latents: int,
        cond_kv: LayerKV | None = None,
    ) -> torch.Tensor:
        """x ``[B, N, C]``, temb ``[B, T, C_t]`` fp32, text ``[B, L, C]`` -> ``[B, N, C]``."""
        B, N, C = x.shape
        T, height, width = latent_shape
        n_cond = num_cond_latents * height * width
        with fp32_region(x.device):
            modulation = self.adaLN_modulation(temb).unsqueeze(2)  # [B, T, 1, 6C]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=-1)

        frames = x.view(B, T, -1, C)  # [B, T, H*W, C]: modulation is per latent frame
        modulated = _modulate(frames, shift_msa, scale_msa).view(B, N, C)
        h = self.attn(modulated, rope, latent_shape, num_cond_latents, cond_kv)
        x = _gated_residual(frames, gate_msa, h.view(B, T, -1, C)).view(B, N, C)

        # Condition tokens take no text: only the noisy tokens go through cross-attention.
        if n_cond < N:
            h = self.cross_attn(self.pre_crs_attn_norm(x[:, n_cond:]), text, text_mask)  # [B, N - n_cond, C]
            x = torch.cat([x[:, :n_cond], x[:, n_cond:] + h], dim=1) if n_cond else x + h

        frames = x.view(B, T, -1, C)
        chunks = min(self.feed_forward_chunks, T)
        if chunks == 1 or not torch.is_grad_enabled():
            return self._feed_forward(frames, shift_mlp, scale_mlp, gate_mlp).view(B, N, C)
        # Frame groups, each checkpointed: backward holds one group's SwiGLU activations (11008 wide,
        # the largest of the block) instead of all of them, for one more FFN forward per group.
        groups = zip(
            *(t.tensor_split(chunks, dim=1) for t in (frames, shift_mlp, scale_mlp, gate_mlp)), strict=True
        )
        out = [checkpoint(self._feed_forward, *group, use_reentrant=False) for group in groups]
        return torch.cat(out, dim=1).view(B, N, C)

    def _feed_forward(
        self, frames: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, gate: torch.Tensor
    ) -> torch.Tensor:
        """Modulated SwiGLU and its gated residual on ``[B, T, H*W, C]`` (per-frame modulation)."""
        return _gated_residual(frames, gate, self.ffn(_modulate(frames, shift, scale)))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a linear map to patch pixels, in fp32."""

    def __init__(self, hidden_size: int, patch_volume: int, out_channels: int, adaln_tembed_dim: int) -> None:
        super().__init__()
        self.linear = FP32Linear(hidden_size, patch_volume * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), FP32Linear(adaln_tembed_dim, 2 * hidden_size))

    def forward(self, x: torch.Tensor, temb: torch.Tensor, num_frames: int) -> torch.Tensor:
        """x ``[B, N, C]``, temb ``[B, T, C_t]`` -> ``[B, N, patch_volume * C_out]`` fp32."""
        B, N, C = x.shape
        with fp32_region(x.device):
            shift, scale = self.adaLN_modulation(temb).unsqueeze(2).chunk(2, dim=-1)
            x = _modulate(x.view(B, num_frames, -1, C), shift, scale).view(B, N, C)
            return self.linear(x)


# ------------------------------------------------------------------------------------------ model


class LongCatVideoTransformer(nn.Module):
    """The LongCat-Video DiT. Outputs the flow ``x0 - eps`` for latents ``[B, 16, T, H, W]``."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        self.x_embedder = PatchEmbed3D(config.patch_size, config.in_channels, config.hidden_size)
        self.t_embedder = TimestepEmbedder(config.adaln_tembed_dim, config.frequency_embedding_size)
        self.y_embedder = CaptionEmbedder(config.caption_channels, config.hidden_size)
        self.blocks = nn.ModuleList(LongCatBlock(config) for _ in range(config.depth))
        self.final_layer = FinalLayer(
            config.hidden_size, math.prod(config.patch_size), config.out_channels, config.adaln_tembed_dim
        )
        self._block_step = block_step
        self.gradient_checkpointing = "full"
        self.attention_implementation = "sdpa"
        self.block_sparse_params = config.official_block_sparse_params
        self.step_cache: StepCache | None = None  # set for a denoising loop by step_cache.step_cache

    def _attention_modules(self) -> Iterator[SelfAttention | CrossAttention]:
        return (m for m in self.modules() if isinstance(m, SelfAttention | CrossAttention))

    @property
    def attention_implementation(self) -> str:
        """The attention kernel of every block, a name of ``longcat_train.attention.BACKENDS``.

        A runtime choice like checkpointing, not part of the architecture: not saved in config.json.
        """
        return self._attention_implementation

    @attention_implementation.setter
    def attention_implementation(self, name: str) -> None:
        if name not in BACKENDS:
            raise ValueError(f"attention_implementation {name!r} is not one of {tuple(BACKENDS)}")
        self._attention_implementation = name
        for module in self._attention_modules():
            module.attention_implementation = name

    @property
    def block_sparse_params(self) -> dict[str, Any] | None:
        """Keyword arguments for ``longcat_kernels.block_sparse_attention`` (``density``, ``block``) when
        the attention is ``block_sparse``; by default what the config's official ``bsa_params`` say."""
        return self._block_sparse_params

    @block_sparse_params.setter
    def block_sparse_params(self, params: dict[str, Any] | None) -> None:
        self._block_sparse_params = params
        for module in self._attention_modules():
            if isinstance(module, SelfAttention):
                module.block_sparse_params = params

    @property
    def gradient_checkpointing(self) -> CheckpointMode | tuple[CheckpointMode, ...]:
        """Activation checkpointing while gradients are enabled: one mode for every block, or one per block.

        ``full`` recomputes a block in backward; ``selective`` keeps the self-attention outputs and
        recomputes the rest (more memory, no second attention forward); ``none`` stores everything. A
        tuple (one mode per block, e.g. a memory plan's) reads back as a tuple unless all modes agree.
        Every mode computes the same loss and gradients: only what is kept differs.
        """
        modes = self.block_checkpointing
        return modes[0] if modes and all(m == modes[0] for m in modes) else modes

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, mode: CheckpointMode | Sequence[CheckpointMode]) -> None:
        modes = (mode,) * len(self.blocks) if isinstance(mode, str) else tuple(mode)
        if len(modes) != len(self.blocks):
            raise ValueError(f"gradient_checkpointing: {len(modes)} modes for {len(self.blocks)} blocks")
        for m in modes:
            if m not in CHECKPOINT_MODES:
                raise ValueError(f"gradient_checkpointing must be one of {CHECKPOINT_MODES}, got {m!r}")
        for block, m in zip(self.blocks, modes, strict=True):
            block.checkpointing = m

    @property
    def block_checkpointing(self) -> tuple[CheckpointMode, ...]:
        """The checkpointing mode of each block, in order."""
        return tuple(block.checkpointing for block in self.blocks)

    @property
    def feed_forward_chunks(self) -> int:
        """Latent-frame groups each block's feed-forward runs in while gradients are enabled (1: one pass).

        More groups lower the activation peak of a block's backward (its SwiGLU activations are the
        largest) at the cost of one more feed-forward pass: the 24 GB-card setting with block swap. The
        result is the same as one pass up to matmul rounding.
        """
        return self.blocks[0].feed_forward_chunks if len(self.blocks) else 1

    @feed_forward_chunks.setter
    def feed_forward_chunks(self, chunks: int) -> None:
        if chunks < 1:
            raise ValueError(f"feed_forward_chunks must be >= 1, got {chunks}")
        for block in self.blocks:
            block.feed_forward_chunks = chunks

    def compile_blocks(self, tune: bool = False, **compile_kwargs: Any) -> None:
        """torch.compile the per-block step, checkpointing included (``block_step.compile_block_step``:
        ``tune``, ``compile_kwargs``)."""
        warn_if_unavailable(self.attention_implementation)
        self._block_step = compile_block_step(tune, **compile_kwargs)

    def run_block(self, block: LongCatBlock, *args: Any) -> torch.Tensor:
        """``block(*args)`` under its checkpointing mode (compiled after :meth:`compile_blocks`)."""
        checkpointing = block.checkpointing if torch.is_grad_enabled() else "none"
        return self._block_step(block, checkpointing, *args)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        num_cond_latents: int = 0,
        cond_cache: ConditionCache | None = None,
    ) -> torch.Tensor:
        """Predict ``x0 - eps``.

        Args:
            hidden_states: noisy latents ``[B, C_in, T, H, W]``; the first ``num_cond_latents`` frames hold
                the clean condition.
            timestep: ``[B]`` or per latent frame ``[B, T]``, in [0, 1000]. Condition frames are set to 0.
            encoder_hidden_states: text-encoder states ``[B, L, caption_channels]``, padded or not.
            encoder_attention_mask: ``[B, L]``, 1 for real tokens, 0 for padding; None = all real.
            num_cond_latents: leading latent frames that are the clean condition (1 for image-to-video).
            cond_cache: their keys and values (``kv_cache.cache_condition``). Empty: ``hidden_states`` are
                the ``num_cond_latents`` condition frames alone, and it is filled. Filled: they are the noisy
                frames alone, after the cached ones (the output too).

        Returns:
            ``[B, C_out, T, H, W]`` float32.
        """
        config = self.config
        if hidden_states.ndim != 5 or hidden_states.shape[1] != config.in_channels:
            raise ValueError(
                f"hidden_states must be [B, {config.in_channels}, T, H, W], got {tuple(hidden_states.shape)}"
            )
        B, _, T, H, W = hidden_states.shape
        _, ph, pw = config.patch_size
        if H % ph or W % pw:
            raise ValueError(f"latent size {H}x{W} is not divisible by the patch size {ph}x{pw}")
        latent_shape = (T, H // ph, W // pw)
        # cached: condition frames the cache holds in place of the input's
        cached, layers = block_caches(cond_cache, num_cond_latents, T, len(self.blocks), latent_shape[1:])
        dtype = self.x_embedder.proj.weight.dtype

        x = self.x_embedder(hidden_states.to(dtype))  # [B, N, C]
        # The official model casts timesteps to the weight dtype before embedding them; so do we.
        temb = self.t_embedder(
            self._frame_timesteps(timestep, B, T, num_cond_latents - cached).to(dtype)
        )  # [B, T, C_t]
        text, text_mask = self._embed_text(
            encoder_hidden_states.to(dtype), encoder_attention_mask
        )  # [B, L, C]
        rope = rope_tables((cached + T, *latent_shape[1:]), config.head_dim, x.device)
        rope = tuple(table[cached * latent_shape[1] * latent_shape[2] :] for table in rope)  # noisy positions

        block_args = (temb, text, text_mask, rope, latent_shape, num_cond_latents - cached)
        if self.step_cache is None:
            for block, kv in zip(self.blocks, layers, strict=True):
                x = self.run_block(block, x, *block_args, kv)
        else:
            x = self.step_cache.run_blocks(self, x, block_args, layers)

        x = self.final_layer(x, temb, T)  # [B, N, ph*pw*C_out] fp32
        return self._unpatchify(x, latent_shape)

    @staticmethod
    def _frame_timesteps(
        timestep: torch.Tensor, batch: int, frames: int, num_cond_latents: int
    ) -> torch.Tensor:
        """``[B]`` or ``[B, T]`` -> ``[B, T]`` with the condition frames at t = 0."""
        if timestep.ndim == 1:
            timestep = timestep[:, None].expand(batch, frames)
        if timestep.shape != (batch, frames):
            raise ValueError(
                f"timestep must be [B] or [B, T] = [{batch}, {frames}], got {tuple(timestep.shape)}"
            )
        is_cond = torch.arange(frames, device=timestep.device) < num_cond_latents
        return timestep.masked_fill(is_cond, 0)

    def _embed_text(
        self, text: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Caption embedding and the cross-attention mask (None when every key is attended).

        With ``text_tokens_zero_pad`` (the official setting) the text is brought to ``text_max_length``
        tokens with zero embeddings and every position is attended, exactly what the official model does
        with the pipeline's max-length padding: padded keys are bias-only and do take softmax weight.
        Otherwise padded tokens are masked out and padding length does not matter.
        """
        B, L, _ = text.shape
        mask = torch.ones(B, L, dtype=torch.bool, device=text.device) if mask is None else mask.to(torch.bool)
        text = self.y_embedder(text)  # [B, L, C]
        if not self.config.text_tokens_zero_pad:
            if not bool(mask.any(dim=1).all()):
                raise ValueError("every prompt needs at least one real text token when padding is masked out")
            return text, None if bool(mask.all()) else mask[:, None, None, :]  # [B, 1, 1, L]
        max_length = self.config.text_max_length
        if L > max_length:
            if bool(mask[:, max_length:].any()):
                raise ValueError(f"more than text_max_length={max_length} text tokens")
            text, mask = text[:, :max_length], mask[:, :max_length]
        text = text * mask[..., None]
        return F.pad(text, (0, 0, 0, max_length - text.shape[1])), None  # [B, text_max_length, C]

    def _unpatchify(self, x: torch.Tensor, latent_shape: tuple[int, int, int]) -> torch.Tensor:
        """``[B, N, pt*ph*pw*C_out]`` -> ``[B, C_out, T*pt, H*ph, W*pw]``."""
        B = x.shape[0]
        T, H, W = latent_shape
        pt, ph, pw = self.config.patch_size
        x = x.view(B, T, H, W, pt, ph, pw, self.config.out_channels)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C_out, T, pt, H, ph, W, pw]
        return x.reshape(B, self.config.out_channels, T * pt, H * ph, W * pw)


# ------------------------------------------------------------------------------------------ structure


def transformer_of(model: nn.Module) -> LongCatVideoTransformer:
    """The DiT inside ``model``: the model itself (also with LoRA injected, or sharded by FSDP2, which keep
    its class), or unwrapped from peft's ``PeftModel``, DDP's ``.module`` or torch.compile's ``_orig_mod``."""
    inner = model
    while not isinstance(inner, LongCatVideoTransformer):
        if hasattr(inner, "get_base_model"):
            inner = inner.get_base_model()
        elif isinstance(getattr(inner, "module", None), nn.Module):
            inner = inner.module
        elif isinstance(getattr(inner, "_orig_mod", None), nn.Module):
            inner = inner._orig_mod
        else:
            raise TypeError(f"{type(model).__name__} holds no LongCatVideoTransformer")
    return inner


def block_linears(block: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    """Each linear of ``architecture.BLOCK_LINEARS`` in a block, as (path inside the block, the
    ``nn.Linear`` that computes it): under a LoRA layer, its base layer (``attn.qkv.base_layer``)."""
    for name in BLOCK_LINEARS:
        path, module = name, block.get_submodule(name)
        while not isinstance(module, nn.Linear) and isinstance(
            getattr(module, "base_layer", None), nn.Module
        ):
            path, module = f"{path}.base_layer", module.base_layer
        if not isinstance(module, nn.Linear):
            raise TypeError(
                f"block linear {name} is a {type(module).__name__} without an nn.Linear base layer"
            )
        yield path, module
