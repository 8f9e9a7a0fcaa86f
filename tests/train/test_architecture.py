"""The DiT builds what ``longcat_train.architecture`` declares: its block linears, its attention backends
(each kept by selective checkpointing), and the runtime settings that are the model's, not its config's."""

from __future__ import annotations

import logging
import re
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from longcat_train import attention, lora
from longcat_train.architecture import ATTENTION_BACKENDS, BLOCK_LINEARS
from longcat_train.dit_config import DiTConfig
from longcat_train.loading import tiny_dit
from longcat_train.model import (
    CrossAttention,
    LongCatBlock,
    LongCatVideoTransformer,
    SelfAttention,
    block_linears,
    transformer_of,
)

# ------------------------------------------------------------------------------------ block linears


def test_block_linears_are_exactly_the_declared_ones() -> None:
    block = LongCatBlock(DiTConfig.tiny())
    linears = [
        name
        for name, module in block.named_modules()
        if isinstance(module, nn.Linear) and not name.startswith("adaLN_modulation")
    ]
    assert sorted(linears) == sorted(BLOCK_LINEARS) and len(set(BLOCK_LINEARS)) == len(BLOCK_LINEARS)
    assert [path for path, _ in block_linears(block)] == list(BLOCK_LINEARS)


def test_block_linears_reach_the_base_layer_under_lora() -> None:
    model = tiny_dit().requires_grad_(False)
    wrapped = ["attn.qkv", "cross_attn.kv_linear", "ffn.w2"]
    inject_adapter_in_model(LoraConfig(r=2, target_modules=wrapped), model)
    block = model.blocks[1]
    found = dict(block_linears(block))
    expected = [f"{name}.base_layer" if name in wrapped else name for name in BLOCK_LINEARS]
    assert list(found) == expected
    assert all(type(m) is nn.Linear and block.get_submodule(path) is m for path, m in found.items())


def test_transformer_of_sees_through_wrappers() -> None:
    base = tiny_dit()
    peft_model = lora.apply_lora(base, rank=2, targets=["attn.qkv"])
    assert transformer_of(base) is base
    assert transformer_of(peft_model) is base
    assert transformer_of(torch.compile(peft_model)) is base  # compiles nothing until called
    assert transformer_of(peft_model).blocks is base.blocks
    with pytest.raises(TypeError, match="holds no LongCatVideoTransformer"):
        transformer_of(nn.Linear(2, 2))


# ------------------------------------------------------------------------------------ runtime settings


def test_attention_settings_reach_every_attention_module() -> None:
    model = tiny_dit()
    assert model.attention_implementation == "sdpa" and model.block_sparse_params is None
    model.attention_implementation = "xformers"
    model.block_sparse_params = {"density": 0.5, "block": (2, 2, 2)}
    modules = [m for m in model.modules() if isinstance(m, SelfAttention | CrossAttention)]
    assert len(modules) == 2 * model.config.depth
    assert all(m.attention_implementation == "xformers" for m in modules)
    assert all(
        m.block_sparse_params == {"density": 0.5, "block": (2, 2, 2)}
        for m in modules
        if isinstance(m, SelfAttention)
    )
    with pytest.raises(ValueError, match="attention_implementation 'flash9'"):
        model.attention_implementation = "flash9"


def test_config_json_of_earlier_saves_still_reads(caplog: pytest.LogCaptureFixture) -> None:
    saved = DiTConfig.tiny().to_dict()
    assert "attention_implementation" not in saved and "block_sparse_params" not in saved
    earlier = {**saved, "attention_implementation": "block_sparse", "block_sparse_params": {"density": 0.5}}
    with caplog.at_level(logging.INFO, logger="longcat_train.dit_config"):
        config = DiTConfig.from_dict(earlier)
    assert config == DiTConfig.tiny() and config.to_dict() == saved
    assert "attention_implementation=block_sparse" in caplog.text
    assert "unknown keys" not in caplog.text


