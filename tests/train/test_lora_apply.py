"""Frozen LoRAs on the DiT (longcat_train.lora_apply): every linear they target, merged or hooked, several
at once, and the refusals; reading official split files; PATH[:STRENGTH]."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from longcat_train import lora, lora_formats
from longcat_train.config import ConfigError, TrainConfig
from longcat_train.dit_config import DiTConfig
from longcat_train.lora_apply import load_loras
from longcat_train.lora_spec import LORA_SPECS, LoraSpec, parse_lora_spec
from longcat_train.lowrank import LowRankDelta, LowRankPiece, LowRankSet
from longcat_train.model import LongCatVideoTransformer

pytestmark = pytest.mark.usefixtures("single_thread")

# Linears outside the blocks' projections, which the model runs in fp32 (and the official loader targets).
FP32_TARGETS = [
    "adaLN_modulation.1",
    "final_layer.linear",
    "final_layer.adaLN_modulation.1",
    "t_embedder.mlp.0",
]


def tiny(seed: int = 0, dtype: torch.dtype = torch.float32) -> LongCatVideoTransformer:
    torch.manual_seed(seed)
    return LongCatVideoTransformer(DiTConfig.tiny()).to(dtype).eval()


def inputs(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(1, 16, 3, 4, 4, generator=g),
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, 5, 64, generator=g),
        num_cond_latents=1,
    )


def run(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs())


def random_lora(model: torch.nn.Module, modules: dict[str, int], rank: int, seed: int, scale: float = 0.5):
    """A LowRankSet on ``modules`` (path -> row blocks), random pieces of ``rank``."""
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    for module, n in modules.items():
        linear = model.get_submodule(module)
        pieces = tuple(
            LowRankPiece(
                torch.randn(rank, linear.in_features, generator=g) * 0.1,
                torch.randn(linear.out_features // n, rank, generator=g) * 0.1,
            )
            for _ in range(n)
        )
        deltas[module] = LowRankDelta(pieces, scale)
    return LowRankSet(deltas, "test")


MODULES = {
    "blocks.0.attn.qkv": 3,
    "blocks.1.cross_attn.kv_linear": 2,
    "blocks.0.adaLN_modulation.1": 6,
    "final_layer.adaLN_modulation.1": 2,
    "final_layer.linear": 1,
    "blocks.1.ffn.w1": 1,
}


# ---------------------------------------------------------------- every target acts


@pytest.mark.parametrize("target", FP32_TARGETS)
def test_a_trained_lora_on_the_fp32_layers_acts_and_gets_gradients(target: str) -> None:
    """Those layers used to be computed from their base weights directly: a LoRA there changed nothing."""
    base = run(tiny())
    model = lora.apply_lora(tiny(), rank=2, targets=[target])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(run(model), base, atol=1e-4)
    model.train()
    model(**inputs()).square().mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_fp32_layers_and_their_loras_stay_fp32_under_a_bf16_autocast() -> None:
    model = tiny()
    load_loras(model, [(random_lora(model, {"blocks.0.adaLN_modulation.1": 6}, 2, seed=5), 1.0)], merge=False)
    seen = []
    model.blocks[0].adaLN_modulation.register_forward_hook(lambda m, a, out: seen.append(out))
    run(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        run(model)
    assert seen[1].dtype == torch.float32 and torch.equal(seen[0], seen[1])


@pytest.mark.parametrize("merge", [False, True])
def test_hooked_and_merged_updates_are_the_block_diagonal_sum(merge: bool) -> None:
    model = tiny()
    first, second = random_lora(model, MODULES, 2, seed=1), random_lora(model, MODULES, 3, seed=2, scale=2.0)
    reference = tiny()
    with torch.no_grad():
        for module in MODULES:
            layer = reference.get_submodule(module)
            layer.weight += 0.7 * first.deltas[module].weight() - 0.3 * second.deltas[module].weight()
    loaded = load_loras(model, [(first, 0.7), (second, -0.3)], merge=merge)
    torch.testing.assert_close(run(model), run(reference), rtol=1e-5, atol=1e-5)
    assert loaded.merged == merge and loaded.names == ["#1 (test)", "#2 (test)"]


# ---------------------------------------------------------------- merge, unmerge, strengths, order


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unmerge_gives_the_base_weights_back_within_one_rounding(dtype: torch.dtype) -> None:
    model = tiny(dtype=dtype)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    lora_set = random_lora(model, MODULES, 4, seed=7, scale=3.0)
    loaded = load_loras(model, [(lora_set, 1.5)], merge=True)
    changed = [k for k in original if not torch.equal(model.state_dict()[k], original[k])]
    assert sorted(changed) == sorted(f"{m}.weight" for m in MODULES)
    loaded.remove()
    eps = torch.finfo(dtype).eps
    for module, delta in lora_set.deltas.items():
        weight, before = model.get_submodule(module).weight.float(), original[f"{module}.weight"].float()
        bound = eps * (before.abs() + 1.5 * delta.weight().abs())
        assert bool(((weight - before).abs() <= bound).all()), module
    assert all(torch.equal(model.state_dict()[k], original[k]) for k in original if k not in changed)


def test_hooks_come_off_exactly_and_can_be_switched_off() -> None:
    model = tiny()
    base = run(model)
    loaded = load_loras(model, [(random_lora(model, MODULES, 2, seed=1), 1.0)], merge=False)
    on = run(model)
    loaded.enabled = False
    assert torch.equal(run(model), base)
    loaded.enabled = True
    assert torch.equal(run(model), on) and not torch.allclose(on, base, atol=1e-4)
    loaded.remove()
    assert torch.equal(run(model), base)
    assert {n for n, _ in model.named_parameters()} == {
        n for n, _ in tiny().named_parameters()
    }  # no new ones


def test_strength_scales_the_update_linearly() -> None:
    model = tiny()
    lora_set = random_lora(model, MODULES, 2, seed=4)
    base = run(model)
    outputs = {}
    for strength in (0.0, 1.0, -1.0, 2.0):
        loaded = load_loras(model, [(lora_set, strength)], merge=False)
        outputs[strength] = run(model)
        loaded.remove()
    assert torch.equal(outputs[0.0], base)
    model_scaled = tiny()
    load_loras(model_scaled, [(lora_set.scaled(2.0), 1.0)], merge=False)
    torch.testing.assert_close(run(model_scaled), outputs[2.0], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(outputs[1.0], outputs[-1.0], atol=1e-4)


@pytest.mark.parametrize("merge", [False, True])
def test_stacking_order_does_not_matter(merge: bool) -> None:
    a, b, c = (random_lora(tiny(), MODULES, r, seed=s) for r, s in ((2, 1), (3, 2), (1, 3)))
    outs = []
    for order in ([(a, 0.5), (b, 1.0), (c, -2.0)], [(c, -2.0), (a, 0.5), (b, 1.0)]):
        model = tiny()
        load_loras(model, order, merge=merge)
        outs.append(run(model))
    # One call, or one per LoRA, stack to the same model.
    model = tiny()
    for entry in [(b, 1.0), (c, -2.0), (a, 0.5)]:
        load_loras(model, [entry], merge=merge)
    outs.append(run(model))
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- reading official files


def _official_name(module: str) -> str:
    return "lora___lorahyphen___" + module.replace(".", "___lorahyphen___")


def test_official_split_file_reads_as_block_diagonal_pieces(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    qkv, ada = _official_name("blocks.0.attn.qkv"), _official_name("final_layer.adaLN_modulation.1")
    down = torch.randn(3 * 4, 128, generator=g)
    ups = [torch.randn(128, 4, generator=g) for _ in range(3)]
    tensors = {f"{qkv}.lora_down.weight": down, f"{qkv}.alpha_scale": torch.tensor(0.5)}
    tensors |= {f"{qkv}.lora_up.blocks.{i}.weight": up for i, up in enumerate(ups)}
    tensors |= {
        f"{ada}.lora_down.weight": torch.randn(2, 64, generator=g),
        f"{ada}.lora_up.weight": torch.randn(256, 2, generator=g),
        f"{ada}.alpha_scale": torch.tensor(2.0),
    }
    save_file(tensors, str(tmp_path / "o.safetensors"))
    read = lora_formats.read_file(tmp_path / "o.safetensors")
    assert read.format == "official" and set(read.deltas) == {
        "blocks.0.attn.qkv",
        "final_layer.adaLN_modulation.1",
    }
    split = read.deltas["blocks.0.attn.qkv"]
    assert len(split.pieces) == 3 and split.rank == 4 and split.scale == 0.5
    torch.testing.assert_close(split.weight(), 0.5 * torch.block_diag(*ups) @ down)
    assert read.deltas["final_layer.adaLN_modulation.1"].rank == 2  # ranks may differ between modules


@pytest.mark.parametrize(
    ("drop", "add", "reason"),
    [
        ("lora_up.blocks.1.weight", {}, "has lora_up blocks [0, 2]; blocks 0 to 2 must all be there"),
        ("alpha_scale", {}, "the file states no alpha (e.g. for blocks.0.attn.qkv)"),
        (None, {"lora_up.weight": torch.zeros(384, 4)}, "has both lora_up.weight and lora_up blocks"),
        (None, {"lora_down.weight": torch.zeros(8, 128)}, "lora_down has 8 rows for 3 up blocks"),
        (None, {"alpha_scale": torch.tensor(float("nan"))}, "holds values that are not finite"),
    ],
)
def test_broken_official_files_are_one_line_errors(tmp_path, drop, add, reason) -> None:
    name = _official_name("blocks.0.attn.qkv")
    parts = {"lora_down.weight": torch.zeros(12, 128), "alpha_scale": torch.tensor(1.0)}
    parts |= {f"lora_up.blocks.{i}.weight": torch.zeros(128, 4) for i in range(3)}
    parts = {k: v for k, v in parts.items() if k != drop} | add
    path = tmp_path / "broken.safetensors"
    save_file({f"{name}.{k}": v for k, v in parts.items()}, str(path))
    with pytest.raises(ValueError) as err:
        lora_formats.read_file(path)
    assert str(err.value).startswith(f"{path}: ") and reason in str(err.value) and "\n" not in str(err.value)


def test_peft_alpha_comes_from_the_adapter_config_beside_the_file(tmp_path) -> None:
    import json

    module = "blocks.0.ffn.w1"
    save_file(
        {
            f"base_model.model.{module}.lora_A.weight": torch.ones(4, 128),
            f"base_model.model.{module}.lora_B.weight": torch.ones(512, 4),
        },
        str(tmp_path / "adapter_model.safetensors"),
    )
    with pytest.raises(ValueError, match="the file states no alpha"):  # peft's own default is no rule
        lora_formats.read_file(tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"r": 4, "lora_alpha": 2, "alpha_pattern": {"ffn.w1": 8}})
    )
    assert lora_formats.read_file(tmp_path / "adapter_model.safetensors").deltas[module].scale == 2.0


# ---------------------------------------------------------------- refusals, one line each


def test_refusals_name_the_lora_the_module_and_the_shapes(tmp_path) -> None:
    model = tiny()
    wide = LongCatVideoTransformer(
        DiTConfig(hidden_size=256, depth=2, num_heads=2, caption_channels=64, adaln_tembed_dim=64)
    )
    other = random_lora(wide, {"blocks.0.attn.qkv": 3, "blocks.0.attn.proj": 1}, 2, seed=1)
    with pytest.raises(ValueError) as err:
        load_loras(model, [(other, 1.0)], merge=True)
    assert str(err.value) == (
        "LoRA #1 (test): blocks.0.attn.qkv is [768, 256] in the LoRA but [384, 128] in the DiT "
        "(a LoRA for another model?)"
    )
    strays = LowRankSet(
        {
            name: LowRankDelta((LowRankPiece(torch.zeros(1, 4), torch.zeros(4, 1)),), 1.0)
            for name in ("down_blocks.0.to_q", "x_embedder.proj", "blocks.5.attn.qkv")
        },
        "test",
    )
    with pytest.raises(
        ValueError,
        match=r"^LoRA #2 \(test\): 3 of its modules match no Linear layer of the DiT: "
        r"down_blocks.0.to_q, x_embedder.proj, blocks.5.attn.qkv \(a LoRA for another model\?\)$",
    ):
        load_loras(model, [(random_lora(model, MODULES, 2, seed=1), 1.0), (strays, 1.0)], merge=False)
    with pytest.raises(ValueError, match=r"^LoRA #1 \(test\): strength inf is not a finite number$"):
        load_loras(model, [(random_lora(model, MODULES, 2, seed=1), float("inf"))], merge=True)
    not_lora = tmp_path / "model.safetensors"
    save_file({"blocks.0.attn.qkv.weight": torch.zeros(4, 4)}, str(not_lora))
    with pytest.raises(
        ValueError,
        match=r"model.safetensors: not a LongCat-Video LoRA in any layout this tool reads "
        r"\(e.g. key blocks.0.attn.qkv.weight\)$",
    ):
        load_loras(model, [(not_lora, 1.0)], merge=False)
    assert torch.equal(run(model), run(tiny()))  # every refusal left the model as it was


@pytest.mark.parametrize("base", ["int8-quanto", "fp8-matmuls-stored"])
def test_merging_into_quantised_weights_is_refused_and_hooks_still_work(base: str) -> None:
    from longcat_train.quant import quantize_base, use_fp8_matmuls

    if base == "int8-quanto":
        pytest.importorskip("optimum.quanto")
        model = quantize_base(tiny(), "int8-quanto")
    else:
        model = tiny().requires_grad_(False)
        use_fp8_matmuls(model, store=True)
    lora_set = random_lora(model, {"blocks.0.attn.qkv": 3}, 2, seed=1)
    with pytest.raises(
        ValueError, match="cannot be merged into blocks.0.attn.qkv: its weight is a .*quantised"
    ):
        load_loras(model, [(lora_set, 1.0)], merge=True)
    base = run(model)
    load_loras(model, [(lora_set, 1.0)], merge=False)
    assert not torch.allclose(run(model), base, atol=1e-4)


def test_one_lora_trains_at_a_time(tmp_path) -> None:
    from longcat_train.trainer import check_frozen_loras

    model = lora.apply_lora(tiny(), rank=2, targets=["attn.qkv"])
    with pytest.raises(
        ConfigError, match="already carries a LoRA adapter that trains; one LoRA trains at a time"
    ):
        lora.apply_lora(model, rank=2, targets=["attn.proj"])
    out = tmp_path / "run"
    path = lora.save_diffusers(
        lora.lora_weights(model), out / "lora.safetensors", lora.adapter_settings(model)
    )
    for setting in ("base_lora", "validation_lora"):
        cfg = TrainConfig(output_dir=str(out), **{setting: [f"{path}:0.5"]})
        with pytest.raises(ConfigError, match=f"^{setting} {path} is the LoRA this run trains"):
            check_frozen_loras(cfg)
    with pytest.raises(ConfigError, match="^base_lora missing.safetensors: no such LoRA file$"):
        check_frozen_loras(TrainConfig(output_dir=str(tmp_path / "new"), base_lora=["missing.safetensors"]))


# ---------------------------------------------------------------- PATH[:STRENGTH]


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("style.safetensors", LoraSpec("style.safetensors")),
        ("style.safetensors:0.8", LoraSpec("style.safetensors", 0.8)),
        ("style.safetensors:-1e-1", LoraSpec("style.safetensors", -0.1)),
        ("C:\\loras\\style.safetensors", LoraSpec("C:\\loras\\style.safetensors")),
        ("C:\\loras\\style.safetensors:.5", LoraSpec("C:\\loras\\style.safetensors", 0.5)),
        ("/data/run:2/style.safetensors", LoraSpec("/data/run:2/style.safetensors")),
        ("/data/run:2/style.safetensors:2", LoraSpec("/data/run:2/style.safetensors", 2.0)),
        ("odd:0.5:1", LoraSpec("odd:0.5", 1.0)),
        ("style:v2", LoraSpec("style:v2")),
        ("style.safetensors:", LoraSpec("style.safetensors:")),
        (":0.5", LoraSpec(":0.5")),
    ],
)
def test_path_and_strength_split_at_the_last_colon_before_a_number(text: str, spec: LoraSpec) -> None:
    assert parse_lora_spec(text) == spec


@pytest.mark.parametrize(
    "text", ["a.safetensors:inf", "a.safetensors:nan", "a.safetensors:-INF", "a:4.5", "a:-5"]
)
def test_strengths_that_are_not_finite_or_too_large_are_refused(text: str) -> None:
    assert not LORA_SPECS.test([text])
    with pytest.raises(
        ConfigError,
        match=rf"^base_lora = \[{text!r}\]: must be PATH or PATH:STRENGTH, STRENGTH a finite number in \[-4, 4\]$",
    ):
        TrainConfig(base_lora=[text]).validate()
    assert LORA_SPECS.test(["a.safetensors:-4", "b.safetensors", "c:4"])
