import pytest
import torch

from longcat_train.lowrank import LowRankDelta, LowRankPiece, LowRankSet


def test_one_piece_is_a_plain_lora_and_n_pieces_are_block_diagonal() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 6, generator=g), torch.randn(9, 4, generator=g)
    plain = LowRankDelta((LowRankPiece(a, b),), scale=0.5)
    assert torch.allclose(plain.weight(), 0.5 * b @ a)
    downs = [torch.randn(2, 6, generator=g) for _ in range(3)]
    ups = [torch.randn(3, 2, generator=g) for _ in range(3)]
    split = LowRankDelta(tuple(LowRankPiece(d, u) for d, u in zip(downs, ups, strict=True)), scale=2.0)
    # The same update as one rank-6 LoRA whose up matrix is block-diagonal over the row blocks.
    up = torch.block_diag(*ups)
    assert torch.allclose(split.weight(), 2.0 * up @ torch.cat(downs))
    assert (split.in_features, split.out_features, split.rank) == (6, 9, 2)


def test_pieces_that_do_not_fit_are_refused_and_strength_scales() -> None:
    with pytest.raises(ValueError, match="do not fit"):
        LowRankDelta(
            (
                LowRankPiece(torch.zeros(2, 6), torch.zeros(3, 2)),
                LowRankPiece(torch.zeros(2, 5), torch.zeros(3, 2)),
            ),
            1.0,
        )
    lora = LowRankSet(
        {"blocks.0.ffn.w1": LowRankDelta((LowRankPiece(torch.ones(1, 2), torch.ones(2, 1)),), 1.0)}, "peft"
    )
    assert torch.equal(lora.scaled(-0.5).deltas["blocks.0.ffn.w1"].weight(), torch.full((2, 2), -0.5))