def test_the_dit_config_reads_and_writes_config_json_without_torch() -> None:
    code = (
        "import sys\nfrom longcat_train.dit_config import DiTConfig\n"
        "c = DiTConfig.from_dict(DiTConfig.full().to_dict())\n"
        "print(c.ffn_hidden_size, 'torch' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.split() == ["11008", "False"], proc.stderr


# ------------------------------------------------------------------------------------ attention backends


def test_backend_table_is_the_declared_one() -> None:
    assert tuple(attention.BACKENDS) == ATTENTION_BACKENDS
    sdpa_ops = attention.BACKENDS["sdpa"].saved_ops
    for name, chosen in attention.BACKENDS.items():
        # Masked calls and every fallback run through SDPA, so each backend keeps its ops too.
        assert sdpa_ops.items() <= chosen.saved_ops.items(), name
        assert all(re.fullmatch(r"\w+\.\w+\.\w+", op) for op in chosen.saved_ops), name
        assert chosen.saved_ops.items() <= attention.SAVED_OPS.items(), name
    with pytest.raises(ValueError, match="unknown attention implementation 'flash9'"):
        attention.backend("flash9")


def test_a_backend_table_that_differs_from_the_architecture_fails_at_import() -> None:
    code = (
        "import longcat_train.architecture as a\na.ATTENTION_BACKENDS = ('sdpa',)\n"
        "import longcat_train.attention\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "RuntimeError" in proc.stderr and "ATTENTION_BACKENDS" in proc.stderr


class _SelfAttentionKernels(TorchDispatchMode):
    """Attention-kernel forward ops dispatched while a SelfAttention module runs (its forward, or the
    recompute of it that checkpointing runs inside backward)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inside = 0
        self.calls: list[str] = []
        self.handles = []
        for module in model.modules():
            if isinstance(module, SelfAttention):
                self.handles.append(module.register_forward_pre_hook(lambda *_: self._step(1)))
                self.handles.append(module.register_forward_hook(lambda *_: self._step(-1)))

    def _step(self, by: int) -> None:
        self.inside += by

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = str(func)
        if self.inside and re.search(r"attention|attn|flash", name) and not re.search(r"backward|bwd", name):
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def _recomputed_self_attention(model: LongCatVideoTransformer, mode: str) -> list[str]:
    model.gradient_checkpointing = mode
    g = torch.Generator().manual_seed(0)
    x = dict(
        hidden_states=torch.randn(1, 16, 5, 4, 6, generator=g),  # 5 latent frames: block-sparse applies
        timestep=torch.tensor([800.0]),
        encoder_hidden_states=torch.randn(1, 7, 64, generator=g),
    )
    counter = _SelfAttentionKernels(model)
    try:
        out = model(**x, num_cond_latents=1)
        with counter:
            out.square().mean().backward()
    finally:
        for handle in counter.handles:
            handle.remove()
    return counter.calls


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_selective_checkpointing_keeps_every_backends_self_attention(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if backend == "block_sparse":
        pytest.importorskip("longcat_kernels")  # its torch path runs on the CPU
    if backend == "xformers":
        monkeypatch.setitem(sys.modules, "xformers", None)  # on the CPU: the SDPA fallback
    model = tiny_dit().train()
    model.attention_implementation = backend
    model.block_sparse_params = {"density": 0.5, "block": (2, 2, 2)}
    attention._xformers_attention.cache_clear()
    try:
        assert _recomputed_self_attention(model, "full")  # the count sees full checkpointing's recompute
        assert _recomputed_self_attention(model, "selective") == []
    finally:
        attention._xformers_attention.cache_clear()


@pytest.mark.gpu
def test_gpu_selective_checkpointing_keeps_xformers_self_attention() -> None:
    """xformers' declared ops are the ones memory_efficient_attention dispatches to on this GPU."""
    pytest.importorskip("xformers")
    model = tiny_dit().to("cuda", torch.bfloat16).train()
    model.attention_implementation = "xformers"
    model.gradient_checkpointing = "selective"
    g = torch.Generator().manual_seed(0)
    x = dict(
        hidden_states=torch.randn(1, 16, 5, 16, 16, generator=g).cuda(),
        timestep=torch.tensor([800.0]).cuda(),
        encoder_hidden_states=torch.randn(1, 7, 64, generator=g).cuda(),
    )
    counter = _SelfAttentionKernels(model)
    with counter:
        model(**x, num_cond_latents=1)
    assert counter.calls and all(name in attention.SAVED_OPS for name in counter.calls), counter.calls
    counter.calls.clear()
    out = model(**x, num_cond_latents=1)
    with counter:
        out.float().square().mean().backward()
    assert counter.calls == []
