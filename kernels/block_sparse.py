"""Triton block-sparse flash attention, forward and backward, over tiles of gathered token rows.

Every kernel reads and writes q, k, v, o and their gradients in the caller's token order: a tile's rows
are gathered through ``BlockLayout.tile_tokens`` (one 256-byte row per token for head dim 128, so the
loads stay coalesced), which spares the permuted copies of q, k, v, o, do, dq, dk, dv that a
block-contiguous layout would need (about 2.4 GB of traffic per layer at 37k tokens). Empty slots of
partial edge tiles load as zeros and are masked out of the softmax.

Forward: one program per (query tile, head) walks its selected key tiles with an online softmax in fp32
and stores the output and the log-sum-exp (base 2). Backward recomputes the probabilities from the
log-sum-exp. dq: one program per query tile, over the same selected key tiles. dk, dv: one program per
key tile, over the query tiles that selected it, read from a CSR transpose of the selection. The
transpose costs one sort per step; the alternative, atomically adding dk and dv from the query-side
program, would need fp32 scratch of twice the size of k and v, serialise on the popular key tiles (the
condition tiles are chosen by every query tile) and give run-to-run different gradients.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .selection import BlockLayout, transpose_selection

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class KernelConfig:
    """Launch shape of one kernel: ``tiles`` gathered tiles per loop step, warps and pipeline depth."""

    tiles: int = 1
    num_warps: int = 4
    num_stages: int = 2


# Chosen by `python benchmarks/attention.py --sweep` on an H100 (benchmarks/RESULTS.md).
CONFIGS: dict[str, KernelConfig] = {
    "fwd": KernelConfig(tiles=2, num_warps=4, num_stages=3),
    "dq": KernelConfig(tiles=1, num_warps=4, num_stages=2),
    "dkdv": KernelConfig(tiles=1, num_warps=4, num_stages=2),
}


@triton.jit
def _tile_rows(TILE_TOKENS, tile, TILE: tl.constexpr):
    return tl.load(TILE_TOKENS + tile * TILE + tl.arange(0, TILE))


@triton.jit
def _listed_rows(LIST, pos, count, TILE_TOKENS, TILE: tl.constexpr, STEP_TILES: tl.constexpr):
    """Token rows of the tiles LIST[pos : pos + STEP_TILES]; -1 for empty slots and for entries past count."""
    slot = tl.arange(0, STEP_TILES * TILE)
    entry = pos + slot // TILE
    tile = tl.load(LIST + entry, mask=entry < count, other=-1)
    return tl.load(TILE_TOKENS + tile * TILE + slot % TILE, mask=tile >= 0, other=-1)


@triton.jit
def _load_rows(X, rows, stride_n, HEAD_DIM: tl.constexpr):
    d = tl.arange(0, HEAD_DIM)
    return tl.load(X + rows[:, None] * stride_n + d[None, :], mask=rows[:, None] >= 0, other=0.0)


@triton.jit
def _store_rows(X, rows, stride_n, value, HEAD_DIM: tl.constexpr):
    d = tl.arange(0, HEAD_DIM)
    tl.store(X + rows[:, None] * stride_n + d[None, :], value.to(X.dtype.element_ty), mask=rows[:, None] >= 0)


@triton.jit
def _fwd_kernel(
    Q, K, V, OUT, LSE, INDICES, COUNTS, TILE_TOKENS,
    qk_scale,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    H, N, N_TILES, WIDTH,
    HEAD_DIM: tl.constexpr, TILE: tl.constexpr, STEP_TILES: tl.constexpr,
):  # fmt: skip
    q_tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    OUT += b * stride_ob + h * stride_oh
    row = bh * N_TILES + q_tile
    selected = INDICES + row.to(tl.int64) * WIDTH
    count = tl.load(COUNTS + row)

    q_rows = _tile_rows(TILE_TOKENS, q_tile, TILE)
    q = _load_rows(Q, q_rows, stride_qn, HEAD_DIM)
    m_i = tl.full([TILE], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([TILE], dtype=tl.float32)
    acc = tl.zeros([TILE, HEAD_DIM], dtype=tl.float32)
    for pos in range(0, count, STEP_TILES):
        kv_rows = _listed_rows(selected, pos, count, TILE_TOKENS, TILE, STEP_TILES)
        k = _load_rows(K, kv_rows, stride_kn, HEAD_DIM)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        # empty key slots must not enter the normaliser; every selected tile has at least one real
        # token, so no row is all -inf and m_i is finite after the first step
        s = tl.where(kv_rows[None, :] >= 0, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(V, kv_rows, stride_vn, HEAD_DIM)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    _store_rows(OUT, q_rows, stride_on, acc / l_i[:, None], HEAD_DIM)
    tl.store(LSE + bh.to(tl.int64) * N + q_rows, m_i + tl.math.log2(l_i), mask=q_rows >= 0)


@triton.jit
def _delta_kernel(
    OUT, DO, DELTA,
    stride_ob, stride_oh, stride_on,
    stride_gb, stride_gh, stride_gn,
    H, N,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rows = tl.where(rows < N, rows, -1)
    o = _load_rows(OUT + b * stride_ob + h * stride_oh, rows, stride_on, HEAD_DIM).to(tl.float32)
    do = _load_rows(DO + b * stride_gb + h * stride_gh, rows, stride_gn, HEAD_DIM).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * N + rows, tl.sum(o * do, 1), mask=rows >= 0)


@triton.jit
def _dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, INDICES, COUNTS, TILE_TOKENS,
    qk_scale, sm_scale,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_gb, stride_gh, stride_gn,
    stride_db, stride_dh, stride_dn,
    H, N, N_TILES, WIDTH,
    HEAD_DIM: tl.constexpr, TILE: tl.constexpr, STEP_TILES: tl.constexpr,
):  # fmt: skip
    q_tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    row = bh * N_TILES + q_tile
    selected = INDICES + row.to(tl.int64) * WIDTH
    count = tl.load(COUNTS + row)

    q_rows = _tile_rows(TILE_TOKENS, q_tile, TILE)
    q = _load_rows(Q + b * stride_qb + h * stride_qh, q_rows, stride_qn, HEAD_DIM)
    do = _load_rows(DO + b * stride_gb + h * stride_gh, q_rows, stride_gn, HEAD_DIM)
    stats = bh.to(tl.int64) * N + q_rows
    lse = tl.load(LSE + stats, mask=q_rows >= 0, other=float("inf"))
    delta = tl.load(DELTA + stats, mask=q_rows >= 0, other=0.0)
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    dq = tl.zeros([TILE, HEAD_DIM], dtype=tl.float32)
    for pos in range(0, count, STEP_TILES):
        kv_rows = _listed_rows(selected, pos, count, TILE_TOKENS, TILE, STEP_TILES)
        k = _load_rows(K, kv_rows, stride_kn, HEAD_DIM)
        v = _load_rows(V, kv_rows, stride_vn, HEAD_DIM)
        # empty key slots need no mask here: their k rows are zero, so they add nothing to dq
        p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    _store_rows(DQ + b * stride_db + h * stride_dh, q_rows, stride_dn, dq * sm_scale, HEAD_DIM)


@triton.jit
def _dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, QUERY_TILES, STARTS, LENGTHS, ORDER, TILE_TOKENS,
    qk_scale, sm_scale,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_gb, stride_gh, stride_gn,
    stride_db, stride_dh, stride_dn,
    H, N, N_TILES,
    HEAD_DIM: tl.constexpr, TILE: tl.constexpr, STEP_TILES: tl.constexpr,
):  # fmt: skip
    task = tl.load(ORDER + tl.program_id(0))
    bh = task // N_TILES
    k_tile = task % N_TILES
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    readers = QUERY_TILES + tl.load(STARTS + task)
    count = tl.load(LENGTHS + task)

    k_rows = _tile_rows(TILE_TOKENS, k_tile, TILE)
    k = _load_rows(K + b * stride_kb + h * stride_kh, k_rows, stride_kn, HEAD_DIM)
    v = _load_rows(V + b * stride_vb + h * stride_vh, k_rows, stride_vn, HEAD_DIM)
    Q += b * stride_qb + h * stride_qh
    DO += b * stride_gb + h * stride_gh
    LSE += bh.to(tl.int64) * N
    DELTA += bh.to(tl.int64) * N
    dk = tl.zeros([TILE, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([TILE, HEAD_DIM], dtype=tl.float32)
    for pos in range(0, count, STEP_TILES):
        q_rows = _listed_rows(readers, pos, count, TILE_TOKENS, TILE, STEP_TILES)
        q = _load_rows(Q, q_rows, stride_qn, HEAD_DIM)
        do = _load_rows(DO, q_rows, stride_gn, HEAD_DIM)
        # an empty query slot gets lse = +inf, hence probability 0 and no share of dk or dv
        lse = tl.load(LSE + q_rows, mask=q_rows >= 0, other=float("inf"))
        delta = tl.load(DELTA + q_rows, mask=q_rows >= 0, other=0.0)
        p_t = tl.math.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])  # [key rows, query rows]
        dv = tl.dot(p_t.to(do.dtype), do, dv)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk)
    _store_rows(DK + b * stride_db + h * stride_dh, k_rows, stride_dn, dk * sm_scale, HEAD_DIM)
    _store_rows(DV + b * stride_db + h * stride_dh, k_rows, stride_dn, dv, HEAD_DIM)


@triton.jit
def _pool_kernel(
    X, OUT, TILE_TOKENS, TILE_COUNTS,
    stride_xb, stride_xh, stride_xn,
    H, N_TILES,
    HEAD_DIM: tl.constexpr, TILE: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    X += (bh // H).to(tl.int64) * stride_xb + (bh % H).to(tl.int64) * stride_xh
    x = _load_rows(X, _tile_rows(TILE_TOKENS, tile, TILE), stride_xn, HEAD_DIM).to(tl.float32)
    mean = tl.sum(x, 0) / tl.load(TILE_COUNTS + tile)
    tl.store(OUT + (bh.to(tl.int64) * N_TILES + tile) * HEAD_DIM + tl.arange(0, HEAD_DIM), mean)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _strides(x: Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _rows_last(x: Tensor) -> Tensor:
    """The kernels index rows with int32 offsets and need unit stride along the head dim."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.shape[2] * x.stride(2) >= 2**31:
        raise ValueError("a head of this tensor spans more than 2**31 elements; pass it contiguous")
    return x


