"""Our ComfyUI file applied the way ComfyUI-WanVideoWrapper applies a LoRA, re-implemented here from
their code (kijai/ComfyUI-WanVideoWrapper @088128b, Comfy-Org/ComfyUI @a125cd8) independently of
``longcat_train``; plus ``longcat-lora inspect`` / ``convert``."""

import subprocess
import sys

import pytest
import torch
from lora_files import (
    official_state,
    peft_injected,
    peft_state,
    random_lora,
    simpletuner_comfyui,
    videox_fun_kohya,
)
from safetensors.torch import load_file, save_file

from longcat_train import lora_cli
from longcat_train.dit_config import DiTConfig
from longcat_train.loading import tiny_dit
from longcat_train.lora_comfyui import emulate_load
from longcat_train.lora_formats import read_file, write
from longcat_train.lora_tool import inspect_lora, module_shapes, report_lines, wrapper_weights

pytestmark = pytest.mark.usefixtures("single_thread")

# Official module -> the WanVideoWrapper LongCat WanModel modules of its output rows, in order (WVW
# wanvideo/modules/model.py: WanSelfAttention q/k/v/o and norm_q/norm_k :393-402, norm3 :924, cross_attn
# :925-926, FeedForwardSwiGLU w1/w2/w3 :932-934, modulation = Sequential(SiLU, Linear) :941,
# patch_embedding :1874, text_embedding :1887-1889, time_embedding.mlp :1895-1897, Head_adaLN head and
# modulation :1580-1608). Fused rows: q|k|v as unbound by the official attention (attention.py:113-115),
# k|v (:216-217).
WRAPPER_OF_BLOCK = {
    "adaLN_modulation.1": ["modulation.1"],
    "pre_crs_attn_norm": ["norm3"],
    "attn.qkv": ["self_attn.q", "self_attn.k", "self_attn.v"],
    "attn.q_norm": ["self_attn.norm_q"],
    "attn.k_norm": ["self_attn.norm_k"],
    "attn.proj": ["self_attn.o"],
    "cross_attn.q_linear": ["cross_attn.q"],
    "cross_attn.kv_linear": ["cross_attn.k", "cross_attn.v"],
    "cross_attn.q_norm": ["cross_attn.norm_q"],
    "cross_attn.k_norm": ["cross_attn.norm_k"],
    "cross_attn.proj": ["cross_attn.o"],
    "ffn.w1": ["ffn.w1"],
    "ffn.w2": ["ffn.w2"],
    "ffn.w3": ["ffn.w3"],
}
WRAPPER_OF_TOP = {
    "x_embedder.proj": ["patch_embedding"],
    "t_embedder.mlp.0": ["time_embedding.mlp.0"],
    "t_embedder.mlp.2": ["time_embedding.mlp.2"],
    "y_embedder.y_proj.0": ["text_embedding.0"],
    "y_embedder.y_proj.2": ["text_embedding.2"],
    "final_layer.linear": ["head.head"],
    "final_layer.adaLN_modulation.1": ["head.modulation.1"],
}


