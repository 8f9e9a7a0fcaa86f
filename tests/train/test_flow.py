import pytest
import torch

from longcat_train import flow


def test_shift_maps_endpoints_and_pushes_towards_noise():
    s = torch.tensor([0.0, 0.25, 0.5, 1.0])
    out = flow.shift_sigmas(s, 12.0)
    assert out[0] == 0 and out[-1] == 1
    assert torch.allclose(out[2], torch.tensor(12 * 0.5 / (1 + 11 * 0.5)))
    assert (out[1:3] > s[1:3]).all()
    assert torch.equal(flow.shift_sigmas(s, 1.0), s)


@pytest.mark.parametrize("mode", ["logit_normal", "uniform"])
def test_sample_sigmas_range_and_determinism(mode):
    a = flow.sample_sigmas(1000, mode=mode, shift=1.0, generator=torch.Generator().manual_seed(0))
    b = flow.sample_sigmas(1000, mode=mode, shift=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert a.shape == (1000,) and (a > 0).all() and (a < 1).all()
    assert abs(a.mean().item() - 0.5) < 0.05


def test_logit_normal_concentrates_mid_and_shift_raises_mean():
    g = torch.Generator().manual_seed(0)
    ln = flow.sample_sigmas(20000, mode="logit_normal", shift=1.0, generator=g)
    un = flow.sample_sigmas(20000, mode="uniform", shift=1.0, generator=g)
    assert ln.std() < un.std()
    shifted = flow.sample_sigmas(20000, shift=12.0, generator=torch.Generator().manual_seed(0))
    assert shifted.mean() > 0.8


def test_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match="sampling mode"):
        flow.sample_sigmas(2, mode="beta")


def test_noising_endpoints():
    x0, eps = torch.randn(2, 16, 3, 4, 4), torch.randn(2, 16, 3, 4, 4)
    assert torch.equal(flow.add_noise(x0, eps, torch.zeros(2)), x0)
    assert torch.equal(flow.add_noise(x0, eps, torch.ones(2)), eps)
    mixed = flow.add_noise(x0, eps, torch.tensor([0.0, 1.0]))
    assert torch.equal(mixed[0], x0[0]) and torch.equal(mixed[1], eps[1])


def test_target_sign_perfect_prediction_has_zero_loss():
    """The DiT outputs x0 - eps: a model that returns exactly that has zero loss, its negation does not."""
    x0 = torch.randn(2, 16, 5, 4, 6)
    cond = x0[:, :, :1].clone()
    g = torch.Generator().manual_seed(1)
    x_t, timestep, target, n_cond = flow.noisy_inputs(x0, cond, generator=g)
    # Recover eps from x_t on the noisy frames, as an oracle model would: eps = (x_t - (1-s) x0) / s.
    s = (timestep / 1000).view(-1, 1, 1, 1, 1)
    eps = (x_t - (1 - s) * x0) / s
    oracle = x0 - eps
    assert n_cond == 1
    assert flow.flow_loss(oracle, target, n_cond).item() < 1e-8
    assert flow.flow_loss(-oracle, target, n_cond).item() > 1.0


def test_condition_frame_replaced_and_excluded_from_loss():
    x0 = torch.randn(1, 16, 4, 2, 2)
    cond = torch.full((1, 16, 1, 2, 2), 7.0)
    x_t, _, target, n_cond = flow.noisy_inputs(x0, cond, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x_t[:, :, 0], cond[:, :, 0])
    pred = target.clone()
    pred[:, :, 0] += 1000.0  # anything on the condition frame must not count
    assert flow.flow_loss(pred, target, n_cond).item() == 0.0
    assert flow.flow_loss(pred, target, 0).item() > 0.0


def test_t2v_noises_every_frame():
    x0 = torch.zeros(1, 16, 3, 2, 2)
    x_t, _, _, n_cond = flow.noisy_inputs(x0, None, generator=torch.Generator().manual_seed(0))
    assert n_cond == 0 and (x_t[:, :, 0] != 0).any()


def test_loss_needs_a_noisy_frame():
    with pytest.raises(ValueError, match="no noisy frame"):
        flow.flow_loss(torch.zeros(1, 16, 1, 2, 2), torch.zeros(1, 16, 1, 2, 2), 1)


def test_caption_dropout():
    embeds = torch.ones(4, 3, 8)
    mask = torch.ones(4, 3, dtype=torch.long)
    empty = torch.full((5, 8), 2.0)
    same = flow.drop_captions(embeds, mask, empty, 0.0)
    assert same[0] is embeds
    all_e, all_m = flow.drop_captions(embeds, mask, empty, 1.0, torch.Generator().manual_seed(0))
    assert all_e.shape == (4, 5, 8) and torch.equal(all_e, empty.expand(4, 5, 8))
    assert all_m.sum().item() == 4 * 5
    embeds, mask = torch.ones(64, 3, 8), torch.ones(64, 3, dtype=torch.long)
    some_e, some_m = flow.drop_captions(embeds, mask, empty, 0.5, torch.Generator().manual_seed(0))
    dropped = some_m.sum(1) == 5
    assert 16 < dropped.sum() < 48
    kept = ~dropped
    assert torch.equal(some_e[kept, :3], embeds[kept]) and (some_e[kept, 3:] == 0).all()
