"""Exact reshapings of a :class:`LowRankDelta` between the shapes the file formats can hold.

A format holds either one down/up pair per module (peft, kohya, ComfyUI) or n row pieces (the official
split). Every function here changes the pieces, never the update ``delta.weight()``: tensors are copied,
sliced, concatenated or padded with zeros, no arithmetic, except :func:`rescaled` (one multiplication).
"""

from __future__ import annotations

import torch

from longcat_train.lowrank import LowRankDelta, LowRankPiece


def shares_down(delta: LowRankDelta) -> bool:
    """Whether every piece has the same down matrix (a plain LoRA cut into row blocks)."""
    first = delta.pieces[0].down
    return all(p.down.shape == first.shape and torch.equal(p.down, first) for p in delta.pieces[1:])


def one_piece(delta: LowRankDelta) -> LowRankDelta:
    """The same update as a single down/up pair: a shared down with the ups stacked, else the downs
    stacked ``[sum r_i, in]`` with a block-diagonal up ``[out, sum r_i]``."""
    if len(delta.pieces) == 1:
        return delta
    if shares_down(delta):
        up = torch.cat([p.up for p in delta.pieces])
        return LowRankDelta((LowRankPiece(delta.pieces[0].down, up),), delta.scale)
    down = torch.cat([p.down for p in delta.pieces])
    up = torch.block_diag(*(p.up for p in delta.pieces)).to(delta.pieces[0].up.dtype)
    return LowRankDelta((LowRankPiece(down, up),), delta.scale)


def merge_shared_down(delta: LowRankDelta) -> LowRankDelta:
    """Pieces that all share one down matrix become one pair; any other delta is returned as it is."""
    return one_piece(delta) if len(delta.pieces) > 1 and shares_down(delta) else delta


def row_parts(delta: LowRankDelta, parts: int) -> list[LowRankPiece]:
    """``parts`` pieces covering equal row blocks of the output, in row order: the delta's own pieces
    when they are those blocks, else row slices of the one-pair form's up (all with its down)."""
    rows = delta.out_features // parts
    if delta.out_features % parts:
        raise ValueError(f"{delta.out_features} output rows do not split into {parts} equal blocks")
    if len(delta.pieces) == parts and all(p.up.shape[0] == rows for p in delta.pieces):
        return list(delta.pieces)
    whole = one_piece(delta).pieces[0]
    return [LowRankPiece(whole.down, whole.up[i * rows : (i + 1) * rows]) for i in range(parts)]


def split_block_diagonal(delta: LowRankDelta, parts: int) -> LowRankDelta:
    """A one-pair delta whose up matrix is block-diagonal over ``parts`` row blocks (what :func:`one_piece`
    makes of split pieces) back to those pieces; any other delta is returned as it is. A zero diagonal
    block does not count (an untrained up matrix is all zeros, not a split)."""
    if len(delta.pieces) != 1 or parts < 2:
        return delta
    down, up = delta.pieces[0].down, delta.pieces[0].up
    if down.shape[0] % parts or up.shape[0] % parts:
        return delta
    rank, rows = down.shape[0] // parts, up.shape[0] // parts
    nonzero = up.reshape(parts, rows, parts, rank).ne(0).any(dim=3).any(dim=1)  # [row block, rank block]
    if not torch.equal(nonzero, torch.eye(parts, dtype=torch.bool)):
        return delta
    pieces = tuple(
        LowRankPiece(
            down[i * rank : (i + 1) * rank], up[i * rows : (i + 1) * rows, i * rank : (i + 1) * rank]
        )
        for i in range(parts)
    )
    return LowRankDelta(pieces, delta.scale)


def padded(piece: LowRankPiece, rank: int) -> LowRankPiece:
    """The piece at a higher ``rank``: zero rows under down, zero columns beside up (the same product)."""
    extra = rank - piece.rank
    if extra < 0:
        raise ValueError(f"cannot pad a rank-{piece.rank} piece down to rank {rank}")
    if extra == 0:
        return piece
    down = torch.cat([piece.down, piece.down.new_zeros(extra, piece.down.shape[1])])
    up = torch.cat([piece.up, piece.up.new_zeros(piece.up.shape[0], extra)], dim=1)
    return LowRankPiece(down, up)


def rescaled(piece: LowRankPiece, factor: float) -> LowRankPiece:
    """The piece with ``factor`` folded into its up matrix (computed in fp32, kept in fp32)."""
    return piece if factor == 1.0 else LowRankPiece(piece.down, piece.up.float() * factor)
