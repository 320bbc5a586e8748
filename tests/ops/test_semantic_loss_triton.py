"""The semantic loss's Triton kernel, interpreted on the CPU (TRITON_INTERPRET=1): values and gradients against
the reference at tiny fp32 shapes (the interpreter's bf16 tl.dot is wrong), precision bf16, shared sets, strides.
"""

from __future__ import annotations

import os

import pytest
import torch
from _semantic_checks import (
    assert_identical,
    loss_and_grad,
    make_problem,
    reference_loss_and_grad,
    round_bf16,
    tolerance,
)

import spae_fast
from spae_fast import _ref
from spae_fast.semantic import pack_candidate_sets

OPS = torch.ops.spae_fast

# ----------------------------------------------------------------------------------------------------------
# Triton, interpreted on the CPU (tiny fp32 shapes: the interpreter's bf16 tl.dot is wrong)
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def triton_interpreter():
    triton = pytest.importorskip("triton")
    if type(triton.language.zeros).__name__ == "JITFunction":
        pytest.skip(
            "triton was imported in GPU mode before TRITON_INTERPRET=1 could be set; run this file alone"
        )
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    yield
    if before is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = before


@pytest.mark.parametrize(("num", "num_rows", "dim"), [(1, 1, 1), (21, 45, 19), (17, 40, 33)])
def test_triton_matches_reference(triton_interpreter, num, num_rows, dim):
    z, weight, mask = make_problem(num, num_rows, dim, seed=num + dim, empty_rows=(0,) if num > 1 else ())
    index, offsets = _ref.candidates_from_mask(mask)
    loss, grad = loss_and_grad(z, weight, index, offsets, tau=0.8, backend="triton")
    ref_loss, ref_grad = reference_loss_and_grad(z, weight, index, offsets, tau=0.8)
    atol = tolerance(z, weight, 0.8)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=atol)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=atol / 10)


def test_triton_precision_bf16_is_the_loss_of_the_rounded_operands(triton_interpreter):
    z, weight, mask = make_problem(13, 70, 21, seed=97)
    index, offsets = _ref.candidates_from_mask(mask)
    loss, grad = loss_and_grad(z, weight, index, offsets, tau=0.8, backend="triton", precision="bf16")
    z16, w16 = round_bf16(z), round_bf16(weight)
    ref_loss, ref_grad = reference_loss_and_grad(z16, w16, index, offsets, tau=0.8)
    atol = tolerance(z16, w16, 0.8)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=atol)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=atol / 10)


def test_triton_shared_sets_no_grad_and_strides(triton_interpreter):
    z, weight, _ = make_problem(18, 35, 20, seed=71)
    index, offsets = pack_candidate_sets([torch.tensor([3, 3, 30]), torch.tensor([], dtype=torch.long),
                                          torch.tensor([0, 34])])  # fmt: skip
    sets = torch.tensor([0, 1, 2, -1, 2, 0] * 3)
    weight_strided = torch.zeros(70, 20)[::2]
    weight_strided.copy_(weight)
    loss, grad = loss_and_grad(z, weight_strided, index, offsets, sets, backend="triton")
    ref_loss, ref_grad = reference_loss_and_grad(z, weight, index, offsets, sets)
    atol = tolerance(z, weight, 1.0)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=atol)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=atol / 10)
    with torch.no_grad():
        no_grad = spae_fast.semantic_loss(z, weight, index, offsets, sets, reduction="none", backend="triton")
    assert_identical(no_grad, loss, "triton no_grad vs grad")
    # per-position values do not depend on the batch (one program owns its rows; no atomics)
    head = spae_fast.semantic_loss(
        z[:5], weight, index, offsets, sets[:5], reduction="none", backend="triton"
    )
    assert_identical(head, loss[:5], "triton batch split")


def test_triton_kernels_import_from_installed_package():
    pytest.importorskip("triton")
    import spae_fast.triton_kernels.semantic_loss as module

    assert os.path.dirname(module.__file__) == os.path.join(
        os.path.dirname(spae_fast.__file__), "triton_kernels"
    )
    assert callable(module.softmax_stats) and callable(module.set_means)
