"""The fused semantic loss (`spae_fast.semantic_loss`, ``spae_fast::semantic_loss``) and its candidate-set helpers.

Every backend that runs here (torch reference, native CPU with each micro-kernel, Triton interpreted) is
checked against the spec `spae_fast._ref.semantic_loss_reference` (values and autograd gradients), against a
materialised ``F.cross_entropy`` over the literal logits -||z - e||^2 / tau with soft targets uniform on the
candidate set, and against fp64. Tolerances scale with the logit magnitude (max|z| max|e| / tau): the loss is a
difference of two numbers of that size.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _semantic_checks import (
    assert_identical,
    check_against_reference,
    generator,
    loss_and_grad,
    make_problem,
    materialised_cross_entropy,
    reference_loss_and_grad,
    tolerance,
)

import spae_fast
from spae_fast import _ref
from spae_fast.semantic import candidates_from_relevance, pack_candidate_sets, pyramid_set_of_position

OPS = torch.ops.spae_fast

# ----------------------------------------------------------------------------------------------------------
# Fixtures (use_isa and set_threads come from tests/conftest.py and restore their setting after each test)
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(params=["torch", "cpu-portable", "cpu-avx2"])
def impl(request, use_isa) -> str:
    """Every CPU implementation: the torch reference and the native kernel with each micro-kernel."""
    if request.param == "torch":
        return "torch"
    use_isa(request.param.removeprefix("cpu-"))
    return "cpu"


@pytest.fixture(params=["portable", "avx2"])
def isa(request, use_isa) -> str:
    use_isa(request.param)
    return request.param


# ----------------------------------------------------------------------------------------------------------
# Values and gradients
# ----------------------------------------------------------------------------------------------------------

SHAPES = [(1, 1, 1), (1, 7, 3), (4, 1, 5), (5, 37, 19), (29, 203, 37), (13, 300, 64), (7, 65, 17)]


@pytest.mark.parametrize(("num", "num_rows", "dim"), SHAPES)
def test_matches_reference(impl, num, num_rows, dim):
    z, weight, mask = make_problem(num, num_rows, dim, seed=num * 7 + dim)
    index, offsets = _ref.candidates_from_mask(mask)
    loss, grad = loss_and_grad(z, weight, index, offsets, tau=0.7, backend=impl)
    check_against_reference(loss, grad, z, weight, index, offsets, tau=0.7)


@pytest.mark.parametrize("tau", [0.05, 0.5, 1.0, 13.0])
def test_matches_fp64_and_materialised_cross_entropy(impl, tau):
    z, weight, mask = make_problem(23, 150, 24, seed=3, empty_rows=(4, 17))
    index, offsets = _ref.candidates_from_mask(mask)
    leaf = z.clone().requires_grad_(True)
    mean = spae_fast.semantic_loss(leaf, weight, index, offsets, tau=tau, backend=impl)
    (grad,) = torch.autograd.grad(mean, leaf)

    leaf64 = z.double().requires_grad_(True)
    expected = materialised_cross_entropy(leaf64, weight, mask, tau)
    (expected_grad,) = torch.autograd.grad(expected, leaf64)
    atol = tolerance(z, weight, tau)
    assert mean.dtype == torch.float32 and mean.shape == ()
    torch.testing.assert_close(mean.double(), expected, rtol=0, atol=atol)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=atol / z.shape[0])
    # the spec in fp64 agrees with the materialised cross-entropy to fp64 precision
    spec64 = _ref.semantic_loss_reference(z.double(), weight.double(), index, offsets, tau=tau)
    torch.testing.assert_close(spec64, expected, rtol=1e-10, atol=1e-9)
    # per position
    per_position = spae_fast.semantic_loss(z, weight, index, offsets, tau=tau, reduction="none", backend=impl)
    torch.testing.assert_close(per_position.double(), materialised_cross_entropy(z, weight, mask, tau, "none"),
                               rtol=0, atol=atol)  # fmt: skip
    assert per_position[4] == 0 and per_position[17] == 0


def test_large_vocabulary_several_groups_and_panels(impl):
    """V spanning many 64-column groups (a partial last panel and group) and a running max that moves."""
    z, weight, mask = make_problem(8, 1000, 40, seed=11, density=0.02)
    weight[997] *= 3.0  # a late, large logit: the running max grows at the end
    index, offsets = _ref.candidates_from_mask(mask)
    loss, grad = loss_and_grad(z, weight, index, offsets, backend=impl)
    check_against_reference(loss, grad, z, weight, index, offsets)


@pytest.mark.parametrize("z_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes(impl, z_dtype, weight_dtype):
    """16-bit inputs are upcast exactly and accumulated in fp32; the gradient comes back in z's dtype."""
    z, weight, mask = make_problem(11, 70, 21, seed=5)
    z, weight = z.to(z_dtype), weight.to(weight_dtype)
    index, offsets = _ref.candidates_from_mask(mask)
    loss, grad = loss_and_grad(z, weight, index, offsets, backend=impl)
    assert loss.dtype == torch.float32 and grad.dtype == z_dtype
    ref_loss, ref_grad = reference_loss_and_grad(z.float(), weight.float(), index, offsets)
    atol = tolerance(z, weight, 1.0)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=atol)
    grad_tol = 1e-2 if z_dtype != torch.float32 else 1e-4  # the gradient is rounded to z's dtype
    torch.testing.assert_close(grad.float(), ref_grad, rtol=grad_tol, atol=atol / 10 + grad_tol * 1e-2)


