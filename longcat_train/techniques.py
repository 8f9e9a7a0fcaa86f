"""The training techniques applied to a built DiT, and the rules for combining them: all in this one place.

:func:`check_techniques` holds every compatibility rule; it runs when the flags are parsed, before anything
loads, so it imports nothing heavy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from longcat_data.flags import ConfigError

if TYPE_CHECKING:
    from longcat_train.config import TrainConfig


def check_techniques(cfg: TrainConfig) -> None:
    """ConfigError naming both settings for every pair of techniques that do not combine."""
    if cfg.compile and cfg.block_swap:
        raise ConfigError(
            "compile and block_swap do not mix: block swap's hooks break the compiled block graph; turn one off"
        )
    if cfg.compile_tune and not cfg.compile:
        raise ConfigError("compile_tune tunes the compiled block step: set compile too")
    if cfg.offload_activations and (cfg.compile or cfg.fsdp):
        raise ConfigError("offload_activations works in eager, unsharded training: turn off compile and fsdp")
    if cfg.fp8_matmuls and cfg.base_model_precision not in ("no_change", "bf16"):
        raise ConfigError(
            f"fp8_matmuls computes in float8 from bf16 weights; base_model_precision = "
            f"{cfg.base_model_precision} stores them quantised: pick one"
        )
    if cfg.fsdp and cfg.block_swap:
        raise ConfigError("fsdp and block_swap do not combine: shard or swap, not both")
