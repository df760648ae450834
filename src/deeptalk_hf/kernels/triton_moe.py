"""Triton kernels for SwiGLU Mixture-of-Experts layers (forward and backward) and their launchers.

Notation: `T` tokens, `k` slots per token, `P = T * k` (token, slot) pairs, pair id `p = t * k + j`; `E` experts with
`gate_up_proj` `[E, 2I, H]` (gate rows, then up rows) and `down_proj` `[E, H, I]`. The grouped kernels walk the pairs
in expert order (see `routing.py`); per-pair buffers (`act`, `gate_up`, `grad_gate_up`) are indexed by sorted row.

Forward (grouped):
  `_gate_up_kernel`      act[s] = silu(x[t] @ Wg[e]^T) * (x[t] @ Wu[e]^T)   gather of x fused into the loads,
                         SwiGLU in the epilogue; with autograd it also keeps the pre-activation `gate_up[s]`.
  `_scatter_kernel`      out[t] += w[p] * act[s] @ Wd[e]^T                  weighting and the return to token order
                         fused: fp32 atomic adds into `[T, H]`, no `[P, H]` buffer.
Backward:
  `_down_backward_kernel` g[s] = dout[t] @ Wd[e]; dw[p] = <g[s], act[s]>; grad_gate_up[s] = SwiGLU'(w[p] * g[s]);
                         `act` is recomputed from the saved `gate_up` (cheaper than saving it) and, for the down
                         projection's gradient, written once as `w[p] * act[s]`.
  `_scatter_kernel`      dx[t] += grad_gate_up[s] @ Wgu[e]                   (the same kernel as the down projection)
  `_expert_grad_kernel`  dWd[e] = sum_s dout[t]^T (w[p] act[s]),  dWgu[e] = sum_s grad_gate_up[s]^T x[t]: plain
                         products of stored rows (token rows gathered in the loads), so the loads pipeline; the
                         activation recomputed and scaled inside this loop made it the slowest kernel (3.0 of 11.7 ms
                         at Qwen3-30B-A3B, T = 16384, on an H200).
Decode (tiny `T`, no autograd): `_gate_up_decode_kernel` and `_down_decode_kernel` work per pair / per token with
matrix-vector products straight from `top_k_index`, so they need no sort, no fp32 buffer and no atomics.

Atomic adds make the summation order vary from run to run. Under `torch.use_deterministic_algorithms(True)` the
kernels store per-pair rows (`[P, H]`) and per-column-block partial routing gradients instead, summed afterwards by
torch in a fixed order: bitwise reproducible, at the cost of that buffer.

All products accumulate in fp32. Autotuning is keyed by the problem's shape class (`N`, `K`, expert count and a
power-of-two bucket of rows per expert, plus dtypes), so a new sequence length reuses the tuned config of its bucket;
`cache_results` keeps tuned configs on disk across processes. Under `TRITON_INTERPRET=1` one small config is used.
"""

import torch
import triton
import triton.language as tl

from . import _triton_interpreting

# The mode these kernels are built in: Triton fixes it when first imported, whatever TRITON_INTERPRET says now and
# whatever the device of a later call (its interpreter also runs CUDA tensors, through host copies).
_INTERPRET = _triton_interpreting()


def _configs(names: tuple[str, ...], tuned: list[tuple[int, ...]], interpret: tuple[int, ...]) -> list[triton.Config]:
    """Configs from `(*block sizes in `names` order, num_warps, num_stages)`; one small config for the interpreter."""
    if _INTERPRET:
        return [triton.Config(dict(zip(names, interpret, strict=True)))]
    return [
        triton.Config(dict(zip(names, blocks, strict=True)), num_warps=warps, num_stages=stages)
        for *blocks, warps, stages in tuned
    ]


_MNK = ("BLOCK_M", "BLOCK_N", "BLOCK_K")


