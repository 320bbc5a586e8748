"""Randomised property suite: the native CPU backend of nearest, topk, saq and semantic_loss against fp64.

At least 1000 seeded random problems per op (plain torch RNG loops: one seed per problem, named in every
failure message; rerun one with ``SPAE_PROPERTY_SEED=<seed>``), from families that stress what can go wrong:

  gaussian    random data at scales 1e-15 .. 1e15 (16-bit inputs: their own ranges), queries near rows,
              between two rows and anywhere;
  integer     small-integer data: every fp32 operation is exact, so results must equal the exact fp64 order
              bitwise, exact ties going to the lowest index;
  duplicates  many copies of the same rows: a chosen row must be the first copy (ties to the lowest index);
  near_ties   hundreds of rows at almost the same distance (a sphere / cone around the query, relative spread
              1e-7 .. 1e-4), so the int8 pre-filter's certificate cannot settle them and must fall back;
  sphere      hundreds of integer rows at exactly the same distance from the query (signed permutations of
              one vector): an exact tie the pre-filter cannot settle, won by the lowest index.

Each problem also draws the micro-kernel, the thread count, Codebook or plain tensor, strides and (where the CPU
runs it) the pre-filter, whose results must be bitwise those of ``prefilter="none"``.

Ground truth is fp64 from the rounded inputs. Searches: `_spae_checks.check_against_fp64` (no chosen row
certainly farther than an unchosen one under the fp32 error bound, distances within it, sorted; exact data: the
(distance, index) order bitwise). saq: each layer's chosen rows against the fp64 distances of that layer's
fp32 target, formed as the spec forms it from the kernel's own earlier layers. semantic_loss: loss and gradient
computed in fp64 from the logits -||z - e||^2 / tau, within a bound derived from the fp32 error of the logits.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from _spae_checks import check_against_fp64, check_output_format, error_bound, fp64_distances, single_threaded

import spae_fast
from spae_fast import _native, _ref
from spae_fast import ops as spae_ops

EPS32 = torch.finfo(torch.float32).eps
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SEED = os.environ.get("SPAE_PROPERTY_SEED")  # rerun one problem: every family runs just that seed
INT8 = spae_ops.int8_prefilter_available()
PREFILTERS = ("none", "auto", "int8") if INT8 else ("none", "auto")


def _seeds(base: int, count: int) -> list[int]:
    return [int(SEED)] if SEED is not None else [base + i for i in range(count)]


def _pick(g: torch.Generator, options):
    return options[int(torch.randint(0, len(options), (1,), generator=g))]


def _int(g: torch.Generator, low: int, high: int) -> int:
    """Uniform in [low, high]."""
    return int(torch.randint(low, high + 1, (1,), generator=g))


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(1, generator=g))


def _table_and_near_rows(g, family, num_rows, dim, scale, max_base, num, noises):
    """(weight [V, D], x [num, D]) at `scale`: Gaussian rows ("duplicates": drawn from 1..max_base distinct
    ones) and queries near random rows (noise picked from `noises`), so that the searches are neither trivial
    nor all far from the codebook."""
    if family == "duplicates":
        base = torch.randn(_int(g, 1, max_base), dim, generator=g) * scale
        weight = base[torch.randint(0, base.shape[0], (num_rows,), generator=g)]
    else:
        weight = torch.randn(num_rows, dim, generator=g) * scale
    picks = torch.randint(0, num_rows, (num,), generator=g)
    return weight, weight[picks] + _pick(g, noises) * scale * torch.randn(num, dim, generator=g)


@pytest.fixture
def native_state(use_isa, set_threads):
    """Per problem: a random micro-kernel and thread count (restored after the test by the fixtures)."""
    native = _native.cpu_module()

    def draw(g: torch.Generator) -> str:
        isa = _pick(g, ("portable", "avx2"))
        if not native.set_isa(isa):
            isa = "portable"
            assert native.set_isa(isa)
        set_threads(_int(g, 1, 3))
        return f"isa={isa} threads={torch.get_num_threads()}"

    use_isa(native.get_isa())  # registers the restore
    return draw


def _run(seeds, check, what):
    """Runs `check(seed, note)` for every seed; `note(text)` records the problem, which a failure names."""
    noted = []
    for seed in seeds:
        noted.clear()
        try:
            check(seed, noted.append)
        except AssertionError as error:
            raise AssertionError(f"{what} seed {seed} ({' '.join(noted)}): {error}") from error
    assert seeds, "no problems ran"


# ----------------------------------------------------------------------------------------------------------
# Search problems (nearest, topk)
# ----------------------------------------------------------------------------------------------------------


def _scale_exponent(g, dtype) -> int:
    if dtype == torch.float16:
        return _int(g, -2, 2)
    return _int(g, -15, 15)


def _queries_near(g, weight32: torch.Tensor, num: int, spread: float) -> torch.Tensor:
    """Queries: copies of rows, rows plus noise, midpoints of two rows (near-ties) and random vectors."""
    num_rows, dim = weight32.shape
    first = torch.randint(0, num_rows, (num,), generator=g)
    second = torch.randint(0, num_rows, (num,), generator=g)
    kind = torch.randint(0, 4, (num, 1), generator=g)
    scale = float(weight32.abs().max()) or 1.0
    noise = torch.randn(num, dim, generator=g)
    candidates = [
        weight32[first],
        weight32[first] + spread * scale * noise,
        0.5 * (weight32[first] + weight32[second]),
        scale * noise,
    ]
    x = candidates[0]
    for value, option in enumerate(candidates):
        x = torch.where(kind == value, option, x)
    return x


def _gaussian_problem(g):
    metric = _pick(g, ("l2", "ip", "cosine"))
    x_dtype, w_dtype = _pick(g, DTYPES), _pick(g, DTYPES)
    w_exponent = _scale_exponent(g, w_dtype)
    num, num_rows, dim = _int(g, 1, 12), _int(g, 1, 80), _int(g, 1, 40)
    weight = torch.randn(num_rows, dim, generator=g) * 10.0**w_exponent
    x = _queries_near(g, weight, num, _pick(g, (1e-3, 0.1, 1.0)))
    x_exponent = w_exponent
    if _int(g, 0, 3) == 0 or (x_dtype == torch.float16 and abs(w_exponent) > 2):
        x_exponent = _scale_exponent(g, x_dtype)  # queries at another scale than the rows
        x = x * 10.0 ** (x_exponent - w_exponent)
    description = f"gaussian scales 1e{x_exponent} / 1e{w_exponent}"
    return x.to(x_dtype), weight.to(w_dtype), metric, False, description


def _integer_problem(g):
    metric = _pick(g, ("l2", "ip"))
    low, high = -_int(g, 0, 4), _int(g, 0, 4)
    num, num_rows, dim = _int(g, 1, 12), _int(g, 1, 80), _int(g, 1, 40)
    weight = torch.randint(low, high + 1, (num_rows, dim), generator=g).float()
    x = torch.randint(low, high + 1, (num, dim), generator=g).float()
    return x.to(_pick(g, DTYPES)), weight.to(_pick(g, DTYPES)), metric, True, f"integer [{low}, {high}]"


def _duplicates_problem(g):
    metric = _pick(g, ("l2", "ip", "cosine"))
    num_distinct, dim = _int(g, 1, 12), _int(g, 1, 24)
    base = torch.randn(num_distinct, dim, generator=g) * 10.0 ** _int(g, -6, 6)
    rows = torch.randint(0, num_distinct, (_int(g, 2, 90),), generator=g)  # each distinct row many times
    weight = base[rows]
    x = _queries_near(g, weight, _int(g, 1, 12), _pick(g, (0.0, 1e-6, 1e-2)))
    dtype = _pick(g, (torch.float32, torch.bfloat16))
    return x.to(dtype), weight.to(dtype), metric, False, f"duplicates {num_distinct} distinct of {len(rows)}"


def _near_ties_problem(g):
    """Rows at almost the same distance from the queries: a sphere (l2), a slab (ip) or a cone (cosine)."""
    metric = _pick(g, ("l2", "ip", "cosine"))
    num_rows, dim = _int(g, 520, 1100), _int(g, 8, 32)
    spread = 10.0 ** _uniform(g, -7, -4)
    center = torch.randn(dim, generator=g).double()
    direction = torch.randn(num_rows, dim, generator=g).double()
    radius = 1.0 + spread * torch.randn(num_rows, 1, generator=g).double()
    if metric == "l2":
        weight = center + radius * direction / direction.norm(dim=1, keepdim=True)
        queries = center[None]
    else:
        unit = center / center.norm()
        orthogonal = direction - (direction @ unit)[:, None] * unit  # [V, D] orthogonal to the query
        if metric == "ip":  # the same inner product with the query, any orthogonal part
            weight = radius * unit + orthogonal
        else:  # the same angle to the query, any length
            lengths = torch.rand(num_rows, 1, generator=g).double() * 3 + 0.5
            weight = lengths * (unit + radius * orthogonal / orthogonal.norm(dim=1, keepdim=True))
        queries = unit[None] * _uniform(g, 0.5, 2.0)
    num = _int(g, 1, 8)
    x = queries + spread * 1e-2 * torch.randn(num, dim, generator=g).double()
    return x.float(), weight.float(), metric, False, f"near_ties V={num_rows} spread={spread:.1e}"


def _sphere_problem(g):
    """Integer rows c + (signed permutation of v): all exactly ||v||^2 from c (l2), plus rows farther out;
    more exact ties than the pre-filter's 512 candidates."""
    dim = 8
    value = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    count = _int(g, 520, 900)
    tied = torch.stack([value[torch.randperm(dim, generator=g)] for _ in range(count)])
    tied = tied * (torch.randint(0, 2, (count, dim), generator=g) * 2 - 1)
    farther = 2 * tied[: _int(g, 0, 100)]
    center = torch.randint(-3, 4, (dim,), generator=g).float()
    weight = center + torch.cat([tied, farther])[torch.randperm(count + len(farther), generator=g)]
    others = torch.randint(-3, 4, (_int(g, 0, 6), dim), generator=g).float()
    x = torch.cat([center[None].expand(_int(g, 1, 4), dim), others])
    return x, weight, _pick(g, ("l2", "ip")), True, f"sphere V={weight.shape[0]}"