def test_duplicate_candidates_count_with_multiplicity(impl):
    z, weight, _ = make_problem(3, 40, 8, seed=9)
    sets = [torch.tensor([5, 5, 7]), torch.tensor([1, 2, 2, 2, 39]), torch.tensor([0])]
    index, offsets = pack_candidate_sets(sets)
    loss, grad = loss_and_grad(z, weight, index, offsets, backend=impl)
    targets = torch.zeros(3, 40, dtype=torch.float64)
    for row, rows in enumerate(sets):
        targets[row].index_add_(0, rows, torch.ones(len(rows), dtype=torch.float64))
    targets /= targets.sum(1, keepdim=True)
    leaf = z.double().requires_grad_(True)
    expected = F.cross_entropy(-torch.cdist(leaf, weight.double()).square(), targets, reduction="none")
    (expected_grad,) = torch.autograd.grad(expected.sum(), leaf)
    atol = tolerance(z, weight, 1.0)
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=0, atol=atol)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=atol / 10)


def test_duplicate_codebook_rows(impl):
    z, weight, mask = make_problem(9, 30, 6, seed=13)
    weight[20:25] = weight[0:5]
    index, offsets = _ref.candidates_from_mask(mask)
    loss, grad = loss_and_grad(z, weight, index, offsets, backend=impl)
    check_against_reference(loss, grad, z, weight, index, offsets)


def test_empty_sets_and_positions_without_a_set(impl):
    z, weight, _ = make_problem(6, 25, 5, seed=17)
    sets = [torch.tensor([1, 2]), torch.tensor([], dtype=torch.int64), torch.tensor([24])]
    index, offsets = pack_candidate_sets(sets)
    set_of_position = torch.tensor([0, 1, -1, 2, 1, 0])
    loss, grad = loss_and_grad(z, weight, index, offsets, set_of_position, backend=impl)
    excluded = torch.tensor([False, True, True, False, True, False])
    assert bool((loss[excluded] == 0).all()) and bool((grad[excluded] == 0).all())
    assert bool((loss[~excluded] > 0).all())
    ref_loss, _ = reference_loss_and_grad(z, weight, index, offsets, set_of_position)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=tolerance(z, weight, 1.0))
    mean = spae_fast.semantic_loss(z, weight, index, offsets, set_of_position, backend=impl)
    torch.testing.assert_close(mean, loss.sum() / 3, rtol=1e-6, atol=0)
    # nothing included: mean 0 (not NaN), zero gradient
    leaf = z.clone().requires_grad_(True)
    none = spae_fast.semantic_loss(
        leaf, weight, index, offsets, torch.tensor([1, -1, 1, 1, -1, -1]), backend=impl
    )
    none.backward()
    assert float(none.detach()) == 0.0 and bool((leaf.grad == 0).all())
    # no sets at all (S = 0)
    empty_index, empty_offsets = pack_candidate_sets([])
    zero = spae_fast.semantic_loss(z, weight, empty_index, empty_offsets, torch.full((6,), -1), backend=impl)
    assert float(zero) == 0.0


