"""DiT speed and memory: our block and our 48-block model against a naive reference block, in one run.

    python benchmarks/model.py [--parts block,model] [--compile] [--out FILE]
    python benchmarks/model.py --quick          # CPU smoke check with a small config

Full config with random bf16 weights at 480x832x93 (24 latent frames of 60x104 -> a 24x30x52 patch grid,
37,440 tokens), image-to-video (1 condition frame), text zero-padded to 512 tokens as the official model
sees it. Cases:

- block: one block forward (no grad), and forward+backward with checkpointing the way LoRA training runs
  it (base frozen): gradients for the input activations only, and with a rank-8 adapter on the block's
  linears; checkpointing ``full`` and ``selective``. The same for ``NaiveBlock`` below (plain Linear +
  SDPA, separate q/k/v projections, the official's layout copies and step-by-step fp32 modulation,
  ``full`` checkpointing), sharing our block's weights; its output is checked against ours.
- model: the whole model forward (target <= 3.3 s on an H100), and forward+backward with a rank-8 adapter
  under ``full`` and ``selective`` checkpointing, with peak memory.

Timing: warm-up runs first, then CUDA events around each repetition, median reported (min and max too).
FLOPs are counted analytically (model FLOPs: linears + attention matmuls, not recomputation); for
forward+backward with a frozen base, the backward counts the linears' input gradients (1x forward) and
attention's (2x forward). ``--compile`` runs our blocks through ``compile_blocks()`` (run the script once
with and once without it; the naive block stays eager). Prints one JSON document; ``--out`` also writes
it after every case, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from _shared import write_report  # benchmarks/_shared.py
from peft import LoraConfig, inject_adapter_in_model
from torch import nn
from torch.utils.checkpoint import checkpoint

from longcat_train.architecture import BLOCK_LINEARS
from longcat_train.dit_config import DiTConfig
from longcat_train.model import LongCatBlock, LongCatVideoTransformer, rope_tables

OUR_ADAPTER_TARGETS = list(BLOCK_LINEARS)
NAIVE_ADAPTER_TARGETS = r".*(self_[qkv]|self_proj|cross_[qkv]|cross_proj|w[123])"


@dataclass(frozen=True)
class Setup:
    config: DiTConfig
    latent_shape: tuple[int, int, int]  # VAE latent frames, height, width
    text_tokens: int  # real prompt tokens (the rest is zero padding up to text_max_length)
    device: str
    dtype: torch.dtype
    warmup: int  # block cases
    reps: int
    model_warmup: int  # whole-model cases (seconds each)
    model_reps: int

    @property
    def grid(self) -> tuple[int, int, int]:
        t, h, w = self.latent_shape
        _, ph, pw = self.config.patch_size
        return t, h // ph, w // pw


def full_setup() -> Setup:
    return Setup(
        DiTConfig.full(),
        (24, 60, 104),
        120,
        "cuda",
        torch.bfloat16,
        warmup=3,
        reps=10,
        model_warmup=1,
        model_reps=3,
    )


def quick_setup() -> Setup:
    config = DiTConfig(
        hidden_size=256, depth=2, num_heads=2, caption_channels=128, adaln_tembed_dim=64, text_max_length=64
    )
    return Setup(config, (3, 8, 12), 20, "cpu", torch.float32, warmup=1, reps=2, model_warmup=1, model_reps=2)


# ----------------------------------------------------------------------------------------- utilities


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(fn: Callable[[], object], setup: Setup, warmup: int, reps: int) -> dict:
    """Median wall time of ``fn`` over ``reps`` after ``warmup`` runs, and the peak memory of the timed runs."""
    for _ in range(warmup):
        fn()
    sync(setup.device)
    if setup.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        if setup.device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            start_s = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start_s)
    result = {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "reps": reps}
    if setup.device == "cuda":
        result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> None:
    """Random weights of trained-model scale (never zeros: they time differently and hide bugs)."""
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=g, device=p.device) * fan_in**-0.5)
        elif "norm" in name and name.endswith("weight"):
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g, device=p.device))
        else:
            p.copy_(0.02 * torch.randn(p.shape, generator=g, device=p.device))


def build(config: DiTConfig, setup: Setup, compile_: bool) -> LongCatVideoTransformer:
    """Random weights straight on the device in the compute dtype; base frozen as in LoRA training."""
    with torch.device("meta"):
        model = LongCatVideoTransformer(config).to(setup.dtype)
    model.to_empty(device=setup.device)
    randomize_(model)
    if compile_:
        model.compile_blocks()
    return model.requires_grad_(False)


def add_adapter(module: nn.Module, targets: str | list[str], rank: int = 8) -> list[nn.Parameter]:
    """A peft LoRA on ``targets``; only the adapter trains, as in our LoRA training."""
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets), module)
    trainable = []
    for name, p in module.named_parameters():
        p.requires_grad_("lora_" in name)
        if "lora_" in name:
            trainable.append(p)
    return trainable


def flops_per_block(setup: Setup) -> dict[str, float]:
    """Matmul FLOPs of one block's forward, I2V with one condition frame (2 per multiply-add)."""
    c, f, t_dim = setup.config.hidden_size, setup.config.ffn_hidden_size, setup.config.adaln_tembed_dim
    frames, h, w = setup.grid
    n = frames * h * w
    cond = h * w
    noisy = n - cond
    text = setup.config.text_max_length
    linear = 2 * (
        n * c * 3 * c  # qkv
        + n * c * c  # attention output projection
        + 2 * noisy * c * c  # cross-attention q and output projection (noisy tokens only)
        + text * c * 2 * c  # cross-attention kv on the text
        + 3 * n * c * f  # SwiGLU
        + frames * t_dim * 6 * c  # adaLN
    )
    # q.k^T and p.v over every head: condition->condition, noisy->all, noisy->text
    attention = 4 * c * (cond * cond + noisy * n + noisy * text)
    return {"linear": float(linear), "attention": float(attention)}


