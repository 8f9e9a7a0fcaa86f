"""Quantised frozen base: right layers quantised, output close to bf16, LoRA gradients flow through it."""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model

from longcat_train.config import ConfigError
from longcat_train.dit_config import DiTConfig
from longcat_train.model import LongCatVideoTransformer
from longcat_train.quant import Fp8MatmulLinear, check_fp8_matmuls, quantize_base, use_fp8_matmuls

LORA_TARGETS = ["attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear", "ffn.w1", "ffn.w2"]
QUANTISED = [
    "attn.qkv",
    "attn.proj",
    "cross_attn.q_linear",
    "cross_attn.kv_linear",
    "cross_attn.proj",
    "ffn.w1",
]
PACKAGE = {"int8-quanto": "optimum.quanto", "fp8-torchao": "torchao"}
# Relative L2 error of the tiny model's output against bf16; measured 0.3% (int8) and 0.6% (float8 e4m3).
TOLERANCE = {"int8-quanto": 0.01, "fp8-torchao": 0.03}


def make_model(device: str = "cpu") -> LongCatVideoTransformer:
    torch.manual_seed(0)
    config = dataclasses.replace(DiTConfig.tiny(), depth=3)
    return LongCatVideoTransformer(config).to(device, torch.bfloat16).requires_grad_(False)


def add_lora(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(1)
    lora = LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights=False)
    return inject_adapter_in_model(lora, model)


def make_inputs(device: str = "cpu"):
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(1, 16, 3, 4, 4, generator=g).to(device)
    return latents, torch.tensor([700.0], device=device), torch.randn(1, 6, 64, generator=g).to(device)


def run(model: torch.nn.Module, device: str = "cpu") -> torch.Tensor:
    return model(*make_inputs(device), num_cond_latents=1)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def tensor_bytes(t: torch.Tensor) -> int:
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def block_bytes(model: torch.nn.Module) -> int:
    """Bytes of the frozen block weights: quantised ones counted through their inner tensors."""
    return sum(tensor_bytes(p) for n, p in model.blocks.named_parameters() if "lora_" not in n)


def weight_type(model: torch.nn.Module, name: str) -> type:
    module = model.blocks[0].get_submodule(name)
    return type(getattr(module, "base_layer", module).weight)


def test_unknown_precision_and_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="base_model_precision must be one of"):
        quantize_base(make_model(), "int4")
    real = importlib.import_module

    def no_quanto(name: str, *args):
        if name == "optimum.quanto":
            raise ImportError("No module named 'optimum.quanto'")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", no_quanto)
    with pytest.raises(ImportError, match="needs the optimum-quanto package"):
        quantize_base(make_model(), "int8-quanto")


def test_bf16_casts_the_base_not_lora() -> None:
    model = add_lora(make_model().float())
    for p in model.parameters():
        p.data = p.data.float()
    quantize_base(model, "bf16")
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if "lora_" in name else torch.bfloat16), name
    assert quantize_base(model, "no_change") is model


@pytest.mark.parametrize("precision", ["int8-quanto", "fp8-torchao"])
@pytest.mark.parametrize("lora_first", [False, True])
def test_lora_trains_on_quantised_base(precision: str, lora_first: bool) -> None:
    pytest.importorskip(PACKAGE[precision])
    reference = run(add_lora(make_model())).detach()
    model = make_model()
    if lora_first:
        model = quantize_base(add_lora(model), precision)
    else:
        model = add_lora(quantize_base(model, precision))

    for name in QUANTISED:
        assert weight_type(model, name) is not torch.nn.Parameter, name  # a quantised tensor subclass
    assert type(model.blocks[0].adaLN_modulation[1].weight) is torch.nn.Parameter  # runs in fp32: kept
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    assert block_bytes(model) < 0.7 * block_bytes(make_model())  # one byte per weight, plus scales

    out = run(model)
    assert rel_error(out, reference) < TOLERANCE[precision]
    out.float().square().mean().backward()
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(lora) == 2 * len(LORA_TARGETS) * 3
    # Every factor in every block gets a gradient: it flows through the quantised layers above.
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values())

    torch.optim.SGD(lora.values(), lr=1e-2).step()
    assert rel_error(run(model), out.detach()) > 1e-4  # the step changed what the model computes


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["int8-quanto", "fp8-torchao"])
def test_gpu_quantise_on_device(precision: str) -> None:
    pytest.importorskip(PACKAGE[precision])
    reference = run(add_lora(make_model("cuda")), "cuda").detach()
    model = add_lora(quantize_base(make_model(), precision, device="cuda").to("cuda"))
    qkv = model.blocks[0].attn.qkv.base_layer.weight
    assert qkv.device.type == "cuda"
    out = run(model, "cuda")
    assert rel_error(out, reference) < TOLERANCE[precision]
    out.float().square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert block_bytes(model) < 0.7 * block_bytes(make_model())


# ---------------------------------------------------------------- float8 matmuls


