"""Fused nearest / top-k search in Triton, and the fp64 pair rescoring of exact mode. The SAQ op runs the
same kernel with SAQ=True: its prologue forms a layer's targets (`saq._saq_target_tile`) instead of loading x.

Math (the reference `spae_fast._ref` is the spec). With queries x [N, D] and codebook rows e [V, D]:

    score[n, v] = bias[v] + col_scale[v] * (row_scale[n] *) sum_d x[n, d] * e[v, d]

The caller folds the metric into bias / scales: l2: bias = ||e||^2, col_scale = -2; ip: bias = 0,
col_scale = -1; cosine: bias = 0, col_scale = -1/|e|, row_scale = 1/|x|. Scaling by -2 or -1 is exact, so
l2 / ip scores equal those of the pre-scaled codebook of the CPU kernel, and 16-bit operands are fed to
the tensor cores unchanged (their products are exact in fp32): no scaled copy of the codebook is made.

`search` returns, per query, the k smallest scores in the total order (score, index) - ties to the lowest
index. NaN scores (only possible with non-finite inputs and ``check_finite=False``) count as +inf.

Kernel structure (`_search_kernel`):
  * work item = (block of BLOCK_M queries, chunk of the codebook); a persistent grid of programs walks the
    items in grouped order (GROUP_M query blocks x all chunks), so the programs running together share the
    same few query blocks and codebook tiles in L2;
  * per codebook tile: ``acc = sum_k tl.dot(x_tile, e_tile^T)`` over D in BLOCK_K steps (fp32 accumulation;
    ``input_precision`` "ieee" = exact fp32, "tf32" for fp32 operands on tensor cores), then the epilogue
    folds the tile into a running top-k held in registers: k = 1 a running (min, argmin); k > 1 an unsorted
    set of K_PAD entries refreshed by a few rounds of "extract the tile minimum, replace the set's worst";
  * merge: k = 1 packs (score, index) into one int64 whose signed order is the total order and does
    ``atomic_min`` into the output - order independent, so the result is bitwise the same for any chunking,
    grid or launch. k > 1 writes each chunk's set; the host sorts the packed keys of all chunks.
Per-element scores depend only on (BLOCK_K, dtype, precision, device), never on N, so results are bitwise
identical for every batch size. Extra memory: O(N) (N int64 keys, or N x chunks x K_PAD partial sets).
"""

from __future__ import annotations

import dataclasses
import os

import torch

import triton
import triton.language as tl

from .saq import _combine_lanes, _saq_target_tile, layer_args

KEY_EMPTY = (1 << 63) - 1  # int64 max: "no candidate yet" in the atomic-min output
_EMPTY_INDEX = tl.constexpr(1 << 30)  # index of the unfilled slots of a running set (after every real row)
_REMOVED_INDEX = tl.constexpr((1 << 31) - 1)  # index given to tile entries already taken or out of range
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _pack_key(score, index):
    """(fp32 score, int32 index >= 0) -> int64 whose signed order is the order (score, index), NaN last."""
    bits = score.to(tl.int32, bitcast=True)
    key32 = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # monotone map of the float order onto int32
    key32 = tl.where(score == 0.0, 0, key32)  # -0.0 == +0.0
    key32 = tl.where(score != score, 0x7FFFFFFF, key32)  # NaN after +inf  # noqa: PLR0124
    return (key32.to(tl.int64) << 32) | index.to(tl.int64)


