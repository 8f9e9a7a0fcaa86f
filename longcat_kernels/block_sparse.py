"""Triton block-sparse flash attention, forward and backward, over tiles of gathered token rows.

Every kernel reads and writes q, k, v, o and their gradients in the caller's token order: a tile's rows
are gathered through ``BlockLayout.tile_tokens`` (one 256-byte row per token for head dim 128, so the
loads stay coalesced), which spares the permuted copies of q, k, v, o, do, dq, dk, dv that a
block-contiguous layout would need (gigabytes of traffic per layer at 480p). Empty slots of
partial edge tiles load as zeros and are masked out of the softmax.

Selection: one kernel pools q and k per tile, a float32 matmul scores tile pairs, and one warp per
query tile finds its row's k-th best score by bisection on the scores' bit patterns and writes the
chosen key tiles in ascending order (torch.topk runs a dozen launches of radix passes and a sort, a
sizeable part of the forward).

Forward: one program per (query tile, head) walks its selected key tiles with an online softmax in fp32
and stores the output and the log-sum-exp (base 2). Backward recomputes the probabilities from the
log-sum-exp. dq: one program per query tile, over the same selected key tiles; it also stores
``delta = rowsum(o * do)`` of its rows for the next kernel. dk, dv: one program per key tile, over the
query tiles that selected it, read from a CSR transpose of the selection. The transpose costs one sort
per step; the alternative, atomically adding dk and dv from the query-side program, would need fp32
scratch of twice the size of k and v, serialise on the popular key tiles (the condition tiles are chosen
by every query tile) and give run-to-run different gradients.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .selection import BlockLayout, num_selected, tile_scores, transpose_selection

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class KernelConfig:
    """Warps and software-pipeline depth of one kernel, for 64-token tiles."""

    num_warps: int = 4
    num_stages: int = 2


# Chosen by `python benchmarks/attention.py --sweep` on an H100 (benchmarks/RESULTS.md).
CONFIGS: dict[str, KernelConfig] = {
    "fwd": KernelConfig(num_warps=4, num_stages=2),
    "dq": KernelConfig(num_warps=4, num_stages=2),
    "dkdv": KernelConfig(num_warps=4, num_stages=4),
}


@triton.jit
def _tile_rows(TILE_TOKENS, tile, TILE: tl.constexpr):
    return tl.load(TILE_TOKENS + tile * TILE + tl.arange(0, TILE))


@triton.jit
def _load_rows(X, rows, stride_n, HEAD_DIM: tl.constexpr):
    d = tl.arange(0, HEAD_DIM)
    return tl.load(X + rows[:, None] * stride_n + d[None, :], mask=rows[:, None] >= 0, other=0.0)


@triton.jit
def _store_rows(X, rows, stride_n, value, HEAD_DIM: tl.constexpr):
    d = tl.arange(0, HEAD_DIM)
    tl.store(X + rows[:, None] * stride_n + d[None, :], value.to(X.dtype.element_ty), mask=rows[:, None] >= 0)


@triton.jit
def _pool_kernel(
    Q,
    K,
    POOLED,
    TILE_TOKENS,
    TILE_COUNTS,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_kb,
    stride_kh,
    stride_kn,
    H,
    BH,
    N_TILES,
    HEAD_DIM: tl.constexpr,
    TILE: tl.constexpr,
):
    """POOLED[0] = per-tile mean of q, POOLED[1] of k: [2, B * H, n_tiles, D] float32."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    which = tl.program_id(2)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = _tile_rows(TILE_TOKENS, tile, TILE)
    if which == 0:
        x = _load_rows(Q + b * stride_qb + h * stride_qh, rows, stride_qn, HEAD_DIM)
    else:
        x = _load_rows(K + b * stride_kb + h * stride_kh, rows, stride_kn, HEAD_DIM)
    mean = tl.sum(x.to(tl.float32), 0) / tl.load(TILE_COUNTS + tile)
    out = ((which * BH + bh).to(tl.int64) * N_TILES + tile) * HEAD_DIM
    tl.store(POOLED + out + tl.arange(0, HEAD_DIM), mean)