# Hopper/Ampere-sized tiles for the grouped GEMMs; the small-M ones serve experts that receive few rows. 128x128 is the
# widest tile of the gate/up kernel, which holds two accumulators (gate and up) per tile.
GROUPED_TILES = [
    (128, 128, 64, 8, 3),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (32, 64, 128, 4, 3),
    (16, 64, 128, 4, 3),
]
# The scatter kernel (down projection, input gradient) holds one accumulator, so it also gets 128x256 and 256x128 tiles,
# which halve how often each gathered row or weight slab is re-read at large widths (Mixtral's H = 4096); the 4-stage
# 128x256 one took Mixtral-8x7B's input gradient (K = 2I = 28672) from 12.7 to 12.1 ms on an H200.
SCATTER_TILES = [(128, 256, 64, 8, 4), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), *GROUPED_TILES]
_GROUPED_CONFIGS = _configs(_MNK, GROUPED_TILES, interpret=(16, 32, 32))
_SCATTER_CONFIGS = _configs(_MNK, SCATTER_TILES, interpret=(16, 32, 32))
# Weight gradients: M x N is a slice of one expert's weight, K runs over that expert's rows. The wide tiles were added
# after the first H200 profile, where this kernel (at most 128x128 tiles) took half of a training step; the two with
# BLOCK_K = 32 and 5 stages (deeper pipelining of the gathered row loads) after a sweep at Mixtral-8x7B's shape, where
# 256x128 took the gate/up weight gradient from 18.9 to 16.5 ms on an H200.
EXPERT_GRAD_TILES = [
    (256, 128, 32, 8, 5),
    (128, 256, 32, 8, 5),
    (128, 256, 64, 8, 3),
    (256, 128, 64, 8, 3),
    (128, 128, 64, 8, 3),
    (128, 128, 64, 4, 4),
    (128, 128, 32, 8, 4),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 32, 4, 4),
]
_EXPERT_GRAD_CONFIGS = _configs(_MNK, EXPERT_GRAD_TILES, interpret=(32, 32, 16))
# Decode (matrix-vector): BLOCK_N output features per program, BLOCK_K reduction chunk.
_DECODE_CONFIGS = _configs(
    ("BLOCK_N", "BLOCK_K"),
    [(16, 256, 4, 3), (32, 128, 4, 3), (32, 256, 4, 3), (64, 128, 4, 3)],
    interpret=(32, 32),
)


def _prune_by_rows(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop row tiles much taller than the typical expert's row count (they would be mostly padding)."""
    limit = max(16, 2 * {**named_args, **kwargs}["ROWS_BUCKET"])
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= limit]
    return kept or configs[-1:]


def _autotune(configs: list[triton.Config], key: list[str], **kwargs):
    return triton.autotune(configs=configs, key=key, cache_results=True, **kwargs)