def test_fp8_matmul_linear_forward_and_input_gradient() -> None:
    torch.manual_seed(3)
    linear = torch.nn.Linear(64, 48).requires_grad_(False)
    fp8 = Fp8MatmulLinear.replacing(linear)
    assert fp8.weight is linear.weight and fp8.bias is linear.bias  # same parameters, nothing copied
    x = torch.randn(2, 5, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out, ref = fp8(x), linear(x_ref)
    assert out.shape == ref.shape and 0 < rel_error(out, ref) < 0.06  # float8 e4m3, one scale per row
    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    assert 0 < rel_error(x.grad, x_ref.grad) < 0.06
    assert linear.weight.grad is None
    with pytest.raises(ValueError, match="frozen"):
        Fp8MatmulLinear.replacing(torch.nn.Linear(64, 48))


def test_fp8_matmul_linear_stored_weights_compute_the_same() -> None:
    torch.manual_seed(4)
    linear = torch.nn.Linear(64, 48).to(torch.bfloat16).requires_grad_(False)
    per_call, stored = Fp8MatmulLinear.replacing(linear), Fp8MatmulLinear.replacing(linear)
    stored.store_fp8()
    stored.store_fp8()  # once is enough: a second call changes nothing
    assert stored.weight.dtype == torch.float8_e4m3fn and not stored.weight.requires_grad
    assert stored.weight_scale.shape == (48, 1) and per_call.weight is linear.weight  # bf16 kept there
    assert stored.weight.nbytes * 2 == linear.weight.nbytes
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    grads = []
    for layer in (per_call, stored):
        xi = x.clone().requires_grad_()
        out = layer(xi)
        out.backward(torch.ones_like(out))
        grads.append((out, xi.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_fp8_matmul_input_gradient_is_that_of_the_float8_forward() -> None:
    # The backward multiplies by the weight the forward did (its float8 rows). A one-hot gradient row
    # quantises exactly, so the input gradient is then that row of the float8 weight, dequantised.
    torch.manual_seed(5)
    linear = torch.nn.Linear(256, 128, bias=False).requires_grad_(False)
    fp8 = Fp8MatmulLinear.replacing(linear)
    fp8.store_fp8()
    dequantised = fp8.weight.float() * fp8.weight_scale
    x = torch.randn(64, 256, requires_grad=True)
    rows = torch.randint(0, 128, (64,))
    fp8(x).backward(torch.nn.functional.one_hot(rows, 128).float())
    assert rel_error(x.grad, dequantised[rows]) < 1e-6
    assert rel_error(x.grad, linear.weight[rows]) > 0.01  # not the bf16 weight's


def test_fp8_matmuls_store_weights_in_float8_under_lora() -> None:
    per_call, stored = add_lora(make_model()), add_lora(make_model())
    use_fp8_matmuls(per_call)
    names = sorted(n for n, _ in stored.named_parameters())
    weights = sum(p.nbytes for n, p in stored.named_parameters() if "lora_" not in n)
    use_fp8_matmuls(stored, store=True)
    assert sorted(n for n, _ in stored.named_parameters()) == names
    linears = [m for m in stored.modules() if isinstance(m, Fp8MatmulLinear)]
    assert len(linears) == 8 * 3 and all(m.weight.dtype == torch.float8_e4m3fn for m in linears)
    assert sum(p.nbytes for n, p in stored.named_parameters() if "lora_" not in n) < 0.7 * weights
    out, reference = run(stored), run(per_call)
    assert torch.equal(out, reference)
    out.float().square().mean().backward()
    reference.float().square().mean().backward()
    for (name, a), (_, b) in zip(stored.named_parameters(), per_call.named_parameters(), strict=True):
        if a.requires_grad:
            assert torch.equal(a.grad, b.grad), name


def test_fp8_matmuls_under_lora() -> None:
    model = make_model()
    reference = run(add_lora(make_model())).detach()
    model = add_lora(model)
    names = sorted(n for n, _ in model.named_parameters())
    assert use_fp8_matmuls(model) == 8 * 3  # qkv, proj, q, kv, cross proj, w1, w2, w3 in 3 blocks
    assert sorted(n for n, _ in model.named_parameters()) == names  # state-dict names unchanged
    assert isinstance(model.blocks[0].attn.qkv.base_layer, Fp8MatmulLinear)
    assert type(model.blocks[0].attn.qkv.lora_A["default"]) is torch.nn.Linear  # LoRA stays as it is
    out = run(model)
    assert 0 < rel_error(out, reference) < 0.05
    out.float().square().mean().backward()
    lora = [p for p in model.parameters() if p.requires_grad]
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)


def test_fp8_matmuls_refuse_a_quantised_base() -> None:
    pytest.importorskip("optimum.quanto")
    with pytest.raises(ValueError, match="quantised"):
        use_fp8_matmuls(quantize_base(make_model(), "int8-quanto"))


def test_fp8_matmuls_refuse_a_gpu_without_float8_tensor_cores(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ConfigError, match="A100.*8.0.*turn fp8_matmuls off"):
        check_fp8_matmuls(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_fp8_matmuls(torch.device("cuda"))
    check_fp8_matmuls(torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.parametrize("store", [False, True], ids=["per_call", "stored"])
def test_gpu_fp8_matmuls(store: bool) -> None:
    # torch._scaled_mm on CUDA is stricter than on the CPU (operand layouts, scale shapes, sm89+).
    reference = run(add_lora(make_model("cuda")), "cuda").detach()
    model = add_lora(make_model("cuda"))
    use_fp8_matmuls(model, store=store)
    out = run(model, "cuda")
    assert 0 < rel_error(out, reference) < 0.05
    out.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