@triton.jit
def _select_kernel(
    SCORES,
    INDICES,
    COUNTS,
    N_TILES,
    N_COND,
    WIDTH,
    KEYS: tl.constexpr,
):
    """For one query tile of one head: the key tiles to keep, ascending, and how many.

    Condition query tiles keep the N_COND condition key tiles; the others keep those plus the best
    WIDTH - N_COND of the rest by score (ties go to the lower tile index). One warp per row, so the 32
    bisection steps reduce with shuffles alone.
    """
    query = tl.program_id(0)
    row = (tl.program_id(1) * N_TILES + query).to(tl.int64)
    cols = tl.arange(0, KEYS)
    inside = cols < N_TILES
    score = tl.load(SCORES + row * N_TILES + cols, mask=inside, other=0.0)
    # Order-preserving map of float32 to int32: flip the magnitude bits of negative numbers.
    bits = score.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    is_cond = cols < N_COND
    key = tl.where(inside & (query >= N_COND), key, -2147483648)  # condition queries: condition keys only
    key = tl.where(is_cond, 2147483647, key)  # condition keys are always kept
    want = tl.where(query < N_COND, N_COND, WIDTH)
    # Bisection for the want-th largest key: the largest t with count(key >= t) >= want.
    lo = tl.full([], -2147483648, tl.int64)
    hi = tl.full([], 2147483647, tl.int64)
    for _ in range(32):
        mid = lo + (hi - lo + 1) // 2
        enough = tl.sum((key >= mid.to(tl.int32)).to(tl.int32)) >= want
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid - 1)
    threshold = lo.to(tl.int32)
    above = key > threshold
    tied = key == threshold
    room = want - tl.sum(above.to(tl.int32))
    keep = above | (tied & (tl.cumsum(tied.to(tl.int32), 0) <= room))
    slot = tl.cumsum(keep.to(tl.int32), 0) - 1
    tl.store(INDICES + row * WIDTH + slot, cols, mask=keep)
    tl.store(COUNTS + row, want)


@triton.jit
def _query_program(
    Q,
    K,
    V,
    INDICES,
    COUNTS,
    TILE_TOKENS,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_kb,
    stride_kh,
    stride_vb,
    stride_vh,
    H,
    N_TILES,
    WIDTH,
    HEAD_DIM: tl.constexpr,
    TILE: tl.constexpr,
):
    """What the forward and dq programs start from: batch b, head h, this head's K and V, the query tile's
    row of the selection (and its key-tile list and count), its token rows and its q."""
    q_tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    row = bh * N_TILES + q_tile
    q_rows = _tile_rows(TILE_TOKENS, q_tile, TILE)
    q = _load_rows(Q + b * stride_qb + h * stride_qh, q_rows, stride_qn, HEAD_DIM)
    selected = INDICES + row.to(tl.int64) * WIDTH
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    return b, h, K, V, row, selected, tl.load(COUNTS + row), q_rows, q


@triton.jit
def _selected_keys(
    K, V, selected, i, TILE_TOKENS, stride_kn, stride_vn, HEAD_DIM: tl.constexpr, TILE: tl.constexpr
):
    """The i-th selected key tile: its token rows (-1 for empty slots), k and v."""
    kv_rows = _tile_rows(TILE_TOKENS, tl.load(selected + i), TILE)
    return kv_rows, _load_rows(K, kv_rows, stride_kn, HEAD_DIM), _load_rows(V, kv_rows, stride_vn, HEAD_DIM)