def rows_bucket(num_pairs: int, num_experts: int) -> int:
    """Power-of-two bucket of the mean rows per expert: the autotuning key that stands for the sequence length."""
    return min(triton.next_power_of_2(max(num_pairs // num_experts, 1)), 4096)


@triton.jit
def _grouped_program(N, BLOCK_N: tl.constexpr):
    """This program's (row tile, column block), in groups of 8 row tiles that sweep the column blocks together, so the
    expert's weight slab and the tiles' input rows are reused from L2 (Triton's grouped ordering)."""
    num_n = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    return tl.swizzle2d(pid // num_n, pid % num_n, tl.num_programs(0) // num_n, num_n, 8)


@triton.jit
def _expert_tile(offsets_ptr, tile, NUM_EXPERTS: tl.constexpr, E_POW2: tl.constexpr, BLOCK_M: tl.constexpr):
    """Expert, first row and end row of row-tile `tile`; the expert is `NUM_EXPERTS` past the last tile.

    Each expert's rows `[offsets[e], offsets[e+1])` are cut into `cdiv(count, BLOCK_M)` tiles, numbered expert after
    expert; the mapping is recomputed per program from the `E + 1` offsets, so it holds for any `BLOCK_M`.
    """
    experts = tl.arange(0, E_POW2)
    real = experts < NUM_EXPERTS
    starts = tl.load(offsets_ptr + experts, mask=real, other=0)
    ends = tl.load(offsets_ptr + experts + 1, mask=real, other=0)
    tiles = tl.cdiv(ends - starts, BLOCK_M)
    tiles_end = tl.cumsum(tiles, axis=0)
    expert = tl.sum(((tiles_end <= tile) & real).to(tl.int32), axis=0)
    mine = experts == expert
    first_row = (
        tl.sum(tl.where(mine, starts, 0), axis=0)
        + (tile - tl.sum(tl.where(mine, tiles_end - tiles, 0), axis=0)) * BLOCK_M
    )
    end_row = tl.sum(tl.where(mine, ends, 0), axis=0)
    return expert, first_row, end_row


@_autotune(
    _GROUPED_CONFIGS,
    key=["N", "K", "NUM_EXPERTS", "ROWS_BUCKET", "STORE_GATE_UP", "PRECISION"],
    prune_configs_by={"early_config_prune": _prune_by_rows},
)
@triton.jit
def _gate_up_kernel(
    x_ptr, w_ptr, act_ptr, gate_up_ptr, sorted_pairs_ptr, offsets_ptr,
    N, K, ROWS_BUCKET,
    stride_xt, stride_xk,
    stride_we, stride_wn, stride_wk,
    stride_am, stride_gm,
    TOP_K: tl.constexpr, NUM_EXPERTS: tl.constexpr, E_POW2: tl.constexpr,
    STORE_GATE_UP: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """act[s, n] = silu(gate) * up over `N = I` columns; `x` rows gathered by token, `K = H`."""
    tile, block_n = _grouped_program(N, BLOCK_N)
    expert, first_row, end_row = _expert_tile(offsets_ptr, tile, NUM_EXPERTS, E_POW2, BLOCK_M)
    if expert >= NUM_EXPERTS:
        return
    rows = first_row + tl.arange(0, BLOCK_M)
    row_mask = rows < end_row
    tokens = (tl.load(sorted_pairs_ptr + rows, mask=row_mask, other=0) // TOP_K).to(tl.int64)
    cols = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tokens[:, None] * stride_xt + ks[None, :] * stride_xk
    gate_ptrs = w_ptr + expert.to(tl.int64) * stride_we + cols[None, :] * stride_wn + ks[:, None] * stride_wk
    up_ptrs = gate_ptrs + N * stride_wn
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        k_mask = ks < K - k
        w_mask = k_mask[:, None] & col_mask[None, :]
        w_gate = tl.load(gate_ptrs, mask=w_mask, other=0.0)
        x = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0).to(w_gate.dtype)
        gate = tl.dot(x, w_gate, gate, input_precision=PRECISION)
        up = tl.dot(x, tl.load(up_ptrs, mask=w_mask, other=0.0), up, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        gate_ptrs += BLOCK_K * stride_wk
        up_ptrs += BLOCK_K * stride_wk
    out_mask = row_mask[:, None] & col_mask[None, :]
    rows = rows.to(tl.int64)
    act = gate * tl.sigmoid(gate) * up
    tl.store(act_ptr + rows[:, None] * stride_am + cols[None, :], act.to(act_ptr.dtype.element_ty), mask=out_mask)
    if STORE_GATE_UP:
        gate_up_ptrs = gate_up_ptr + rows[:, None] * stride_gm + cols[None, :]
        tl.store(gate_up_ptrs, gate.to(gate_up_ptr.dtype.element_ty), mask=out_mask)
        tl.store(gate_up_ptrs + N, up.to(gate_up_ptr.dtype.element_ty), mask=out_mask)


@_autotune(
    _SCATTER_CONFIGS,
    key=["N", "K", "NUM_EXPERTS", "ROWS_BUCKET", "WEIGHTED", "PER_PAIR", "PRECISION"],
    prune_configs_by={"early_config_prune": _prune_by_rows},
    reset_to_zero=["out_ptr"],
)
@triton.jit
def _scatter_kernel(
    a_ptr, w_ptr, out_ptr, routing_ptr, sorted_pairs_ptr, offsets_ptr,
    N, K, ROWS_BUCKET,
    stride_am,
    stride_we, stride_wk, stride_wn,
    stride_ot,
    TOP_K: tl.constexpr, NUM_EXPERTS: tl.constexpr, E_POW2: tl.constexpr,
    WEIGHTED: tl.constexpr, PER_PAIR: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """out[t, n] += (w[p] *) sum_k a[s, k] * W[e](k, n): fp32 atomics into token rows of `out` `[T, N]`, or with
    `PER_PAIR` a plain store into pair rows of `out` `[P, N]`."""
    tile, block_n = _grouped_program(N, BLOCK_N)
    expert, first_row, end_row = _expert_tile(offsets_ptr, tile, NUM_EXPERTS, E_POW2, BLOCK_M)
    if expert >= NUM_EXPERTS:
        return
    rows = first_row + tl.arange(0, BLOCK_M)
    row_mask = rows < end_row
    pairs = tl.load(sorted_pairs_ptr + rows, mask=row_mask, other=0)
    cols = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * stride_am + ks[None, :]
    w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        k_mask = ks < K - k
        w = tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0).to(w.dtype)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    if WEIGHTED:
        acc *= tl.load(routing_ptr + pairs, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    mask = row_mask[:, None] & col_mask[None, :]
    if PER_PAIR:
        tl.store(out_ptr + pairs.to(tl.int64)[:, None] * stride_ot + cols[None, :], acc, mask=mask)
    else:
        tokens = (pairs // TOP_K).to(tl.int64)
        tl.atomic_add(out_ptr + tokens[:, None] * stride_ot + cols[None, :], acc, mask=mask, sem="relaxed")


@_autotune(
    _GROUPED_CONFIGS,
    key=[
        "N",
        "K",
        "NUM_EXPERTS",
        "ROWS_BUCKET",
        "GRAD_GATE_UP",
        "GRAD_ROUTING",
        "WEIGHTED_ACT",
        "PER_BLOCK",
        "PRECISION",
    ],
    prune_configs_by={"early_config_prune": _prune_by_rows},
    reset_to_zero=["grad_routing_ptr"],
)
@triton.jit
def _down_backward_kernel(
    grad_out_ptr, w_ptr, gate_up_ptr, routing_ptr, grad_gate_up_ptr, grad_routing_ptr, weighted_act_ptr,
    sorted_pairs_ptr, offsets_ptr,
    N, K, ROWS_BUCKET,
    stride_dt, stride_dk,
    stride_we, stride_wk, stride_wn,
    stride_gm, stride_ggm, stride_gr, stride_am,
    TOP_K: tl.constexpr, NUM_EXPERTS: tl.constexpr, E_POW2: tl.constexpr,
    GRAD_GATE_UP: tl.constexpr, GRAD_ROUTING: tl.constexpr, WEIGHTED_ACT: tl.constexpr, PER_BLOCK: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """g = dout[t] @ down[e] over `N = I` columns (`K = H`), then the routing-weight and SwiGLU gradients.

    dw[p] += sum_n g * act (fp32 atomics across column blocks, or with `PER_BLOCK` a store into column `block_n` of a
    `[P, stride_gr]` buffer); grad_gate_up[s] = (dgate, dup) of `w[p] * g`; with `WEIGHTED_ACT` also
    weighted_act[s] = w[p] * act[s] (the product `g` is skipped when nothing else needs it).
    """
    tile, block_n = _grouped_program(N, BLOCK_N)
    expert, first_row, end_row = _expert_tile(offsets_ptr, tile, NUM_EXPERTS, E_POW2, BLOCK_M)
    if expert >= NUM_EXPERTS:
        return
    rows = first_row + tl.arange(0, BLOCK_M)
    row_mask = rows < end_row
    pairs = tl.load(sorted_pairs_ptr + rows, mask=row_mask, other=0)
    tokens = (pairs // TOP_K).to(tl.int64)
    cols = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    ks = tl.arange(0, BLOCK_K)
    d_ptrs = grad_out_ptr + tokens[:, None] * stride_dt + ks[None, :] * stride_dk
    w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn
    grad_act = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if GRAD_GATE_UP or GRAD_ROUTING:
        for k in range(0, K, BLOCK_K):
            k_mask = ks < K - k
            w = tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            d = tl.load(d_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0).to(w.dtype)
            grad_act = tl.dot(d, w, grad_act, input_precision=PRECISION)
            d_ptrs += BLOCK_K * stride_dk
            w_ptrs += BLOCK_K * stride_wk
    mask = row_mask[:, None] & col_mask[None, :]
    rows = rows.to(tl.int64)
    gate_up_ptrs = gate_up_ptr + rows[:, None] * stride_gm + cols[None, :]
    gate = tl.load(gate_up_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptrs + N, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    routing = tl.load(routing_ptr + pairs, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    if WEIGHTED_ACT:
        act_ptrs = weighted_act_ptr + rows[:, None] * stride_am + cols[None, :]
        tl.store(act_ptrs, (routing * silu * up).to(weighted_act_ptr.dtype.element_ty), mask=mask)
    if GRAD_ROUTING:
        partial = tl.sum(grad_act * silu * up, axis=1)
        if PER_BLOCK:
            tl.store(grad_routing_ptr + pairs.to(tl.int64) * stride_gr + block_n, partial, mask=row_mask)
        else:
            tl.atomic_add(grad_routing_ptr + pairs, partial, mask=row_mask, sem="relaxed")
    if GRAD_GATE_UP:
        grad_act *= routing
        grad_gate = grad_act * up * sig * (1.0 + gate * (1.0 - sig))
        out_ptrs = grad_gate_up_ptr + rows[:, None] * stride_ggm + cols[None, :]
        tl.store(out_ptrs, grad_gate.to(grad_gate_up_ptr.dtype.element_ty), mask=mask)
        tl.store(out_ptrs + N, (grad_act * silu).to(grad_gate_up_ptr.dtype.element_ty), mask=mask)


@_autotune(_EXPERT_GRAD_CONFIGS, key=["M", "N", "NUM_EXPERTS", "ROWS_BUCKET", "L_BY_TOKEN", "R_BY_TOKEN", "PRECISION"])
@triton.jit
def _expert_grad_kernel(
    l_ptr, r_ptr, c_ptr, sorted_pairs_ptr, offsets_ptr,
    M, N, ROWS_BUCKET,
    stride_lm, stride_lc,
    stride_rm, stride_rc,
    stride_ce, stride_cm, stride_cn,
    TOP_K: tl.constexpr, NUM_EXPERTS: tl.constexpr,
    L_BY_TOKEN: tl.constexpr, R_BY_TOKEN: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """C[e] = sum over expert e's sorted rows s of L[s]^T R[s] (`[M, N]`), written whole (zeros for idle experts).

    `L_BY_TOKEN` / `R_BY_TOKEN`: that operand's rows are token rows `t`, gathered, instead of sorted rows `s`.
    """
    expert = tl.program_id(1)
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    cols_m = (pid // num_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols_n = (pid % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = cols_m < M
    n_mask = cols_n < N
    start = tl.load(offsets_ptr + expert)
    end = tl.load(offsets_ptr + expert + 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for first in range(start, end, BLOCK_K):
        rows = first + tl.arange(0, BLOCK_K)
        row_mask = rows < end
        pairs = tl.load(sorted_pairs_ptr + rows, mask=row_mask, other=0)
        tokens = (pairs // TOP_K).to(tl.int64)
        l_rows = tokens if L_BY_TOKEN else rows.to(tl.int64)
        left = tl.load(
            l_ptr + l_rows[:, None] * stride_lm + cols_m[None, :] * stride_lc,
            mask=row_mask[:, None] & m_mask[None, :],
            other=0.0,
        ).to(c_ptr.dtype.element_ty)
        r_rows = tokens if R_BY_TOKEN else rows.to(tl.int64)
        right = tl.load(
            r_ptr + r_rows[:, None] * stride_rm + cols_n[None, :] * stride_rc,
            mask=row_mask[:, None] & n_mask[None, :],
            other=0.0,
        )
        acc = tl.dot(tl.trans(left), right.to(left.dtype), acc, input_precision=PRECISION)
    c_ptrs = c_ptr + expert.to(tl.int64) * stride_ce + cols_m[:, None] * stride_cm + cols_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@_autotune(_DECODE_CONFIGS, key=["N", "K", "NUM_EXPERTS"])
@triton.jit
def _gate_up_decode_kernel(
    x_ptr, w_ptr, act_ptr, index_ptr,
    N, K,
    stride_xt, stride_xk,
    stride_we, stride_wn, stride_wk,
    TOP_K: tl.constexpr, NUM_EXPERTS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One pair per program row: act[p, n] = silu(gate) * up as matrix-vector products (sentinel pairs skipped)."""
    pair = tl.program_id(0)
    expert = tl.load(index_ptr + pair)
    if (expert < 0) | (expert >= NUM_EXPERTS):  # ids outside [0, E) are skipped, as on the grouped path
        return
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + (pair // TOP_K).to(tl.int64) * stride_xt + ks * stride_xk
    gate_ptrs = w_ptr + expert.to(tl.int64) * stride_we + cols[:, None] * stride_wn + ks[None, :] * stride_wk
    up_ptrs = gate_ptrs + N * stride_wn
    gate = tl.zeros((BLOCK_N,), dtype=tl.float32)
    up = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        k_mask = ks < K - k
        w_mask = col_mask[:, None] & k_mask[None, :]
        x = tl.load(x_ptrs, mask=k_mask, other=0.0).to(tl.float32)[None, :]
        gate += tl.sum(tl.load(gate_ptrs, mask=w_mask, other=0.0).to(tl.float32) * x, axis=1)
        up += tl.sum(tl.load(up_ptrs, mask=w_mask, other=0.0).to(tl.float32) * x, axis=1)
        x_ptrs += BLOCK_K * stride_xk
        gate_ptrs += BLOCK_K * stride_wk
        up_ptrs += BLOCK_K * stride_wk
    act = gate * tl.sigmoid(gate) * up
    tl.store(act_ptr + pair.to(tl.int64) * N + cols, act.to(act_ptr.dtype.element_ty), mask=col_mask)


@_autotune(_DECODE_CONFIGS, key=["N", "K", "NUM_EXPERTS"])
@triton.jit
def _down_decode_kernel(
    act_ptr, w_ptr, out_ptr, index_ptr, routing_ptr,
    N, K,
    stride_we, stride_wn, stride_wk,
    stride_ot,
    TOP_K: tl.constexpr, NUM_EXPERTS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One token per program row: out[t, n] = sum_j w[t, j] * act[t*k + j] @ down[e]^T, written once in out's dtype."""
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    ks = tl.arange(0, BLOCK_K)
    out = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for slot in range(TOP_K):
        pair = token * TOP_K + slot
        expert = tl.load(index_ptr + pair)
        if (expert >= 0) & (expert < NUM_EXPERTS):
            a_ptrs = act_ptr + pair.to(tl.int64) * K + ks
            w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + cols[:, None] * stride_wn + ks[None, :] * stride_wk
            acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for k in range(0, K, BLOCK_K):
                k_mask = ks < K - k
                a = tl.load(a_ptrs, mask=k_mask, other=0.0).to(tl.float32)
                w = tl.load(w_ptrs, mask=col_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
                acc += tl.sum(w * a[None, :], axis=1)
                a_ptrs += BLOCK_K
                w_ptrs += BLOCK_K * stride_wk
            out += tl.load(routing_ptr + pair).to(tl.float32) * acc
    tl.store(out_ptr + token.to(tl.int64) * stride_ot + cols, out.to(out_ptr.dtype.element_ty), mask=col_mask)


# ----------------------------------------------------------------------------------------------------------------------
# Launchers. `sorted_pairs`/`offsets` come from `routing.sort_by_expert`; grids are upper bounds computed on the host
# from shapes alone (`cdiv(P, BLOCK_M) + min(E, P)` row tiles cover any split of P rows over E experts) and the
# programs past the last real tile return at once, so no launch waits on device data.


def _precision(dtype: torch.dtype) -> str | None:
    """fp32 products follow torch's matmul precision setting (exact by default, TF32 when the user allows it); other
    dtypes keep the backend's default."""
    if dtype != torch.float32:
        return None
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _grouped_grid(num_pairs: int, num_experts: int, n: int):
    return lambda meta: (
        (triton.cdiv(num_pairs, meta["BLOCK_M"]) + min(num_experts, num_pairs)) * triton.cdiv(n, meta["BLOCK_N"]),
    )


def _grouped_meta(top_k: int, num_experts: int, num_pairs: int) -> dict:
    return {
        "ROWS_BUCKET": rows_bucket(num_pairs, num_experts),
        "TOP_K": top_k,
        "NUM_EXPERTS": num_experts,
        "E_POW2": max(16, triton.next_power_of_2(num_experts)),
    }


def gate_up_forward(
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    sorted_pairs: torch.Tensor,
    offsets: torch.Tensor,
    top_k: int,
    keep_gate_up: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(act [P, I], gate_up [P, 2I] or None)` in the weights' dtype, rows in sorted order."""
    num_experts, two_i, hidden = gate_up_proj.shape
    inter = two_i // 2
    num_pairs = sorted_pairs.numel()
    act = x.new_empty(num_pairs, inter, dtype=gate_up_proj.dtype)
    gate_up = x.new_empty(num_pairs, two_i, dtype=gate_up_proj.dtype) if keep_gate_up else act
    if num_pairs:
        _gate_up_kernel[_grouped_grid(num_pairs, num_experts, inter)](
            x, gate_up_proj, act, gate_up, sorted_pairs, offsets,
            inter, hidden, **_grouped_meta(top_k, num_experts, num_pairs),
            stride_xt=x.stride(0), stride_xk=x.stride(1),
            stride_we=gate_up_proj.stride(0), stride_wn=gate_up_proj.stride(1), stride_wk=gate_up_proj.stride(2),
            stride_am=act.stride(0), stride_gm=gate_up.stride(0),
            STORE_GATE_UP=keep_gate_up, PRECISION=_precision(gate_up_proj.dtype),
        )  # fmt: skip
    return act, gate_up if keep_gate_up else None


def scatter_to_tokens(
    rows: torch.Tensor,
    weight: torch.Tensor,
    weight_strides: tuple[int, int, int],
    routing_weights: torch.Tensor | None,
    sorted_pairs: torch.Tensor,
    offsets: torch.Tensor,
    num_tokens: int,
    top_k: int,
    out_features: int,
) -> torch.Tensor:
    """fp32 `[T, N]`: each sorted row times its expert's `[K, N]` matrix (`weight_strides` = expert, k, n strides),
    optionally scaled by its routing weight, summed into its token's row."""
    num_experts = weight.shape[0]
    num_pairs, inner = rows.shape
    per_pair = torch.are_deterministic_algorithms_enabled()
    out = torch.zeros(num_pairs if per_pair else num_tokens, out_features, device=rows.device, dtype=torch.float32)
    if num_pairs:
        _scatter_kernel[_grouped_grid(num_pairs, num_experts, out_features)](
            rows, weight, out, routing_weights, sorted_pairs, offsets,
            out_features, inner, **_grouped_meta(top_k, num_experts, num_pairs),
            stride_am=rows.stride(0),
            stride_we=weight_strides[0], stride_wk=weight_strides[1], stride_wn=weight_strides[2],
            stride_ot=out.stride(0),
            WEIGHTED=routing_weights is not None, PER_PAIR=per_pair, PRECISION=_precision(weight.dtype),
        )  # fmt: skip
    return out.view(num_tokens, top_k, out_features).sum(1) if per_pair else out


def down_backward(
    grad_out: torch.Tensor,
    down_proj: torch.Tensor,
    gate_up: torch.Tensor,
    routing_weights: torch.Tensor,
    sorted_pairs: torch.Tensor,
    offsets: torch.Tensor,
    top_k: int,
    grad_gate_up: bool,
    grad_routing: bool,
    weighted_act: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """`(grad_gate_up [P, 2I], grad_routing fp32 [P], weighted_act [P, I])`, each None unless asked for."""
    num_experts, hidden, inter = down_proj.shape
    num_pairs = sorted_pairs.numel()
    grad_gu = torch.empty_like(gate_up) if grad_gate_up else gate_up
    act = gate_up.new_empty(num_pairs, inter) if weighted_act else gate_up
    per_block = torch.are_deterministic_algorithms_enabled()
    # Deterministic: one partial per column block of the narrowest configured tile, summed below.
    blocks = triton.cdiv(inter, min(c.kwargs["BLOCK_N"] for c in _GROUPED_CONFIGS)) if per_block else 1
    grad_w = torch.zeros(num_pairs, blocks, device=gate_up.device, dtype=torch.float32)
    if num_pairs:
        _down_backward_kernel[_grouped_grid(num_pairs, num_experts, inter)](
            grad_out, down_proj, gate_up, routing_weights, grad_gu, grad_w, act, sorted_pairs, offsets,
            inter, hidden, **_grouped_meta(top_k, num_experts, num_pairs),
            stride_dt=grad_out.stride(0), stride_dk=grad_out.stride(1),
            stride_we=down_proj.stride(0), stride_wk=down_proj.stride(1), stride_wn=down_proj.stride(2),
            stride_gm=gate_up.stride(0), stride_ggm=grad_gu.stride(0), stride_gr=grad_w.stride(0),
            stride_am=act.stride(0),
            GRAD_GATE_UP=grad_gate_up, GRAD_ROUTING=grad_routing, WEIGHTED_ACT=weighted_act, PER_BLOCK=per_block,
            PRECISION=_precision(down_proj.dtype),
        )  # fmt: skip
    return (
        grad_gu if grad_gate_up else None,
        grad_w.sum(1) if grad_routing else None,
        act if weighted_act else None,
    )


def expert_grad(
    left: torch.Tensor,
    right: torch.Tensor,
    out_shape: torch.Size,
    dtype: torch.dtype,
    sorted_pairs: torch.Tensor,
    offsets: torch.Tensor,
    top_k: int,
    left_by_token: bool,
    right_by_token: bool,
) -> torch.Tensor:
    """`[E, M, N]` per-expert sums of outer products of sorted rows (see `_expert_grad_kernel`)."""
    num_experts, m, n = out_shape
    grad = torch.empty(out_shape, device=left.device, dtype=dtype)
    num_pairs = sorted_pairs.numel()

    def grid(meta):
        return triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), num_experts

    _expert_grad_kernel[grid](
        left, right, grad, sorted_pairs, offsets,
        m, n, rows_bucket(num_pairs, num_experts),
        stride_lm=left.stride(0), stride_lc=left.stride(1),
        stride_rm=right.stride(0), stride_rc=right.stride(1),
        stride_ce=grad.stride(0), stride_cm=grad.stride(1), stride_cn=grad.stride(2),
        TOP_K=top_k, NUM_EXPERTS=num_experts,
        L_BY_TOKEN=left_by_token, R_BY_TOKEN=right_by_token, PRECISION=_precision(dtype),
    )  # fmt: skip
    return grad


def decode_forward(
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Inference for a handful of tokens: per-pair matrix-vector kernels, no routing metadata. Returns `[T, H]`."""
    num_tokens, top_k = top_k_index.shape
    num_experts, two_i, hidden = gate_up_proj.shape
    inter = two_i // 2
    index = top_k_index.reshape(-1).to(torch.int32).contiguous()
    routing = top_k_weights.reshape(-1).contiguous()
    act = x.new_empty(num_tokens * top_k, inter, dtype=gate_up_proj.dtype)
    _gate_up_decode_kernel[lambda meta: (num_tokens * top_k, triton.cdiv(inter, meta["BLOCK_N"]))](
        x, gate_up_proj, act, index, inter, hidden,
        stride_xt=x.stride(0), stride_xk=x.stride(1),
        stride_we=gate_up_proj.stride(0), stride_wn=gate_up_proj.stride(1), stride_wk=gate_up_proj.stride(2),
        TOP_K=top_k, NUM_EXPERTS=num_experts,
    )  # fmt: skip
    out = x.new_empty(num_tokens, hidden, dtype=out_dtype)
    _down_decode_kernel[lambda meta: (num_tokens, triton.cdiv(hidden, meta["BLOCK_N"]))](
        act, down_proj, out, index, routing, hidden, inter,
        stride_we=down_proj.stride(0), stride_wn=down_proj.stride(1), stride_wk=down_proj.stride(2),
        stride_ot=out.stride(0),
        TOP_K=top_k, NUM_EXPERTS=num_experts,
    )  # fmt: skip
    return out