def pool_tiles_triton(x: Tensor, layout: BlockLayout) -> Tensor:
    """Same as ``selection.pool_tiles``, in one pass over ``x`` without a float32 copy of it."""
    x = _rows_last(x)
    batch, heads, _, dim = x.shape
    out = torch.empty(batch, heads, layout.num_tiles, dim, device=x.device, dtype=torch.float32)
    _pool_kernel[(layout.num_tiles, batch * heads)](
        x, out, layout.tile_tokens, layout.tile_counts, *_strides(x), heads, layout.num_tiles,
        HEAD_DIM=dim, TILE=layout.tile, num_warps=4,
    )  # fmt: skip
    return out


def _launch(cfg: KernelConfig, tile: int) -> dict[str, int]:
    """Kernel launch arguments for a layout's tile size. `CONFIGS` is tuned for 64-token tiles; other
    tiles keep the rows per loop step (tiles * 64) and get a warp per 16 rows at least."""
    launch = {"STEP_TILES": max(1, cfg.tiles * 64 // tile)}
    # The interpreter ignores warps and stages; leave them out so it runs the same code path.
    if not _interpreting():
        launch.update(num_warps=max(cfg.num_warps, tile // 16), num_stages=cfg.num_stages)
    return launch


def sparse_forward(
    q: Tensor, k: Tensor, v: Tensor, layout: BlockLayout, indices: Tensor, counts: Tensor, scale: float,
    cfg: KernelConfig,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Output [B, H, N, D] (stored as [B, N, H, D], so the model's merge of heads is a view) and the
    base-2 log-sum-exp [B, H, N] float32."""
    batch, heads, tokens, dim = q.shape
    out = torch.empty(batch, tokens, heads, dim, device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty(batch, heads, tokens, device=q.device, dtype=torch.float32)
    _fwd_kernel[(layout.num_tiles, batch * heads)](
        q, k, v, out, lse, indices, counts, layout.tile_tokens,
        scale * LOG2E,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        heads, tokens, layout.num_tiles, indices.shape[-1],
        HEAD_DIM=dim, TILE=layout.tile, **_launch(cfg, layout.tile),
    )  # fmt: skip
    return out, lse


def sparse_backward(
    grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, layout: BlockLayout,
    indices: Tensor, counts: Tensor, scale: float, configs: dict[str, KernelConfig],
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    batch, heads, tokens, dim = q.shape
    grad = _rows_last(grad)
    n_tiles = layout.num_tiles
    delta = torch.empty_like(lse)
    block = 64
    _delta_kernel[(triton.cdiv(tokens, block), batch * heads)](
        out, grad, delta, *_strides(out), *_strides(grad), heads, tokens, HEAD_DIM=dim, BLOCK=block,
    )  # fmt: skip

    dq = torch.empty(batch, heads, tokens, dim, device=q.device, dtype=q.dtype)
    cfg = configs["dq"]
    _dq_kernel[(n_tiles, batch * heads)](
        q, k, v, grad, dq, lse, delta, indices, counts, layout.tile_tokens,
        scale * LOG2E, scale,
        *_strides(q), *_strides(k), *_strides(v), *_strides(grad), *_strides(dq),
        heads, tokens, n_tiles, indices.shape[-1],
        HEAD_DIM=dim, TILE=layout.tile, **_launch(cfg, layout.tile),
    )  # fmt: skip

    query_tiles, starts, lengths = transpose_selection(indices, counts, n_tiles)
    # Longest key tiles first within each head: the condition tiles are read by every query tile and
    # would otherwise start late and run alone at the end. Heads stay in order so that the programs
    # running together share one head's q and do in L2.
    head = torch.arange(batch * heads, device=q.device).repeat_interleave(n_tiles)
    order = torch.argsort(head * (n_tiles + 1) + (n_tiles - lengths), stable=True).to(torch.int32)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    cfg = configs["dkdv"]
    _dkdv_kernel[(batch * heads * n_tiles,)](
        q, k, v, grad, dk, dv, lse, delta, query_tiles, starts, lengths, order, layout.tile_tokens,
        scale * LOG2E, scale,
        *_strides(q), *_strides(k), *_strides(v), *_strides(grad), *_strides(dk),
        heads, tokens, n_tiles,
        HEAD_DIM=dim, TILE=layout.tile, **_launch(cfg, layout.tile),
    )  # fmt: skip
    return dq, dk, dv


class BlockSparseAttention(torch.autograd.Function):
    """Attention of every query tile over its selected key tiles; the selection is an input (no grad)."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, q: Tensor, k: Tensor, v: Tensor, layout: BlockLayout,
        indices: Tensor, counts: Tensor, scale: float, configs: dict[str, KernelConfig],
    ) -> Tensor:  # fmt: skip
        q, k, v = _rows_last(q), _rows_last(k), _rows_last(v)
        out, lse = sparse_forward(q, k, v, layout, indices, counts, scale, configs["fwd"])
        ctx.save_for_backward(q, k, v, out, lse, indices, counts)
        ctx.layout, ctx.scale, ctx.configs = layout, scale, configs
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse, indices, counts = ctx.saved_tensors
        dq, dk, dv = sparse_backward(
            grad, q, k, v, out, lse, ctx.layout, indices, counts, ctx.scale, ctx.configs
        )
        return dq, dk, dv, None, None, None, None, None
