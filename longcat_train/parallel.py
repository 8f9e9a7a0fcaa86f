"""Multi-GPU / multi-node setup applied to a built model from outside (torchtitan style).

- ``init_distributed``: reads torchrun's environment; NCCL on CUDA, gloo on CPU; a single process needs
  no process group at all.
- ``apply_ddp``: replicate the model and all-reduce only the LoRA gradients. The frozen base is loaded
  identically on every rank, so DDP is told not to broadcast it.
- ``apply_fsdp``: FSDP2 ``fully_shard`` per transformer block, then the root, for a base too large to
  replicate. LoRA weights are sharded with their block.
- ``grad_sync``: turn gradient communication off for the micro-batches before the last of an
  accumulated step (DDP ``no_sync``; FSDP2 ``set_requires_gradient_sync``).
- state dicts that gather sharded LoRA/optimizer state on every rank for saving, and load it back.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from longcat_train.model import transformer_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed() -> Dist:
    """This process's place in a torchrun job (or a single process), with its device selected."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # Long timeout: rank 0 may encode captions or save a checkpoint while the others wait.
        dist.init_process_group(
            backend,
            timeout=datetime.timedelta(minutes=60),
            device_id=device if device.type == "cuda" else None,
        )
        log.info("rank %d/%d on %s (%s)", rank, world, device, backend)
    return Dist(rank, world, local, device)


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def mean_across(value: torch.Tensor, d: Dist) -> torch.Tensor:
    """The mean of a scalar over ranks (identical result on every rank)."""
    if not d.enabled:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / d.world_size


def agree(value: int, d: Dist, *, op: str) -> int:
    """``op`` ("max" or "min") of one integer over ranks, the same on every rank; a cheap collective
    for decisions all ranks must take together (stop now, this checkpoint is intact)."""
    if not d.enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=d.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.MIN)
    return int(tensor.item())


def apply_ddp(model: nn.Module, d: Dist) -> DistributedDataParallel:
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    frozen += [name for name, _ in model.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
    return DistributedDataParallel(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)


def apply_fsdp(model: nn.Module, d: Dist, param_dtype: torch.dtype | None) -> nn.Module:
    """Shard every block, then the rest, over all ranks (in place). ``param_dtype`` = compute dtype of the
    all-gathered weights (bf16 on GPU); gradients are reduced in fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(d.device.type, (d.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in transformer_of(model).blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def grad_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Communicate gradients in this backward only when ``enabled`` (the last micro-batch)."""
    if isinstance(model, DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
    elif is_fsdp(model):
        model.set_requires_gradient_sync(enabled)
        yield
    else:
        yield


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full (gathered) trainable parameters on the CPU, keyed by name; a collective under FSDP."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        return get_model_state_dict(model, options=options)
    return {name: p.detach().cpu() for name, p in unwrap(model).named_parameters() if p.requires_grad}


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state to save: full tensors (gathered under FSDP, a collective there)."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    return optimizer.state_dict()


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


def total_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip to ``max_norm`` (0: no clipping) and return the pre-clip norm as a plain tensor."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
