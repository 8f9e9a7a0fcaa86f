import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from longcat_train import lora, lora_formats
from longcat_train.config import DEFAULT_LORA_TARGETS, ConfigError
from longcat_train.dit_config import DiTConfig
from longcat_train.lora_apply import load_loras
from longcat_train.model import LongCatVideoTransformer

pytestmark = pytest.mark.usefixtures("single_thread")

# The official checkout: LONGCAT_OFFICIAL_DIR (as for the parity tests), else the repo's read-only copy.
OFFICIAL_DIR = Path(os.environ.get("LONGCAT_OFFICIAL_DIR") or Path(__file__).parents[2] / ".official")
OFFICIAL_LORA_UTILS = OFFICIAL_DIR / "longcat_video/modules/lora_utils.py"


def tiny(seed: int = 0) -> LongCatVideoTransformer:
    torch.manual_seed(seed)
    return LongCatVideoTransformer(DiTConfig.tiny())


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 3, 4, 4, generator=g)
    return dict(
        hidden_states=x,
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, 5, 64, generator=g),
        num_cond_latents=1,
    )


def trained(model: torch.nn.Module, seed: int = 2) -> None:
    """Give every LoRA matrix non-zero values, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_apply_lora_freezes_the_base_and_starts_as_identity():
    base_out = tiny()(**inputs())
    model = lora.apply_lora(tiny(), rank=4, targets=list(DEFAULT_LORA_TARGETS))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 8 * 2  # 2 blocks x 8 linears x (A, B)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    assert torch.equal(model(**inputs()), base_out)  # lora_B starts at zero
    with model.disable_adapter():
        trained(model)
        assert torch.equal(model(**inputs()), base_out)
    assert not torch.equal(model(**inputs()), base_out)


def test_bad_targets_and_rank_are_clear_errors():
    with pytest.raises(ConfigError, match="attn.qkvv match no Linear.*attn.qkv"):
        lora.apply_lora(tiny(), rank=4, targets=["attn.qkv", "attn.qkvv"])
    with pytest.raises(ConfigError, match="exceeds the narrowest"):
        lora.apply_lora(tiny(), rank=100000, targets=["attn.qkv"])
    with pytest.raises(ConfigError, match="at least 1"):
        lora.apply_lora(tiny(), rank=0, targets=["attn.qkv"])


def test_canonical_names_strip_wrappers():
    for name in [
        "module.base_model.model.blocks.0.attn.qkv.lora_A.default.weight",
        "base_model.model.blocks.0.attn.qkv.lora_A.default.weight",
        "_orig_mod.base_model.model.blocks.0.attn.qkv.lora_A.weight",
    ]:
        assert lora.canonical_name(name) == "blocks.0.attn.qkv.lora_A.weight"


@pytest.mark.parametrize("fmt", ["diffusers", "official"])
def test_save_load_round_trip(tmp_path, fmt):
    model = lora.apply_lora(tiny(), rank=4, alpha=8, targets=list(DEFAULT_LORA_TARGETS))
    trained(model)
    expected = model(**inputs())
    weights, settings = lora.lora_weights(model), lora.adapter_settings(model)
    save = lora.save_diffusers if fmt == "diffusers" else lora.save_official
    path = save(weights, tmp_path / "lora.safetensors", settings)

    read = lora_formats.read_file(path)
    modules = {k.rsplit(".", 2)[0] for k in weights}
    assert set(read.deltas) == modules and all(d.rank == 4 and d.scale == 2.0 for d in read.deltas.values())
    if fmt == "diffusers":
        for module, delta in read.deltas.items():
            assert torch.equal(delta.pieces[0].down, weights[f"{module}.lora_A.weight"])
            assert torch.equal(delta.pieces[0].up, weights[f"{module}.lora_B.weight"])
        stored = json.loads(read.metadata[lora.METADATA_KEY])
        assert stored["transformer.lora_alpha"] == 8 and stored["transformer.target_modules"] == sorted(
            DEFAULT_LORA_TARGETS
        )
    # Onto a bare base model (hooked) and into an adapter with another alpha (rescaled).
    bare = tiny()
    load_loras(bare, [(path, 1.0)], merge=False)
    adapter = lora.apply_lora(tiny(), rank=4, alpha=4, targets=list(DEFAULT_LORA_TARGETS))
    lora.load_lora_weights(adapter, read)
    for loaded in (bare, adapter):
        torch.testing.assert_close(loaded(**inputs()), expected, rtol=1e-5, atol=1e-6)


def test_official_key_names(tmp_path):
    model = lora.apply_lora(tiny(), rank=4, alpha=8, targets=["attn.qkv"])
    path = lora.save_official(
        lora.lora_weights(model), tmp_path / "o.safetensors", lora.adapter_settings(model)
    )
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        scale = f.get_tensor(
            "lora___lorahyphen___blocks___lorahyphen___0___lorahyphen___attn___lorahyphen___qkv.alpha_scale"
        )
    name = "lora___lorahyphen___blocks___lorahyphen___1___lorahyphen___attn___lorahyphen___qkv"
    assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha_scale"} <= keys
    assert len(keys) == 2 * 3 and scale.ndim == 0 and scale.item() == 2.0


def test_wrong_shapes_are_refused(tmp_path):
    model = lora.apply_lora(tiny(), rank=4, targets=["attn.qkv"])
    path = lora.save_diffusers(
        lora.lora_weights(model), tmp_path / "a.safetensors", lora.adapter_settings(model)
    )
    other = lora.apply_lora(tiny(), rank=2, targets=["attn.qkv"])
    with pytest.raises(ValueError, match="shape"):
        lora.load_lora_weights(other, lora_formats.read_file(path))
    narrower = lora.apply_lora(tiny(), rank=4, targets=["attn.qkv", "ffn.w1"])
    with pytest.raises(ValueError, match="missing"):
        lora.load_lora_weights(narrower, lora_formats.read_file(path))


NOT_SAFETENSORS = (
    "not a safetensors file; LoRAs are read from .safetensors only "
    "(convert a .ckpt or .bin with safetensors.torch.save_file)"
)
O_QKV = "lora___lorahyphen___blocks___lorahyphen___0___lorahyphen___attn___lorahyphen___qkv"


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        (
            "style.ckpt",
            lambda path: torch.save({"lora": torch.zeros(2, 2)}, path),
            NOT_SAFETENSORS,
        ),
        (
            "garbage.safetensors",
            lambda path: path.write_bytes(b"\x00\x01 not a header"),
            NOT_SAFETENSORS,
        ),
        (
            "empty.safetensors",
            lambda path: save_file({}, path),
            "not a LongCat-Video LoRA in any layout this tool reads (it holds no tensors)",
        ),
        (
            "model.safetensors",
            lambda path: save_file({"blocks.0.attn.qkv.weight": torch.zeros(4, 4)}, path),
            "not a LongCat-Video LoRA in any layout this tool reads (e.g. key blocks.0.attn.qkv.weight)",
        ),
        (
            "flat.safetensors",
            lambda path: save_file({"transformer.blocks.0.attn.qkv.lora_A.weight": torch.zeros(4)}, path),
            "none of its LoRA modules can be applied (e.g. transformer.blocks.0.attn.qkv.lora_A.weight: "
            "not a matrix pair (a convolution LoRA?))",
        ),
        (
            "half.safetensors",
            lambda path: save_file({f"{O_QKV}.lora_down.weight": torch.zeros(2, 128)}, path),
            "blocks.0.attn.qkv has no up matrix, so it is not a whole LoRA",
        ),
    ],
)
def test_files_that_are_not_loras_are_one_line_errors(tmp_path, name, content, reason):
    path = tmp_path / name
    content(path)
    with pytest.raises(ValueError) as err:
        lora_formats.read_file(path)
    assert str(err.value) == f"{path}: {reason}"
    if name != "half.safetensors":  # needs the tensors; the rest is known from the header alone
        with pytest.raises(ValueError) as err:
            lora_formats.check_file(path)
        assert str(err.value) == f"{path}: {reason}"


@pytest.mark.skipif(not OFFICIAL_LORA_UTILS.is_file(), reason="official LongCat-Video code not checked out")
def test_official_loader_reads_our_file_and_computes_the_same_delta(tmp_path):
    """The official LoRANetwork loads our export with strict=True, and its delta (up(down(x)) * alpha_scale)
    equals the peft adapter's."""
    spec = importlib.util.spec_from_file_location("official_lora_utils", OFFICIAL_LORA_UTILS)
    official = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(official)

    model = lora.apply_lora(tiny(), rank=4, alpha=8, targets=list(DEFAULT_LORA_TARGETS))
    trained(model)
    path = lora.save_official(
        lora.lora_weights(model), tmp_path / "o.safetensors", lora.adapter_settings(model)
    )
    from safetensors.torch import load_file

    state = load_file(str(path))
    base = tiny()
    network = official.create_lora_network(base, state, 1.0, 4, 8)
    network.load_state_dict(state, strict=True)
    assert len(network.loras) == 16
    for module in network.loras:
        path_name = module.lora_name.removeprefix("lora___lorahyphen___").replace("___lorahyphen___", ".")
        layer = model.get_submodule(f"base_model.model.{path_name}")
        x = torch.randn(3, layer.in_features)
        ours = layer(x) - layer.base_layer(x)
        theirs = module.lora_up(module.lora_down(x)) * module.multiplier * module.alpha_scale
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
