"""The DiT on CPU with the tiny config: layout, I2V semantics, RoPE, text padding, checkpointing."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable

import pytest
import torch
from functorch.compile import make_boxed_func
from torch.utils._python_dispatch import TorchDispatchMode

from longcat_train.architecture import CHECKPOINT_MODES
from longcat_train.attention import _xformers_attention, attention
from longcat_train.block_step import MATMUL_OPS, MIN_KEPT_CONTRACTION
from longcat_train.dit_config import DiTConfig
from longcat_train.loading import tiny_dit
from longcat_train.model import LongCatVideoTransformer, apply_rope, rope_split, rope_tables

# The official checkpoint layout of the full model, from the official module structure: name -> shape.
OFFICIAL_TOP_LEVEL = {
    "x_embedder.proj.weight": (4096, 16, 1, 2, 2),
    "x_embedder.proj.bias": (4096,),
    "t_embedder.mlp.0.weight": (512, 256),
    "t_embedder.mlp.0.bias": (512,),
    "t_embedder.mlp.2.weight": (512, 512),
    "t_embedder.mlp.2.bias": (512,),
    "y_embedder.y_proj.0.weight": (4096, 4096),
    "y_embedder.y_proj.0.bias": (4096,),
    "y_embedder.y_proj.2.weight": (4096, 4096),
    "y_embedder.y_proj.2.bias": (4096,),
    "final_layer.linear.weight": (64, 4096),
    "final_layer.linear.bias": (64,),
    "final_layer.adaLN_modulation.1.weight": (8192, 512),
    "final_layer.adaLN_modulation.1.bias": (8192,),
}
OFFICIAL_BLOCK = {
    "adaLN_modulation.1.weight": (24576, 512),
    "adaLN_modulation.1.bias": (24576,),
    "pre_crs_attn_norm.weight": (4096,),
    "pre_crs_attn_norm.bias": (4096,),
    "attn.qkv.weight": (12288, 4096),
    "attn.qkv.bias": (12288,),
    "attn.q_norm.weight": (128,),
    "attn.k_norm.weight": (128,),
    "attn.proj.weight": (4096, 4096),
    "attn.proj.bias": (4096,),
    "cross_attn.q_linear.weight": (4096, 4096),
    "cross_attn.q_linear.bias": (4096,),
    "cross_attn.kv_linear.weight": (8192, 4096),
    "cross_attn.kv_linear.bias": (8192,),
    "cross_attn.proj.weight": (4096, 4096),
    "cross_attn.proj.bias": (4096,),
    "cross_attn.q_norm.weight": (128,),
    "cross_attn.k_norm.weight": (128,),
    "ffn.w1.weight": (11008, 4096),
    "ffn.w2.weight": (4096, 11008),
    "ffn.w3.weight": (11008, 4096),
}
OFFICIAL_DEPTH = 48

# The published dit/config.json.
OFFICIAL_CONFIG = {
    "_class_name": "LongCatVideoTransformer3DModel",
    "_diffusers_version": "0.35.1",
    "adaln_tembed_dim": 512,
    "bsa_params": {
        "chunk_3d_shape_k": [4, 4, 4],
        "chunk_3d_shape_q": [4, 4, 4],
        "sparsity": 0.9375,
        "cdf_threshold": None,
    },
    "caption_channels": 4096,
    "cp_split_hw": None,
    "depth": 48,
    "enable_bsa": False,
    "enable_flashattn2": True,
    "enable_flashattn3": False,
    "enable_xformers": False,
    "frequency_embedding_size": 256,
    "hidden_size": 4096,
    "in_channels": 16,
    "mlp_ratio": 4,
    "num_heads": 32,
    "out_channels": 16,
    "patch_size": [1, 2, 2],
    "text_tokens_zero_pad": True,
}


@pytest.fixture
def model() -> LongCatVideoTransformer:
    return tiny_dit().eval()


def _inputs(frames: int = 3, batch: int = 2, text_len: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 16, frames, 4, 6, generator=g),
        timestep=torch.tensor([800.0, 300.0])[:batch],
        encoder_hidden_states=torch.randn(batch, text_len, 64, generator=g),
    )


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return torch.allclose(a, b, rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------ layout and config


def test_full_model_on_meta_has_the_official_layout() -> None:
    with torch.device("meta"):
        dit = LongCatVideoTransformer(DiTConfig.full())
    expected = dict(OFFICIAL_TOP_LEVEL)
    for i in range(OFFICIAL_DEPTH):
        expected.update({f"blocks.{i}.{name}": shape for name, shape in OFFICIAL_BLOCK.items()})
    actual = {name: tuple(t.shape) for name, t in dit.state_dict().items()}
    assert actual == expected
    assert list(dit.buffers()) == []
    parameters = sum(p.numel() for p in dit.parameters())
    assert parameters == 13_581_071_424
    assert round(parameters / 1e9, 1) == 13.6


def test_config_reads_the_official_config_json(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="longcat_train.dit_config"):
        config = DiTConfig.from_dict(OFFICIAL_CONFIG)
    full = DiTConfig.full()
    assert (config.hidden_size, config.depth, config.num_heads, config.ffn_hidden_size) == (
        4096,
        48,
        32,
        11008,
    )
    assert config.patch_size == (1, 2, 2) and config.text_tokens_zero_pad
    with torch.device("meta"):
        dit, full_dit = LongCatVideoTransformer(config), LongCatVideoTransformer(full)
    assert dit.attention_implementation == full_dit.attention_implementation == "sdpa"
    assert dit.block_sparse_params == {"density": 0.0625, "block": (4, 4, 4)}
    assert config.official_extras["enable_flashattn2"] is True
    assert "enable_flashattn2=True" in caplog.text  # the ignored runtime keys are reported
    # What we write back still carries every official key, and reads back to the same config.
    written = config.to_dict()
    assert {k: written[k] for k in OFFICIAL_CONFIG} == OFFICIAL_CONFIG
    assert DiTConfig.from_dict(written) == config


def test_config_rejects_bad_values(model: LongCatVideoTransformer) -> None:
    with pytest.raises(ValueError, match="attention_implementation"):
        model.attention_implementation = "flash3"
    with pytest.raises(ValueError, match="patch_size"):
        DiTConfig(patch_size=(2, 2, 2))


# ------------------------------------------------------------------------------------ image-to-video


def test_condition_frames_ignore_noisy_frames_text_and_noise_level(model: LongCatVideoTransformer) -> None:
    x = _inputs()
    with torch.no_grad():
        base = model(**x, num_cond_latents=1)
        other_noise = model(
            **(
                x
                | {"hidden_states": torch.cat([x["hidden_states"][:, :, :1], torch.randn(2, 16, 2, 4, 6)], 2)}
            ),
            num_cond_latents=1,
        )
        other_text = model(**(x | {"encoder_hidden_states": torch.randn(2, 11, 64)}), num_cond_latents=1)
        other_time = model(**(x | {"timestep": torch.tensor([10.0, 990.0])}), num_cond_latents=1)
    for changed in (other_noise, other_text, other_time):
        assert _close(changed[:, :, :1], base[:, :, :1], 1e-6)
        assert not _close(changed[:, :, 1:], base[:, :, 1:], 1e-3)


def test_noisy_frames_depend_on_the_condition(model: LongCatVideoTransformer) -> None:
    x = _inputs()
    new_cond = x["hidden_states"].clone()
    new_cond[:, :, :1] = torch.randn(2, 16, 1, 4, 6)
    with torch.no_grad():
        base = model(**x, num_cond_latents=1)
        changed = model(**(x | {"hidden_states": new_cond}), num_cond_latents=1)
        # Without conditioning, frame 0 is a noisy frame like the others and sees the rest of the video.
        t2v = model(**x)
        t2v_changed = model(
            **(
                x
                | {"hidden_states": torch.cat([x["hidden_states"][:, :, :1], torch.randn(2, 16, 2, 4, 6)], 2)}
            )
        )
    assert not _close(changed[:, :, 1:], base[:, :, 1:], 1e-3)
    assert not _close(t2v[:, :, :1], t2v_changed[:, :, :1], 1e-3)


def test_condition_timestep_is_zero(model: LongCatVideoTransformer) -> None:
    frame_t = model._frame_timesteps(torch.tensor([500.0, 20.0]), 2, 4, num_cond_latents=1)
    assert frame_t.tolist() == [[0.0, 500.0, 500.0, 500.0], [0.0, 20.0, 20.0, 20.0]]
    x = _inputs()
    per_frame = x["timestep"][:, None].repeat(1, 3)
    per_frame[:, 0] = 123.0  # whatever the caller puts on the condition frame is overridden
    with torch.no_grad():
        scalar = model(**x, num_cond_latents=1)
        framewise = model(**(x | {"timestep": per_frame}), num_cond_latents=1)
        explicit_zero = model(
            **(x | {"timestep": per_frame.index_fill(1, torch.tensor([0]), 0.0)}), num_cond_latents=1
        )
    assert torch.equal(scalar, framewise) and torch.equal(scalar, explicit_zero)


def test_forward_validates_inputs(model: LongCatVideoTransformer) -> None:
    x = _inputs()
    with pytest.raises(ValueError, match="num_cond_latents"):
        model(**x, num_cond_latents=3)
    with pytest.raises(ValueError, match="timestep"):
        model(**(x | {"timestep": torch.zeros(2, 5)}))
    with pytest.raises(ValueError, match="divisible"):
        model(**(x | {"hidden_states": torch.randn(2, 16, 3, 5, 6)}))


# ------------------------------------------------------------------------------------ RoPE


def test_rope_split_and_interleaved_layout() -> None:
    assert rope_split(128) == (44, 42, 42)
    assert rope_split(64) == (24, 20, 20)
    cos, sin = rope_tables((3, 4, 5), 128, "cpu")
    assert cos.shape == sin.shape == (60, 1, 128)
    assert torch.equal(cos[..., 0::2], cos[..., 1::2])  # one angle per adjacent channel pair
    assert torch.equal(sin[..., 0::2], -sin[..., 1::2])
    grid = cos.view(3, 4, 5, 128)
    # Moving along one axis changes only that axis's channels: t -> [0, 44), h -> [44, 86), w -> [86, 128).
    for axis, (lo, hi) in enumerate([(0, 44), (44, 86), (86, 128)]):
        step = grid.narrow(axis, 1, 1) != grid.narrow(axis, 0, 1)
        changed = step.flatten(0, 2).any(0).nonzero().flatten()
        assert changed.min() == lo and changed.max() < hi


def test_rope_scores_depend_only_on_relative_position() -> None:
    shape, head_dim = (3, 4, 5), 64
    g = torch.Generator().manual_seed(0)
    n = 3 * 4 * 5
    q = torch.randn(1, 1, 1, head_dim, generator=g, dtype=torch.float64).expand(1, n, 1, head_dim)
    k = torch.randn(1, 1, 1, head_dim, generator=g, dtype=torch.float64).expand(1, n, 1, head_dim)
    rope = tuple(t.double() for t in rope_tables(shape, head_dim, "cpu"))
    scores = apply_rope(q, rope)[0, :, 0] @ apply_rope(k, rope)[0, :, 0].T  # [N, N]
    pos = torch.stack(torch.meshgrid(*(torch.arange(s) for s in shape), indexing="ij"), -1).view(n, 3)

    def flat(p: torch.Tensor) -> torch.Tensor:
        return (p[..., 0] * 4 + p[..., 1]) * 5 + p[..., 2]

    shift = torch.tensor([1, 1, 1])
    inside = (pos + shift < torch.tensor(shape)).all(-1)
    i = pos[inside]
    # every (query, key) pair moved together by the same shift keeps its score
    moved = scores[flat(i + shift)][:, flat(i + shift)]
    assert torch.allclose(moved, scores[flat(i)][:, flat(i)], atol=1e-10)
    assert scores.std() > 0.1  # and the score does vary with the displacement


# ------------------------------------------------------------------------------------ text padding


def test_masked_mode_is_invariant_to_padding(model: LongCatVideoTransformer) -> None:
    model.config.text_tokens_zero_pad = False
    x = _inputs(text_len=5)
    text = x["encoder_hidden_states"]
    padded = torch.cat([text, torch.randn(2, 9, 64)], dim=1)  # garbage in the padded slots
    mask = torch.zeros(2, 14, dtype=torch.long)
    mask[:, :5] = 1
    with torch.no_grad():
        unpadded_out = model(**x, num_cond_latents=1)
        padded_out = model(
            **(x | {"encoder_hidden_states": padded}), encoder_attention_mask=mask, num_cond_latents=1
        )
        # Sample 1 with only 3 real tokens in a batch whose longest prompt has 5.
        mask[1, 3:] = 0
        ragged = model(
            **(x | {"encoder_hidden_states": padded}), encoder_attention_mask=mask, num_cond_latents=1
        )
        alone = model(
            **(
                x
                | {
                    "hidden_states": x["hidden_states"][1:],
                    "timestep": x["timestep"][1:],
                    "encoder_hidden_states": text[1:, :3],
                }
            ),
            num_cond_latents=1,
        )
    assert _close(padded_out, unpadded_out)
    assert _close(ragged[1:], alone) and _close(ragged[:1], unpadded_out[:1])


def test_zero_pad_mode_matches_the_official_max_length_padding(model: LongCatVideoTransformer) -> None:
    max_length = model.config.text_max_length
    x = _inputs(text_len=5)
    official_like = torch.randn(2, max_length, 64)  # the pipeline's 512 positions, garbage past the prompt
    official_like[:, :5] = x["encoder_hidden_states"]
    mask = torch.zeros(2, max_length, dtype=torch.long)
    mask[:, :5] = 1
    with torch.no_grad():
        unpadded = model(**x, num_cond_latents=1)
        padded = model(
            **(x | {"encoder_hidden_states": official_like}), encoder_attention_mask=mask, num_cond_latents=1
        )
        # Materialised by hand: zero embeddings after the caption embedder at every padded position.
        by_hand = _zero_pad_reference(model, x, max_length)
        model.config.text_tokens_zero_pad = False
        masked = model(**x, num_cond_latents=1)
    assert _close(unpadded, padded) and _close(unpadded, by_hand)
    assert not _close(unpadded, masked, 1e-3)  # the zero-padded keys do take attention weight


def _zero_pad_reference(
    model: LongCatVideoTransformer, x: dict[str, torch.Tensor], max_length: int
) -> torch.Tensor:
    real = model.y_embedder(x["encoder_hidden_states"])
    text = torch.cat([real, torch.zeros(2, max_length - real.shape[1], real.shape[2])], dim=1)
    original = model.y_embedder.forward
    model.y_embedder.forward = lambda y: text  # hand the blocks the materialised sequence
    model.config.text_tokens_zero_pad = False
    try:
        return model(**(x | {"encoder_hidden_states": torch.zeros(2, max_length, 64)}), num_cond_latents=1)
    finally:
        model.y_embedder.forward = original
        model.config.text_tokens_zero_pad = True


def test_zero_pad_mode_rejects_too_many_tokens(model: LongCatVideoTransformer) -> None:
    x = _inputs(text_len=model.config.text_max_length + 1)
    with pytest.raises(ValueError, match="text_max_length"):
        model(**x)


# ------------------------------------------------------------------------------------ checkpointing


class _CountRecomputable(TorchDispatchMode):
    """Attention forwards, and matmuls (block_step.MATMUL_OPS) that contract over at least
    MIN_KEPT_CONTRACTION channels: a backward runs the latter for its gradients too."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = 0
        self.matmuls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = str(func)
        if "scaled_dot_product" in name and "backward" not in name:
            self.attention += 1
        left = MATMUL_OPS.get(name)
        if left is not None and args[left].shape[-1] >= MIN_KEPT_CONTRACTION:
            self.matmuls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("zero_pad", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(zero_pad: bool) -> None:
    model = tiny_dit().train()
    model.config.text_tokens_zero_pad = zero_pad
    x = _inputs()
    gradients, recomputed, matmuls = {}, {}, {}
    for mode in ("none", "elementwise", "full", "selective"):
        model.gradient_checkpointing = mode
        model.zero_grad()
        latents = x["hidden_states"].clone().requires_grad_()
        out = model(**(x | {"hidden_states": latents}), num_cond_latents=1)
        counter = _CountRecomputable()
        with counter:
            out.square().mean().backward()
        recomputed[mode], matmuls[mode] = counter.attention, counter.matmuls
        gradients[mode] = [latents.grad] + [p.grad for p in model.parameters()]
    for mode in ("elementwise", "full", "selective"):
        assert all(_close(a, b, 1e-6) for a, b in zip(gradients[mode], gradients["none"], strict=True))
    depth = model.config.depth
    # full recomputes both self-attention calls (condition, noisy) and the cross-attention per block;
    # selective keeps self-attention. Zero-padded text has more keys (512) than this tiny video has
    # tokens, so that cross-attention counts as kept too (cheap either way).
    assert recomputed == {
        "none": 0,
        "elementwise": 0,
        "full": 3 * depth,
        "selective": 0 if zero_pad else depth,
    }
    # elementwise runs the gradients' matmuls and no forward one; selective and full recompute the forward's
    assert matmuls["elementwise"] == matmuls["none"] < matmuls["selective"] == matmuls["full"]


def _loss_and_gradients(
    model: LongCatVideoTransformer, x: dict, backward_mode: TorchDispatchMode | None = None
) -> list[torch.Tensor]:
    model.zero_grad()
    latents = x["hidden_states"].clone().requires_grad_()
    loss = model(**(x | {"hidden_states": latents}), num_cond_latents=1).square().mean()
    with backward_mode or contextlib.nullcontext():
        loss.backward()
    return [loss.detach(), latents.grad] + [p.grad for p in model.parameters()]


@pytest.mark.parametrize(
    "modes",
    [
        ("none", "selective", "full", "none"),
        ("full", "none", "none", "selective"),
        ("selective", "selective", "full", "full"),
        ("elementwise", "elementwise", "selective", "full"),
    ],
)
def test_per_block_checkpointing_is_bit_identical_to_none(modes: tuple[str, ...]) -> None:
    """A memory plan's mix of modes, one per block, changes what is kept, never a bit of the result."""
    torch.manual_seed(0)
    model = LongCatVideoTransformer(DiTConfig(**{**DiTConfig.tiny().__dict__, "depth": 4})).train()
    x = _inputs()
    model.gradient_checkpointing = "none"
    reference = _loss_and_gradients(model, x)
    model.gradient_checkpointing = modes
    assert model.gradient_checkpointing == modes == model.block_checkpointing
    counter = _CountRecomputable()
    mixed = _loss_and_gradients(model, x, counter)
    assert all(torch.equal(a, b) for a, b in zip(mixed, reference, strict=True))
    # Each fully checkpointed block recomputes its self-attention (twice: condition, noisy) and its
    # cross-attention in backward; the others recompute none of them here (zero-padded text keeps it).
    assert counter.attention == 3 * modes.count("full")


def test_per_block_checkpointing_refuses_a_wrong_length_or_mode() -> None:
    model = tiny_dit()
    with pytest.raises(ValueError, match="3 modes for 2 blocks"):
        model.gradient_checkpointing = ("none", "full", "full")
    with pytest.raises(ValueError, match="must be one of"):
        model.gradient_checkpointing = ("none", "partial")
    model.gradient_checkpointing = ["full", "full"]
    assert model.gradient_checkpointing == "full"


def test_checkpointing_works_with_a_frozen_base_and_input_gradients() -> None:
    model = tiny_dit().requires_grad_(False)
    x = _inputs()
    latents = x["hidden_states"].clone().requires_grad_()
    for mode in ("full", "selective"):
        model.gradient_checkpointing = mode
        model(**(x | {"hidden_states": latents}), num_cond_latents=1).sum().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        model.gradient_checkpointing = "some"


@pytest.mark.parametrize("mode", ["none", "elementwise", "full", "selective"])
def test_feed_forward_chunks_give_the_same_output_and_gradients(mode: str) -> None:
    model = tiny_dit().train()
    model.gradient_checkpointing = mode
    x = _inputs(frames=5, batch=1)

    def run(chunks: int) -> list[torch.Tensor]:
        model.feed_forward_chunks = chunks
        model.zero_grad()
        latents = x["hidden_states"].clone().requires_grad_()
        out = model(**(x | {"hidden_states": latents}), num_cond_latents=1)
        out.square().mean().backward()
        return [out.detach(), latents.grad] + [p.grad for p in model.parameters()]

    reference = run(1)
    # 5 latent frames in 2 groups (3 + 2), and more groups than frames (one frame each).
    for chunks in (2, 8):
        assert all(_close(a, b, 1e-6) for a, b in zip(run(chunks), reference, strict=True))
    with torch.no_grad():
        assert torch.equal(model(**x, num_cond_latents=1), reference[0])  # no chunking without gradients
    with pytest.raises(ValueError):
        model.feed_forward_chunks = 0


def test_feed_forward_chunks_save_less_for_backward() -> None:
    model = tiny_dit().requires_grad_(False)
    model.gradient_checkpointing = "none"
    x = _inputs(frames=5, batch=1)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def saved_bytes(chunks: int) -> int:
        model.feed_forward_chunks = chunks
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        latents = x["hidden_states"].clone().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(**(x | {"hidden_states": latents}), num_cond_latents=1)
        return sum(n for ptr, n in storages.items() if ptr not in weights)

    tokens = 5 * 2 * 3  # 5 latent frames of 2 x 3 patches
    # w1 x (silu's input), silu(w1 x) and w3 x (the product's inputs), fp32 here; with LoRA on w2 its
    # input would be saved too.
    swiglu = 3 * tokens * model.config.ffn_hidden_size * 4
    assert saved_bytes(5) <= saved_bytes(1) - model.config.depth * swiglu


def test_compiled_blocks_match_eager() -> None:
    model = tiny_dit()
    x = _inputs(batch=1)

    def run(mode: str) -> list[torch.Tensor]:
        model.gradient_checkpointing = mode
        model.zero_grad()
        latents = x["hidden_states"].clone().requires_grad_()
        out = model(**(x | {"hidden_states": latents}), num_cond_latents=1)
        out.square().mean().backward()
        return [out.detach(), latents.grad] + [p.grad for p in model.parameters()]

    reference = run("none")
    # aot_eager traces exactly what inductor would get (one graph, checkpointing inside) without the
    # C++ code generation; the CUDA test below compiles with inductor.
    model.compile_blocks(backend="aot_eager")
    compiled = run("selective")
    assert all(_close(a, b, 1e-5) for a, b in zip(compiled, reference, strict=True))
    model.feed_forward_chunks = 2  # nested checkpoints inside the compiled, checkpointed block step
    chunked = run("full")
    assert all(_close(a, b, 1e-5) for a, b in zip(chunked, reference, strict=True))


def _backward_graphs(model: LongCatVideoTransformer, mode: str, x: dict) -> tuple[list, list[torch.Tensor]]:
    """The compiled blocks' backward graphs under ``mode`` (traced as inductor gets them), and the
    gradients of one backward."""
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def keep_backward(gm: torch.fx.GraphModule, inputs: list) -> Callable:
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    forward = aot_autograd(
        fw_compiler=lambda gm, inputs: make_boxed_func(gm.forward), bw_compiler=keep_backward
    )
    model.compile_blocks(backend=forward)
    model.gradient_checkpointing = mode
    model.zero_grad()
    latents = x["hidden_states"].clone().requires_grad_()
    model(**(x | {"hidden_states": latents}), num_cond_latents=1).square().mean().backward()
    return graphs, [latents.grad] + [p.grad for p in model.parameters() if p.requires_grad]


def test_compiled_elementwise_backward_runs_only_the_matmuls_none_runs() -> None:
    """Compiled, elementwise checkpointing keeps the sums LoRA adds to the kept matmul outputs, so its
    backward recomputes no up-projection: the same matmuls as without checkpointing."""
    from longcat_train import lora
    from longcat_train.config import TrainConfig

    torch.manual_seed(0)
    model = lora.apply_lora(
        tiny_dit().requires_grad_(False), rank=8, targets=list(TrainConfig().lora_targets)
    )
    for p in model.parameters():
        if p.requires_grad:  # LoRA B starts at zero: give every factor a gradient
            p.data.normal_(std=0.02)
    base = model.get_base_model()
    g = torch.Generator().manual_seed(1)
    x = dict(
        hidden_states=torch.randn(1, 16, 3, 16, 16, generator=g),  # 192 tokens: wider than the rank
        timestep=torch.tensor([700.0]),
        encoder_hidden_states=torch.randn(1, 7, 64, generator=g),
    )
    matmuls, saved, gradients = {}, {}, {}
    for mode in ("none", "elementwise"):
        graphs, gradients[mode] = _backward_graphs(base, mode, x)
        nodes = [n for gm in graphs for n in gm.graph.nodes]
        matmuls[mode] = sum(n.op == "call_function" and str(n.target) in MATMUL_OPS for n in nodes)
        saved[mode] = sum(
            n.meta["val"].nbytes
            for n in nodes
            if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)
        )
    torch._dynamo.reset()
    assert matmuls["elementwise"] == matmuls["none"] > 0
    assert saved["elementwise"] < saved["none"]
    assert all(_close(a, b, 1e-5) for a, b in zip(gradients["elementwise"], gradients["none"], strict=True))