def wrapper_state(official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official weights split into the wrapper's ``WanVideoModel`` state dict, whose names are
    ``diffusion_model.<WanModel parameter>`` (WVW nodes_model_loading.py:63-71)."""
    out = {}
    for key, tensor in official.items():
        module, param = key.rsplit(".", 1)
        parts = module.split(".", 2)
        if parts[0] == "blocks":
            prefix, names = f"blocks.{parts[1]}.", WRAPPER_OF_BLOCK[parts[2]]
        else:
            prefix, names = "", WRAPPER_OF_TOP[module]
        for name, rows in zip(names, tensor.chunk(len(names)), strict=True):
            out[f"diffusion_model.{prefix}{name}.{param}"] = rows.clone()
    return out


def wvw_standardize(lora_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """WVW ``standardize_lora_key_format`` (nodes_model_loading.py:116-278) for keys that are not
    lycoris (:119) or Wan-Fun ``lora_unet__`` (:141) ones (none of ours is: asserted)."""
    out = {}
    for k, v in lora_sd.items():
        assert not k.startswith(("lycoris_blocks_", "lora_unet__")), k
        if k.startswith("transformer."):
            k = k.replace("transformer.", "diffusion_model.")
        if k.startswith("pipe.dit."):
            k = k.replace("pipe.dit.", "diffusion_model.")
        if k.startswith("blocks."):
            k = k.replace("blocks.", "diffusion_model.blocks.")
        if k.startswith("vace_blocks."):
            k = k.replace("vace_blocks.", "diffusion_model.vace_blocks.")
        k = (
            k.replace(".default.", ".")
            .replace(".diff_m", ".modulation.diff")
            .replace("base_model.model.", "diffusion_model.")
        )
        if k.startswith("diffusion.model."):
            k = k.replace("diffusion.model.", "diffusion_model.")
        if ".attn1." in k or ".attn2." in k:
            k = k.replace(".attn1.", ".cross_attn.").replace(".attn2.", ".cross_attn.")
            k = (
                k.replace(".to_k.", ".k.")
                .replace(".to_q.", ".q.")
                .replace(".to_v.", ".v.")
                .replace(".to_out.0.", ".o.")
            )
        for fused in ("img_attn.proj", "img_attn.qkv", "txt_attn.proj", "txt_attn.qkv"):
            k = k.replace(fused, fused.replace(".", "_"))
        out[k] = v
    return out


def comfy_key_map(model_sd: dict[str, torch.Tensor]) -> dict[str, str]:
    """ComfyUI ``model_lora_keys_unet`` (comfy/lora.py:175-186); the wrapper's unet_config is {} (WVW
    nodes_model_loading.py:79-83), so ``unet_to_diffusers`` adds nothing (comfy/utils.py:265-267)."""
    key_map = {}
    for k in model_sd:
        if k.startswith("diffusion_model."):
            if k.endswith(".weight"):
                key_lora = k[len("diffusion_model.") : -len(".weight")].replace(".", "_")
                key_map[f"lora_unet_{key_lora}"] = k
                key_map[k[: -len(".weight")]] = k
            else:
                key_map[k] = k
    return key_map


# LoRAAdapter.load's (up, down) names in the order it tries them (comfy/weight_adapter/lora.py:92-129).
ADAPTER_NAMES = [
    (".lora_up.weight", ".lora_down.weight"),
    ("_lora.up.weight", "_lora.down.weight"),
    (".lora_B.weight", ".lora_A.weight"),
    (".lora.up.weight", ".lora.down.weight"),
    (".lora_B", ".lora_A"),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
    (".lora_B.default.weight", ".lora_A.default.weight"),
]


def comfy_load_lora(lora_sd, key_map):
    """ComfyUI ``load_lora`` (comfy/lora.py:37-95) for plain LoRA adapters: {weight: (up, down, alpha)}
    and the keys it warns "lora key not loaded" about."""
    patches, loaded = {}, set()
    for x, target in key_map.items():
        alpha = None
        if f"{x}.alpha" in lora_sd:
            alpha = lora_sd[f"{x}.alpha"].item()
            loaded.add(f"{x}.alpha")
        for up, down in ADAPTER_NAMES:
            if x + up in lora_sd:
                patches[target] = (lora_sd[x + up], lora_sd[x + down], alpha)
                loaded |= {x + up, x + down}
                break
    return patches, [k for k in lora_sd if k not in loaded]


def comfy_apply(weight, patch, strength):
    """LoRAAdapter.calculate_weight (comfy/weight_adapter/lora.py:174-208), in fp32 as WVW patches
    (utils.py:246-276): alpha / rank with rank = down.shape[0], no alpha -> 1.0."""
    up, down, alpha = patch
    scale = alpha / down.shape[0] if alpha is not None else 1.0
    diff = torch.mm(up.float().flatten(start_dim=1), down.float().flatten(start_dim=1)).reshape(weight.shape)
    return weight.float() + (strength * scale) * diff


def load_in_wanvideowrapper(path, official_sd, strength):
    """WVW ``add_lora_weights`` (nodes_model_loading.py:973-1013) merged: the wrapper's weights after."""
    lora_sd = load_file(str(path))
    assert "base_model.model.blocks.0.cross_attn.k.lora_A.weight" not in lora_sd  # rs-lora (:993)
    lora_sd = wvw_standardize(lora_sd)
    assert "diffusion_model.patch_embedding.lora_A.weight" not in lora_sd  # Control-LoRA mode (:1004)
    model_sd = wrapper_state(official_sd)
    patches, not_loaded = comfy_load_lora(lora_sd, comfy_key_map(model_sd))
    assert not_loaded == []
    return {
        k: comfy_apply(w, patches[k], strength) if k in patches else w for k, w in model_sd.items()
    }, patches


