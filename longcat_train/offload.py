"""Block swap and activation offload: train a model larger than the GPU by streaming through host memory.

Block swap keeps the frozen weights of the last N transformer blocks off the GPU and streams them in;
activation offload (:func:`apply_activation_offload`, below) does the same for what autograd saves between
forward and backward.

Applied from outside the model (the model never knows): forward pre-hooks on the swapped blocks make each
block's weights resident on the compute device just before it runs and start copying the next block in on
a side CUDA stream, so the copy overlaps the current block's compute.

How one training step flows, with the last N blocks swapped and gradient checkpointing on:

- forward: resident blocks run while the first swapped block is prefetched (root pre-hook); each swapped
  block then prefetches the next one. Under checkpointing the autograd graph keeps no reference to the
  weights, so a block's buffer can be reused as soon as its forward is enqueued.
- backward: checkpointing re-runs each block's forward in reverse order, inside the backward pass. The
  same pre-hook fires there; it sees that it runs inside backward and prefetches the *previous* block.
  The last block of the forward is also the first of the backward, so it simply stays resident.

Memory: the swapped blocks' frozen tensors live in one flat buffer per block on the offload device
(pinned host memory for CPU offload, so host-to-device copies are asynchronous DMA). On the compute
device a fixed pool of two block-sized buffers takes turns: the one in use and the one being filled.
No device memory is allocated per step.

Trainable parameters (LoRA) on swapped blocks stay on the compute device: they are tiny, and their
identity must not change under the optimizer. Frozen tensors are re-bound on every load (module attributes
point into the pool buffer while resident, into the offload buffer otherwise), so hold modules, not
references to frozen weights. Tensor subclasses (optimum-quanto int8, torchao float8 weights) are streamed
through their inner tensors, so a quantised base swaps at its quantised size.

Order: call :func:`apply_block_swap` last, after quantisation and LoRA injection, and instead of
``model.to(device)`` (it places the model). A block whose modules or tensors change afterwards is refused.
Training through swapped blocks needs gradient checkpointing on them: without it autograd would keep
views of the pooled buffers for backward, and they are refilled with other blocks by then.

Why not diffusers' group offloading (``apply_group_offloading(..., use_stream=True)``): it offloads every
block (no "last N"), onloads by ``.to()`` into fresh allocations, moves the trainable LoRA parameters with
the frozen ones, and prefetches in the order of the first forward, so checkpointed backward (reverse order)
falls back to synchronous loads.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from longcat_train.model import transformer_of

logger = logging.getLogger(__name__)

# Byte alignment of every tensor inside a flat buffer: a view must start where its dtype's `view` accepts it,
# and vectorised kernels want 16-byte aligned rows; 256 matches what the CUDA caching allocator hands out.
_ALIGN = 256

# One buffer in use plus one being filled is enough: a prefetch waits only for the block before the current
# one to finish, and its copy then runs during the current block's compute.
_POOL_SIZE = 2


@dataclass(frozen=True)
class _Leaf:
    """A plain tensor kept at byte `offset` of its block's flat buffer."""

    offset: int
    dtype: torch.dtype
    size: tuple[int, ...]
    stride: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class _Wrapped:
    """A wrapper tensor subclass, rebuilt from its inner tensors with ``__tensor_unflatten__``."""

    cls: type
    ctx: Any
    size: torch.Size
    stride: tuple[int, ...]
    inner: dict[str, _Leaf | _Wrapped]


_Spec = _Leaf | _Wrapped