def frozen_backward_flops(forward: dict[str, float]) -> float:
    """Backward with frozen weights: linears need input gradients only; attention needs dq, dk, dv."""
    return forward["linear"] + 2 * forward["attention"]


# ----------------------------------------------------------------------------------------- naive block


class NaiveBlock(nn.Module):
    """The block's function written plainly: separate q/k/v Linears, no fusions, the official's layout copies.

    Built from (and numerically equal to) a :class:`LongCatBlock`: the reference our block is compared with.
    """

    def __init__(self, block: LongCatBlock, config: DiTConfig) -> None:
        super().__init__()
        self.heads, self.head_dim = config.num_heads, config.head_dim

        def linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
            layer = nn.Linear(
                weight.shape[1],
                weight.shape[0],
                bias=bias is not None,
                device=weight.device,
                dtype=weight.dtype,
            )
            layer.weight.data.copy_(weight)
            if bias is not None:
                layer.bias.data.copy_(bias)
            return layer.requires_grad_(False)

        modulation = block.adaLN_modulation[1]
        self.modulation = linear(modulation.weight, modulation.bias)
        qkv_w, qkv_b = block.attn.qkv.weight.chunk(3), block.attn.qkv.bias.chunk(3)
        self.self_q, self.self_k, self.self_v = (linear(w, b) for w, b in zip(qkv_w, qkv_b, strict=True))
        self.self_proj = linear(block.attn.proj.weight, block.attn.proj.bias)
        self.cross_q = linear(block.cross_attn.q_linear.weight, block.cross_attn.q_linear.bias)
        kv_w, kv_b = block.cross_attn.kv_linear.weight.chunk(2), block.cross_attn.kv_linear.bias.chunk(2)
        self.cross_k, self.cross_v = (linear(w, b) for w, b in zip(kv_w, kv_b, strict=True))
        self.cross_proj = linear(block.cross_attn.proj.weight, block.cross_attn.proj.bias)
        self.w1, self.w2, self.w3 = (linear(getattr(block.ffn, n).weight, None) for n in ("w1", "w2", "w3"))
        self.norms = {
            "self_q": block.attn.q_norm.weight,
            "self_k": block.attn.k_norm.weight,
            "cross_q": block.cross_attn.q_norm.weight,
            "cross_k": block.cross_attn.k_norm.weight,
        }
        self.cross_norm = (block.pre_crs_attn_norm.weight, block.pre_crs_attn_norm.bias)

    def _heads(self, x: torch.Tensor, norm: str) -> torch.Tensor:
        B, N, _ = x.shape
        x = x.view(B, N, self.heads, self.head_dim)
        xf = x.float()
        x = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * self.norms[norm]
        return x.permute(0, 2, 1, 3).contiguous()  # [B, H, N, D]

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        pairs = xf.unflatten(-1, (-1, 2))
        rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
        return (xf * cos + rotated * sin).to(x.dtype)

    def forward(
        self,
        x: torch.Tensor,
        temb: torch.Tensor,
        text: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        grid: tuple[int, int, int],
        num_cond_latents: int,
    ) -> torch.Tensor:
        B, N, C = x.shape
        T = grid[0]
        n_cond = num_cond_latents * N // T
        mod = F.linear(F.silu(temb).float(), self.modulation.weight.float(), self.modulation.bias.float())
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = mod.unsqueeze(2).chunk(6, dim=-1)

        def modulate(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            normed = F.layer_norm(h.view(B, T, -1, C).float(), (C,), eps=1e-6)
            return (normed * (1 + scale) + shift).to(h.dtype).view(B, N, C)

        def residual(h: torch.Tensor, gate: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
            return (h.view(B, T, -1, C) + gate * update.view(B, T, -1, C)).to(h.dtype).view(B, N, C)

        h = modulate(x, shift_a, scale_a)
        q = self._rope(self._heads(self.self_q(h), "self_q"), cos, sin)
        k = self._rope(self._heads(self.self_k(h), "self_k"), cos, sin)
        v = self.self_v(h).view(B, N, self.heads, self.head_dim).permute(0, 2, 1, 3).contiguous()
        out_cond = F.scaled_dot_product_attention(
            q[:, :, :n_cond].contiguous(), k[:, :, :n_cond].contiguous(), v[:, :, :n_cond].contiguous()
        )
        out_noisy = F.scaled_dot_product_attention(q[:, :, n_cond:].contiguous(), k, v)
        out = torch.cat([out_cond, out_noisy], dim=2).transpose(1, 2).reshape(B, N, C)
        x = residual(x, gate_a, self.self_proj(out))

        h = F.layer_norm(x.float(), (C,), self.cross_norm[0].float(), self.cross_norm[1].float(), 1e-6).to(
            x.dtype
        )
        h = h[:, n_cond:]
        q = self._heads(self.cross_q(h), "cross_q")
        k = self._heads(self.cross_k(text), "cross_k")
        v = self.cross_v(text).view(B, -1, self.heads, self.head_dim).permute(0, 2, 1, 3).contiguous()
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, -1, C)
        out = self.cross_proj(out)
        x = x + torch.cat([torch.zeros(B, n_cond, C, dtype=out.dtype, device=out.device), out], dim=1)

        h = modulate(x, shift_f, scale_f)
        return residual(x, gate_f, self.w2(F.silu(self.w1(h)) * self.w3(h)))


# ----------------------------------------------------------------------------------------- cases


class Report:
    def __init__(self, setup: Setup, out: Path | None) -> None:
        self.out = out
        self.data: dict = {
            "device": torch.cuda.get_device_name() if setup.device == "cuda" else "cpu",
            "torch": torch.__version__,
            "dtype": str(setup.dtype),
            "latent_shape": setup.latent_shape,
            "patch_grid": setup.grid,
            "tokens": math.prod(setup.grid),
            "text_max_length": setup.config.text_max_length,
            "hidden_size": setup.config.hidden_size,
            "depth": setup.config.depth,
            "cases": {},
        }

    def record(self, name: str, result: dict, flops: float | None = None) -> None:
        if flops is not None:
            result["tflop"] = float(f"{flops / 1e12:.4g}")
            result["tflops_per_s"] = float(f"{flops / result['median_s'] / 1e12:.4g}")
        self.data["cases"][name] = result
        print(json.dumps({name: result}), file=sys.stderr, flush=True)
        if self.out:
            self.out.write_text(json.dumps(self.data, indent=1))


def block_inputs(model: LongCatVideoTransformer, setup: Setup) -> dict:
    """What a block receives inside the model: tokens, frame embeddings, zero-padded text, RoPE."""
    g = torch.Generator(device=setup.device).manual_seed(1)
    config = model.config
    frames = setup.grid[0]
    n = math.prod(setup.grid)
    x = torch.randn(1, n, config.hidden_size, generator=g, device=setup.device).to(setup.dtype)
    temb = torch.randn(1, frames, config.adaln_tembed_dim, generator=g, device=setup.device)
    caption = torch.randn(1, setup.text_tokens, config.caption_channels, generator=g, device=setup.device)
    with torch.no_grad():
        text, text_mask = model._embed_text(caption.to(setup.dtype), None)
    rope = rope_tables(setup.grid, config.head_dim, setup.device)
    return dict(x=x, temb=temb, text=text, text_mask=text_mask, rope=rope)


def bench_block(setup: Setup, report: Report, compile_: bool) -> None:
    config = dataclasses.replace(setup.config, depth=1)
    model = build(config, setup, compile_)
    block = model.blocks[0]
    inputs = block_inputs(model, setup)
    x, rope = inputs["x"], inputs["rope"]
    args = (inputs["temb"], inputs["text"], inputs["text_mask"], rope, setup.grid, 1)
    naive = NaiveBlock(block, config)
    cos, sin = rope[0][:, 0], rope[1][:, 0, 1::2].repeat_interleave(2, dim=-1)  # plain interleaved tables
    naive_args = (inputs["temb"], inputs["text"], cos, sin, setup.grid, 1)

    with torch.no_grad():
        ours_out = model.run_block(block, x, *args).float()
        naive_out = naive(x, *naive_args).float()
    report.data["naive_vs_ours_rel_error"] = float((naive_out - ours_out).norm() / naive_out.norm())

    forward = flops_per_block(setup)
    fwd_flops = forward["linear"] + forward["attention"]
    fwd_bwd_flops = fwd_flops + frozen_backward_flops(forward)
    grad_out = torch.randn_like(x)
    x_grad = x.detach().clone().requires_grad_()

    def forward_only(run: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], object]:
        def step() -> None:
            with torch.no_grad():
                run(x)

        return step

    def forward_backward(
        run: Callable[[torch.Tensor], torch.Tensor], params: list[nn.Parameter]
    ) -> Callable[[], object]:
        def step() -> None:
            x_grad.grad = None
            for p in params:
                p.grad = None
            run(x_grad).backward(grad_out)

        return step

    def ours(x_in: torch.Tensor) -> torch.Tensor:
        return model.run_block(block, x_in, *args)

    def naive_plain(x_in: torch.Tensor) -> torch.Tensor:
        return naive(x_in, *naive_args)

    def naive_checkpointed(x_in: torch.Tensor) -> torch.Tensor:
        return checkpoint(naive, x_in, *naive_args, use_reentrant=False)

    report.record("ours_block_fwd", measure(forward_only(ours), setup, setup.warmup, setup.reps), fwd_flops)
    report.record(
        "naive_block_fwd", measure(forward_only(naive_plain), setup, setup.warmup, setup.reps), fwd_flops
    )
    for mode in ("full", "selective"):
        model.gradient_checkpointing = mode
        case = measure(forward_backward(ours, []), setup, setup.warmup, setup.reps)
        report.record(f"ours_block_fwd_bwd_{mode}_input_grads", case, fwd_bwd_flops)
    case = measure(forward_backward(naive_checkpointed, []), setup, setup.warmup, setup.reps)
    report.record("naive_block_fwd_bwd_full_input_grads", case, fwd_bwd_flops)

    # With a trainable rank-8 adapter on every projection, as LoRA training runs.
    ours_params = add_adapter(model, OUR_ADAPTER_TARGETS)
    naive_params = add_adapter(naive, NAIVE_ADAPTER_TARGETS)
    for mode in ("full", "selective"):
        model.gradient_checkpointing = mode
        case = measure(forward_backward(ours, ours_params), setup, setup.warmup, setup.reps)
        report.record(f"ours_block_fwd_bwd_{mode}_lora", case, fwd_bwd_flops)
    case = measure(forward_backward(naive_checkpointed, naive_params), setup, setup.warmup, setup.reps)
    report.record("naive_block_fwd_bwd_full_lora", case, fwd_bwd_flops)


