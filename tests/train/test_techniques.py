"""The training techniques: every combination rule, and the one order apply_techniques applies them in."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longcat_train import lora, lora_formats, offload, parallel, quant
from longcat_train.cli import parse_train_args
from longcat_train.config import ConfigError, TrainConfig
from longcat_train.loading import tiny_dit
from longcat_train.lowrank import LowRankSet
from longcat_train.model import LongCatVideoTransformer, SelfAttention
from longcat_train.parallel import Dist
from longcat_train.techniques import RULES, apply_techniques, check_techniques, load_device

CPU = torch.device("cpu")

# ---------------------------------------------------------------- rules


@pytest.mark.parametrize("rule", RULES, ids=["+".join(r.settings) for r in RULES])
def test_every_rule_raises_naming_both_settings(rule) -> None:
    cfg = TrainConfig(**rule.example)
    assert rule.clashes(cfg)
    with pytest.raises(ConfigError) as error:
        check_techniques(cfg)
    message = str(error.value)
    assert message == rule.message.format(**vars(cfg))
    for setting in rule.settings:
        assert re.search(rf"\b{setting}\b", message), (setting, message)
    flags = [f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}") for k, v in rule.example.items()]
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_train_args(flags)  # parsing the command line runs the rules


def test_the_defaults_clash_with_no_rule() -> None:
    cfg = TrainConfig()
    assert not any(rule.clashes(cfg) for rule in RULES)
    check_techniques(cfg)


def test_techniques_imports_no_torch() -> None:
    code = "import sys\nimport longcat_train.techniques\nprint(sorted(m for m in ('torch', 'peft') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr


def test_load_device() -> None:
    gpu = torch.device("cuda", 0)
    assert load_device(TrainConfig(), gpu) == gpu
    assert load_device(TrainConfig(block_swap=2), gpu) == CPU
    assert load_device(TrainConfig(fsdp=True), gpu) == CPU


# ---------------------------------------------------------------- order


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the technique functions apply_techniques calls, in order; each still does its work."""
    seen: list[str] = []

    def spy(owner, name: str) -> None:
        real = getattr(owner, name)

        def recorded(*args, **kwargs):
            seen.append(name)
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, recorded)

    for owner, name in [
        (quant, "quantize_base"),
        (lora, "apply_lora"),
        (lora, "load_lora_weights"),
        (quant, "use_fp8_matmuls"),
        (LongCatVideoTransformer, "compile_blocks"),
        (offload, "apply_block_swap"),
        (offload, "apply_activation_offload"),
    ]:
        spy(owner, name)
    # One process plays a two-process job: the DDP wrapper is recorded, not built.
    monkeypatch.setattr(parallel, "apply_ddp", lambda model, d: seen.append("apply_ddp") or model)
    return seen


def _adapter_file(folder: Path) -> LowRankSet:
    """LoRA weights as a checkpoint holds them: ones everywhere, so loading them is visible."""
    with torch.random.fork_rng(devices=[]):
        model = lora.apply_lora(tiny_dit(), rank=2, targets=list(TrainConfig().lora_targets))
    weights = {k: torch.ones_like(v) for k, v in lora.lora_weights(model).items()}
    path = lora.save_diffusers(weights, folder / "lora.safetensors", lora.adapter_settings(model))
    return lora_formats.read_file(path)


def test_quantised_base_lora_resume_swap_offload_then_ddp(calls: list[str], tmp_path: Path) -> None:
    pytest.importorskip("optimum.quanto")
    cfg = TrainConfig(
        model="tiny",
        base_model_precision="int8-quanto",
        lora_rank=2,
        block_swap=1,
        offload_activations=True,
        gradient_checkpointing="full",
        feed_forward_chunks=2,
        attention="xformers",
    )
    cfg.validate()
    base, resumed = tiny_dit(), _adapter_file(tmp_path)
    calls.clear()
    train_model, model = apply_techniques(base, cfg, Dist(world_size=2, device=CPU), lora_weights=resumed)
    assert calls == [
        "quantize_base",
        "apply_lora",
        "load_lora_weights",
        "apply_block_swap",
        "apply_activation_offload",
        "apply_ddp",
    ]
    assert train_model is model and model.get_base_model() is base
    qkv = base.blocks[0].attn.qkv
    assert type(qkv.base_layer).__name__ == "QLinear"  # LoRA wraps the quantised linear
    assert torch.equal(qkv.lora_A["default"].weight, torch.ones_like(qkv.lora_A["default"].weight))
    assert (base.gradient_checkpointing, base.feed_forward_chunks) == ("full", 2)
    assert all(
        m.attention_implementation == "xformers" for m in base.modules() if isinstance(m, SelfAttention)
    )


def test_fp8_matmuls_under_lora_then_compile_then_ddp(calls: list[str]) -> None:
    cfg = TrainConfig(model="tiny", fp8_matmuls=True, compile=True, lora_rank=2)
    cfg.validate()
    base = tiny_dit().requires_grad_(False)
    train_model, model = apply_techniques(base, cfg, Dist(world_size=2, device=CPU))
    assert calls == ["quantize_base", "apply_lora", "use_fp8_matmuls", "compile_blocks", "apply_ddp"]
    qkv = base.blocks[0].attn.qkv
    assert isinstance(qkv.base_layer, quant.Fp8MatmulLinear) and "default" in qkv.lora_A  # fp8 under LoRA
    assert qkv.base_layer.stores_fp8  # the trainer keeps the float8 weights only
    assert base.gradient_checkpointing == "selective"


def test_fsdp_keeps_the_float8_matmuls_weights_in_bf16(calls: list[str], monkeypatch) -> None:
    """FSDP shards the bf16 weights; stored float8 ones would sit whole on every rank."""
    monkeypatch.setattr(parallel, "apply_fsdp", lambda model, d, dtype: calls.append("apply_fsdp") or model)
    cfg = TrainConfig(model="tiny", fp8_matmuls=True, fsdp=True, lora_rank=2)
    cfg.validate()
    base = tiny_dit().requires_grad_(False)
    apply_techniques(base, cfg, Dist(world_size=2, device=CPU))
    assert calls[-1] == "apply_fsdp"
    linear = base.blocks[0].attn.qkv.base_layer
    assert isinstance(linear, quant.Fp8MatmulLinear) and not linear.stores_fp8


def test_single_process_trains_the_peft_model_itself(calls: list[str]) -> None:
    cfg = TrainConfig(model="tiny", lora_rank=2)
    train_model, model = apply_techniques(tiny_dit(), cfg, Dist(device=CPU))
    assert train_model is model and calls == ["quantize_base", "apply_lora"]
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == sorted(
        n for n in dict(model.named_parameters()) if ".lora_" in n
    )