def test_zero_positions(impl):
    weight = torch.randn(10, 4)
    z = torch.zeros(0, 4, requires_grad=True)
    index, offsets = pack_candidate_sets([])
    loss = spae_fast.semantic_loss(z, weight, index, offsets, backend=impl)
    loss.backward()
    assert float(loss) == 0.0 and z.grad.shape == (0, 4)


def test_sum_reduction_and_leading_dims(impl):
    z, weight, _ = make_problem(12, 33, 9, seed=19)
    index, offsets = pack_candidate_sets([torch.tensor([0, 3]), torch.tensor([7]), torch.tensor([1, 2, 30])])
    sets = torch.tensor([[0, 1, 2, 0], [1, 1, 2, -1], [2, 0, 0, 1]])
    per_position = spae_fast.semantic_loss(z.reshape(3, 4, 9), weight, index, offsets, sets, reduction="none",
                                           backend=impl)  # fmt: skip
    assert per_position.shape == (3, 4)
    flat = spae_fast.semantic_loss(
        z, weight, index, offsets, sets.reshape(-1), reduction="none", backend=impl
    )
    assert_identical(per_position.reshape(-1), flat, "leading dims vs flat")
    total = spae_fast.semantic_loss(
        z.reshape(3, 4, 9), weight, index, offsets, sets, reduction="sum", backend=impl
    )
    torch.testing.assert_close(total, flat.double().sum().float(), rtol=1e-6, atol=0)


def test_non_contiguous_inputs(impl):
    z, weight, mask = make_problem(10, 40, 12, seed=23)
    index, offsets = _ref.candidates_from_mask(mask)
    z_strided = torch.zeros(12, 10).T  # [10, 12] with strides (1, 10)
    z_strided.copy_(z)
    weight_strided = torch.zeros(80, 12)[::2]  # row stride 24
    weight_strided.copy_(weight)
    loss, grad = loss_and_grad(z_strided, weight_strided, index, offsets, backend=impl)
    expected_loss, expected_grad = loss_and_grad(z, weight, index, offsets, backend=impl)
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=tolerance(z, weight, 1.0))
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)


def test_codebook_object_matches_tensor(impl):
    z, weight, mask = make_problem(14, 90, 16, seed=29)
    index, offsets = _ref.candidates_from_mask(mask)
    codebook = spae_fast.Codebook(weight)
    loss, grad = loss_and_grad(z, codebook, index, offsets, backend=impl)
    expected_loss, expected_grad = loss_and_grad(z, weight, index, offsets, backend=impl)
    assert_identical(loss, expected_loss, "Codebook vs tensor loss")
    assert_identical(grad, expected_grad, "Codebook vs tensor grad")


def test_no_grad_gives_the_same_loss(impl):
    """Without autograd the kernel skips the softmax-weighted sum; the loss is bitwise the same."""
    z, weight, mask = make_problem(9, 77, 13, seed=31)
    index, offsets = _ref.candidates_from_mask(mask)
    with_grad, _ = loss_and_grad(z, weight, index, offsets, backend=impl)
    with torch.no_grad():
        without = spae_fast.semantic_loss(z, weight, index, offsets, reduction="none", backend=impl)
    assert_identical(without, with_grad, "no_grad vs grad")


def test_shared_sets_equal_per_position_sets(impl):
    """Sets shared through set_of_position give bitwise the same values as one (copied) set per position."""
    z, weight, _ = make_problem(10, 60, 11, seed=37)
    sets = [torch.tensor([3, 9, 41]), torch.tensor([0]), torch.tensor([59, 58, 2, 2])]
    set_of_position = torch.tensor([2, 0, 0, 1, 2, 1, 0, 2, 2, 1])
    index, offsets = pack_candidate_sets(sets)
    shared = loss_and_grad(z, weight, index, offsets, set_of_position, backend=impl)
    own_index, own_offsets = pack_candidate_sets([sets[s] for s in set_of_position.tolist()])
    own = loss_and_grad(z, weight, own_index, own_offsets, backend=impl)
    assert_identical(shared[0], own[0], "loss")
    assert_identical(shared[1], own[1], "grad")
    from_sets = spae_fast.semantic_loss_from_sets(
        z, weight, sets, set_of_position, reduction="none", backend=impl
    )
    assert_identical(from_sets, shared[0], "semantic_loss_from_sets")