def bench_model(setup: Setup, report: Report, compile_: bool) -> None:
    model = build(setup.config, setup, compile_)
    g = torch.Generator(device=setup.device).manual_seed(2)
    latents = torch.randn(1, setup.config.in_channels, *setup.latent_shape, generator=g, device=setup.device)
    caption = torch.randn(
        1, setup.text_tokens, setup.config.caption_channels, generator=g, device=setup.device
    )
    timestep = torch.tensor([700.0], device=setup.device)
    grad_out = torch.randn_like(latents)

    # The blocks' matmuls; embedders and the output layer add well under 0.1%.
    per_block = flops_per_block(setup)
    depth = setup.config.depth
    fwd_flops = depth * (per_block["linear"] + per_block["attention"])
    fwd_bwd_flops = fwd_flops + depth * frozen_backward_flops(per_block)

    def run() -> torch.Tensor:
        return model(latents, timestep, caption, num_cond_latents=1)

    def forward() -> None:
        with torch.no_grad():
            run()

    report.record("ours_model_fwd", measure(forward, setup, setup.model_warmup, setup.model_reps), fwd_flops)
    params = add_adapter(model, OUR_ADAPTER_TARGETS)

    def forward_backward() -> None:
        for p in params:
            p.grad = None
        run().backward(grad_out)

    for mode in ("full", "selective"):
        model.gradient_checkpointing = mode
        case = measure(forward_backward, setup, setup.model_warmup, setup.model_reps)
        report.record(f"ours_model_fwd_bwd_{mode}_lora", case, fwd_bwd_flops)


