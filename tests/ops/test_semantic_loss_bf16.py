"""The semantic loss at precision="bf16": the loss of bf16(z) against bf16(E) with fp32 accumulation, on
every CPU path (reference, rounded operands through each fp32 micro-kernel, the AVX512-BF16 kernel).
"""

from __future__ import annotations

import pytest
import torch
from _semantic_checks import (
    assert_identical,
    loss_and_grad,
    make_problem,
    materialised_cross_entropy,
    reference_loss_and_grad,
    round_bf16,
    tolerance,
)

import spae_fast
from spae_fast import _ref

OPS = torch.ops.spae_fast

# ----------------------------------------------------------------------------------------------------------
# precision="bf16": the loss of bf16(z) against bf16(E), fp32 accumulation
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(params=["torch", "cpu-portable", "cpu-avx2", "cpu-avx512bf16"])
def bf16_impl(request, use_isa) -> str:
    """Every CPU path of precision "bf16": the reference, the rounded operands through the fp32 kernel (each
    micro-kernel; what CPUs without AVX512-BF16 run) and the AVX512-BF16 kernel."""
    if request.param == "torch":
        return "torch"
    if request.param == "cpu-avx512bf16":
        if not spae_fast.ops.cpu_has_bf16_semantic_kernel():
            pytest.skip("this CPU has no AVX512-BF16")
        return "cpu"
    use_isa(request.param.removeprefix("cpu-"))
    return "cpu-emulated"


def bf16_loss_and_grad(z, weight, index, offsets, sets=None, *, impl, **kwargs):
    if impl != "cpu-emulated":
        return loss_and_grad(z, weight, index, offsets, sets, precision="bf16", backend=impl, **kwargs)
    # CPUs without AVX512-BF16: pack_semantic_bf16 then hands back the rounded table and its fp32 packing
    original = spae_fast.ops.common.cpu_has_bf16_semantic_kernel
    spae_fast.ops.common.cpu_has_bf16_semantic_kernel = lambda: False
    try:
        return loss_and_grad(z, weight, index, offsets, sets, precision="bf16", backend="cpu", **kwargs)
    finally:
        spae_fast.ops.common.cpu_has_bf16_semantic_kernel = original


BF16_SHAPES = [(1, 1, 1), (1, 7, 3), (5, 37, 19), (29, 203, 37), (13, 300, 64), (7, 65, 17), (9, 130, 130)]


@pytest.mark.parametrize(("num", "num_rows", "dim"), BF16_SHAPES)
def test_bf16_is_the_loss_of_the_rounded_operands(bf16_impl, num, num_rows, dim):
    """Loss: the fp64 cross-entropy of bf16(z) against bf16(E), to fp32 accuracy. Gradient: that of the rounded
    problem (straight-through), up to the bf16 rounding of the softmax weights (relative 2^-8 per weight)."""
    z, weight, mask = make_problem(num, num_rows, dim, seed=num * 11 + dim)
    index, offsets = _ref.candidates_from_mask(mask)
    loss, grad = bf16_loss_and_grad(z, weight, index, offsets, impl=bf16_impl, tau=0.7)
    z16, w16 = round_bf16(z), round_bf16(weight)
    exact = materialised_cross_entropy(z16, w16, mask, 0.7, reduction="none")
    torch.testing.assert_close(loss.double(), exact, rtol=0, atol=tolerance(z16, w16, 0.7))
    _, ref_grad = reference_loss_and_grad(z16, w16, index, offsets, tau=0.7, dtype=torch.float64)
    scale = float(ref_grad.abs().max()) + 1e-30
    assert float((grad.double() - ref_grad).abs().max()) <= 2**-7 * scale + tolerance(z16, w16, 0.7) / 10
    # and it differs from the fp32 loss only by the rounding of the operands
    fp32_loss, _ = loss_and_grad(z, weight, index, offsets, tau=0.7, backend="torch")
    assert float((loss - fp32_loss).abs().max()) <= 2**-7 * (tolerance(z, weight, 0.7) / 2e-6)


