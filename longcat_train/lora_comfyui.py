"""What ComfyUI-WanVideoWrapper would load from a LoRA file on its LongCat-Video model, by key names.

WanVideoWrapper (kijai/ComfyUI-WanVideoWrapper ``nodes_model_loading.py``: ``add_lora_weights``,
``standardize_lora_key_format``) rewrites a file's keys, then hands them to ComfyUI's generic LoRA loader
(Comfy-Org/ComfyUI ``comfy/lora.py``: ``model_lora_keys_unet``, ``load_lora``; ``comfy/weight_adapter/
lora.py``: the adapter suffixes). ComfyUI patches a model weight ``diffusion_model.<path>.weight`` from the
prefix ``diffusion_model.<path>`` or ``lora_unet_<path with _>``, and warns "lora key not loaded" for every
other key. This module redoes that matching so ``longcat-lora inspect`` can say what a ComfyUI load drops;
the math (``alpha / rank``) is the file's own. WVW's rules for other model families' key styles
(lycoris, HunyuanVideo, VACE) are left out: none of them names a LongCat module.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

# ComfyUI's LoRA adapter key pairs after a prefix, in the order it tries them (up, down).
_ADAPTER_SUFFIXES = (
    (".lora_up.weight", ".lora_down.weight"),
    ("_lora.up.weight", "_lora.down.weight"),
    (".lora_B.weight", ".lora_A.weight"),
    (".lora.up.weight", ".lora.down.weight"),
    (".lora_B", ".lora_A"),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
    (".lora_B.default.weight", ".lora_A.default.weight"),
)
_WEIGHT_TYPES = {"alpha": ".alpha", "lora_down.weight": ".lora_A.weight", "lora_down": ".lora_A.weight"}
_WEIGHT_TYPES |= {"lora_up.weight": ".lora_B.weight", "lora_up": ".lora_B.weight"}
# Checked after an adapter, for the same prefix (ComfyUI load_lora): DoRA scale, full diffs, set weights.
_EXTRA_SUFFIXES = (".dora_scale", ".w_norm", ".b_norm", ".diff", ".diff_b", ".set_weight")
_SPECIAL_COMPONENTS = (
    ("time.projection", "time_projection"),
    ("img.emb", "img_emb"),
    ("text.emb", "text_emb"),
    ("time.emb", "time_emb"),
)
CONTROL_LORA_KEY = "diffusion_model.patch_embedding.lora_A.weight"
_RS_LORA_KEY = "base_model.model.blocks.0.cross_attn.k.lora_A.weight"


@dataclass
class WrapperLoad:
    """The outcome of a WanVideoWrapper LoRA load."""

    patched: dict[str, str] = field(default_factory=dict)  # model weight -> the file prefix patching it
    not_loaded: list[str] = field(default_factory=list)  # file keys ComfyUI warns about and ignores
    control_lora: bool = False  # a patch_embedding key: WVW widens the input conv (Control-LoRA)
    rs_lora: bool = False  # WVW takes the file for rank-stabilised peft and sets alpha = sqrt(rank)

    @property
    def unmerged_skipped(self) -> list[str]:
        """Patched weights WVW's unmerged LoRA path (merge_loras off, GGUF, scaled fp8) skips: any
        weight whose name contains "head"."""
        return sorted(k for k in self.patched if "head" in k)


def _weight_type(new_key: str, weight_type: str) -> str:
    if weight_type in _WEIGHT_TYPES:
        return new_key + _WEIGHT_TYPES[weight_type]
    new_key += f".{weight_type}"
    return new_key if new_key.endswith(".weight") else new_key + ".weight"


def _fun_block_key(main: str, weight_type: str) -> str:
    """``lora_unet__blocks_0_cross_attn_q`` keys: one name token kept after self_attn/cross_attn/ffn."""
    components = main[len("lora_unet__") :].split("_")
    new_key = "diffusion_model"
    if components[0] == "blocks":
        new_key += f".blocks.{components[1]}"
        idx = 2
        if idx < len(components):
            if (
                components[idx] in ("self", "cross")
                and idx + 1 < len(components)
                and components[idx + 1] == "attn"
            ):
                new_key += f".{components[idx]}_attn"
                idx += 2
            elif components[idx] == "ffn":
                new_key += ".ffn"
                idx += 1
        if idx < len(components):
            component = components[idx]
            if idx + 1 < len(components) and components[idx + 1] == "img":
                component += "_img"
            new_key += f".{component}"
    return _weight_type(new_key, weight_type) if weight_type else new_key


def _fun_other_key(main: str, weight_type: str) -> str:
    new_key = main.replace("lora_unet__", "diffusion_model.")
    for old, new in (
        ("_self_attn", ".self_attn"),
        ("_cross_attn", ".cross_attn"),
        ("_ffn", ".ffn"),
        ("blocks_", "blocks."),
        ("head_head", "head.head"),
        ("text_embedding", "text.embedding"),
        ("time_embedding", "time.embedding"),
        ("time_projection", "time.projection"),
    ):
        new_key = new_key.replace(old, new)
    protected = ("img_emb", "self_attn", "cross_attn")
    new_key = ".".join(p if p in protected else p.replace("_", ".") for p in new_key.split("."))
    return _weight_type(new_key, weight_type) if weight_type else new_key


def standardize_key(key: str) -> str:
    """A key as WanVideoWrapper's ``standardize_lora_key_format`` rewrites it (str.replace semantics:
    every occurrence)."""
    if key.startswith("transformer."):
        key = key.replace("transformer.", "diffusion_model.")
    if key.startswith("pipe.dit."):
        key = key.replace("pipe.dit.", "diffusion_model.")
    if key.startswith("blocks."):
        key = key.replace("blocks.", "diffusion_model.blocks.")
    key = key.replace(".default.", ".").replace(".diff_m", ".modulation.diff")
    key = key.replace("base_model.model.", "diffusion_model.")
    if key.startswith("lora_unet__"):
        main, _, weight_type = key.partition(".")
        key = (_fun_block_key if "blocks_" in main else _fun_other_key)(main, weight_type)
        for old, new in _SPECIAL_COMPONENTS:
            key = key.replace(old, new)
    if key.startswith("diffusion.model."):
        key = key.replace("diffusion.model.", "diffusion_model.")
    if ".attn1." in key or ".attn2." in key:
        key = key.replace(".attn1.", ".cross_attn.").replace(".attn2.", ".cross_attn.")
        for old, new in ((".to_k.", ".k."), (".to_q.", ".q."), (".to_v.", ".v."), (".to_out.0.", ".o.")):
            key = key.replace(old, new)
    return key


def emulate_load(keys: Iterable[str], weights: Iterable[str]) -> WrapperLoad:
    """Which of a file's ``keys`` WanVideoWrapper + ComfyUI would apply to a model whose LoRA-able
    weights are ``weights`` (``diffusion_model.<path>.weight``)."""
    original = list(keys)
    result = WrapperLoad(rs_lora=_RS_LORA_KEY in original)
    standard = {standardize_key(k): k for k in original}
    if result.rs_lora:
        standard |= {
            k.replace(".lora_A.weight", ".alpha"): "" for k in standard if k.endswith(".lora_A.weight")
        }
    result.control_lora = CONTROL_LORA_KEY in standard
    key_map = {}
    for weight in weights:
        path = weight[len("diffusion_model.") : -len(".weight")]
        key_map[f"lora_unet_{path.replace('.', '_')}"] = weight
        key_map[f"diffusion_model.{path}"] = weight
    loaded: set[str] = set()
    for prefix, weight in key_map.items():
        for up, down in _ADAPTER_SUFFIXES:
            if prefix + up in standard:
                loaded |= {prefix + up, prefix + down, prefix + ".alpha"}
                if up == ".lora_up.weight":
                    loaded.add(prefix + ".lora_mid.weight")
                result.patched[weight] = prefix
                break
        extras = {prefix + s for s in _EXTRA_SUFFIXES} & standard.keys()
        if extras:
            loaded |= extras
            result.patched[weight] = prefix
    result.not_loaded = sorted(standard[k] for k in standard if k not in loaded and standard[k])
    return result