FAMILIES = {
    "gaussian": (_gaussian_problem, 350),
    "integer": (_integer_problem, 300),
    "duplicates": (_duplicates_problem, 200),
    "near_ties": (_near_ties_problem, 75),
    "sphere": (_sphere_problem, 75),
}
assert sum(count for _, count in FAMILIES.values()) >= 1000


def _layout(g, x):
    """The same values as [N, D] contiguous, strided (a transposed copy), or with a leading dimension."""
    choice = _int(g, 0, 2)
    if choice == 1:
        return x.T.contiguous().T
    if choice == 2 and x.shape[0] % 2 == 0:
        return x.reshape(2, x.shape[0] // 2, x.shape[1])
    return x


def _first_copies_chosen(weight: torch.Tensor, index: torch.Tensor) -> None:
    """Ties to the lowest index: with a row chosen, every earlier identical row is chosen too."""
    w = weight.float()
    same = (w[:, None, :] == w[None, :, :]).all(-1)  # [V, V]
    earlier = torch.tril(same, diagonal=-1)  # earlier[i, j]: row j < i equals row i
    index2 = index.reshape(-1, index.shape[-1]) if index.dim() > 1 else index.reshape(-1, 1)
    for row in range(index2.shape[0]):
        chosen = set(index2[row].tolist())
        for i in chosen:
            missing = [j for j in earlier[i].nonzero().flatten().tolist() if j not in chosen]
            assert not missing, f"query {row}: row {i} chosen but its earlier copy {missing[0]} is not"


def _check_search(x, weight, metric, exact, dist, index, k, family):
    check_output_format(x, dist, index, k)
    with single_threaded():
        check_against_fp64(x, weight, metric, dist, index, exact=exact)
        if family in ("duplicates", "near_ties", "sphere"):
            _first_copies_chosen(weight, index)


@pytest.mark.parametrize("family", FAMILIES)
def test_nearest_against_fp64(native_state, family):
    make, count = FAMILIES[family]
    fallbacks = []

    def case(seed, note):
        g = torch.Generator().manual_seed(seed)
        x, weight, metric, exact, description = make(g)
        state = native_state(g)
        prefilter = _pick(g, PREFILTERS)
        codebook = spae_fast.Codebook(weight, metric) if _int(g, 0, 1) else weight
        x = _layout(g, x)
        note(f"{description} {metric} {x.dtype}/{weight.dtype} {state} prefilter={prefilter}")
        dist, index = spae_fast.nearest(x, codebook, metric=metric, backend="cpu", prefilter=prefilter)
        if prefilter != "none":
            stats = spae_ops.last_cpu_search_stats()
            if stats["prefilter"]:
                fallbacks.append(stats["full_search_rows"])
            plain = spae_fast.nearest(x, codebook, metric=metric, backend="cpu", prefilter="none")
            assert torch.equal(index, plain[1]), "index differs from prefilter='none'"
            assert torch.equal(dist, plain[0]), "dist differs from prefilter='none'"
        _check_search(x, weight, metric, exact, dist, index, None, family)

    _run(_seeds(1_000_000 * (1 + list(FAMILIES).index(family)), count), case, f"nearest/{family}")
    if INT8 and SEED is None and family in ("near_ties", "sphere"):
        # the family is adversarial for the pre-filter: its certificate had to fall back on some rows
        assert fallbacks and sum(fallbacks) > 0, "the int8 pre-filter never fell back on near-ties"


@pytest.mark.parametrize("family", FAMILIES)
def test_topk_against_fp64(native_state, family):
    make, count = FAMILIES[family]

    def case(seed, note):
        g = torch.Generator().manual_seed(seed)
        x, weight, metric, exact, description = make(g)
        state = native_state(g)
        k = _int(g, 1, min(weight.shape[0], 64))
        codebook = spae_fast.Codebook(weight, metric) if _int(g, 0, 1) else weight
        x = _layout(g, x)
        note(f"{description} {metric} k={k} {x.dtype}/{weight.dtype} {state}")
        dist, index = spae_fast.topk(x, codebook, k, metric=metric, backend="cpu")
        _check_search(x, weight, metric, exact, dist, index, k, family)

    _run(_seeds(20_000_000 + 1_000_000 * list(FAMILIES).index(family), count), case, f"topk/{family}")


# ----------------------------------------------------------------------------------------------------------
# saq
# ----------------------------------------------------------------------------------------------------------


def _pyramid(g) -> tuple[int, list[int]]:
    """(grid, non-decreasing sides dividing it)."""
    grid = _pick(g, (1, 2, 3, 4, 6, 8))
    divisors = [s for s in range(1, grid + 1) if grid % s == 0]
    return grid, sorted(_pick(g, divisors) for _ in range(_int(g, 1, 5)))


def _saq_problem(g, family):
    """(z [B, D, g, g], weight [V, D], exact, sides)."""
    grid, sides = _pyramid(g)
    batch = _int(g, 1, 2)
    if family == "near_ties":  # every position at the centre of a sphere of rows: layer 1 is all near-ties
        num_rows, dim = _int(g, 520, 900), _int(g, 8, 32)
        center = torch.randn(dim, generator=g).double()
        direction = torch.randn(num_rows, dim, generator=g).double()
        radius = 1.0 + 10.0 ** _uniform(g, -7, -4) * torch.randn(num_rows, 1, generator=g).double()
        weight = (center + radius * direction / direction.norm(dim=1, keepdim=True)).float()
        z = center.float()[None, :, None, None] + 1e-6 * torch.randn(batch, dim, grid, grid, generator=g)
        return z, weight, False, sides
    dim, num_rows = _int(g, 1, 24), _int(g, 1, 60)
    if family == "integer":
        weight = torch.randint(-3, 4, (num_rows, dim), generator=g).float()
        z = torch.randint(-3, 4, (batch, dim, grid, grid), generator=g).float()
        return z.to(_pick(g, DTYPES)), weight.to(_pick(g, DTYPES)), True, sides
    scale = 10.0 ** _int(g, -6, 6)
    weight, z = _table_and_near_rows(
        g, family, num_rows, dim, scale, 8, batch * grid * grid, (0.0, 1e-3, 0.3)
    )
    z = z.reshape(batch, grid, grid, dim).permute(0, 3, 1, 2)  # a non-contiguous [B, D, g, g]
    dtype = _pick(g, (torch.float32, torch.bfloat16))
    return z.to(dtype), weight.to(dtype), False, sides


def _saq_targets_checked(z, weight, ids, sides, mode, exact, family):
    """Layer by layer: the target the spec forms from the kernel's own earlier ids, rounded once to fp32, and
    the chosen row against that target's fp64 distances."""
    batch, dim, grid = z.shape[0], z.shape[1], z.shape[-1]
    z64, e64 = z.double(), weight.double()
    covering = torch.zeros(batch, dim, grid, grid, dtype=torch.float64)
    first = 0
    for layer, side in enumerate(sides, 1):
        stride = grid // side
        pos = torch.arange(side) * stride + (stride - (stride + 1) // 2)
        coefficient = float(layer) if mode == "saq" else 1.0
        target = (coefficient * z64[:, :, pos][:, :, :, pos] - covering[:, :, pos][:, :, :, pos]).float()
        queries = target.permute(0, 2, 3, 1).reshape(-1, dim)  # raster order
        chosen = ids[:, first : first + side * side].reshape(-1, 1)
        d64 = fp64_distances(queries, weight, "l2")
        if exact:
            expected = torch.sort(d64, dim=1, stable=True).indices[:, :1]
            assert torch.equal(chosen, expected), (
                f"layer {layer}: ids {chosen.flatten().tolist()} vs exact fp64 {expected.flatten().tolist()}"
            )
        else:
            tol = error_bound(queries, weight, "l2")
            worst = (d64 - tol).gather(1, chosen)
            best = (d64 + tol).min(1, keepdim=True).values
            bad = worst > best
            assert not bool(bad.any()), (
                f"layer {layer}: a chosen row is certainly farther than another "
                f"(query {int(bad.nonzero()[0, 0])})"
            )
        if family in ("duplicates", "near_ties"):
            _first_copies_chosen(weight, chosen)
        picked = e64[ids[:, first : first + side * side].reshape(batch, side, side)].permute(0, 3, 1, 2)
        covering = covering + picked.repeat_interleave(stride, 2).repeat_interleave(stride, 3)
        first += side * side


SAQ_FAMILIES = {"gaussian": 400, "integer": 350, "duplicates": 200, "near_ties": 50}
assert sum(SAQ_FAMILIES.values()) >= 1000


@pytest.mark.parametrize("family", SAQ_FAMILIES)
def test_saq_against_fp64(native_state, family):
    fallbacks = []

    def case(seed, note):
        g = torch.Generator().manual_seed(seed)
        z, weight, exact, sides = _saq_problem(g, family)
        mode = _pick(g, ("saq", "rq"))
        state = native_state(g)
        prefilter = _pick(g, PREFILTERS)
        codebook = spae_fast.Codebook(weight) if _int(g, 0, 1) else weight
        note(
            f"z {tuple(z.shape)} V={weight.shape[0]} sides={sides} {mode} {z.dtype}/{weight.dtype} {state} "
            f"prefilter={prefilter}"
        )
        ids = spae_fast.saq(z, codebook, sides, mode=mode, backend="cpu", prefilter=prefilter)
        assert ids.shape == (z.shape[0], sum(s * s for s in sides)) and ids.dtype == torch.int64
        assert bool(((ids >= 0) & (ids < weight.shape[0])).all()), "id out of range"
        if prefilter != "none":
            stats = spae_ops.last_saq_stats()
            if stats["prefilter"]:
                fallbacks.append(stats["full_search_rows"])
            plain = spae_fast.saq(z, codebook, sides, mode=mode, backend="cpu", prefilter="none")
            assert torch.equal(ids, plain), "ids differ from prefilter='none'"
        with single_threaded():
            _saq_targets_checked(z, weight, ids, sides, mode, exact, family)
            if exact:  # exact arithmetic: the spec's ids bitwise
                assert torch.equal(ids, _ref.saq_reference(z, weight, sides, mode)), (
                    "ids differ from the reference"
                )

    _run(_seeds(40_000_000 + 1_000_000 * list(SAQ_FAMILIES).index(family), SAQ_FAMILIES[family]), case,
         f"saq/{family}")  # fmt: skip
    if INT8 and SEED is None and family == "near_ties":
        assert fallbacks and sum(fallbacks) > 0, "the int8 pre-filter never fell back on near-ties"


# ----------------------------------------------------------------------------------------------------------
# semantic_loss
# ----------------------------------------------------------------------------------------------------------


def _semantic_problem(g, family):
    num, num_rows, dim = _int(g, 0, 16), _int(g, 1, 150), _int(g, 1, 40)
    if family == "integer":  # exact logits: z, e small integers, tau a power of two
        weight = torch.randint(-3, 4, (num_rows, dim), generator=g).float()
        z = torch.randint(-3, 4, (num, dim), generator=g).float()
        tau = _pick(g, (0.5, 1.0, 2.0, 4.0))
    else:
        scale = 10.0 ** _int(g, -4, 3)
        weight, z = _table_and_near_rows(g, family, num_rows, dim, scale, 6, num, (0.0, 0.1, 1.0))
        # logits (2 |z| |e| + |e|^2) / tau of order 1 .. 1e4: a peaked or a flat softmax
        tau = scale * scale * dim * 10.0 ** _uniform(g, -4, 1)
    num_sets = _int(g, 0, 6)
    sets = [torch.randint(0, num_rows, (_int(g, 0, 6),), generator=g) for _ in range(num_sets)]
    offsets = torch.tensor([0] + [len(s) for s in sets]).cumsum(0)
    index = torch.cat(sets) if sets else torch.zeros(0, dtype=torch.int64)
    set_of_position = torch.randint(-1, num_sets, (num,), generator=g) if num_sets else torch.full((num,), -1)
    return z, weight, index, offsets, set_of_position, float(tau)


def _semantic_fp64(z, weight, index, offsets, set_of_position, tau):
    """(loss [N], grad [N, D], active [N], shifted logit magnitude [N]) in fp64 from the given operands."""
    q, e = z.double(), weight.double()
    logits = -((q[:, None, :] - e[None, :, :]) ** 2).sum(-1) / tau  # [N, V]
    lse = torch.logsumexp(logits, dim=1) if e.shape[0] else torch.zeros(q.shape[0], dtype=torch.float64)
    softmax = torch.softmax(logits, dim=1)
    loss = torch.zeros(q.shape[0], dtype=torch.float64)
    grad = torch.zeros_like(q)
    active = torch.zeros(q.shape[0], dtype=torch.bool)
    for p in range(q.shape[0]):
        s = int(set_of_position[p])
        if s < 0:
            continue
        members = index[int(offsets[s]) : int(offsets[s + 1])]
        if members.numel() == 0:
            continue
        active[p] = True
        loss[p] = lse[p] - logits[p, members].mean()
        grad[p] = (2.0 / tau) * (softmax[p] @ e - e[members].mean(0))
    shifted = (
        2.0 * q.norm(dim=1)[:, None] * e.norm(dim=1)[None] + (e * e).sum(1)[None]
    ) / tau  # |s_k + |z|^2/tau|
    return loss, grad, active, shifted.max(1).values if e.shape[0] else torch.zeros(q.shape[0])


SEMANTIC_FAMILIES = {"gaussian": 450, "integer": 350, "duplicates": 200}
assert sum(SEMANTIC_FAMILIES.values()) >= 1000


@pytest.mark.parametrize("family", SEMANTIC_FAMILIES)
def test_semantic_loss_against_fp64(native_state, family):
    def case(seed, note):
        g = torch.Generator().manual_seed(seed)
        z, weight, index, offsets, set_of_position, tau = _semantic_problem(g, family)
        state = native_state(g)
        precision = _pick(g, ("default", "bf16"))
        dtype = _pick(g, DTYPES) if family == "integer" else _pick(g, (torch.float32, torch.bfloat16))
        z, weight = z.to(dtype), weight.to(dtype)
        codebook = spae_fast.Codebook(weight) if _int(g, 0, 1) else weight
        note(
            f"N={z.shape[0]} V={weight.shape[0]} D={z.shape[1]} tau={tau:.3g} {dtype} precision={precision} {state}"
        )
        leaf = z.clone().requires_grad_(True)
        loss = spae_fast.semantic_loss(leaf, codebook, index, offsets, set_of_position, tau=tau,
                                       reduction="none", backend="cpu", precision=precision)  # fmt: skip
        assert loss.shape == (z.shape[0],) and loss.dtype == torch.float32
        loss.sum().backward()
        grad = leaf.grad.float() if z.shape[0] else torch.zeros(0, z.shape[1])
        with single_threaded():
            rounded = (
                (z.bfloat16().float(), weight.bfloat16().float())
                if precision == "bf16"
                else (z.float(), weight.float())
            )
            loss64, grad64, active, shifted = _semantic_fp64(*rounded, index, offsets, set_of_position, tau)
            assert torch.equal(loss[~active], torch.zeros_like(loss[~active])), (
                "loss of a position without a set"
            )
            assert torch.equal(grad[~active], torch.zeros_like(grad[~active])), (
                "grad of a position without a set"
            )
            num_rows, dim = weight.shape
            gamma = 2.0 * (dim + 8) * EPS32
            logit_error = 0.0 if family == "integer" else gamma * shifted  # exact logits on integer data
            # logits, the online logsumexp (a sum of V terms, one exp / log each), the set term, the result
            loss_tol = (4.0 * logit_error + 8.0 * EPS32 * (shifted + math.log(num_rows) + 1.0)
                        + 4.0 * (num_rows + 16) * EPS32 + 4.0 * EPS32 * loss64.abs())  # fmt: skip
            error = (loss.double() - loss64).abs()
            bad = active & (error > loss_tol)
            assert not bool(bad.any()), (
                f"loss off fp64: position {int(bad.nonzero()[0, 0])}, error "
                f"{float(error[bad].max()):.3g} > tol {float(loss_tol[bad].max()):.3g}"
            )
            max_e = float(rounded[1].double().norm(dim=1).max())
            weights_error = 2.0 * loss_tol + 4.0 * (num_rows + dim + 16) * EPS32  # relative, softmax weights
            if precision == "bf16":
                weights_error = weights_error + 2.0**-7  # the softmax weights are rounded to bf16
            grad_tol = (2.0 / tau) * max_e * weights_error  # [N]
            grad_tol = grad_tol[:, None] + grad64.abs() * (2.0**-7 if dtype != torch.float32 else 4 * EPS32)
            grad_error = (grad.double() - grad64).abs()
            bad = active[:, None] & (grad_error > grad_tol)
            assert not bool(bad.any()), (
                f"gradient off fp64: position {int(bad.nonzero()[0, 0])}, error "
                f"{float(grad_error[bad].max()):.3g} > tol {float(grad_tol[bad].max()):.3g}"
            )

    seeds = _seeds(60_000_000 + 1_000_000 * list(SEMANTIC_FAMILIES).index(family), SEMANTIC_FAMILIES[family])
    _run(seeds, case, f"semantic_loss/{family}")
