"""The first-block step cache: when it reuses, what a reused call returns, guidance rows, condition
frames, and the setting's way from the flags to the denoising loop."""

from __future__ import annotations

import pytest
import torch

from longcat_data.flags import ConfigError
from longcat_train.config import VideoSettings
from longcat_train.loading import tiny_dit
from longcat_train.sample_config import SampleConfig
from longcat_train.sampling import denoise, generate_videos
from longcat_train.step_cache import StepCache, step_cache


@pytest.fixture(scope="module")
def dit() -> torch.nn.Module:
    return tiny_dit().eval().requires_grad_(False)


def _inputs(batch: int = 2, frames: int = 3, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 16, frames, 4, 6, generator=g),
        timestep=torch.full((batch,), 700.0),
        encoder_hidden_states=torch.randn(batch, 5, 64, generator=g),
        encoder_attention_mask=torch.ones(batch, 5, dtype=torch.long),
        num_cond_latents=1,
    )


def _first_block(dit: torch.nn.Module, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The blocks' input and the first block's output for ``inputs``, through the model's own embedders."""
    seen = {}
    handle = dit.blocks[0].register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    with torch.no_grad():
        dit(**inputs)
    handle.remove()
    return seen["x"], seen["out"]


@torch.no_grad()
def test_a_reused_call_is_the_first_block_plus_the_kept_residual_of_the_rest(dit) -> None:
    first = _inputs(seed=0)
    second = dict(
        first, hidden_states=first["hidden_states"] + 1e-3 * torch.randn_like(first["hidden_states"])
    )
    seen: list[tuple[str, torch.Tensor]] = []
    hooks = [
        dit.blocks[0].register_forward_hook(lambda m, a, out: seen.append(("first", out))),
        dit.blocks[-1].register_forward_hook(lambda m, a, out: seen.append(("last", out))),
        dit.final_layer.register_forward_pre_hook(lambda m, a: seen.append(("blocks_out", a[0]))),
    ]
    full_first = dit(**first)
    seen.clear()
    try:
        with step_cache(dit, 1e9) as cache:
            assert dit(**first).equal(full_first)  # the first call runs every block
            dit(**second)
    finally:
        for hook in hooks:
            hook.remove()
    assert [name for name, _ in seen] == ["first", "last", "blocks_out", "first", "blocks_out"]
    assert cache.reused == [1] and dit.step_cache is None  # the cache is only there for the loop
    (_, first_1), (_, last_1), _, (_, first_2), (_, reused) = seen
    expected = (first_2.float() + (last_1.float() - first_1.float())).to(first_2.dtype)
    assert reused.equal(expected)


@torch.no_grad()
def test_the_same_input_again_gives_the_uncached_output_exactly_in_bf16() -> None:
    dit = tiny_dit().to(torch.bfloat16).eval()
    inputs = _inputs()
    expected = dit(**inputs)
    with step_cache(dit, 1e-6) as cache:
        dit(**inputs)
        again = dit(**inputs)
    assert cache.changes == [None, 0.0] and cache.reused == [1]
    assert again.equal(expected)  # bf16 first block + the fp32 residual of bf16 values rounds back exactly


@torch.no_grad()
def test_guidance_rows_reuse_only_when_every_row_barely_changed(dit) -> None:
    inputs = _inputs(batch=2)
    moved = dict(inputs, hidden_states=inputs["hidden_states"].clone())
    moved["hidden_states"][1, :, 1:] += 0.3  # the conditional row's noisy frames move, the other's not
    x0, b0 = _first_block(dit, **inputs)
    x1, b1 = _first_block(dit, **moved)
    kept, now = (b0 - x0)[:, 6:], (b1 - x1)[:, 6:]
    rows = ((now - kept).abs().mean(dim=(1, 2)) / kept.abs().mean(dim=(1, 2))).tolist()
    threshold = 0.75 * rows[1]  # above the change of both rows pooled, below the moved row's own
    assert rows[0] < 1e-6 and float((now - kept).abs().mean() / kept.abs().mean()) < threshold
    with step_cache(dit, threshold) as cache:
        dit(**inputs)
        out = dit(**moved)
    assert cache.reused == [] and cache.changes[1] == pytest.approx(rows[1], rel=1e-5)
    assert out.equal(dit(**moved))  # computed in full


@torch.no_grad()
def test_the_change_is_measured_on_the_noisy_tokens_against_the_last_full_call(dit) -> None:
    inputs = _inputs(batch=1)
    nudged = dict(inputs, hidden_states=inputs["hidden_states"] + 1e-2)
    with step_cache(dit, 1e9) as cache:
        dit(**inputs)
        dit(**nudged)
        dit(**nudged)
    x0, b0 = _first_block(dit, **inputs)
    x1, b1 = _first_block(dit, **nudged)
    noisy = slice(2 * 3, None)  # one condition latent frame of 2 x 3 tokens
    kept, now = (b0 - x0)[:, noisy], (b1 - x1)[:, noisy]
    change = float((now - kept).abs().mean() / kept.abs().mean())
    # Both reused calls compare with the first (the only full) call: changes cannot creep past it.
    assert cache.changes[0] is None
    assert cache.changes[1] == pytest.approx(change, rel=1e-5) == cache.changes[2]


@torch.no_grad()
def test_other_condition_frames_or_shapes_run_every_block(dit) -> None:
    inputs = _inputs()
    with step_cache(dit, 1e9) as cache:
        dit(**inputs)
        dit(**dict(inputs, num_cond_latents=2))
        dit(**_inputs(batch=1))
    assert cache.changes == [None, None, None] and cache.reused == []


def test_one_cache_per_model_at_a_time(dit) -> None:
    with step_cache(dit, 0.1), pytest.raises(RuntimeError, match="already"):
        with step_cache(dit, 0.1):
            pass
    with step_cache(dit, 0.0) as off:
        assert off is None and dit.step_cache is None


def test_denoise_with_the_cache_off_or_never_reusing_is_the_plain_loop(dit) -> None:
    g = torch.Generator().manual_seed(3)
    cond = torch.randn(1, 16, 1, 4, 6, generator=g)
    prompt, negative = [torch.randn(4, 64, generator=g)], torch.randn(1, 64, generator=g)
    args = dict(frames=9, steps=6, seeds=[0], progress=False)
    plain = denoise(dit, cond, prompt, negative, **args)
    assert denoise(dit, cond, prompt, negative, step_cache=1e-30, **args).equal(plain)
    cached = denoise(dit, cond, prompt, negative, step_cache=1e9, **args)
    assert not cached.equal(plain)  # every call after the first reused the later block
    assert cached[:, :, :1].equal(cond)  # the condition frame stays the start image


def test_the_setting_goes_from_the_flag_to_the_loop(tiny: dict, make_image, monkeypatch) -> None:
    assert SampleConfig(model="tiny", step_cache=0.1).video_settings.step_cache == 0.1
    assert VideoSettings().step_cache == 0.0  # off by default
    with pytest.raises(ConfigError, match="step_cache"):
        from longcat_data.flags import check_config

        check_config(SampleConfig(model="tiny", step_cache=-1.0))
    seen: list[StepCache] = []
    real = StepCache.run_blocks

    def spy(self, *args, **kwargs):
        seen.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(StepCache, "run_blocks", spy)
    settings = VideoSettings(frames=5, steps=3, area=(64, 64), step_cache=0.2)
    generate_videos(
        tiny["model"], tiny["vae"], make_image(64, 64), [tiny["prompt"]], tiny["negative"], settings
    )
    assert len(seen) == 3 and len({id(c) for c in seen}) == 1  # one cache for the video's loop


@pytest.mark.gpu
def test_the_cache_runs_around_compiled_float8_blocks_on_the_gpu() -> None:
    from longcat_train.techniques import apply_fast_paths

    g = torch.Generator().manual_seed(0)
    cond = torch.randn(1, 16, 1, 8, 8, generator=g)
    prompt, negative = [torch.randn(6, 64, generator=g)], torch.randn(1, 64, generator=g)
    args = dict(frames=17, steps=8, seeds=[0], progress=False)
    eager = tiny_dit().to("cuda", torch.bfloat16).eval().requires_grad_(False)
    fast = tiny_dit().to("cuda", torch.bfloat16).eval().requires_grad_(False)
    apply_fast_paths(fast, torch.device("cuda"), fp8_matmuls=True, compile=True)
    for threshold in (0.0, 1e9):
        want = denoise(eager, cond, prompt, negative, step_cache=threshold, **args)
        got = denoise(fast, cond, prompt, negative, step_cache=threshold, **args)
        error = float((got - want).norm() / want.norm())
        assert torch.isfinite(got).all() and error < 0.05, (threshold, error)