@pytest.mark.parametrize("split", [True, False], ids=["official-split", "peft"])
def test_our_comfyui_file_changes_every_wrapper_weight_by_our_update(tmp_path, split):
    lora = random_lora(split=split)
    write(lora, tmp_path / "lora_comfyui.safetensors", "comfyui")
    official = tiny_dit().state_dict()
    after, patches = load_in_wanvideowrapper(tmp_path / "lora_comfyui.safetensors", official, strength=0.7)
    merged = {k: v.clone() for k, v in official.items()}
    for module, delta in lora.deltas.items():
        merged[f"{module}.weight"] += 0.7 * delta.weight()
    expected = wrapper_state(merged)
    assert after.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(after[key], expected[key].float(), rtol=1e-5, atol=1e-5, msg=key)
    # Every linear of the model is patched (q, k, v each), the patch embedding (5-D) never.
    assert sorted(patches) == sorted(k for k, w in expected.items() if w.ndim == 2)


def test_our_emulation_agrees_with_comfyui_on_what_each_layout_loses(tmp_path):
    """The key matching longcat-lora inspect reports (lora_comfyui.emulate_load) against the loader
    above, and the outcomes lora-formats.md section 3b derives from WVW's code."""
    official = tiny_dit().state_dict()
    weights = wrapper_weights(module_shapes(DiTConfig.tiny()))
    model = peft_injected(["qkv", "q_linear", "kv_linear", "ffn.w1", "ffn.w2", "ffn.w3"], rank=4, alpha=2)
    state = peft_state(model)
    files = {
        "ours": None,
        "peft": {f"transformer.{k}": v for k, v in state.items()},
        "official": official_state(random_lora()),
        "diffsynth": {k.replace(".weight", ".default.weight"): v for k, v in state.items()},
        "simpletuner": simpletuner_comfyui(
            {f"transformer.{k}": v for k, v in state.items()}, {"lora_alpha": 2}
        ),
    }
    patched = {}
    for name, tensors in files.items():
        path = tmp_path / f"{name}.safetensors"
        if tensors is None:
            write(random_lora(), path, "comfyui")
        else:
            save_file(tensors, str(path))
        lora_sd = load_file(str(path))
        standard = wvw_standardize(lora_sd)
        original = dict(zip(standard, lora_sd, strict=True))  # not_loaded names the file's own keys
        theirs_patches, theirs_lost = comfy_load_lora(standard, comfy_key_map(wrapper_state(official)))
        ours = emulate_load(lora_sd, weights)
        assert sorted(ours.not_loaded) == sorted(original[k] for k in theirs_lost), name
        assert sorted(ours.patched) == sorted(theirs_patches), name
        patched[name] = {k.split(".", 3)[-1] for k in ours.patched}
    assert (
        patched["peft"]
        == patched["diffsynth"]
        == patched["simpletuner"]
        == {"ffn.w1.weight", "ffn.w2.weight", "ffn.w3.weight"}
    )
    assert patched["official"] == set()
    # VideoX-Fun's kohya file: the one-token rule keeps cross_attn_q_linear as cross_attn.q by accident.
    kohya = emulate_load(videox_fun_kohya(state), weights)
    assert {k.split(".", 3)[-1] for k in kohya.patched} == {
        "cross_attn.q.weight",
        "ffn.w1.weight",
        "ffn.w2.weight",
        "ffn.w3.weight",
    }
    assert any("attn_qkv" in k for k in kohya.not_loaded) and any("kv_linear" in k for k in kohya.not_loaded)