@triton.jit
def _search_kernel(
    X, E, BIAS, COL_SCALE, ROW_SCALE,  # [N, D], [V, D], [V] fp32, [V] fp32, [N] fp32 (cosine only)
    OUT_KEY,  # [N] int64 (K_PAD == 1): packed (score, index), atomic-min merged, preset to KEY_EMPTY
    OUT_SCORE, OUT_INDEX,  # [N, num_chunks, K_PAD] fp32 / int32 (K_PAD > 1): each chunk's running set
    N, V, D,
    stride_xn, stride_xd, stride_ev, stride_ed,
    num_chunks, tiles_per_chunk,
    # SAQ (SAQ=True): X is a scratch [programs, BLOCK_M, D] of the operand dtype; the queries are the targets
    # of layer `layer`, formed from Z [B, D, g, g] and the ids of the layers above once per work item.
    Z, IDS, LAYER_SIDES, LAYER_FIRSTS,
    stride_zb, stride_zd, stride_zy, stride_zx, stride_ib,
    grid, layer, coefficient,
    K_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, INPUT_PRECISION: tl.constexpr, SAQ: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    num_row_blocks = tl.cdiv(N, BLOCK_M)
    num_col_tiles = tl.cdiv(V, BLOCK_N)
    num_items = num_row_blocks * num_chunks
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    slots = tl.arange(0, K_PAD)

    for item in range(pid, num_items, num_programs):
        # Grouped rasterisation: GROUP_M query blocks x every chunk, query block fastest.
        group_items = GROUP_M * num_chunks
        first_block = (item // group_items) * GROUP_M
        group_rows = tl.minimum(num_row_blocks - first_block, GROUP_M)
        row_block = first_block + (item % group_items) % group_rows
        chunk = (item % group_items) // group_rows

        rows = row_block * BLOCK_M + offs_m
        row_ok = rows < N
        if SAQ:
            # Targets of this block, once per work item, into this program's scratch rows.
            x_rows = X + (pid.to(tl.int64) * BLOCK_M + offs_m)[:, None] * D  # [BLOCK_M, 1] pointers
            tl.debug_barrier()  # the previous item's reads of the scratch are done
            for k0 in range(0, D, BLOCK_K):
                ks = k0 + offs_k
                target = _saq_target_tile(
                    Z, E, IDS, LAYER_SIDES, LAYER_FIRSTS, rows, row_ok, ks, ks < D,
                    stride_zb, stride_zd, stride_zy, stride_zx, stride_ib, stride_ev, stride_ed,
                    grid, layer, coefficient,
                )  # fmt: skip
                tl.store(x_rows + ks[None, :], target.to(X.dtype.element_ty), mask=(ks < D)[None, :])
            tl.debug_barrier()
        else:
            x_rows = X + rows.to(tl.int64)[:, None] * stride_xn  # [BLOCK_M, 1] pointers
        if HAS_ROW_SCALE:
            row_scale = tl.load(ROW_SCALE + rows, mask=row_ok, other=0.0)

        if K_PAD == 1:
            best_score = tl.full([BLOCK_M], float("inf"), tl.float32)
            best_index = tl.full([BLOCK_M], -1, tl.int32)
        else:
            set_score = tl.full([BLOCK_M, K_PAD], float("inf"), tl.float32)
            set_index = tl.zeros([BLOCK_M, K_PAD], tl.int32) + (slots + _EMPTY_INDEX)[None, :]

        tile_begin = chunk * tiles_per_chunk
        tile_end = tl.minimum(tile_begin + tiles_per_chunk, num_col_tiles)
        for tile in range(tile_begin, tile_end):
            cols = tile * BLOCK_N + offs_n
            col_ok = cols < V
            e_cols = E + cols.to(tl.int64)[None, :] * stride_ev  # [1, BLOCK_N] pointers
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for k0 in range(0, D, BLOCK_K):
                ks = k0 + offs_k
                if EVEN_K:
                    a = tl.load(x_rows + ks[None, :] * stride_xd, mask=row_ok[:, None], other=0.0)
                    b = tl.load(e_cols + ks[:, None] * stride_ed, mask=col_ok[None, :], other=0.0)
                else:
                    k_ok = ks < D
                    a = tl.load(
                        x_rows + ks[None, :] * stride_xd, mask=row_ok[:, None] & k_ok[None, :], other=0.0
                    )
                    b = tl.load(
                        e_cols + ks[:, None] * stride_ed, mask=col_ok[None, :] & k_ok[:, None], other=0.0
                    )
                acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

            if HAS_ROW_SCALE:
                acc = acc * row_scale[:, None]
            bias = tl.load(BIAS + cols, mask=col_ok, other=0.0)
            col_scale = tl.load(COL_SCALE + cols, mask=col_ok, other=0.0)
            score = bias[None, :] + acc * col_scale[None, :]
            score = tl.where(col_ok[None, :] & (score == score), score, float("inf"))  # noqa: PLR0124 (NaN)

            if K_PAD == 1:
                tile_min = tl.min(score, axis=1)
                tile_arg = tl.min(tl.where(score == tile_min[:, None], cols[None, :], _REMOVED_INDEX), axis=1)
                # Tiles are visited in ascending index order: an equal score never replaces the best.
                better = (tile_min < best_score) | (best_index < 0)
                best_score = tl.where(better, tile_min, best_score)
                best_index = tl.where(better, tile_arg, best_index)
            else:
                cid = tl.zeros([BLOCK_M, BLOCK_N], tl.int32) + tl.where(col_ok, cols, _REMOVED_INDEX)[None, :]
                worst_score = tl.max(set_score, axis=1)
                tile_min = tl.min(score, axis=1)
                rounds = 0
                go = tl.max((tile_min <= worst_score).to(tl.int32), axis=0) > 0
                while go:
                    tile_min = tl.min(score, axis=1)
                    tile_arg = tl.min(tl.where(score == tile_min[:, None], cid, _REMOVED_INDEX), axis=1)
                    worst_score = tl.max(set_score, axis=1)
                    worst_index = tl.max(tl.where(set_score == worst_score[:, None], set_index, -1), axis=1)
                    improve = (tile_min < worst_score) | (
                        (tile_min == worst_score) & (tile_arg < worst_index)
                    )
                    replace = (set_score == worst_score[:, None]) & (set_index == worst_index[:, None])
                    replace = replace & improve[:, None]
                    set_score = tl.where(replace, tile_min[:, None], set_score)
                    set_index = tl.where(replace, tile_arg[:, None], set_index)
                    taken = cid == tile_arg[:, None]
                    score = tl.where(taken, float("inf"), score)
                    cid = tl.where(taken, _REMOVED_INDEX, cid)
                    rounds += 1
                    go = (rounds < K_PAD) & (tl.max(improve.to(tl.int32), axis=0) > 0)

        if K_PAD == 1:
            key = _pack_key(best_score, tl.maximum(best_index, 0))
            tl.atomic_min(OUT_KEY + rows, key, mask=row_ok & (best_index >= 0))
        else:
            out = (rows.to(tl.int64)[:, None] * num_chunks + chunk) * K_PAD + slots[None, :]
            tl.store(OUT_SCORE + out, set_score, mask=row_ok[:, None])
            tl.store(OUT_INDEX + out, set_index, mask=row_ok[:, None])


@triton.jit
def _pair_dot64_kernel(
    A, B, INDEX, OUT,  # A [M, D], B [R, D], INDEX [M, C] int64 rows of B (< 0: skip), OUT [M, C] fp64
    C, D,
    stride_am, stride_ad, stride_br, stride_bd, stride_im, stride_ic,
    Z, IDS, LAYER_SIDES, LAYER_FIRSTS, stride_zb, stride_zd, stride_zy, stride_zx, stride_ib,  # SAQ only
    grid, layer, coefficient,
    BLOCK_C: tl.constexpr, SAQ: tl.constexpr,
):  # fmt: skip
    """OUT[m, c] = sum_d A[m, d] * B[INDEX[m, c], d] in fp64, in one canonical order: lane l = d mod 32
    accumulates with fma in ascending d, then lanes combine pairwise (l, l^1), (l, l^2), ... (l, l^16).
    The CUDA module uses the same order, so both backends give bitwise-identical exact-mode results.
    With SAQ, A is not read: its row m is the fp32 SAQ target m of layer `layer`, formed as in the search
    (`saq._saq_target_tile`), and B is the codebook."""
    LANES: tl.constexpr = 32
    m = tl.program_id(0)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cs < C
    index = tl.load(INDEX + m.to(tl.int64) * stride_im + cs * stride_ic, mask=c_ok, other=-1)
    use = c_ok & (index >= 0)
    lanes = tl.arange(0, LANES)
    a_row = A + m.to(tl.int64) * stride_am
    rows = m + tl.zeros([1], tl.int32)
    b_rows = B + tl.maximum(index, 0)[:, None] * stride_br
    acc = tl.zeros([BLOCK_C, LANES], tl.float64)
    for d0 in range(0, D, LANES):
        d = d0 + lanes
        d_ok = d < D
        if SAQ:
            a = _saq_target_tile(
                Z, B, IDS, LAYER_SIDES, LAYER_FIRSTS, rows, rows >= 0, d, d_ok,
                stride_zb, stride_zd, stride_zy, stride_zx, stride_ib, stride_br, stride_bd,
                grid, layer, coefficient,
            ).to(tl.float64)  # fmt: skip
        else:
            a = tl.load(a_row + d * stride_ad, mask=d_ok, other=0.0).to(tl.float64)[None, :]
        b = tl.load(b_rows + d[None, :] * stride_bd, mask=use[:, None] & d_ok[None, :], other=0.0).to(
            tl.float64
        )
        acc = tl.fma(a, b, acc)
    total = _combine_lanes(acc, BLOCK_C)
    tl.store(OUT + m.to(tl.int64) * C + cs, total, mask=c_ok)


# ----------------------------------------------------------------------------------------------------------
# Host wrappers
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8
    programs_per_sm: int = 1


def default_config(
    dot_dtype: torch.dtype, input_precision: str, device: torch.device, capability: int | None = None
) -> SearchConfig:
    """Tile configuration per (operand dtype, precision, device). Never depends on N or k: that is what
    keeps the per-element scores, hence the results, identical across batch sizes.

    Override for tuning with SPAE_FAST_TRITON_CONFIG="block_m,block_n,block_k,num_warps,num_stages[,group_m]"
    (benchmarks/bench_gpu.py --tune sweeps them)."""
    override = os.environ.get("SPAE_FAST_TRITON_CONFIG")
    if override:
        return SearchConfig(*(int(v) for v in override.split(",")))
    if capability is None and (INTERPRET or device.type != "cuda"):
        return SearchConfig(16, 16, 16, 1, 1, 2)
    major = capability if capability is not None else torch.cuda.get_device_capability(device)[0]
    if dot_dtype in (torch.bfloat16, torch.float16):
        if major >= 9:
            return SearchConfig(128, 128, 64, 8, 4)
        return SearchConfig(128, 128, 32, 8, 4)
    if input_precision == "tf32":
        return SearchConfig(128, 128, 32, 8, 3)
    return SearchConfig(64, 64, 32, 4, 2)  # exact fp32: FMA, no tensor cores


def _num_sms(device: torch.device) -> int:
    if INTERPRET or device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def plan_chunks(
    num_queries: int, num_rows: int, k_pad: int, config: SearchConfig, num_sms: int
) -> tuple[int, int]:
    """(num_chunks, tiles_per_chunk): split the codebook so that small batches still fill the GPU (split-V)
    and large ones keep a few chunks for L2 reuse; k > 1 caps chunks x K_PAD to bound the partial sets."""
    row_blocks = -(-num_queries // config.block_m)
    col_tiles = -(-num_rows // config.block_n)
    chunks = max(-(-4 * num_sms // row_blocks), 8)
    if k_pad > 1:
        chunks = min(chunks, max(1, 256 // k_pad))
    chunks = max(1, min(chunks, col_tiles))
    tiles_per_chunk = -(-col_tiles // chunks)
    return -(-col_tiles // tiles_per_chunk), tiles_per_chunk


def search(
    x: torch.Tensor | None,
    e: torch.Tensor,
    bias: torch.Tensor,
    col_scale: torch.Tensor,
    row_scale: torch.Tensor | None,
    k_pad: int,
    input_precision: str = "ieee",
    config: SearchConfig | None = None,
    saq=None,
    num_queries: int | None = None,
) -> tuple[torch.Tensor, ...]:
    """Fused search of x [N, D] against e [V, D] (same dtype: fp32 / bf16 / fp16; any strides). With
    ``saq`` (one layer: `saq.layer_args`) the queries are that layer's targets (x is None, num_queries =
    B * side^2, operands e.dtype).

    Returns ``(keys,)`` with keys [N] int64 packed (score, index) when k_pad == 1, else
    ``(scores [N, S * k_pad] fp32, indices [N, S * k_pad] int32)``: unsorted candidate sets whose k_pad
    smallest entries under (score, index) are the top-k_pad (entries with index >= 2^30 are empty slots).
    """
    num_rows, dim = e.shape
    if saq is None:
        num_queries = x.shape[0]
        assert e.dtype == x.dtype and x.shape[1] == dim
    assert k_pad >= 1 and (k_pad & (k_pad - 1)) == 0
    config = config or default_config(e.dtype, input_precision, e.device)
    num_sms = _num_sms(e.device)
    num_chunks, tiles_per_chunk = plan_chunks(num_queries, num_rows, k_pad, config, num_sms)
    num_items = -(-num_queries // config.block_m) * num_chunks
    grid = (max(1, min(num_items, num_sms * config.programs_per_sm)),)
    if saq is not None:  # per-program target rows: O(programs x BLOCK_M x D), independent of N
        x = torch.empty(grid[0] * config.block_m, dim, dtype=e.dtype, device=e.device)
        saq_args = layer_args(saq)
    else:
        saq_args = (x, x, x, x, 0, 0, 0, 0, 0, 1, 0, 1.0)
    if k_pad == 1:
        keys = torch.full((num_queries,), KEY_EMPTY, dtype=torch.int64, device=e.device)
        out_score = out_index = keys  # unused
    else:
        out_score = torch.empty(num_queries, num_chunks * k_pad, dtype=torch.float32, device=e.device)
        out_index = torch.empty(num_queries, num_chunks * k_pad, dtype=torch.int32, device=e.device)
        keys = out_score  # unused
    _search_kernel[grid](
        x, e, bias, col_scale, bias if row_scale is None else row_scale,
        keys, out_score, out_index,
        num_queries, num_rows, dim,
        x.stride(0), x.stride(1), e.stride(0), e.stride(1),
        num_chunks, tiles_per_chunk, *saq_args,
        K_PAD=k_pad, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        GROUP_M=config.group_m, EVEN_K=dim % config.block_k == 0, HAS_ROW_SCALE=row_scale is not None,
        INPUT_PRECISION=input_precision, SAQ=saq is not None,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    if k_pad == 1:
        return (keys,)
    return out_score, out_index


def pair_dot64(a: torch.Tensor | None, b: torch.Tensor, index: torch.Tensor, saq=None) -> torch.Tensor:
    """out[m, c] = a[m] . b[index[m, c]] in fp64 (canonical order, see the kernel); index < 0 gives 0. With
    ``saq`` (one layer: `saq.layer_args`) a is None and a[m] is that layer's fp32 target m (b: the codebook)."""
    num_pairs, num_candidates = index.shape
    out = torch.empty(num_pairs, num_candidates, dtype=torch.float64, device=b.device)
    if num_pairs == 0 or num_candidates == 0:
        return out
    block_c = min(16, triton.next_power_of_2(num_candidates))
    grid = (num_pairs, triton.cdiv(num_candidates, block_c))
    if saq is None:
        a_args, saq_args = (a, a.stride(0), a.stride(1)), (a, a, a, a, 0, 0, 0, 0, 0, 1, 0, 1.0)
    else:
        a_args, saq_args = (b, 0, 0), layer_args(saq)
    _pair_dot64_kernel[grid](
        a_args[0], b, index, out, num_candidates, b.shape[1],
        *a_args[1:], b.stride(0), b.stride(1), index.stride(0), index.stride(1), *saq_args,
        BLOCK_C=block_c, SAQ=saq is not None, num_warps=4,
    )  # fmt: skip
    return out