def summarize(report: Report) -> None:
    cases = report.data["cases"]
    summary: dict[str, float | bool] = {}

    def speedup(name: str, naive: str, ours: str) -> None:
        if naive in cases and ours in cases:
            summary[name] = round(cases[naive]["median_s"] / cases[ours]["median_s"], 2)

    speedup("block_fwd_speedup_vs_naive", "naive_block_fwd", "ours_block_fwd")
    speedup(
        "block_fwd_bwd_full_speedup_vs_naive",
        "naive_block_fwd_bwd_full_input_grads",
        "ours_block_fwd_bwd_full_input_grads",
    )
    speedup(
        "block_lora_full_speedup_vs_naive", "naive_block_fwd_bwd_full_lora", "ours_block_fwd_bwd_full_lora"
    )
    speedup(
        "block_lora_selective_speedup_vs_naive_full",
        "naive_block_fwd_bwd_full_lora",
        "ours_block_fwd_bwd_selective_lora",
    )
    if "ours_model_fwd" in cases:
        summary["model_fwd_s"] = round(cases["ours_model_fwd"]["median_s"], 3)
        if report.data["device"] != "cpu":  # the target is for the full model at 480x832x93 on an H100
            summary["model_fwd_meets_3.3s_target"] = cases["ours_model_fwd"]["median_s"] <= 3.3
    for mode in ("full", "selective"):
        case = cases.get(f"ours_model_fwd_bwd_{mode}_lora")
        if case:
            summary[f"model_lora_{mode}_s"] = round(case["median_s"], 3)
            if "peak_gib" in case:
                summary[f"model_lora_{mode}_fits_80gb"] = case["peak_gib"] * 2**30 <= 80e9
    report.data["summary"] = summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small config on the CPU: a smoke check")
    parser.add_argument("--parts", default="block,model", help="comma-separated: block, model")
    parser.add_argument("--compile", action="store_true", help="run our blocks through compile_blocks()")
    parser.add_argument("--out", type=Path, help="also write the JSON here, after every case")
    args = parser.parse_args()

    setup = quick_setup() if args.quick else full_setup()
    if setup.device == "cuda" and not torch.cuda.is_available():
        parser.error("needs CUDA; use --quick for the CPU smoke check")
    if args.compile:
        # One graph per checkpointing mode and adapter state; more than the default limit of 8 in one run.
        torch._dynamo.config.recompile_limit = 64
    report = Report(setup, args.out)
    report.data["compiled"] = args.compile
    parts = set(args.parts.split(","))
    if "block" in parts:
        bench_block(setup, report, args.compile)
    if "model" in parts:
        gc.collect()  # the block part's models
        if setup.device == "cuda":
            torch.cuda.empty_cache()
        bench_model(setup, report, args.compile)
    summarize(report)
    write_report(report.data, args.out)


if __name__ == "__main__":
    main()