# ---------------------------------------------------------------- longcat-lora


def test_inspect_reports_layout_splits_fit_and_what_comfyui_drops(tmp_path):
    save_file(official_state(random_lora()), str(tmp_path / "split.safetensors"))
    text = "\n".join(report_lines(inspect_lora(tmp_path / "split.safetensors", "tiny")))
    assert "official LongCat-Video" in text and "fits the tiny DiT (2 blocks, hidden 128)" in text
    assert "split into 3 row pieces (own down each): attn.qkv (blocks 0-1)" in text
    assert "split into 6 row pieces (own down each): adaLN_modulation.1 (blocks 0-1)" in text
    assert "applies 0 of 24 modules" in text and "--to comfyui keeps them" in text
    assert "skips" not in text
    full = "\n".join(report_lines(inspect_lora(tmp_path / "split.safetensors", "full")))
    assert "does not fit the full LongCat-Video DiT (48 blocks, hidden 4096): 24 modules" in full

    write(read_file(tmp_path / "split.safetensors"), tmp_path / "c.safetensors", "comfyui")
    text = "\n".join(report_lines(inspect_lora(tmp_path / "c.safetensors", "tiny")))
    assert "ComfyUI-WanVideoWrapper module names" in text and "applies all 24 modules" in text
    assert "merge_loras off (GGUF, scaled fp8) skips head.head, head.modulation.1" in text


def test_inspect_names_a_missing_alpha(tmp_path):
    model = peft_injected(["ffn.w1"], rank=4, alpha=2)
    save_file(videox_fun_kohya(peft_state(model)), str(tmp_path / "k.safetensors"))
    text = "\n".join(report_lines(inspect_lora(tmp_path / "k.safetensors", "tiny")))
    assert "kohya" in text and "alpha: not stated" in text and "applies 2 of 2 modules" not in text


def run_cli(argv, capsys):
    code = lora_cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_convert_and_its_one_line_errors(tmp_path, capsys):
    model = peft_injected(["qkv", "ffn.w2"], rank=4, alpha=2)
    save_file(peft_state(model), str(tmp_path / "vxf.safetensors"))
    source, target = str(tmp_path / "vxf.safetensors"), str(tmp_path / "out" / "c.safetensors")
    code, _, err = run_cli(["convert", source, target], capsys)
    assert code == 2 and "states no alpha" in err and len(err.strip().splitlines()) == 1
    code, out, _ = run_cli(["convert", source, target, "--alpha", "2", "--to", "comfyui"], capsys)
    assert code == 0 and "wrote" in out
    assert {d.scale for d in read_file(target).deltas.values()} == {0.5}
    code, _, err = run_cli(["convert", target, target], capsys)
    assert code == 2 and "is the input file" in err
    code, _, err = run_cli(["convert", source, str(tmp_path), "--alpha", "2"], capsys)
    assert code == 2 and "is a folder, not a file" in err
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    code, _, err = run_cli(["convert", str(tmp_path / "junk.safetensors"), target], capsys)
    assert code == 2 and "not a safetensors file" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(["inspect", str(tmp_path / "missing.safetensors")], capsys)
    assert code == 2 and "FILE" in err and "existing .safetensors file" in err
    (tmp_path / "dit").mkdir()
    (tmp_path / "dit" / "config.json").write_text("{not json")
    code, _, err = run_cli(["inspect", target, "--model", str(tmp_path)], capsys)
    assert code == 2 and "is not a LongCat-Video DiT config" in err
    with pytest.raises(SystemExit):
        lora_cli.main(["convert", source, target, "--alpha", "-1"])
    assert "a positive number or 'rank'" in capsys.readouterr().err


def test_help_loads_no_torch():
    code = (
        "import sys; from longcat_train import lora_cli; assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    result = subprocess.run(
        [sys.executable, "-m", "longcat_train.lora_cli", "convert", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and "--to {peft,official,comfyui}" in result.stdout