@pytest.fixture
def native_state(use_isa, set_threads):
    return use_isa, set_threads


def test_property_random_problems(native_state):
    """Hypothesis: random sizes, scales, temperatures, dtypes, shared / empty sets, micro-kernels and thread
    counts; the native kernel against the reference."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    use_isa, set_threads = native_state

    @hypothesis.settings(max_examples=40, deadline=None, derandomize=True,
                         suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])  # fmt: skip
    @hypothesis.given(
        num=st.integers(0, 20), num_rows=st.integers(1, 150), dim=st.integers(1, 40),
        log_tau=st.floats(-1.0, 1.0), log_scale=st.integers(-2, 1), num_sets=st.integers(0, 5),
        dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
        isa=st.sampled_from(["portable", "avx2"]), threads=st.integers(1, 3), seed=st.integers(0, 2**31 - 1),
    )  # fmt: skip
    def check(num, num_rows, dim, log_tau, log_scale, num_sets, dtype, isa, threads, seed):
        use_isa(isa)
        set_threads(threads)
        g = generator(seed)
        scale, tau = 10.0**log_scale, 10.0**log_tau
        weight = (torch.randn(num_rows, dim, generator=g) * scale).to(dtype)
        z = (torch.randn(num, dim, generator=g) * scale).to(dtype)
        sets = [torch.randint(0, num_rows, (int(torch.randint(0, 6, (1,), generator=g)),), generator=g)
                for _ in range(num_sets)]  # fmt: skip
        index, offsets = pack_candidate_sets(sets)
        set_of_position = (
            torch.randint(-1, num_sets, (num,), generator=g) if num_sets else torch.full((num,), -1)
        )
        loss, grad = loss_and_grad(z, weight, index, offsets, set_of_position, tau=tau, backend="cpu")
        ref_loss, ref_grad = reference_loss_and_grad(z.float(), weight.float(), index, offsets, set_of_position,
                                                     tau=tau)  # fmt: skip
        # the logit-scale tolerance, plus a few fp32 ulps of the loss itself (about log V when the logits
        # are tiny: small scales at tau = 10)
        loss_scale = float(ref_loss.abs().max()) if ref_loss.numel() else 0.0
        atol = tolerance(z, weight, tau) + 2.0**-22 * loss_scale
        torch.testing.assert_close(loss, ref_loss, rtol=0, atol=atol)
        grad_tol = 1e-4 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(
            grad.float(), ref_grad, rtol=grad_tol, atol=atol / 10 + grad_tol * scale * 1e-2
        )

    check()


# ----------------------------------------------------------------------------------------------------------
# Determinism (native kernel)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num", [1, 7, 200])
def test_bitwise_identical_across_thread_counts(isa, set_threads, num):
    z, weight, mask = make_problem(num, 333, 29, seed=num)
    index, offsets = _ref.candidates_from_mask(mask)
    results = []
    for threads in (1, 2, 3):
        set_threads(threads)
        loss, grad = loss_and_grad(z, weight, index, offsets, backend="cpu")
        mean = spae_fast.semantic_loss(z, weight, index, offsets, backend="cpu")
        results.append((loss, grad, mean))
    for loss, grad, mean in results[1:]:
        assert_identical(loss, results[0][0], "loss across thread counts")
        assert_identical(grad, results[0][1], "grad across thread counts")
        assert_identical(mean, results[0][2], "mean across thread counts")


def test_bitwise_identical_across_batch_splits(isa):
    z, weight, _ = make_problem(61, 250, 23, seed=41)
    index, offsets = pack_candidate_sets(
        [torch.tensor([1, 5, 100]), torch.tensor([7]), torch.tensor([249, 0])]
    )
    sets = torch.randint(-1, 3, (61,), generator=generator(1))
    full = loss_and_grad(z, weight, index, offsets, sets, backend="cpu")
    for cut in (1, 6, 30, 60):
        head = loss_and_grad(z[:cut], weight, index, offsets, sets[:cut], backend="cpu")
        tail = loss_and_grad(z[cut:], weight, index, offsets, sets[cut:], backend="cpu")
        assert_identical(torch.cat([head[0], tail[0]]), full[0], f"loss split at {cut}")
        assert_identical(torch.cat([head[1], tail[1]]), full[1], f"grad split at {cut}")


def test_isas_agree_closely():
    z, weight, mask = make_problem(17, 130, 33, seed=43)
    index, offsets = _ref.candidates_from_mask(mask)
    native = spae_fast._native.cpu_module()
    before = native.get_isa()
    try:
        if not native.set_isa("avx2"):
            pytest.skip("this CPU cannot run the avx2 micro-kernel")
        avx2 = loss_and_grad(z, weight, index, offsets, backend="cpu")
        native.set_isa("portable")
        portable = loss_and_grad(z, weight, index, offsets, backend="cpu")
    finally:
        native.set_isa(before)
    torch.testing.assert_close(avx2[0], portable[0], rtol=0, atol=tolerance(z, weight, 1.0))
    torch.testing.assert_close(avx2[1], portable[1], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# torch.library integration
# ----------------------------------------------------------------------------------------------------------


def _op_args(backend: str, compute_grad: bool, dtype=torch.float32):
    z, weight, _ = make_problem(7, 40, 6, seed=47)
    z, weight = z.to(dtype), weight.to(dtype)
    index, offsets = pack_candidate_sets(
        [torch.tensor([1, 2]), torch.tensor([39]), torch.tensor([], dtype=torch.long)]
    )
    sets = torch.tensor([0, 1, 2, -1, 0, 1, 1])
    if backend == "cpu":
        panels, bias, norm_bound = OPS.pack_codebook(weight, "l2")
    else:
        panels = bias = norm_bound = torch.empty(0)
    z = z.requires_grad_(compute_grad)
    return (z, weight, panels, bias, norm_bound, index, offsets, sets, 0.9, compute_grad, backend, True, torch.empty(0))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("compute_grad", [True, False])
def test_opcheck(backend, compute_grad):
    torch.library.opcheck(OPS.semantic_loss.default, _op_args(backend, compute_grad))


def test_opcheck_bf16():
    torch.library.opcheck(OPS.semantic_loss.default, _op_args("cpu", True, torch.bfloat16))


@pytest.mark.parametrize("compute_grad", [True, False])
def test_opcheck_precision_bf16(compute_grad):
    z, weight, _, _, _, index, offsets, sets, tau, _, _, check, _ = _op_args("cpu", compute_grad)
    packed = spae_fast.ops.pack_semantic_bf16(weight)
    args = (z, *packed[:4], index, offsets, sets, tau, compute_grad, "cpu", check, packed[4], "bf16")
    torch.library.opcheck(OPS.semantic_loss.default, args)


def test_op_without_gradient_refuses_backward():
    args = _op_args("cpu", False)
    z = args[0].detach().requires_grad_(True)
    loss, _ = OPS.semantic_loss(z, *args[1:])
    with pytest.raises(RuntimeError, match="compute_grad=False"):
        loss.sum().backward()


def test_compile_fullgraph_matches_eager():
    z, weight, _ = make_problem(20, 64, 8, seed=53)
    codebook = spae_fast.Codebook(weight)
    index, offsets = pack_candidate_sets([torch.tensor([1, 2, 3]), torch.tensor([63])])
    sets = torch.tensor([0, 1] * 10)

    def loss_fn(x):
        return spae_fast.semantic_loss(x, codebook, index, offsets, sets, tau=0.5) * 2.0

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True)
    leaf = z.clone().requires_grad_(True)
    got = compiled(leaf)
    (grad,) = torch.autograd.grad(got, leaf)
    leaf = z.clone().requires_grad_(True)
    expected = loss_fn(leaf)
    (expected_grad,) = torch.autograd.grad(expected, leaf)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------------------


def _good():
    z, weight, _ = make_problem(4, 10, 3, seed=59)
    index, offsets = pack_candidate_sets([torch.tensor([1, 2]), torch.tensor([9])])
    return {"z": z, "codebook": weight, "candidate_index": index, "candidate_offsets": offsets,
            "set_of_position": torch.tensor([0, 1, 1, -1])}  # fmt: skip


BAD_INPUTS = [
    ({"z": torch.randn(4, 5)}, ValueError, "z has last dimension 5"),
    ({"z": torch.randn(4, 3).double()}, TypeError, "z must be float32, bfloat16 or float16"),
    ({"z": [[0.0] * 3]}, TypeError, "z must be a torch.Tensor"),
    ({"codebook": torch.randn(10)}, ValueError, r"codebook must be 2-D \[V, D\]"),
    ({"codebook": torch.randn(0, 3)}, ValueError, "codebook is empty"),
    (
        {"candidate_index": torch.tensor([1.0, 2.0, 9.0])},
        TypeError,
        "candidate_index must be an integer tensor",
    ),
    ({"candidate_index": torch.tensor([[1, 2, 9]])}, ValueError, r"candidate_index must be 1-D"),
    (
        {"candidate_index": torch.tensor([1, 2, 10])},
        ValueError,
        r"candidate_index holds codebook rows out of range",
    ),
    (
        {"candidate_index": torch.tensor([1, -1, 9])},
        ValueError,
        r"candidate_index holds codebook rows out of range",
    ),
    ({"candidate_offsets": torch.tensor([1, 2, 3])}, ValueError, "candidate_offsets must start at 0"),
    (
        {"candidate_offsets": torch.tensor([0, 2, 4])},
        ValueError,
        "candidate_offsets must start at 0 and end at M",
    ),
    (
        {"candidate_offsets": torch.tensor([0, 3, 2, 3])},
        ValueError,
        "candidate_offsets must be non-decreasing",
    ),
    ({"candidate_offsets": torch.tensor([[0, 2, 3]])}, ValueError, r"candidate_offsets must be 1-D"),
    (
        {"candidate_offsets": torch.tensor([0, 2, 3]).float()},
        TypeError,
        "candidate_offsets must be an integer",
    ),
    (
        {"set_of_position": torch.tensor([0, 1, 2, 0])},
        ValueError,
        r"set_of_position values must be in \[-1, S\)",
    ),
    (
        {"set_of_position": torch.tensor([0, 1, -2, 0])},
        ValueError,
        r"set_of_position values must be in \[-1, S\)",
    ),
    ({"set_of_position": torch.tensor([0, 1, 1])}, ValueError, "set_of_position must have shape"),
    ({"set_of_position": torch.tensor([0, 1, 1, 0]).bool()}, TypeError, "set_of_position must be an integer"),
    ({"set_of_position": None}, ValueError, "without set_of_position every position has its own set"),
    ({"tau": 0.0}, ValueError, "tau must be finite and > 0"),
    ({"tau": -1.0}, ValueError, "tau must be finite and > 0"),
    ({"tau": float("nan")}, ValueError, "tau must be finite and > 0"),
    ({"tau": float("inf")}, ValueError, "tau must be finite and > 0"),
    ({"tau": True}, TypeError, "tau must be a number"),
    ({"tau": "1"}, TypeError, "tau must be a number"),
    ({"reduction": "avg"}, ValueError, "reduction must be one of"),
    ({"backend": "gpu"}, ValueError, "backend must be one of"),
    ({"backend": "cuda"}, RuntimeError, "no semantic_loss kernel"),
    ({"precision": "fp16"}, ValueError, "precision must be one of"),
    ({"precision": "tf32"}, ValueError, "precision must be one of"),
]


@pytest.mark.parametrize(("change", "error", "message"), BAD_INPUTS)
def test_bad_inputs(change, error, message):
    args = _good()
    kwargs = {key: args.pop(key) for key in list(args) if key in ("z", "codebook")}
    args.update({k: v for k, v in change.items() if k in args})
    kwargs.update({k: v for k, v in change.items() if k in ("z", "codebook")})
    options = {k: v for k, v in change.items() if k in ("tau", "reduction", "backend", "precision")}
    with pytest.raises(error, match=message):
        spae_fast.semantic_loss(kwargs["z"], kwargs["codebook"], args["candidate_index"], args["candidate_offsets"],
                                args["set_of_position"], **options)  # fmt: skip


def test_non_finite_inputs(impl):
    args = _good()
    z = args["z"].clone()
    z[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"z contains NaN or Inf \(first bad row 2"):
        spae_fast.semantic_loss(z, args["codebook"], args["candidate_index"], args["candidate_offsets"],
                                args["set_of_position"], backend=impl)  # fmt: skip
    # check_finite=False: no exception, the NaN stays in its own row
    loss = spae_fast.semantic_loss(z, args["codebook"], args["candidate_index"], args["candidate_offsets"],
                                   args["set_of_position"], backend=impl, check_finite=False, reduction="none")  # fmt: skip
    assert bool(torch.isfinite(loss[[0, 1]]).all())
    weight = args["codebook"].clone()
    weight[7, 0] = float("inf")
    with pytest.raises(ValueError, match=r"codebook contains NaN or Inf \(first bad row 7\)"):
        spae_fast.semantic_loss(args["z"], weight, args["candidate_index"], args["candidate_offsets"],
                                args["set_of_position"], backend=impl)  # fmt: skip


def test_triton_backend_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args = _good()
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run semantic_loss here"):
        spae_fast.semantic_loss(*args.values(), backend="triton")


def test_overflow_is_reported():
    args = _good()
    call = [args["codebook"], args["candidate_index"], args["candidate_offsets"], args["set_of_position"]]
    with pytest.raises(ValueError, match="z row 0 is too large for fp32 logits"):
        spae_fast.semantic_loss(args["z"] * 1e20, *call, backend="cpu", tau=1e-20)
    with pytest.raises(ValueError, match="z row 1 is too large for fp32 logits"):
        spae_fast.semantic_loss(args["z"] * torch.tensor([[1.0], [1e37], [1.0], [1.0]]), *call, backend="cpu")


def test_cosine_codebook_is_rejected():
    args = _good()
    with pytest.raises(ValueError, match="needs an l2 Codebook"):
        spae_fast.semantic_loss(args["z"], spae_fast.Codebook(args["codebook"], metric="cosine"),
                                args["candidate_index"], args["candidate_offsets"], args["set_of_position"])  # fmt: skip


def test_pack_candidate_sets_rejects_bad_sets():
    with pytest.raises(TypeError, match="candidate_sets must be a list"):
        pack_candidate_sets(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"candidate_sets\[1\] must be a 1-D integer tensor"):
        pack_candidate_sets([torch.tensor([1]), torch.tensor([0.5])])
    with pytest.raises(TypeError, match=r"candidate_sets\[0\] must be a torch.Tensor"):
        pack_candidate_sets([[1, 2]])


# ----------------------------------------------------------------------------------------------------------
# Candidate-set helpers
# ----------------------------------------------------------------------------------------------------------


def test_candidates_from_relevance():
    relevance = torch.tensor(
        [[0.0, 1.0, 0.97, 0.5, 0.951], [2.0, 2.0, 2.0, 2.0, 2.0], [-1.0, 3.0, 2.9, 1.0, 2.0]]
    )
    index, offsets = candidates_from_relevance(relevance, (0.98, 0.95))
    sets = [index[offsets[s] : offsets[s + 1]].tolist() for s in range(6)]
    # image 0: normalised = raw; image 1: constant -> all; image 2: (x + 1) / 4
    assert sets == [[1], [1, 2, 4], [0, 1, 2, 3, 4], [0, 1, 2, 3, 4], [1], [1, 2]]


def test_pyramid_set_of_position():
    sets = pyramid_set_of_position(2, (1, 2, 4))
    assert sets.shape == (2, 21)
    assert sets[0].tolist() == [0] + [1] * 4 + [2] * 16
    assert sets[1].tolist() == [3] + [4] * 4 + [5] * 16


def test_pyramid_pipeline_end_to_end():
    """Relevance -> sets per image and layer -> the loss of the top-3-layer positions, vs the spec."""
    weight = torch.randn(120, 16, generator=generator(61))
    relevance = torch.randn(3, 120, generator=generator(62))
    index, offsets = candidates_from_relevance(relevance, (0.9, 0.8, 0.7))
    sets = pyramid_set_of_position(3, (1, 2, 4))
    z = torch.randn(3, 21, 16, generator=generator(63))
    loss = spae_fast.semantic_loss(z, weight, index, offsets, sets)
    expected = _ref.semantic_loss_reference(z.reshape(-1, 16), weight, index, offsets, sets.reshape(-1))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-4)
