"""The training techniques applied to a built DiT, and the rules for combining them: all in this one place.

:func:`check_techniques` holds every compatibility rule (:data:`RULES`); it runs when the flags are parsed,
before anything loads, so this module imports nothing heavy at its top. :func:`apply_techniques` applies
the techniques a config asks for in the one order they compose in, importing the modules that implement
them (``quant``, ``lora``, ``offload``, ``parallel``) when it runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from longcat_data.flags import ConfigError

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from torch import nn

    from longcat_train.config import TrainConfig
    from longcat_train.lowrank import LowRankSet
    from longcat_train.model import LongCatVideoTransformer
    from longcat_train.parallel import Dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rule:
    """Two settings that do not combine.

    Attributes:
        settings: the two config fields, both named in the message.
        clashes: whether a config combines them.
        message: the ConfigError text, ``str.format``-ed with the config's fields.
        example: field values under which they clash (and no other rule does).
    """

    settings: tuple[str, str]
    clashes: Callable[[TrainConfig], bool]
    message: str
    example: dict[str, Any]


RULES: tuple[Rule, ...] = (
    Rule(
        ("compile", "block_swap"),
        lambda c: bool(c.compile and c.block_swap),
        "compile and block_swap do not mix: block swap's hooks break the compiled block graph; turn one off",
        {"compile": True, "block_swap": 2},
    ),
    Rule(
        ("compile_tune", "compile"),
        lambda c: c.compile_tune and not c.compile,
        "compile_tune tunes the compiled block step: set compile too",
        {"compile_tune": True},
    ),
    Rule(
        ("offload_activations", "compile"),
        lambda c: c.offload_activations and c.compile,
        "offload_activations works in eager training: its saved-tensor hooks do not trace; turn off compile "
        "or offload_activations",
        {"offload_activations": True, "compile": True},
    ),
    Rule(
        ("offload_activations", "fsdp"),
        lambda c: c.offload_activations and c.fsdp,
        "offload_activations works in unsharded training: turn off fsdp or offload_activations",
        {"offload_activations": True, "fsdp": True},
    ),
    Rule(
        ("fp8_matmuls", "base_model_precision"),
        lambda c: c.fp8_matmuls and c.base_model_precision not in ("no_change", "bf16"),
        "fp8_matmuls computes in float8 from bf16 weights; base_model_precision = {base_model_precision} "
        "stores them quantised: pick one",
        {"fp8_matmuls": True, "base_model_precision": "int8-quanto"},
    ),
    Rule(
        ("fp8_matmuls", "gradient_checkpointing"),
        lambda c: c.compile and c.fp8_matmuls and c.gradient_checkpointing == "full",
        "compiled float8 matmuls under full checkpointing run out of memory (the compiled recompute holds "
        "far more than the block inputs; benchmarks/RESULTS.md): use gradient_checkpointing = selective, "
        "or turn off compile or fp8_matmuls",
        {"compile": True, "fp8_matmuls": True, "gradient_checkpointing": "full"},
    ),
    Rule(
        ("fsdp", "block_swap"),
        lambda c: bool(c.fsdp and c.block_swap),
        "fsdp and block_swap do not combine: shard or swap, not both",
        {"fsdp": True, "block_swap": 2},
    ),
    Rule(
        ("memory_budget", "fsdp"),
        lambda c: c.memory_budget is not None and c.fsdp,
        "memory_budget plans one GPU holding the whole base; fsdp shards it: drop memory_budget (set "
        "gradient_checkpointing) or fsdp",
        {"memory_budget": "80", "fsdp": True},
    ),
    Rule(
        ("block_swap", "gradient_checkpointing"),
        lambda c: c.block_swap > 0 and c.gradient_checkpointing == "none",
        "block_swap trains only under gradient_checkpointing (selective, elementwise or full): without it "
        "autograd keeps views of the swap buffers, which are refilled before backward",
        {"block_swap": 2, "gradient_checkpointing": "none"},
    ),
    Rule(
        ("conditioning", "fsdp"),
        lambda c: c.fsdp and len(c.tasks) > 1 and c.train_batch_size > 1,
        "conditioning = mixed with train_batch_size > 1 runs one forward per task drawn in a batch, so "
        "ranks would make different numbers of the calls fsdp takes together: set train_batch_size = 1 "
        "(raise gradient_accumulation_steps instead) or turn off fsdp",
        {"conditioning": "mixed", "train_batch_size": 2, "fsdp": True},
    ),
)


def check_techniques(cfg: TrainConfig) -> None:
    """ConfigError naming both settings for every pair of techniques that do not combine."""
    for rule in RULES:
        if rule.clashes(cfg):
            raise ConfigError(rule.message.format(**vars(cfg)))


def load_device(cfg: TrainConfig, device: torch.device) -> torch.device:
    """Where the base loads: host memory when FSDP shards it from there or block swap places it, else
    straight onto the compute ``device``."""
    import torch

    return torch.device("cpu") if cfg.fsdp or cfg.block_swap > 0 else device


def apply_techniques(
    base: LongCatVideoTransformer,
    cfg: TrainConfig,
    d: Dist,
    *,
    lora_weights: LowRankSet | None = None,
    checkpointing: tuple[str, ...] | None = None,
) -> tuple[nn.Module, PeftModel]:
    """The training techniques of ``cfg`` on the loaded ``base``, in the order they compose in (autos
    still in ``cfg`` are resolved for ``d.device`` first, ``planning.resolve_auto``, steps not known).

    1. the attention backend (a runtime choice of the model);
    2. ``base_lora``: merged into the base weights (computed on the compute device), while they are
       still plain tensors: the LoRA then trains on that base, and is saved alone;
    3. base quantisation: replaces the block linears' weights, so LoRA then wraps quantised layers;
    4. LoRA (seeded: the same adapter on every rank), then ``lora_weights`` when resuming, before anything
       places or shards the model;
    5. gradient checkpointing (``checkpointing``, one mode per block, where a memory plan chose them; else
       ``cfg.gradient_checkpointing`` on every block) and feed-forward chunks;
    6. :func:`apply_fast_paths`: float8 matmuls for the frozen base layers under LoRA (their weights
       stored in float8 unless FSDP shards them), then compile;
    7. placement: block swap (it refuses blocks that change after it, so no module changes later) or the
       compute device, then activation offload's hooks;
    8. DDP or FSDP2 around the placed model.

    Returns:
        ``(train_model, peft_model)``: the module to train (wrapped for data parallelism where there is
        more than one process) and the peft model whose adapter is saved.
    """
    import torch

    from longcat_train import lora, lora_apply, offload, parallel, planning, quant
    from longcat_train.lora_spec import parse_lora_spec

    if any(planning.is_auto(cfg, name) for name in planning.AUTO_FIELDS):
        resolved = planning.resolve_auto(cfg, planning.device_gpu(d.device))
        cfg, checkpointing = resolved.cfg, checkpointing or resolved.checkpointing
    base.attention_implementation = cfg.attention
    # FSDP all-gathers in the model's compute dtype (that of its input projection, as forward uses).
    compute_dtype = base.x_embedder.proj.weight.dtype
    if cfg.base_lora:
        entries = [parse_lora_spec(spec).entry(1.0) for spec in cfg.base_lora]
        try:
            lora_apply.load_loras(base, entries, merge=True, device=d.device)
        except ValueError as err:
            raise ConfigError(f"base_lora: {err}") from None
    quant.quantize_base(base, cfg.base_model_precision)

    with torch.random.fork_rng(devices=[]):
        # LoRA init draws from its own seed: the same adapter on every rank, whatever ran before.
        torch.manual_seed(cfg.seed)
        model = lora.apply_lora(
            base, rank=cfg.lora_rank, alpha=cfg.alpha, dropout=cfg.lora_dropout, targets=cfg.lora_targets
        )
    if lora_weights is not None:
        lora.load_lora_weights(model, lora_weights)

    base.gradient_checkpointing = checkpointing or cfg.gradient_checkpointing
    base.feed_forward_chunks = cfg.feed_forward_chunks
    # FSDP shards the bf16 weights; float8 ones would sit whole on every rank.
    apply_fast_paths(
        model,
        d.device,
        fp8_matmuls=cfg.fp8_matmuls,
        compile=cfg.compile,
        tune=cfg.compile_tune,
        store_fp8=not cfg.fsdp,
    )

    if cfg.block_swap > 0:
        offload.apply_block_swap(model, cfg.block_swap, cfg.block_swap_device, compute_device=d.device)
    elif not cfg.fsdp:
        model.to(d.device)
    if cfg.offload_activations:
        offload.apply_activation_offload(model, compute_device=d.device)

    if cfg.fsdp:
        if not d.enabled:
            log.info("fsdp asked for a single process: nothing to shard")
            return model.to(d.device), model
        return parallel.apply_fsdp(model, d, compute_dtype if d.device.type == "cuda" else None), model
    return (parallel.apply_ddp(model, d) if d.enabled else model), model


def apply_fast_paths(
    model: nn.Module,
    device: torch.device,
    *,
    fp8_matmuls: bool,
    compile: bool,
    tune: bool = False,
    store_fp8: bool = False,
) -> None:
    """The speed techniques training and sampling share, in place on the DiT inside ``model`` (bare, or
    under LoRA: its frozen base layers): float8 matmuls for the block linears once ``device`` is known
    to run them (``quant.check_fp8_matmuls``; ``store_fp8``: their weights quantised once, on
    ``device``, and kept in float8), then the compiled block step (``compile_blocks``, traced at the
    first forward; ``tune``: with coordinate-descent tuning). Call it before block swap places the model
    and before LoRA hooks go on: both hold the modules it replaces."""
    from longcat_train import quant
    from longcat_train.model import transformer_of

    if fp8_matmuls:
        quant.check_fp8_matmuls(device)
        quant.use_fp8_matmuls(model, store=store_fp8, device=device)
    if compile:
        transformer_of(model).compile_blocks(tune=tune)
