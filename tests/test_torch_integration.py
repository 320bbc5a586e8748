"""The custom ops behave as torch.library ops (opcheck: schema, fake tensors, autograd registration, AOT
dispatch) and compile with torch.compile(fullgraph=True), matching eager."""

from __future__ import annotations

import pytest
import torch
from _spae_checks import METRICS, assert_identical, gaussian, queries_for

import spae_fast

OPS = torch.ops.spae_fast


def _operands(weight, metric, backend):
    if backend == "cpu":
        return OPS.pack_codebook(weight, metric)
    empty = torch.empty(0)
    return empty, empty, empty


@pytest.mark.parametrize(
    "metric, dtype",
    [("l2", torch.float32), ("ip", torch.float32), ("cosine", torch.float32), ("l2", torch.bfloat16)],
    ids=str,
)
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_opcheck_nearest_and_topk(backend, metric, dtype):
    weight = gaussian(19, 7, seed=1, dtype=dtype)
    panels, bias, norm_bound = _operands(weight, metric, backend)
    for requires_grad in (False, True):
        x = queries_for(weight, 5, seed=2).requires_grad_(requires_grad)
        for prefilter in ("none", "int8" if backend == "cpu" and spae_fast.ops.int8_prefilter_available() else "auto"):
            int8 = spae_fast.ops.common.prefilter_operands(weight, weight, panels, bias, prefilter, backend)
            torch.library.opcheck(
                OPS.nearest.default, (x, weight, panels, bias, norm_bound, *int8, metric, backend, True, prefilter)
            )
            torch.library.opcheck(
                OPS.topk.default, (x, weight, panels, bias, norm_bound, *int8, 3, metric, backend, True, prefilter)
            )
    # empty batch
    x = torch.empty(0, 7, dtype=dtype)
    none = (torch.empty(0),) * 4
    torch.library.opcheck(
        OPS.topk.default, (x, weight, panels, bias, norm_bound, *none, 2, metric, backend, False, "none")
    )


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_opcheck_pack_codebook(metric, dtype):
    weight = gaussian(33, 5, seed=1, dtype=dtype)
    torch.library.opcheck(OPS.pack_codebook.default, (weight, metric))
    panels, bias, norm_bound = OPS.pack_codebook(weight, metric)
    assert panels.shape == (3, 5, 16) and bias.shape == (48,) and norm_bound.shape == ()
    assert bool(torch.isinf(bias[33:]).all()), "pad rows must never be selected"
    scale = {"l2": -2.0, "ip": -1.0}.get(metric)
    if scale is not None:  # packed panel p[panel][d][column] = scale * e[row]
        assert panels.dtype == dtype  # a narrow table keeps its dtype for l2 / ip (widened exactly by the kernels)
        unpacked = panels.permute(0, 2, 1).reshape(48, 5)[:33].float()
        if panels.dtype == torch.float16 and metric == "l2":
            unpacked = 2 * unpacked  # fp16 l2 panels hold -e (-2e may overflow fp16); the kernels double it
        assert torch.equal(unpacked, scale * weight.float())


def _compile(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True)


@pytest.mark.parametrize("backend", ["cpu", "auto"])
def test_compile_fullgraph_matches_eager(backend):
    weight = gaussian(300, 16, seed=1)
    codebook = spae_fast.Codebook(weight)
    cosine_codebook = spae_fast.Codebook(weight, "cosine")

    def search(x):
        d1, i1 = spae_fast.nearest(x, codebook, backend=backend)  # a Codebook
        d2, i2 = spae_fast.topk(x * 0.5, weight, 4, metric="ip", backend=backend)  # a raw tensor
        d3, i3 = spae_fast.nearest(x, cosine_codebook, backend=backend)
        return d1.sum() + d2.sum() + d3.sum(), i1, i2, i3, d1, d2

    compiled = _compile(search)
    for num in (40, 41):  # a second shape: recompiles or runs dynamically, either way must match
        x = queries_for(weight, num, seed=num).requires_grad_()
        got = compiled(x)
        expected = search(x)
        for a, b in zip(got[1:], expected[1:]):
            assert torch.equal(a, b)
        torch.testing.assert_close(got[0], expected[0], rtol=1e-6, atol=0)
        (grad_compiled,) = torch.autograd.grad(got[0], x)
        (grad_eager,) = torch.autograd.grad(expected[0], x)
        torch.testing.assert_close(grad_compiled, grad_eager, rtol=1e-6, atol=1e-6)


def test_compile_fullgraph_leading_dims_bf16():
    weight = gaussian(70, 12, seed=3, dtype=torch.bfloat16)

    def search(x):
        return spae_fast.topk(x, weight, 2, backend="cpu")

    x = queries_for(weight, 24, seed=4).reshape(2, 3, 4, 12)
    assert_identical(_compile(search)(x), search(x), "compiled vs eager")
