"""Test helpers: data generators, fp64 ground truth and the assertions every backend must pass.

Correctness is judged two ways:
  * against fp64 distances of the *rounded* inputs (bf16 / fp16 upcast exactly), with a tolerance derived from
    the fp32 error bound of a length-D dot product (so a near-tie may go either way, nothing else may);
  * against the reference `spae_fast._ref.topk_reference` (the executable spec): the same indices except on
    such near-ties, and distances within the same bound. On integer-valued data every fp32 operation is exact,
    so there the backends must agree with the reference and with fp64 *bitwise*, tie-breaking included.
"""

from __future__ import annotations

import contextlib

import torch

from spae_fast import _ref

EPS32 = torch.finfo(torch.float32).eps
METRICS = ("l2", "ip", "cosine")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gaussian(*shape: int, seed: int, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=generator(seed)) * scale).to(dtype)


def queries_for(
    weight: torch.Tensor, num: int, *, seed: int, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """[num, D] queries: half are codebook rows plus small noise (a clear nearest row), half random mixtures
    of two rows (harder), so the searches are neither trivial nor all near-ties."""
    g = generator(seed)
    num_rows, dim = weight.shape
    e = weight.float()
    scale = float(e.abs().mean()) or 1.0
    first = torch.randint(0, num_rows, (num,), generator=g)
    second = torch.randint(0, num_rows, (num,), generator=g)
    mix = torch.rand(num, 1, generator=g)
    near = e[first] + 0.1 * scale * torch.randn(num, dim, generator=g)
    combo = mix * e[first] + (1 - mix) * e[second] + 0.3 * scale * torch.randn(num, dim, generator=g)
    x = torch.where((torch.arange(num) % 2 == 0)[:, None], near, combo)
    return x.to(dtype or weight.dtype)


def integers(*shape: int, seed: int, dtype: torch.dtype = torch.float32, low: int = -3, high: int = 3):
    """Small integers: every product and partial sum is exact in fp32, so every backend computes exact
    distances and ties are exact ties."""
    return torch.randint(low, high + 1, shape, generator=generator(seed)).to(dtype)


# ----------------------------------------------------------------------------------------------------------
# Ground truth
# ----------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def single_threaded():
    """Ground truth is computed with one torch thread: the reference's many small elementwise ops and the fp64
    GEMMs stall badly with intra-op threads on a shared, loaded 2-core machine. The thread count under test
    is restored before the next search runs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fp64_distances(x: torch.Tensor, weight: torch.Tensor, metric: str) -> torch.Tensor:
    """x [N, D], weight [V, D] -> all distances [N, V] in fp64 from the rounded inputs.

    Small problems use `_ref.distances_fp64` (direct formula); large ones the expanded form in fp64, whose
    error (~1e-16 relative) is far below every fp32 tolerance used here."""
    num, dim = x.shape
    if num * weight.shape[0] * dim <= 4_000_000:
        return _ref.distances_fp64(x, weight, metric)
    q, e = x.double(), weight.double()
    if metric == "l2":
        return ((q * q).sum(-1, keepdim=True) + (e * e).sum(-1) - 2.0 * (q @ e.T)).clamp_min(0.0)
    if metric == "ip":
        return -(q @ e.T)
    q = q / torch.linalg.vector_norm(q, dim=-1, keepdim=True).clamp_min(_ref.COSINE_EPS)
    e = e / torch.linalg.vector_norm(e, dim=-1, keepdim=True).clamp_min(_ref.COSINE_EPS)
    return 1.0 - q @ e.T


def error_bound(x: torch.Tensor, weight: torch.Tensor, metric: str) -> torch.Tensor:
    """[N, V] fp64: a safe bound on |fp32-computed distance - exact distance| of every (query, row) pair.

    A length-D fp32 dot product errs by at most gamma_D * sum|x_d e_d| <= gamma_D |x| |e| (gamma_D ~ D eps);
    l2 scores ||e||^2 - 2 x.e are bounded by ||x||^2 + ||e||^2; cosine adds the two normalisations."""
    q, e = x.double(), weight.double()
    gamma = 2.0 * (q.shape[-1] + 8) * EPS32
    x_norm_sq = (q * q).sum(-1)[:, None]  # [N, 1]
    e_norm_sq = (e * e).sum(-1)[None, :]  # [1, V]
    if metric == "l2":
        return gamma * (x_norm_sq + e_norm_sq)
    if metric == "ip":
        return gamma * (x_norm_sq * e_norm_sq).sqrt()
    return torch.full((q.shape[0], e.shape[0]), 4.0 * gamma, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------------------
# Assertions
# ----------------------------------------------------------------------------------------------------------


def _flat(x, dist, index):
    dim = x.shape[-1]
    k = dist.shape[-1] if dist.dim() == x.dim() else None
    x2 = x.reshape(-1, dim)
    if k is None:
        return x2, dist.reshape(-1, 1), index.reshape(-1, 1)
    return x2, dist.reshape(-1, k), index.reshape(-1, k)


def check_output_format(x: torch.Tensor, dist: torch.Tensor, index: torch.Tensor, k: int | None) -> None:
    expected = tuple(x.shape[:-1]) + (() if k is None else (k,))
    assert tuple(dist.shape) == expected, f"dist shape {tuple(dist.shape)}, expected {expected}"
    assert tuple(index.shape) == expected, f"index shape {tuple(index.shape)}, expected {expected}"
    assert dist.dtype == torch.float32, dist.dtype
    assert index.dtype == torch.int64, index.dtype
    assert dist.device == x.device and index.device == x.device


def check_against_fp64(x, weight, metric, dist, index, *, exact: bool = False, d64=None, tol=None) -> None:
    """The result ([..., k] or [...] for nearest) is a correct top-k of fp64 up to near-ties, with distances
    close to fp64, sorted ascending. With exact=True (integer data) there is no tolerance at all: the k
    smallest in the total order (distance, index)."""
    x2, dist2, index2 = _flat(x, dist, index)
    num, k = index2.shape
    if num == 0:
        return
    num_rows = weight.shape[0]
    assert bool(((index2 >= 0) & (index2 < num_rows)).all()), "index out of range"
    sorted_index = index2.sort(dim=1).values
    assert bool((sorted_index[:, 1:] != sorted_index[:, :-1]).all()), (
        "an index appears twice in a row's top-k"
    )
    d64 = fp64_distances(x2, weight, metric) if d64 is None else d64  # [N, V]
    chosen = d64.gather(1, index2)  # [N, k]
    if exact:
        # the k smallest under (distance, index): a stable sort of fp64 distances (exact here)
        expected = torch.sort(d64, dim=1, stable=True).indices[:, :k]
        assert torch.equal(index2, expected), _first_difference("index vs exact fp64 order", index2, expected)
        assert torch.equal(dist2.double(), chosen.float().double()), "distances are not exact"
        return
    # every computed distance lies in [d64 - tol, d64 + tol]: no chosen row may be certainly farther than an
    # unchosen one, i.e. max over chosen of (d64 - tol) <= min over unchosen of (d64 + tol)
    tol = error_bound(x2, weight, metric) if tol is None else tol  # [N, V]
    selected = torch.zeros_like(d64, dtype=torch.bool).scatter_(1, index2, True)
    if k < num_rows:
        worst_chosen = (d64 - tol).masked_fill(~selected, -torch.inf).max(1).values
        best_unchosen = (d64 + tol).masked_fill(selected, torch.inf).min(1).values
        bad = worst_chosen > best_unchosen
        assert not bool(bad.any()), (
            f"{int(bad.sum())} rows have a top-k row certainly farther than an unselected one "
            f"(first row {int(bad.nonzero()[0])}, by {float((worst_chosen - best_unchosen).max())})"
        )
    error = (dist2.double() - chosen).abs()
    assert bool((error <= tol.gather(1, index2)).all()), "distance off fp64 by more than the error bound"
    assert bool((dist2[:, 1:] >= dist2[:, :-1]).all()), "distances not sorted ascending"


def check_against_reference(
    x, weight, metric, dist, index, *, exact: bool = False, d64=None, tol=None
) -> None:
    """Same indices as the reference except on fp64 near-ties; distances within the fp32 error bound.
    With exact=True: bitwise equal to the reference."""
    x2, dist2, index2 = _flat(x, dist, index)
    num, k = index2.shape
    ref_dist, ref_index = _ref.topk_reference(x2, weight, k, metric)
    if exact:
        assert torch.equal(index2, ref_index), _first_difference("index vs reference", index2, ref_index)
        assert torch.equal(dist2, ref_dist), _first_difference("dist vs reference", dist2, ref_dist)
        return
    if num == 0:
        return
    differ = index2 != ref_index
    d64 = fp64_distances(x2, weight, metric) if d64 is None else d64
    tol = error_bound(x2, weight, metric) if tol is None else tol
    if bool(differ.any()):
        gap = (d64.gather(1, index2) - d64.gather(1, ref_index)).abs()
        allowed = tol.gather(1, index2) + tol.gather(1, ref_index)
        assert bool((gap <= allowed)[differ].all()), _first_difference(
            "index vs reference beyond near-ties", index2, ref_index
        )
    # where the indices agree the distances must agree to fp32 accuracy
    error = (dist2.double() - ref_dist.double()).abs()
    assert bool((error <= 2 * tol.gather(1, index2))[~differ].all()), "distances differ from the reference"


def check_search(x, weight, metric, dist, index, *, k: int | None, exact: bool = False) -> None:
    """Format, fp64 and reference checks of one result (nearest when k is None)."""
    check_output_format(x, dist, index, k)
    with single_threaded():
        x2 = x.reshape(-1, x.shape[-1])
        d64 = fp64_distances(x2, weight, metric)
        tol = None if exact else error_bound(x2, weight, metric)
        check_against_fp64(x, weight, metric, dist, index, exact=exact, d64=d64, tol=tol)
        check_against_reference(x, weight, metric, dist, index, exact=exact, d64=d64, tol=tol)


def assert_identical(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor], what: str):
    """Bitwise equality of two (dist, index) results."""
    assert a[0].shape == b[0].shape and a[1].shape == b[1].shape, f"{what}: shapes differ"
    assert torch.equal(a[1], b[1]), _first_difference(f"{what}: index", a[1], b[1])
    assert torch.equal(a[0], b[0]), _first_difference(f"{what}: dist", a[0], b[0])


def _first_difference(what: str, a: torch.Tensor, b: torch.Tensor) -> str:
    differ = (a != b).reshape(a.shape[0], -1).any(-1) if a.dim() else (a != b).reshape(1)
    rows = differ.nonzero().flatten()
    if rows.numel() == 0:
        return f"{what}: equal"
    row = int(rows[0])
    return f"{what}: {rows.numel()} rows differ, first row {row}: {a[row].tolist()} vs {b[row].tolist()}"


class ClassRelevance:
    """A deterministic stand-in relevance provider for training tests: a fixed random score table per class."""

    def __init__(self, num_rows: int, num_classes: int = 10) -> None:
        self.table = torch.rand(num_classes, num_rows, generator=torch.Generator().manual_seed(3))
        self.num_rows = num_rows

    def __call__(self, images, labels=None):
        return self.table[labels.to(torch.int64)]

    def class_word_similarity(self, class_names):
        return self.table[: len(class_names)]
