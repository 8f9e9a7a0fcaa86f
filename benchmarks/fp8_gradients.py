"""LoRA gradients with bf16 and with float8 base matmuls, against a float32 reference.

    python benchmarks/fp8_gradients.py                # GPU: 8 full-width blocks at 480x832x45
    python benchmarks/fp8_gradients.py --quick        # CPU: the tiny model

One batch, one model, three backward passes with the same noise and sigma: float32 weights without
autocast (TF32 off, the reference), then the base weights cast to bf16 under bf16 autocast (what the trainer
runs), then the same with ``longcat_train.quant.use_fp8_matmuls`` (the trainer's ``fp8_matmuls``).
The LoRA B factors are randomised (they start at zero, which would leave every A factor without a gradient).
Dense SDPA attention in all three, so only the matmul precision differs. Prints, for bf16 and float8, the
loss and the relative L2 error and cosine similarity of all LoRA gradients (concatenated) against the
reference, and float8 against bf16.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from _shared import build_model, smooth_latents, write_report  # benchmarks/_shared.py

from longcat_train import trainer
from longcat_train.config import TrainConfig
from longcat_train.dit_config import DiTConfig
from longcat_train.quant import use_fp8_matmuls


def lora_gradients(
    model: torch.nn.Module, batch: dict, cfg: TrainConfig, device: torch.device, autocast: bool
) -> tuple[float, torch.Tensor]:
    """The loss and all LoRA gradients as one float32 vector, from a fixed noise and sigma draw."""
    generator = torch.Generator(device).manual_seed(0)
    with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
        loss = trainer.training_loss(model, batch, cfg, generator, None, device)
    loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.cat([p.grad.float().flatten() for p in params])
    for p in params:
        p.grad = None
    return loss.item(), grads


def agreement(ours: torch.Tensor, reference: torch.Tensor) -> dict:
    return {
        "rel_err": float((ours - reference).norm() / reference.norm()),
        "cosine": float(F.cosine_similarity(ours, reference, dim=0)),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU run with the tiny model")
    parser.add_argument("--depth", type=int, default=8, help="full-width blocks (the float32 copy must fit)")
    parser.add_argument("--frames", type=int, default=45, help="clip frames, 4k+1 (480x832 area)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)

    device = torch.device("cpu" if args.quick else "cuda")
    config = DiTConfig.tiny() if args.quick else DiTConfig.full()
    config.depth = min(args.depth, config.depth)
    latent_shape = (3, 8, 8) if args.quick else (1 + (args.frames - 1) // 4, 60, 104)
    torch.backends.cuda.matmul.allow_tf32 = False

    model = build_model(config, device, torch.float32)
    model.get_base_model().attention_implementation = "sdpa"
    model.get_base_model().gradient_checkpointing = "full"
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    latents = smooth_latents(config.in_channels, latent_shape, g)[None]
    batch = {
        "latents": latents,
        "cond_latents": latents[:, :, :1].clone(),
        "embeds": torch.randn(1, 512, config.caption_channels, generator=g),
        "embeds_mask": torch.ones(1, 512, dtype=torch.long),
    }
    cfg = TrainConfig(model="benchmark")

    reference_loss, reference = lora_gradients(model, batch, cfg, device, autocast=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" not in name:
                p.data = p.data.to(torch.bfloat16)
    bf16_loss, bf16 = lora_gradients(model, batch, cfg, device, autocast=True)
    use_fp8_matmuls(model)
    fp8_loss, fp8 = lora_gradients(model, batch, cfg, device, autocast=True)

    T, H, W = latent_shape
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "config": {
            "dit": "tiny" if args.quick else "full width",
            "depth": config.depth,
            "latent_shape": [config.in_channels, T, H, W],
            "tokens": T * (H // 2) * (W // 2),
            "attention": "sdpa",
            "lora_rank": 8,
            "lora_parameters": reference.numel(),
        },
        "float32": {"loss": reference_loss},
        "bf16": {"loss": bf16_loss, **agreement(bf16, reference)},
        "fp8_matmuls": {"loss": fp8_loss, **agreement(fp8, reference), "against_bf16": agreement(fp8, bf16)},
    }
    write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