def _plan(t: torch.Tensor, cursor: list[int]) -> _Spec:
    """Give `t` (and its inner tensors, for a subclass) a place in a flat buffer; advance `cursor[0]`."""
    if is_traceable_wrapper_subclass(t):
        names, ctx = t.__tensor_flatten__()
        inner = {name: _plan(getattr(t, name), cursor) for name in names}
        return _Wrapped(type(t), ctx, t.size(), tuple(t.stride()), inner)
    # The strided extent covers non-contiguous layouts (a transposed inner weight) without reordering them.
    span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True)) if t.numel() else 0
    leaf = _Leaf(cursor[0], t.dtype, tuple(t.shape), tuple(t.stride()), span * t.element_size())
    cursor[0] += -(-leaf.nbytes // _ALIGN) * _ALIGN
    return leaf


def _view(flat: torch.Tensor, spec: _Spec) -> torch.Tensor:
    """The tensor `spec` describes, as a view of the uint8 buffer `flat` (no copy)."""
    if isinstance(spec, _Wrapped):
        inner = {name: _view(flat, s) for name, s in spec.inner.items()}
        return spec.cls.__tensor_unflatten__(inner, spec.ctx, spec.size, spec.stride)
    raw = flat[spec.offset : spec.offset + spec.nbytes].view(spec.dtype)
    return raw.as_strided(spec.size, spec.stride)


def _write(flat: torch.Tensor, spec: _Spec, t: torch.Tensor) -> None:
    if isinstance(spec, _Wrapped):
        for name, s in spec.inner.items():
            _write(flat, s, getattr(t, name))
    else:
        _view(flat, spec).copy_(t.detach())


class _CudaStreams:
    """Copies on a side stream; events order them against the compute (current) stream."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.copy_stream = torch.cuda.Stream(device)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: torch.cuda.Event | None) -> torch.cuda.Event:
        with torch.cuda.stream(self.copy_stream):
            if after is not None:
                self.copy_stream.wait_event(after)
            dst.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.copy_stream)
        return done

    def mark(self) -> torch.cuda.Event:
        # Recorded on the compute stream: completes once everything enqueued so far (the users of a buffer) ran.
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def wait(self, event: torch.cuda.Event | None) -> None:
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def keep(self, t: torch.Tensor) -> None:
        # The allocator must not hand `t`'s memory out again before the copy stream has read it.
        t.record_stream(self.copy_stream)


class _SyncStreams:
    """Stand-in where the compute device has no streams (CPU): every copy is complete when it returns."""

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: None) -> None:
        dst.copy_(src)

    def mark(self) -> None:
        return None

    def wait(self, event: None) -> None:
        pass

    def keep(self, t: torch.Tensor) -> None:
        pass


@dataclass(eq=False)
class _Slot:
    """A block-sized buffer on the compute device, holding one swapped block at a time."""

    buffer: torch.Tensor
    block: _SwappedBlock | None = None
    free: Any = None  # event: the previous holder's compute is done, the buffer may be overwritten
    last_use: int = 0


@dataclass(eq=False)
class _SwappedBlock:
    index: int
    module: nn.Module
    # (owning module, attribute name, is a parameter, place in the flat buffers)
    entries: list[tuple[nn.Module, str, bool, _Spec]]
    storage: torch.Tensor  # flat uint8 on the offload device
    slot: _Slot | None = None
    ready: Any = None  # event: the copy into `slot` is done
    members: list[object] = field(default_factory=list)
    trainable: bool = False  # has parameters that train (LoRA): autograd records the block's forward


def _page_locked(nbytes: int) -> torch.Tensor:
    """A host byte buffer that CUDA copies from asynchronously (DMA).

    Page-locked in place rather than taken from the pinned caching allocator, which rounds every
    allocation up to a power of two: a block just over a power of two would hold nearly twice its size.
    """
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    if nbytes == 0:
        return buffer
    cudart = torch.cuda.cudart()
    if int(cudart.cudaHostRegister(buffer.data_ptr(), nbytes, 0)) == 0:
        weakref.finalize(buffer, cudart.cudaHostUnregister, buffer.data_ptr())
        return buffer
    logger.warning("cudaHostRegister failed: block swap falls back to PyTorch's pinned allocator")
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


def _members(module: nn.Module) -> list[object]:
    """Every module and tensor object of a block, to notice changes made behind the swap's back."""
    return [*module.modules(), *module.parameters(), *module.buffers()]


def _in_backward() -> bool:
    # Checkpointing re-runs block forwards from inside the autograd engine; outside backward this is -1.
    return torch._C._current_graph_task_id() != -1


def _checkpointed() -> bool:
    # Non-reentrant checkpointing runs the block under its own saved-tensor hooks, which keep no tensor
    # alive. Activation offload's hooks (outermost, around the whole model) do not count: they would keep
    # views of pooled weights.
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return hooks is not None and not isinstance(getattr(hooks[0], "__self__", None), ActivationOffload)


class BlockSwap:
    """Handle of a model whose last blocks stream from the offload device. Built by :func:`apply_block_swap`."""

    def __init__(
        self,
        model: nn.Module,
        num_blocks: int,
        offload_device: torch.device,
        compute_device: torch.device,
    ) -> None:
        blocks = transformer_of(model).blocks
        if not 0 <= num_blocks <= len(blocks):
            raise ValueError(f"cannot swap {num_blocks} blocks of a model with {len(blocks)}")
        self.offload_device = offload_device
        self.compute_device = compute_device
        self.indices = list(range(len(blocks) - num_blocks, len(blocks)))
        swapped = {id(m) for i in self.indices for m in blocks[i].modules()}
        for module in model.modules():
            if id(module) not in swapped:
                module._apply(lambda t: t.to(compute_device), recurse=False)

        pin = offload_device.type == "cpu" and compute_device.type == "cuda"
        self._blocks = [self._pack(i, blocks[i], pin) for i in self.indices]
        self._streams = _CudaStreams(compute_device) if compute_device.type == "cuda" else _SyncStreams()
        self.block_bytes = max((b.storage.numel() for b in self._blocks), default=0)
        self._slots = [
            _Slot(torch.empty(self.block_bytes, dtype=torch.uint8, device=compute_device))
            for _ in range(min(_POOL_SIZE, num_blocks))
        ]
        self._clock = 0
        self._handles = [
            b.module.register_forward_pre_hook(self._make_pre_hook(n)) for n, b in enumerate(self._blocks)
        ]
        if self._blocks:
            self._handles.append(model.register_forward_pre_hook(self._prefetch_first))
        logger.info(
            "block swap: %d of %d blocks on %s (%.2f GB each, pinned=%s), pool of %d on %s",
            num_blocks,
            len(blocks),
            offload_device,
            self.block_bytes / 1e9,
            pin,
            len(self._slots),
            compute_device,
        )

    @property
    def loaded_blocks(self) -> list[int]:
        """Indices (in the model's ``blocks``) of the swapped blocks now resident on the compute device."""
        return sorted(s.block.index for s in self._slots if s.block is not None)

    def _pack(self, index: int, module: nn.Module, pin: bool) -> _SwappedBlock:
        """Move a block's frozen tensors into one flat buffer on the offload device; trainable ones to compute."""
        entries: list[tuple[nn.Module, str, bool, _Spec]] = []
        tensors: list[torch.Tensor] = []
        cursor = [0]
        trainable = False
        for owner in module.modules():
            for name, p in owner._parameters.items():
                if p is None:
                    continue
                if p.requires_grad:
                    if is_traceable_wrapper_subclass(p):
                        raise TypeError(f"block {index}: trainable tensor-subclass parameter {name!r}")
                    p.data = p.data.to(self.compute_device)
                    trainable = True
                    continue
                entries.append((owner, name, True, _plan(p, cursor)))
                tensors.append(p)
            for name, b in owner._buffers.items():
                if b is not None:
                    entries.append((owner, name, False, _plan(b, cursor)))
                    tensors.append(b)
        storage = (
            _page_locked(cursor[0])
            if pin
            else torch.empty(cursor[0], dtype=torch.uint8, device=self.offload_device)
        )
        for (_, _, _, spec), t in zip(entries, tensors, strict=True):
            _write(storage, spec, t)
        block = _SwappedBlock(index, module, entries, storage, trainable=trainable)
        self._bind(block, storage)
        return block

    def _bind(self, block: _SwappedBlock, flat: torch.Tensor) -> None:
        """Point the block's frozen attributes at views of `flat` (its offload buffer or a pool buffer)."""
        for owner, name, is_param, spec in block.entries:
            t = _view(flat, spec)
            if is_param:
                owner._parameters[name] = nn.Parameter(t, requires_grad=False)
            else:
                owner._buffers[name] = t
        block.members = _members(block.module)

    def _check(self, block: _SwappedBlock) -> None:
        now = _members(block.module)
        if len(now) != len(block.members) or any(
            a is not b for a, b in zip(now, block.members, strict=False)
        ):
            raise RuntimeError(
                f"block {block.index} changed after apply_block_swap (new modules or re-assigned tensors): "
                "quantise and inject LoRA first, then apply block swap"
            )

    def _load(self, block: _SwappedBlock, keep: _SwappedBlock) -> None:
        """Start copying `block` into a pool buffer, evicting the least recently used block other than `keep`."""
        self._clock += 1
        if block.slot is not None:
            block.slot.last_use = self._clock
            return
        self._check(block)
        slot = min((s for s in self._slots if s.block is not keep), key=lambda s: s.last_use)
        if slot.block is not None:
            old = slot.block
            self._check(old)
            self._bind(old, old.storage)
            old.slot = None
            # Everything that reads the old block is enqueued by now (its forward ran, and in backward the
            # autograd engine finishes a block before the one below it starts); the copy waits for it.
            slot.free = self._streams.mark()
        nbytes = block.storage.numel()
        block.ready = self._streams.copy(slot.buffer[:nbytes], block.storage, slot.free)
        self._bind(block, slot.buffer)
        block.slot, slot.block, slot.last_use = slot, block, self._clock

    def _make_pre_hook(self, n: int):
        @torch.compiler.disable
        def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            block = self._blocks[n]
            backward = _in_backward()
            records = block.trainable or any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
            if torch.is_grad_enabled() and records and not backward and not _checkpointed():
                raise RuntimeError(
                    f"block {block.index} is swapped and runs with autograd but without gradient "
                    "checkpointing: enable the model's gradient checkpointing to train with block swap"
                )
            self._check(block)
            self._load(block, keep=block)
            self._streams.wait(block.ready)
            block.ready = None
            nxt = n - 1 if backward else n + 1
            if 0 <= nxt < len(self._blocks):
                self._load(self._blocks[nxt], keep=block)

        return pre_hook

    @torch.compiler.disable
    def _prefetch_first(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        # The resident blocks run first: time enough to bring in the first swapped one.
        if not _in_backward():
            self._load(self._blocks[0], keep=self._blocks[0])


@dataclass(eq=False)
class _Packed:
    """A saved activation moved to host memory; `prev` is the one packed just before it in the forward."""

    host: torch.Tensor
    stored: Any  # event: the device-to-host copy is done
    prev: Callable[[], _Packed | None]
    device_copy: torch.Tensor | None = None
    ready: Any = None  # event: the host-to-device copy into `device_copy` is done


class ActivationOffload:
    """Moves large tensors that autograd saves during the model's forward to host memory, and back.

    Built by :func:`apply_activation_offload`. With per-block checkpointing, what autograd keeps between
    forward and backward is each block's input (plus what the embedders and final layer save): one
    full-video activation per block, too much next to a block's recompute on a small card. Copies run on
    a side stream: device-to-host behind the compute that produced the tensor, host-to-device one
    checkpointed block ahead in backward (unpacking a block's input prefetches the input of the block
    before it).
    """

    def __init__(self, model: nn.Module, compute_device: torch.device, min_bytes: int) -> None:
        self.compute_device = compute_device
        self.min_bytes = min_bytes
        self._streams = _CudaStreams(compute_device) if compute_device.type == "cuda" else _SyncStreams()
        self._pin = compute_device.type == "cuda"
        # A tensor saved by several ops (the text states go into every block) is copied once.
        self._seen: dict[int, tuple[weakref.ref[torch.Tensor], _Packed]] = {}
        self._last: _Packed | None = None
        self._context: torch.autograd.graph.saved_tensors_hooks | None = None
        self._handles = [
            model.register_forward_pre_hook(self._enter),
            model.register_forward_hook(self._exit, always_call=True),
        ]

    def _enter(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self._context is not None or _in_backward():
            return
        self._seen, self._last = {}, None
        self._context = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._context.__enter__()

    def _exit(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self._context is not None:
            self._context.__exit__(None, None, None)
            self._context, self._seen, self._last = None, {}, None

    def _offloadable(self, t: torch.Tensor) -> bool:
        return (
            t.device == self.compute_device
            and type(t) is torch.Tensor  # not a weight (nn.Parameter) or a quantised tensor subclass
            and not isinstance(t._base, nn.Parameter)  # nor a transposed weight saved by a matmul
            and t.layout == torch.strided
            and t.numel() * t.element_size() >= self.min_bytes
        )

    @torch.compiler.disable
    def _pack(self, t: torch.Tensor) -> torch.Tensor | _Packed:
        if not self._offloadable(t):
            return t
        hit = self._seen.get(id(t))
        if hit is not None and hit[0]() is t:
            return hit[1]
        host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=self._pin)
        stored = self._streams.copy(host, t, self._streams.mark())
        self._streams.keep(t)
        prev = weakref.ref(self._last) if self._last is not None else lambda: None
        packed = _Packed(host, stored, prev)
        self._seen[id(t)] = (weakref.ref(t), packed)
        self._last = packed
        return packed

    @torch.compiler.disable
    def _unpack(self, packed: torch.Tensor | _Packed) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        previous = packed.prev()
        if packed.device_copy is None:
            self._fetch(packed)
        if previous is not None and previous.device_copy is None:
            self._fetch(previous)
        self._streams.wait(packed.ready)
        t, packed.device_copy, packed.ready = packed.device_copy, None, None
        return t

    def _fetch(self, packed: _Packed) -> None:
        device_copy = torch.empty(packed.host.shape, dtype=packed.host.dtype, device=self.compute_device)
        # The new tensor may reuse memory that compute enqueued so far still reads: wait for it. The copy
        # stream runs in order, so the device-to-host copy of `host` is done before this one starts.
        packed.ready = self._streams.copy(device_copy, packed.host, self._streams.mark())
        packed.device_copy = device_copy


def apply_activation_offload(
    model: nn.Module, *, compute_device: torch.device | str | None = None, min_bytes: int = 16 * 2**20
) -> ActivationOffload:
    """Keep the tensors autograd saves in `model`'s forward (at least `min_bytes` each) in host memory.

    Pair it with gradient checkpointing: then those are the blocks' inputs, and offloading them is what
    brings a swapped fp8 step onto a 24 GB card. Weights are never offloaded.
    """
    handle = ActivationOffload(model, _compute_device(compute_device), min_bytes)
    logger.info("activation offload: saved tensors >= %.1f MB go to host memory", min_bytes / 2**20)
    return handle


def _compute_device(device: torch.device | str | None) -> torch.device:
    """`device`, default the current CUDA device (else CPU), with an index: tensors report ``cuda:0``."""
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def apply_block_swap(
    model: nn.Module,
    num_blocks: int,
    device: torch.device | str = "cpu",
    *,
    compute_device: torch.device | str | None = None,
) -> BlockSwap:
    """Keep the frozen weights of the last `num_blocks` of ``model.blocks`` on `device` and stream them in.

    Places the whole model: everything else (resident blocks, embedders, final layer, all trainable
    parameters) moves to `compute_device` (default: the current CUDA device, else CPU). Call it last, after
    :func:`longcat_train.quant.quantize_base` and LoRA injection, and instead of ``model.to(...)``.
    ``num_blocks=0`` only moves the model. Training needs gradient checkpointing on the swapped blocks.
    """
    return BlockSwap(model, num_blocks, torch.device(device), _compute_device(compute_device))