class _CountBlockSparseForwards(TorchDispatchMode):
    """Calls of the block-sparse forward op (not of its backward op)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if str(func) == "longcat.block_sparse_attention.default":
            self.count += 1
        return func(*args, **(kwargs or {}))


def _block_sparse_dit() -> LongCatVideoTransformer:
    pytest.importorskip("longcat_kernels")
    model = tiny_dit()
    model.attention_implementation = "block_sparse"
    # half of the 2x2x2 tiles: a real selection on the tiny grid (5 x 2 x 3 patches)
    model.block_sparse_params = {"density": 0.5, "block": (2, 2, 2)}
    return model


def test_selective_checkpointing_keeps_block_sparse_attention() -> None:
    model = _block_sparse_dit()
    x = _inputs(frames=5)
    gradients, recomputed = {}, {}
    for mode in ("none", "elementwise", "full", "selective"):
        model.gradient_checkpointing = mode
        model.zero_grad()
        out = model(**x, num_cond_latents=1)
        counter = _CountBlockSparseForwards()
        with counter:
            out.square().mean().backward()
        recomputed[mode] = counter.count
        gradients[mode] = [p.grad for p in model.parameters()]
    for mode in ("elementwise", "full", "selective"):
        assert all(_close(a, b, 1e-6) for a, b in zip(gradients[mode], gradients["none"], strict=True))
    assert recomputed == {"none": 0, "elementwise": 0, "full": model.config.depth, "selective": 0}


@pytest.mark.parametrize("mode", ["full", "selective", "elementwise"])
def test_compiled_blocks_with_block_sparse_match_eager(mode: str) -> None:
    model = _block_sparse_dit()
    x = _inputs(frames=5, batch=1)

    def run() -> list[torch.Tensor]:
        model.zero_grad()
        latents = x["hidden_states"].clone().requires_grad_()
        out = model(**(x | {"hidden_states": latents}), num_cond_latents=1)
        out.square().mean().backward()
        return [out.detach(), latents.grad] + [p.grad for p in model.parameters()]

    model.gradient_checkpointing = mode
    reference = run()
    # the block-sparse op is one opaque node in the graph (its fake gives the shapes), so fullgraph holds
    model.compile_blocks(backend="aot_eager")
    compiled = run()
    assert all(_close(a, b, 1e-5) for a, b in zip(compiled, reference, strict=True))


# ------------------------------------------------------------------------------------ backends and dtypes


def test_missing_xformers_falls_back_to_sdpa(
    model: LongCatVideoTransformer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "xformers", None)  # importing it now fails
    _xformers_attention.cache_clear()
    x = _inputs()
    try:
        with torch.no_grad():
            reference = model(**x, num_cond_latents=1)
            model.attention_implementation = "xformers"
            out = model(**x, num_cond_latents=1)
    finally:
        _xformers_attention.cache_clear()
    assert torch.equal(out, reference)
    assert "xformers is not installed" in caplog.text


def test_block_sparse_at_full_density_equals_dense(model: LongCatVideoTransformer) -> None:
    kernels = pytest.importorskip("longcat_kernels")
    if not hasattr(kernels, "block_sparse_attention"):
        pytest.skip("longcat_kernels has no block_sparse_attention")
    x = _inputs(frames=5)
    with torch.no_grad():
        reference = model(**x, num_cond_latents=1)
        model.attention_implementation = "block_sparse"
        model.block_sparse_params = {"density": 1.0, "block": (2, 2, 2)}
        out = model(**x, num_cond_latents=1)
    assert _close(out, reference)


def test_attention_rejects_unknown_implementation() -> None:
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="unknown attention"):
        attention(q, q, q, implementation="flash9")  # type: ignore[arg-type]


def test_bf16_forward_is_close_to_fp32(model: LongCatVideoTransformer) -> None:
    x = _inputs()
    with torch.no_grad():
        reference = model(**x, num_cond_latents=1)
        out = model.to(torch.bfloat16)(**x, num_cond_latents=1)
    assert out.dtype == torch.float32
    assert (out - reference).norm() / reference.norm() < 2e-2


@pytest.mark.gpu
def test_cuda_bf16_checkpointing_matches_plain_backward() -> None:
    model = tiny_dit().to("cuda", torch.bfloat16)
    x = {k: v.cuda() for k, v in _inputs(frames=5).items()}
    grads = {}
    for mode in ("none", "full", "selective"):
        model.gradient_checkpointing = mode
        model.zero_grad()
        model(**x, num_cond_latents=1).square().mean().backward()
        grads[mode] = torch.cat([p.grad.float().flatten() for p in model.parameters()])
    model.compile_blocks()
    for mode in ("full", "selective"):
        model.gradient_checkpointing = mode
        model.zero_grad()
        model(**x, num_cond_latents=1).square().mean().backward()
        grads[f"compiled {mode}"] = torch.cat([p.grad.float().flatten() for p in model.parameters()])
    for mode in ("full", "selective", "compiled full", "compiled selective"):
        assert (grads[mode] - grads["none"]).norm() / grads["none"].norm() < 1e-2


@pytest.mark.gpu
def test_cuda_bf16_compiled_block_sparse_matches_eager() -> None:
    """Inductor around the Triton block-sparse op (64-token tiles: tl.dot needs at least 16 rows)."""
    model = tiny_dit().to("cuda", torch.bfloat16)
    model.attention_implementation = "block_sparse"
    model.block_sparse_params = {"density": 0.25, "block": (4, 4, 4), "implementation": "triton"}
    g = torch.Generator().manual_seed(0)
    x = dict(
        hidden_states=torch.randn(1, 16, 9, 16, 16, generator=g),  # a 9 x 8 x 8 patch grid
        timestep=torch.tensor([800.0]),
        encoder_hidden_states=torch.randn(1, 7, 64, generator=g),
    )
    x = {k: v.cuda() for k, v in x.items()}
    results = {}
    for compiled in (False, True):
        if compiled:
            model.compile_blocks()
        for mode in ("none", "selective"):
            model.gradient_checkpointing = mode
            model.zero_grad()
            out = model(**x, num_cond_latents=1)
            out.square().mean().backward()
            grads = torch.cat([p.grad.float().flatten() for p in model.parameters()])
            results[compiled, mode] = (out.float(), grads)
    out_ref, grad_ref = results[False, "none"]
    for key, (out, grads) in results.items():
        assert (out - out_ref).norm() / out_ref.norm() < 1e-2, key
        assert (grads - grad_ref).norm() / grad_ref.norm() < 2e-2, key


def test_compiled_blocks_survive_every_mode_task_and_grad_mode_in_one_run() -> None:
    """One compiled block step serves every checkpointing mode, with and without gradients, for each
    number of condition latents a mixed-task run draws: more graphs than dynamo's default limit of 8
    recompiles, which fullgraph turns into an error mid-run."""
    model = tiny_dit().train()
    model.compile_blocks(backend="aot_eager")
    x = _inputs(frames=5, batch=1)
    for num_cond in (0, 1, 2):
        for mode in CHECKPOINT_MODES:
            model.gradient_checkpointing = mode
            model(**x, num_cond_latents=num_cond).square().mean().backward()
        with torch.no_grad():
            model(**x, num_cond_latents=num_cond)