@pytest.mark.parametrize("table", ["contiguous", "strided", "bf16"])
def test_bf16_no_grad_gives_the_same_loss(bf16_impl, table):
    """Without autograd the set means are summed from the table itself (rounded to bf16), with it from the
    packed bf16 rows the gradient pass reads: the loss is bitwise the same either way, for any table layout."""
    z, weight, mask = make_problem(11, 64 * 3 + 9, 21, seed=37)
    if table == "strided":
        weight = torch.cat([weight, weight], dim=1)[:, ::2]
    elif table == "bf16":
        weight = weight.to(torch.bfloat16)
    index, offsets = _ref.candidates_from_mask(mask)
    with_grad, _ = bf16_loss_and_grad(z, weight, index, offsets, impl=bf16_impl)
    original = spae_fast.ops.common.cpu_has_bf16_semantic_kernel
    if bf16_impl == "cpu-emulated":
        spae_fast.ops.common.cpu_has_bf16_semantic_kernel = lambda: False
    try:
        with torch.no_grad():
            backend = "cpu" if bf16_impl == "cpu-emulated" else bf16_impl
            without = spae_fast.semantic_loss(z, weight, index, offsets, reduction="none", precision="bf16",
                                              backend=backend)  # fmt: skip
    finally:
        spae_fast.ops.common.cpu_has_bf16_semantic_kernel = original
    assert_identical(without, with_grad, "no_grad vs grad")


def test_bf16_kernel_matches_the_emulation_closely():
    if not spae_fast.ops.cpu_has_bf16_semantic_kernel():
        pytest.skip("this CPU has no AVX512-BF16")
    z, weight, mask = make_problem(40, 517, 70, seed=71)
    index, offsets = _ref.candidates_from_mask(mask)
    kernel = bf16_loss_and_grad(z, weight, index, offsets, impl="cpu")
    emulated = bf16_loss_and_grad(z, weight, index, offsets, impl="cpu-emulated")
    torch.testing.assert_close(kernel[0], emulated[0], rtol=0, atol=tolerance(round_bf16(z), weight, 1.0))
    assert float((kernel[1] - emulated[1]).abs().max()) <= 2**-7 * float(emulated[1].abs().max())


def test_bf16_large_vocabulary_odd_sizes_and_strides():
    """Several 64-row groups with a partial last one, D not a multiple of 2 or 64, strided inputs."""
    z, weight, mask = make_problem(23, 64 * 9 + 5, 67, seed=73)
    index, offsets = _ref.candidates_from_mask(mask)
    wide = torch.zeros(weight.shape[0], 80)
    wide[:, :67] = weight
    strided_weight = wide[:, :67]
    strided_z = torch.zeros(23, 67 * 2)[:, ::2]
    strided_z.copy_(z)
    got = bf16_loss_and_grad(strided_z, strided_weight, index, offsets, impl="cpu")
    want = bf16_loss_and_grad(z.contiguous(), weight.contiguous(), index, offsets, impl="cpu")
    assert_identical(got[0], want[0], "loss with strided inputs")
    assert_identical(got[1], want[1], "grad with strided inputs")
    exact = materialised_cross_entropy(round_bf16(z), round_bf16(weight), mask, 1.0, reduction="none")
    torch.testing.assert_close(got[0].double(), exact, rtol=0, atol=tolerance(z, weight, 1.0))


