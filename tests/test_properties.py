"""Hypothesis property tests: the native CPU backend against the reference and fp64 on random small shapes,
dtypes, metrics, k, thread counts, micro-kernels and strides."""

from __future__ import annotations

import pytest
import torch
from _spae_checks import DTYPES, METRICS, assert_identical, check_search
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import spae_fast
from spae_fast import _native

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@st.composite
def problems(draw, integer_data: bool):
    num = draw(st.integers(0, 20))
    num_rows = draw(st.integers(1, 70))
    dim = draw(st.integers(1, 40))
    k = draw(st.integers(1, min(num_rows, 64)))
    metric = draw(st.sampled_from(["l2", "ip"] if integer_data else list(METRICS)))
    x_dtype = draw(st.sampled_from(DTYPES))
    weight_dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    if integer_data:
        low, high = -draw(st.integers(0, 3)), draw(st.integers(0, 3))
        weight = torch.randint(low, high + 1, (num_rows, dim), generator=g).float()
        x = torch.randint(low, high + 1, (num, dim), generator=g).float()
    else:
        scale = 10.0 ** draw(st.integers(-3, 3))
        weight = torch.randn(num_rows, dim, generator=g) * scale
        if draw(st.booleans()) and num_rows > 1:  # duplicate rows
            weight[draw(st.integers(1, num_rows - 1))] = weight[0]
        x = torch.randn(num, dim, generator=g) * scale
    transposed = draw(st.booleans())
    if transposed:  # a non-contiguous x with the same values
        x = x.T.contiguous().T
    return x.to(x_dtype), weight.to(weight_dtype), k, metric


@pytest.fixture
def native_state(use_isa, set_threads):
    """select(isa, threads): that micro-kernel (portable where this CPU lacks it) and thread count, both
    restored after the test."""

    def select(isa: str, threads: int) -> None:
        use_isa(isa if _native.cpu_module().set_isa(isa) else "portable")
        set_threads(threads)

    return select


@SETTINGS
@given(
    problem=problems(integer_data=False),
    isa=st.sampled_from(["portable", "avx2"]),
    threads=st.integers(1, 3),
    use_codebook=st.booleans(),
)
def test_cpu_matches_reference_and_fp64(native_state, problem, isa, threads, use_codebook):
    native_state(isa, threads)
    x, weight, k, metric = problem
    codebook = spae_fast.Codebook(weight, metric) if use_codebook else weight
    dist, index = spae_fast.topk(x, codebook, k, metric=metric, backend="cpu")
    check_search(x, weight, metric, dist, index, k=k)
    near = spae_fast.nearest(x, codebook, metric=metric, backend="cpu")
    assert_identical(near, (dist[:, 0], index[:, 0]), "nearest vs topk[:, 0]")
    check_search(x, weight, metric, *near, k=None)


@SETTINGS
@given(
    problem=problems(integer_data=True), isa=st.sampled_from(["portable", "avx2"]), threads=st.integers(1, 3)
)
def test_cpu_bitwise_equals_reference_on_exact_data(native_state, problem, isa, threads):
    """Integer data: exact arithmetic and many exact ties; cpu == reference == fp64 order, bitwise."""
    native_state(isa, threads)
    x, weight, k, metric = problem
    dist, index = spae_fast.topk(x, weight, k, metric=metric, backend="cpu")
    check_search(x, weight, metric, dist, index, k=k, exact=True)
    assert_identical((dist, index), spae_fast.topk(x, weight, k, metric=metric, backend="torch"), "vs torch")
