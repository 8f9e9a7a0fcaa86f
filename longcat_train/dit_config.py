"""The DiT's hyper-parameters and its official ``dit/config.json``, without torch.

:class:`DiTConfig` is what ``model.LongCatVideoTransformer`` is built from; it reads and writes the
official config.json (``from_dict`` / ``to_dict``), keeping the official keys that do not change the
computation so a saved folder still loads in the official code. Reading one needs no torch.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any

from longcat_train.architecture import OFFICIAL_CLASS_NAME

log = logging.getLogger(__name__)

# Official config keys that select kernels or multi-GPU layout in the official code. They do not change
# what the model computes; we keep them so a saved config.json still loads in the official code.
_OFFICIAL_RUNTIME_KEYS = frozenset(
    {"enable_flashattn3", "enable_flashattn2", "enable_xformers", "enable_bsa", "bsa_params", "cp_split_hw"}
)
# Our runtime settings, written into config.json by earlier versions: now attributes of the model
# (LongCatVideoTransformer.attention_implementation, .block_sparse_params), not read from the file.
_OUR_RUNTIME_KEYS = frozenset({"attention_implementation", "block_sparse_params"})


@dataclass
class DiTConfig:
    """Hyper-parameters of the DiT. Field names follow the official ``dit/config.json``."""

    hidden_size: int = 4096
    depth: int = 48
    num_heads: int = 32
    in_channels: int = 16
    out_channels: int = 16
    caption_channels: int = 4096
    mlp_ratio: float = 4
    adaln_tembed_dim: int = 512
    frequency_embedding_size: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    # Official: padded text positions are zeroed after the caption embedder and still attended to.
    text_tokens_zero_pad: bool = True
    # Length the official pipeline pads every prompt to (tokenizer max_length).
    text_max_length: int = 512
    # Official keys read from a config.json that do not affect the computation, written back on save.
    official_extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.patch_size = tuple(self.patch_size)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 8:
            raise ValueError(f"head dim {self.head_dim} must be a multiple of 8 for the 3D RoPE split")
        if len(self.patch_size) != 3 or self.patch_size[0] != 1:
            # Timesteps and modulation are per latent frame, so patches must not merge frames.
            raise ValueError(f"patch_size must be (1, ph, pw), got {self.patch_size}")
        if self.frequency_embedding_size % 2:
            raise ValueError("frequency_embedding_size must be even (cos and sin halves)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn_hidden_size(self) -> int:
        """SwiGLU width: 2/3 of ``mlp_ratio * hidden``, rounded up to a multiple of 256 (11008 for full)."""
        hidden = int(2 * int(self.hidden_size * self.mlp_ratio) / 3)
        return 256 * math.ceil(hidden / 256)

    @classmethod
    def full(cls) -> DiTConfig:
        """The released 13.6B model."""
        return cls()

    @classmethod
    def tiny(cls) -> DiTConfig:
        """A few-hundred-thousand-parameter model with the same structure, for tests and ``--model tiny``."""
        return cls(hidden_size=128, depth=2, num_heads=2, caption_channels=64, adaln_tembed_dim=64)

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> DiTConfig:
        """Read an official ``dit/config.json`` (or one written by :meth:`to_dict`)."""
        known = {f.name for f in dataclasses.fields(cls)} - {"official_extras"}
        kwargs = {k: v for k, v in config.items() if k in known}
        ours = sorted(k for k in config if k in _OUR_RUNTIME_KEYS)
        if ours:
            log.info(
                "DiT config: %s from an earlier save not read; they are runtime settings of the model now "
                "(model.attention_implementation, model.block_sparse_params)",
                ", ".join(f"{k}={config[k]}" for k in ours),
            )
        # _class_name is always written by to_dict; other keys the model does not use are kept for it.
        skipped = {"_class_name", *_OUR_RUNTIME_KEYS}
        extras = {k: v for k, v in config.items() if k not in known and k not in skipped}
        unknown = sorted(k for k in extras if k not in _OFFICIAL_RUNTIME_KEYS and not k.startswith("_"))
        if unknown:
            log.warning("DiT config: unknown keys kept but unused: %s", ", ".join(unknown))
        runtime = sorted(k for k in extras if k in _OFFICIAL_RUNTIME_KEYS)
        if runtime:
            log.info(
                "DiT config: official runtime keys recorded, not used (%s); the attention kernel is the "
                "model's attention_implementation",
                ", ".join(f"{k}={extras[k]}" for k in runtime),
            )
        return cls(**kwargs, official_extras=extras)

    def to_dict(self) -> dict[str, Any]:
        """A config.json the official ``LongCatVideoTransformer3DModel`` and :meth:`from_dict` both read."""
        out: dict[str, Any] = {"_class_name": OFFICIAL_CLASS_NAME, **self.official_extras}
        for f in dataclasses.fields(self):
            if f.name == "official_extras":
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @property
    def official_block_sparse_params(self) -> dict[str, Any] | None:
        """Keyword arguments for ``longcat_kernels.block_sparse_attention`` (density, block) that the
        official ``bsa_params`` of this config ask for; None when it has none (the kernel's defaults)."""
        bsa = self.official_extras.get("bsa_params")
        if not bsa:
            return None
        # Official: drop `sparsity` of the key blocks per query block, blocks of chunk_3d_shape tokens.
        return {"density": 1.0 - bsa["sparsity"], "block": tuple(bsa["chunk_3d_shape_k"])}