@pytest.mark.parametrize("num", [1, 7, 200])
def test_bf16_bitwise_identical_across_thread_counts_and_batch_splits(set_threads, num):
    z, weight, mask = make_problem(num, 333, 29, seed=num + 3)
    index, offsets = _ref.candidates_from_mask(mask)
    runs = []
    for threads in (1, 2, 3):
        set_threads(threads)
        runs.append(bf16_loss_and_grad(z, weight, index, offsets, impl="cpu"))
    for loss, grad in runs[1:]:
        assert_identical(loss, runs[0][0], "bf16 loss across thread counts")
        assert_identical(grad, runs[0][1], "bf16 grad across thread counts")
    if num > 1:
        cut = num // 3
        sets = torch.arange(num)
        head = bf16_loss_and_grad(z[:cut], weight, index, offsets, sets[:cut], impl="cpu")
        tail = bf16_loss_and_grad(z[cut:], weight, index, offsets, sets[cut:], impl="cpu")
        assert_identical(torch.cat([head[0], tail[0]]), runs[0][0], "bf16 loss across a batch split")
        assert_identical(torch.cat([head[1], tail[1]]), runs[0][1], "bf16 grad across a batch split")


def test_bf16_codebook_caches_its_packing_and_matches_the_tensor():
    z, weight, mask = make_problem(11, 150, 24, seed=79)
    index, offsets = _ref.candidates_from_mask(mask)
    codebook = spae_fast.Codebook(weight)
    before = codebook.nbytes_packed()
    with_codebook = bf16_loss_and_grad(z, codebook, index, offsets, impl="cpu")
    assert codebook.nbytes_packed() > before  # the bf16 packing is kept for the next call
    first = codebook._derived["semantic_bf16"]
    bf16_loss_and_grad(z, codebook, index, offsets, impl="cpu")
    assert codebook._derived["semantic_bf16"] is first
    with_tensor = bf16_loss_and_grad(z, weight, index, offsets, impl="cpu")
    assert_identical(with_codebook[0], with_tensor[0], "bf16 loss: Codebook vs tensor")
    assert_identical(with_codebook[1], with_tensor[1], "bf16 grad: Codebook vs tensor")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bf16_precision_with_16bit_inputs(bf16_impl, dtype):
    z, weight, mask = make_problem(9, 90, 21, seed=83)
    z, weight = z.to(dtype), weight.to(dtype)
    index, offsets = _ref.candidates_from_mask(mask)
    loss, grad = bf16_loss_and_grad(z, weight, index, offsets, impl=bf16_impl)
    assert grad.dtype == dtype
    exact = materialised_cross_entropy(round_bf16(z.float()), round_bf16(weight.float()), mask, 1.0, "none")
    torch.testing.assert_close(loss.double(), exact, rtol=0, atol=tolerance(z.float(), weight.float(), 1.0))


def test_bf16_non_finite_and_overflow_are_reported(bf16_impl):
    z, weight, mask = make_problem(6, 40, 8, seed=89)
    index, offsets = _ref.candidates_from_mask(mask)
    bad = z.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="first bad row 3"):
        bf16_loss_and_grad(bad, weight, index, offsets, impl=bf16_impl)
    if bf16_impl != "torch":
        huge = z.clone()
        huge[4] = 1e36
        with pytest.raises(ValueError, match="z row 4 is too large"):
            bf16_loss_and_grad(huge, weight, index, offsets, impl=bf16_impl)


@pytest.mark.parametrize(("value", "message"), [(float("nan"), "codebook contains NaN or Inf"),
                                                 (3.4e38, "codebook contains NaN or Inf"),  # past bf16's range
                                                 (1e30, "codebook row 2 is too large")])  # fmt: skip
def test_bf16_bad_codebook_is_reported(bf16_impl, value, message):
    z, weight, mask = make_problem(4, 12, 5, seed=101)
    index, offsets = _ref.candidates_from_mask(mask)
    weight[2, 1] = value
    if bf16_impl == "torch" and value == 1e30:
        pytest.skip("the reference does not check ||e||^2 overflow")
    with pytest.raises(ValueError, match=message):
        bf16_loss_and_grad(z, weight, index, offsets, impl=bf16_impl)


def test_trainer_uses_the_configured_precision():
    from spae_fast.trainer import TrainConfig

    assert TrainConfig().semantic_precision == "bf16"
    with pytest.raises(ValueError, match="semantic_precision must be one of"):
        TrainConfig(semantic_precision="fp8")