@triton.jit
def _fwd_kernel(
    Q,
    K,
    V,
    OUT,
    LSE,
    INDICES,
    COUNTS,
    TILE_TOKENS,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ob,
    stride_oh,
    stride_on,
    H,
    N_TILES,
    WIDTH,
    HEAD_DIM: tl.constexpr,
    TILE: tl.constexpr,
):
    b, h, K, V, row, selected, count, q_rows, q = _query_program(
        Q,
        K,
        V,
        INDICES,
        COUNTS,
        TILE_TOKENS,
        stride_qb,
        stride_qh,
        stride_qn,
        stride_kb,
        stride_kh,
        stride_vb,
        stride_vh,
        H,
        N_TILES,
        WIDTH,
        HEAD_DIM,
        TILE,
    )
    m_i = tl.full([TILE], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([TILE], dtype=tl.float32)
    acc = tl.zeros([TILE, HEAD_DIM], dtype=tl.float32)
    for i in range(count):
        kv_rows, k, v = _selected_keys(K, V, selected, i, TILE_TOKENS, stride_kn, stride_vn, HEAD_DIM, TILE)
        # empty key slots must not enter the normaliser; every selected tile has at least one real
        # token, so no row is all -inf and m_i is finite after the first step
        s = tl.where(kv_rows[None, :] >= 0, tl.dot(q, tl.trans(k)), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    _store_rows(OUT + b * stride_ob + h * stride_oh, q_rows, stride_on, acc / l_i[:, None], HEAD_DIM)
    # an empty query slot gets lse = +inf: probability 0, so the backward needs no mask for it
    lse = tl.where(q_rows >= 0, m_i + tl.math.log2(l_i), float("inf"))
    tl.store(LSE + row.to(tl.int64) * TILE + tl.arange(0, TILE), lse)


@triton.jit
def _dq_kernel(
    Q,
    K,
    V,
    OUT,
    DO,
    DQ,
    LSE,
    DELTA,
    INDICES,
    COUNTS,
    TILE_TOKENS,
    qk_scale,
    sm_scale,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ob,
    stride_oh,
    stride_on,
    stride_gb,
    stride_gh,
    stride_gn,
    stride_db,
    stride_dh,
    stride_dn,
    H,
    N_TILES,
    WIDTH,
    HEAD_DIM: tl.constexpr,
    TILE: tl.constexpr,
):
    b, h, K, V, row, selected, count, q_rows, q = _query_program(
        Q,
        K,
        V,
        INDICES,
        COUNTS,
        TILE_TOKENS,
        stride_qb,
        stride_qh,
        stride_qn,
        stride_kb,
        stride_kh,
        stride_vb,
        stride_vh,
        H,
        N_TILES,
        WIDTH,
        HEAD_DIM,
        TILE,
    )
    do = _load_rows(DO + b * stride_gb + h * stride_gh, q_rows, stride_gn, HEAD_DIM)
    o = _load_rows(OUT + b * stride_ob + h * stride_oh, q_rows, stride_on, HEAD_DIM)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    stats = row.to(tl.int64) * TILE + tl.arange(0, TILE)
    tl.store(DELTA + stats, delta)  # for the dk, dv kernel, which runs next
    lse = tl.load(LSE + stats)
    dq = tl.zeros([TILE, HEAD_DIM], dtype=tl.float32)
    for i in range(count):
        _, k, v = _selected_keys(K, V, selected, i, TILE_TOKENS, stride_kn, stride_vn, HEAD_DIM, TILE)
        # empty key slots need no mask here: their k rows are zero, so they add nothing to dq
        p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    _store_rows(DQ + b * stride_db + h * stride_dh, q_rows, stride_dn, dq * sm_scale, HEAD_DIM)


@triton.jit
def _dkdv_kernel(
    Q,
    K,
    V,
    DO,
    DK,
    DV,
    LSE,
    DELTA,
    QUERY_TILES,
    STARTS,
    LENGTHS,
    TILE_TOKENS,
    qk_scale,
    sm_scale,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_gb,
    stride_gh,
    stride_gn,
    stride_db,
    stride_dh,
    stride_dn,
    H,
    N_TILES,
    HEAD_DIM: tl.constexpr,
    TILE: tl.constexpr,
):
    # Key tiles of one head run together (program order), so they share that head's q and do in L2;
    # the condition tiles, which every query tile reads, come first in each head and start early.
    k_tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    group = bh * N_TILES + k_tile
    readers = QUERY_TILES + tl.load(STARTS + group)
    count = tl.load(LENGTHS + group)

    k_rows = _tile_rows(TILE_TOKENS, k_tile, TILE)
    k = _load_rows(K + b * stride_kb + h * stride_kh, k_rows, stride_kn, HEAD_DIM)
    v = _load_rows(V + b * stride_vb + h * stride_vh, k_rows, stride_vn, HEAD_DIM)
    Q += b * stride_qb + h * stride_qh
    DO += b * stride_gb + h * stride_gh
    LSE += bh.to(tl.int64) * N_TILES * TILE
    DELTA += bh.to(tl.int64) * N_TILES * TILE
    dk = tl.zeros([TILE, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([TILE, HEAD_DIM], dtype=tl.float32)
    for i in range(count):
        q_tile = tl.load(readers + i)
        q_rows = _tile_rows(TILE_TOKENS, q_tile, TILE)
        q = _load_rows(Q, q_rows, stride_qn, HEAD_DIM)
        do = _load_rows(DO, q_rows, stride_gn, HEAD_DIM)
        # per-tile statistics: contiguous, and their address does not wait for q_rows
        lse = tl.load(LSE + q_tile * TILE + tl.arange(0, TILE))
        delta = tl.load(DELTA + q_tile * TILE + tl.arange(0, TILE))
        p_t = tl.math.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])  # [key rows, query rows]
        dv = tl.dot(p_t.to(do.dtype), do, dv)
        ds_t = p_t * (tl.dot(v, tl.trans(do)) - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk)
    _store_rows(DK + b * stride_db + h * stride_dh, k_rows, stride_dn, dk * sm_scale, HEAD_DIM)
    _store_rows(DV + b * stride_db + h * stride_dh, k_rows, stride_dn, dv, HEAD_DIM)


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


def _launch(cfg: KernelConfig, tile: int) -> dict[str, int]:
    """Launch arguments for a layout's tile size: at least a warp per 16 rows of the tile."""
    # The interpreter ignores warps and stages; leave them out so it runs the same code path.
    if _interpreting():
        return {}
    return {"num_warps": max(cfg.num_warps, tile // 16), "num_stages": cfg.num_stages}


def pool_tiles_triton(q: Tensor, k: Tensor, layout: BlockLayout) -> tuple[Tensor, Tensor]:
    """``selection.pool_tiles`` of q and of k in one pass over each, without a float32 copy."""
    q, k = _rows_last(q), _rows_last(k)
    batch, heads, _, dim = q.shape
    pooled = torch.empty(2, batch, heads, layout.num_tiles, dim, device=q.device, dtype=torch.float32)
    _pool_kernel[(layout.num_tiles, batch * heads, 2)](
        q,
        k,
        pooled,
        layout.tile_tokens,
        layout.tile_counts,
        *_strides(q),
        *_strides(k),
        heads,
        batch * heads,
        layout.num_tiles,
        HEAD_DIM=dim,
        TILE=layout.tile,
    )
    return pooled[0], pooled[1]


def select_blocks_triton(
    pooled_q: Tensor, pooled_k: Tensor, layout: BlockLayout, density: float
) -> tuple[Tensor, Tensor]:
    """``selection.select_blocks`` on CUDA: the same key tiles (up to ties), listed in ascending order."""
    batch, heads, n_tiles, _ = pooled_q.shape
    width = num_selected(layout, density)
    scores = tile_scores(pooled_q, pooled_k)
    indices = torch.empty(batch, heads, n_tiles, width, device=scores.device, dtype=torch.int32)
    counts = torch.empty(batch, heads, n_tiles, device=scores.device, dtype=torch.int32)
    keys = triton.next_power_of_2(n_tiles)
    _select_kernel[(n_tiles, batch * heads)](
        scores,
        indices,
        counts,
        n_tiles,
        layout.num_cond_tiles,
        width,
        KEYS=keys,
        num_warps=max(1, min(8, keys // 1024)),
    )
    return indices, counts


def sparse_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: BlockLayout,
    indices: Tensor,
    counts: Tensor,
    scale: float,
    cfg: KernelConfig,
) -> tuple[Tensor, Tensor]:
    """Output [B, H, N, D] (stored as [B, N, H, D], so the model's merge of heads is a view) and the
    base-2 log-sum-exp per tile slot [B, H, n_tiles, tile] float32 (+inf in empty slots)."""
    batch, heads, tokens, dim = q.shape
    out = torch.empty(batch, tokens, heads, dim, device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty(batch, heads, layout.num_tiles, layout.tile, device=q.device, dtype=torch.float32)
    _fwd_kernel[(layout.num_tiles, batch * heads)](
        q,
        k,
        v,
        out,
        lse,
        indices,
        counts,
        layout.tile_tokens,
        scale * LOG2E,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(out),
        heads,
        layout.num_tiles,
        indices.shape[-1],
        HEAD_DIM=dim,
        TILE=layout.tile,
        **_launch(cfg, layout.tile),
    )
    return out, lse


def sparse_backward(
    grad: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    layout: BlockLayout,
    indices: Tensor,
    counts: Tensor,
    scale: float,
    configs: dict[str, KernelConfig],
) -> tuple[Tensor, Tensor, Tensor]:
    batch, heads, tokens, dim = q.shape
    grad = _rows_last(grad)
    n_tiles = layout.num_tiles
    grid = (n_tiles, batch * heads)
    delta = torch.empty_like(lse)
    dq = torch.empty(batch, heads, tokens, dim, device=q.device, dtype=q.dtype)
    _dq_kernel[grid](
        q,
        k,
        v,
        out,
        grad,
        dq,
        lse,
        delta,
        indices,
        counts,
        layout.tile_tokens,
        scale * LOG2E,
        scale,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(out),
        *_strides(grad),
        *_strides(dq),
        heads,
        n_tiles,
        indices.shape[-1],
        HEAD_DIM=dim,
        TILE=layout.tile,
        **_launch(configs["dq"], layout.tile),
    )
    query_tiles, starts, lengths = transpose_selection(indices, counts, n_tiles)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    _dkdv_kernel[grid](
        q,
        k,
        v,
        grad,
        dk,
        dv,
        lse,
        delta,
        query_tiles,
        starts,
        lengths,
        layout.tile_tokens,
        scale * LOG2E,
        scale,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(grad),
        *_strides(dk),
        heads,
        n_tiles,
        HEAD_DIM=dim,
        TILE=layout.tile,
        **_launch(configs["dkdv"], layout.tile),
    )
    return dq, dk, dv
