"""A LoRA in memory, whatever file it came from: per module, a low-rank update made of row pieces.

Every format in the ecosystem is one of two shapes of the same thing. A peft/diffusers/kohya LoRA gives a
module one down matrix ``A [r, in]`` and one up matrix ``B [out, r]``: ``dW = scale * B @ A``. The official
LongCat-Video files split some modules' output into ``n`` equal row blocks (fused qkv: 3, kv: 2, adaLN: 6,
the final adaLN: 2), each with its own rank-r down slice and up block: ``dW = scale * cat_i(B_i @ A_i)``
over rows, block-diagonal, not a shared A. :class:`LowRankDelta` holds either as ``pieces``: one piece is
the plain LoRA, n pieces the split one. Module paths are the official parameter names without ``.weight``
(``blocks.0.attn.qkv``), the names our DiT uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class LowRankPiece:
    """``up @ down``: ``down [r, in]``, ``up [rows, r]``, the update of ``rows`` consecutive output rows."""

    down: torch.Tensor
    up: torch.Tensor

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass(frozen=True)
class LowRankDelta:
    """One module's update ``scale * cat(piece.up @ piece.down for piece in pieces)`` stacked over output
    rows (one piece: the whole output). ``scale`` is alpha / rank, as each file states it."""

    pieces: tuple[LowRankPiece, ...]
    scale: float

    def __post_init__(self) -> None:
        if not self.pieces:
            raise ValueError("a low-rank delta needs at least one piece")
        inputs = {p.down.shape[1] for p in self.pieces}
        if len(inputs) != 1 or any(p.up.shape[1] != p.down.shape[0] for p in self.pieces):
            shapes = ", ".join(f"down {tuple(p.down.shape)} up {tuple(p.up.shape)}" for p in self.pieces)
            raise ValueError(f"low-rank pieces do not fit together: {shapes}")

    @property
    def in_features(self) -> int:
        return self.pieces[0].down.shape[1]

    @property
    def out_features(self) -> int:
        return sum(p.up.shape[0] for p in self.pieces)

    @property
    def rank(self) -> int:
        """The rank of each piece (the rank a file states)."""
        return self.pieces[0].rank

    def weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense update ``[out, in]`` (for merging and for tests)."""
        rows = [p.up.to(dtype) @ p.down.to(dtype) for p in self.pieces]
        return torch.cat(rows, dim=0) * self.scale


@dataclass
class LowRankSet:
    """A whole LoRA: module path -> its delta, and what the file said about itself."""

    deltas: dict[str, LowRankDelta]
    format: str  # where it came from: "peft", "official", "comfyui", "kohya", "diffsynth", ...
    metadata: dict[str, str] = field(default_factory=dict)

    def scaled(self, strength: float) -> LowRankSet:
        """The same LoRA at ``strength`` times its update."""
        deltas = {name: LowRankDelta(d.pieces, d.scale * strength) for name, d in self.deltas.items()}
        return LowRankSet(deltas, self.format, dict(self.metadata))
