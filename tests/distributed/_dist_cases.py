"""Cases run inside every rank of a gloo process group (tests/distributed/test_vocab_parallel.py spawns them).

Each case is a function ``case(rank, world, data)`` that runs every collective first and asserts only at the
end, so a failing check on one rank never leaves the others waiting in a collective of the same case. The
driver `run_worker` records "ok" or the traceback of every case per rank in a JSON file the test reads.
"""

from __future__ import annotations

import datetime
import json
import os
import traceback

import torch
import torch.distributed as dist

import spae_fast
from spae_fast import _ref
from spae_fast import distributed as sd

CASES: dict[str, object] = {}


def case(function):
    CASES[function.__name__] = function
    return function


def run_worker(rank: int, world: int, store_path: str, out_dir: str, data: dict) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip
    results = {}
    try:
        for name, function in CASES.items():
            try:
                function(rank, world, data)
                results[name] = "ok"
            except Exception:  # noqa: BLE001 - reported to the test
                results[name] = traceback.format_exc()
            with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as file:
                json.dump(results, file)
            dist.barrier()
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------
# Tables, queries and shardings
# ----------------------------------------------------------------------------------------------------------


def shardings(num_rows: int, world: int) -> list[list[tuple[int, int]] | None]:
    """Balanced; a shard of one row first; uneven; shards in reverse rank order (ranges not in rank order)."""
    if world == 2:
        return [None, [(0, 1), (1, num_rows)], [(num_rows - 1, num_rows), (0, num_rows - 1)]]
    return [
        None,
        [(0, 1), (1, 2), (2, num_rows)],
        [(0, 5), (5, num_rows - 3), (num_rows - 3, num_rows)],
        [(num_rows - 4, num_rows), (0, 1), (1, num_rows - 4)],
    ][: 4 if world == 3 else 1]


def integer_table(seed: int, num_rows: int = 61, dim: int = 6) -> torch.Tensor:
    """Small integers: exact ties everywhere; rows duplicated across shard boundaries (first, middle, last)."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randint(-2, 3, (num_rows, dim), generator=g).float()
    table[num_rows - 1] = table[0]
    table[num_rows // 2] = table[0]
    table[1] = table[num_rows - 2]
    return table


def queries(seed: int, count: int, dim: int, kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "integer":
        return torch.randint(-2, 3, (count, dim), generator=g).float()
    return torch.randn(count, dim, generator=g)


def far_queries(table: torch.Tensor) -> torch.Tensor:
    """Queries so far from the table that ||x||^2 swamps the score: distinct scores round to the same fp32
    distance. Every row is 0 in the last column, row 0 is the zero vector and the last row (1, 0, ..., 0): for
    x = (1, 0, ..., 0, 1e4) their scores ||e||^2 - 2 x.e are 0 and -1 (the best), but both distances round to
    1e8; the single-process search picks the last row (lower score), a (dist, index) merge row 0."""
    g = torch.Generator().manual_seed(5)
    x = torch.randint(-2, 3, (40, table.shape[1]), generator=g).float() + 5000.0
    special = torch.zeros(1, table.shape[1])
    special[0, 0], special[0, -1] = 1.0, 1.0e4
    return torch.cat([special, x])


def far_table(num_rows: int = 61, dim: int = 6) -> torch.Tensor:
    table = integer_table(3, num_rows, dim)
    table[:, -1] = 0.0
    table[(table[:, :-1] == torch.tensor([1.0, 0, 0, 0, 0])).all(1)] = 2.0  # no other row scores -1
    table[0] = 0.0
    table[-1] = 0.0
    table[-1, 0] = 1.0
    return table


def naive_topk(x, table, boundaries, k):
    """The merge by (dist, index) of per-shard lists: what the exact merge must beat on far queries."""
    dists, indices = [], []
    for start, stop in boundaries:
        d, i = spae_fast.topk(x, spae_fast.Codebook(table[start:stop]), min(k, stop - start))
        dists.append(d)
        indices.append(i + start)
    d, i = torch.cat(dists, 1), torch.cat(indices, 1)
    by_index = torch.sort(i, dim=1, stable=True).indices
    by_dist = torch.sort(d.gather(1, by_index), dim=1, stable=True).indices
    best = by_index.gather(1, by_dist)[:, :k]
    return d.gather(1, best), i.gather(1, best)


def mismatch(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.shape != b.shape:
        return f"shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    return f"{int((a != b).sum())} of {a.numel()} differ"


# ----------------------------------------------------------------------------------------------------------
# nearest / topk
# ----------------------------------------------------------------------------------------------------------


@case
def nearest_and_topk_bitwise(rank, world, data):
    failures = []
    tables = {
        "integer": integer_table(0),
        "gaussian": torch.randn(61, 6, generator=torch.Generator().manual_seed(1)),
        "bf16": torch.randn(61, 6, generator=torch.Generator().manual_seed(2)).bfloat16(),
    }
    for name, table in tables.items():
        x = queries(7, 97, table.shape[1], "integer" if name == "integer" else "gaussian")
        whole = spae_fast.Codebook(table)
        for bounds in shardings(table.shape[0], world):
            book = sd.ShardedCodebook.from_full(table, boundaries=bounds)
            for prefilter in ("auto", "none"):
                got = sd.nearest(x, book, prefilter=prefilter)
                want = spae_fast.nearest(x, whole, prefilter=prefilter)
                for a, b, what in zip(got, want, ("dist", "index")):
                    if not torch.equal(a, b):
                        failures.append(f"nearest {name} {bounds} {prefilter} {what}: {mismatch(a, b)}")
            for k in (1, 2, 5, table.shape[0]):
                got = sd.topk(x.reshape(97, 1, -1), book, k)
                want = spae_fast.topk(x.reshape(97, 1, -1), whole, k)
                for a, b, what in zip(got, want, ("dist", "index")):
                    if not torch.equal(a, b):
                        failures.append(f"topk k={k} {name} {bounds} {what}: {mismatch(a, b)}")
    assert not failures, failures


@case
def nearest_matches_fp64_on_gaussian_data(rank, world, data):
    table = torch.randn(61, 6, generator=torch.Generator().manual_seed(4))
    x = queries(8, 50, 6, "gaussian")
    _, index = sd.nearest(x, sd.ShardedCodebook.from_full(table))
    truth = _ref.distances_fp64(x, table).argmin(1)
    assert torch.equal(index, truth), mismatch(index, truth)


@case
def ties_straddling_shards_go_to_the_lowest_global_index(rank, world, data):
    table = torch.zeros(9, 3)
    table[:, 0] = torch.arange(9.0)
    table[8] = table[4] = table[1]  # row 1's twins on other shards
    x = table[1:2].repeat(4, 1)
    book = sd.ShardedCodebook.from_full(table, boundaries=[(0, 2), (2, 9)] if world == 2 else [(0, 2), (2, 5), (5, 9)])
    _, index = sd.nearest(x, book)
    _, top = sd.topk(x, book, 4)
    assert torch.equal(index, torch.full((4,), 1)), index
    assert top[0].tolist() == [1, 4, 8, 0], top[0]  # three ties (ascending index), then the next row


@case
def far_queries_take_the_exact_score_path(rank, world, data):
    """Distinct scores rounding to one distance: the exact merge equals the single-process op where a merge by
    (dist, index) does not (so this case can fail)."""
    table = far_table()
    x = far_queries(table)
    whole = spae_fast.Codebook(table)
    failures, naive_wrong = [], 0
    for bounds in shardings(table.shape[0], world):
        book = sd.ShardedCodebook.from_full(table, boundaries=bounds)
        for k in (1, 5):
            got = sd.topk(x, book, k)
            want = spae_fast.topk(x, whole, k)
            for a, b, what in zip(got, want, ("dist", "index")):
                if not torch.equal(a, b):
                    failures.append(f"far topk k={k} {bounds} {what}: {mismatch(a, b)}")
            naive = naive_topk(x, table, book.boundaries, k)
            naive_wrong += int((naive[1] != want[1]).any(1).sum())
        got = sd.nearest(x, book)
        want = spae_fast.nearest(x, whole)
        if not (torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])):
            failures.append(f"far nearest {bounds}: {mismatch(got[1], want[1])}")
    assert int(spae_fast.nearest(x[:1], whole)[1]) == table.shape[0] - 1  # the constructed near-tie
    assert not failures, failures
    assert naive_wrong > 0, "the far queries no longer defeat a (dist, index) merge: the case lost its teeth"


@case
def search_gradient_is_bitwise(rank, world, data):
    table = integer_table(9).bfloat16()
    x = queries(10, 33, table.shape[1], "gaussian")
    whole = spae_fast.Codebook(table)
    book = sd.ShardedCodebook.from_full(table, boundaries=shardings(table.shape[0], world)[1])
    grads = []
    for function in (lambda v, b: sd.topk(v, b, 3), lambda v, b: spae_fast.topk(v, b, 3)):
        v = x.clone().requires_grad_(True)
        d, _ = function(v, book if len(grads) == 0 else whole)
        (d * torch.linspace(-1, 2, 3)).sum().backward()
        grads.append(v.grad)
    v = x.clone().requires_grad_(True)
    sd.nearest(v, book)[0].pow(2).sum().backward()
    w = x.clone().requires_grad_(True)
    spae_fast.nearest(w, whole)[0].pow(2).sum().backward()
    assert torch.equal(grads[0], grads[1]), mismatch(grads[0], grads[1])
    assert torch.equal(v.grad, w.grad), mismatch(v.grad, w.grad)


@case
def sharded_queries_layout(rank, world, data):
    """Each rank its own queries (one rank none): its own rows of the single-process result."""
    table = integer_table(11)
    whole = spae_fast.Codebook(table)
    book = sd.ShardedCodebook.from_full(table)
    count = [5, 0, 12][rank] if world == 3 else [7, 0][rank]
    x = queries(20 + rank, count, table.shape[1], "integer").requires_grad_(True)
    d, i = sd.nearest(x, book, queries="sharded")
    dk, ik = sd.topk(x, book, 4, queries="sharded")
    z = torch.randn(rank % 2 + 1, 6, 4, 4, generator=torch.Generator().manual_seed(rank))
    ids = sd.saq(z, book, (1, 2, 4), queries="sharded")
    (d.sum() + dk.sum()).backward()
    wd, wi = spae_fast.nearest(x.detach(), whole)
    wdk, wik = spae_fast.topk(x.detach(), whole, 4)
    v = x.detach().clone().requires_grad_(True)
    (spae_fast.nearest(v, whole)[0].sum() + spae_fast.topk(v, whole, 4)[0].sum()).backward()
    assert torch.equal(d, wd) and torch.equal(i, wi), mismatch(i, wi)
    assert torch.equal(dk, wdk) and torch.equal(ik, wik), mismatch(ik, wik)
    assert torch.equal(x.grad, v.grad), mismatch(x.grad, v.grad)
    assert torch.equal(ids, spae_fast.saq(z, whole, (1, 2, 4))), "saq, sharded queries"


@case
def lookup_is_exact(rank, world, data):
    table = torch.randn(13, 4, generator=torch.Generator().manual_seed(3))
    table[5, 1] = -0.0
    book = sd.ShardedCodebook.from_full(table)
    index = torch.tensor([[5, 0], [12, 7]])
    rows = sd.lookup(book, index)
    assert torch.equal(rows.view(torch.int32), table[index].view(torch.int32)), "bits differ"


# ----------------------------------------------------------------------------------------------------------
# saq
# ----------------------------------------------------------------------------------------------------------


@case
def saq_bitwise(rank, world, data):
    failures = []
    for name, table in (("integer", integer_table(12)), ("gaussian", torch.randn(61, 6, generator=torch.Generator().manual_seed(13)))):
        whole = spae_fast.Codebook(table)
        g = torch.Generator().manual_seed(14)
        z = torch.randn(3, 6, 8, 8, generator=g) if name == "gaussian" else torch.randint(-2, 3, (3, 6, 8, 8), generator=g).float()
        for bounds in shardings(table.shape[0], world):
            book = sd.ShardedCodebook.from_full(table, boundaries=bounds)
            for mode in ("saq", "rq"):
                for layers in ((1, 2, 4, 8), (2, 2, 8, 8)):
                    got = sd.saq(z, book, layers, mode=mode)
                    want = spae_fast.saq(z, whole, layers, mode=mode)
                    if not torch.equal(got, want):
                        failures.append(f"saq {name} {bounds} {mode} {layers}: {mismatch(got, want)}")
            got = sd.saq(z.half(), book, (1, 2, 4, 8), prefilter="none")
            want = spae_fast.saq(z.half(), whole, (1, 2, 4, 8), prefilter="none")
            if not torch.equal(got, want):
                failures.append(f"saq fp16 z {name} {bounds}: {mismatch(got, want)}")
    assert not failures, failures


# ----------------------------------------------------------------------------------------------------------
# semantic loss
# ----------------------------------------------------------------------------------------------------------


def semantic_problem(seed: int, num_rows: int):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(40, 6, generator=g) * 2
    sets = [torch.tensor([0, num_rows - 1, num_rows // 2, 0]), torch.tensor([1]), torch.tensor([], dtype=torch.int64),
            torch.randint(0, num_rows, (9,), generator=g)]  # fmt: skip
    index = torch.cat(sets)
    offsets = torch.tensor([0] + [len(s) for s in sets]).cumsum(0)
    set_of_position = torch.randint(-1, len(sets), (40,), generator=g)
    return z, index, offsets, set_of_position


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


@case
def semantic_loss_and_gradient(rank, world, data):
    table = torch.randn(61, 6, generator=torch.Generator().manual_seed(15))
    whole = spae_fast.Codebook(table)
    z, index, offsets, sets = semantic_problem(16, table.shape[0])
    errors, failures = {}, []
    for bounds in shardings(table.shape[0], world):
        book = sd.ShardedCodebook.from_full(table, boundaries=bounds)
        for tau in (0.3, 1.0):
            v = z.clone().requires_grad_(True)
            loss = sd.semantic_loss(v, book, index, offsets, sets, tau=tau, reduction="none")
            (loss * torch.linspace(0.5, 1.5, 40)).sum().backward()
            again = sd.semantic_loss(z, book, index, offsets, sets, tau=tau, reduction="none")
            w = z.clone().requires_grad_(True)
            want = spae_fast.semantic_loss(w, whole, index, offsets, sets, tau=tau, reduction="none")
            (want * torch.linspace(0.5, 1.5, 40)).sum().backward()
            exact = _ref.semantic_loss_reference(z.double(), table.double(), index, offsets, sets, tau=tau,
                                                 reduction="none")  # fmt: skip
            mean = sd.semantic_loss(z, book, index, offsets, sets, tau=tau)
            total = sd.semantic_loss(z, book, index, offsets, sets, tau=tau, reduction="sum")
            if not torch.equal(loss.detach(), again):
                failures.append(f"not deterministic {bounds} tau={tau}")
            if not torch.equal(loss.detach() == 0, want.detach() == 0):
                failures.append(f"excluded positions differ {bounds}")
            errors[f"{bounds} {tau} loss vs single"] = relative_error(loss.detach(), want.detach())
            errors[f"{bounds} {tau} loss vs fp64"] = relative_error(loss.detach(), exact)
            errors[f"{bounds} {tau} grad vs single"] = relative_error(v.grad, w.grad)
            errors[f"{bounds} {tau} mean vs single"] = relative_error(mean, spae_fast.semantic_loss(z, whole, index, offsets, sets, tau=tau))
            errors[f"{bounds} {tau} sum vs single"] = relative_error(total, spae_fast.semantic_loss(z, whole, index, offsets, sets, tau=tau, reduction="sum"))
    worst = max(errors.values())
    assert not failures, failures
    assert worst < 2e-6, {k: v for k, v in errors.items() if v >= 2e-6}
    if rank == 0:
        with open(os.path.join(data["out_dir"], f"semantic_errors_{world}.json"), "w") as file:
            json.dump(errors, file)


@case
def semantic_loss_gradient_vs_fp64(rank, world, data):
    """The gradient against autograd through the fp64 reference (both implementations, same bound)."""
    table = torch.randn(61, 6, generator=torch.Generator().manual_seed(17))
    z, index, offsets, sets = semantic_problem(18, table.shape[0])
    book = sd.ShardedCodebook.from_full(table)
    v = z.clone().requires_grad_(True)
    sd.semantic_loss(v, book, index, offsets, sets, tau=0.5, reduction="sum").backward()
    u = z.double().requires_grad_(True)
    _ref.semantic_loss_reference(u, table.double(), index, offsets, sets, tau=0.5, reduction="sum").backward()
    assert relative_error(v.grad, u.grad) < 1e-5, relative_error(v.grad, u.grad)


@case
def semantic_loss_sharded_queries(rank, world, data):
    """Each rank its own positions and sets: the single-process loss and gradient of its own problem."""
    table = torch.randn(61, 6, generator=torch.Generator().manual_seed(19))
    z, index, offsets, sets = semantic_problem(30 + rank, table.shape[0])
    if rank == 1:
        z, sets = z[:0], sets[:0]  # a rank without positions
    book = sd.ShardedCodebook.from_full(table)
    v = z.clone().requires_grad_(True)
    loss = sd.semantic_loss(v, book, index, offsets, sets, tau=0.7, queries="sharded")
    loss.backward()
    w = z.clone().requires_grad_(True)
    want = spae_fast.semantic_loss(w, spae_fast.Codebook(table), index, offsets, sets, tau=0.7)
    want.backward()
    assert relative_error(loss.detach(), want.detach()) < 2e-6, (float(loss), float(want))
    assert v.grad.shape == w.grad.shape and relative_error(v.grad, w.grad) < 2e-6 if z.numel() else True


@case
def semantic_loss_bf16_precision(rank, world, data):
    table = torch.randn(61, 6, generator=torch.Generator().manual_seed(21))
    z, index, offsets, sets = semantic_problem(22, table.shape[0])
    book = sd.ShardedCodebook.from_full(table)
    got = sd.semantic_loss(z, book, index, offsets, sets, reduction="none", precision="bf16")
    want = _ref.semantic_loss_reference(z.bfloat16().double(), table.bfloat16().double(), index, offsets, sets,
                                        reduction="none")  # fmt: skip
    assert relative_error(got, want) < 2e-6, relative_error(got, want)


@case
def semantic_loss_bf16_error_bound(rank, world, data):
    """precision="bf16" on a sharded table (the loss of bf16(z) against bf16(E), gradient straight-through):

    - against fp64 on the same rounded operands, loss and gradient within 2e-6 of the largest value (fp32
      logits, fp64 sums: the default precision's accuracy);
    - against the single-process bf16 op: the loss within 2e-6 (same operands, sums in another order); the
      gradient within 2 (2 / tau) u max_k |e_kj| per coordinate j, u = 2^-8: that kernel rounds the softmax
      weights of its gradient's weighted row sum to bf16 (its docstring), which moves sum_k w_k e_kj by at most
      u sum_k w_k |e_kj| <= u max_k |e_kj| (factor 2 for the fp32 arithmetic around it);
    - against the exact fp64 loss of the unrounded operands, per position within 2 max_k delta_k(p) (+ 1e-5
      relative), where rounding to bf16 moves each logit by at most delta_k(p) = (2u + u^2)(2 ||z_p|| ||e_k|| +
      ||e_k||^2) / tau (|bf(z).bf(e) - z.e| <= (2u + u^2) |z||e| by Cauchy-Schwarz), logsumexp is 1-Lipschitz in
      the max norm and the candidate mean moves by at most the same."""
    table = torch.randn(61, 6, generator=torch.Generator().manual_seed(23))
    z, index, offsets, sets = semantic_problem(24, table.shape[0])
    tau, u = 0.7, 2.0**-8
    book = sd.ShardedCodebook.from_full(table)
    v, w = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    got = sd.semantic_loss(v, book, index, offsets, sets, tau=tau, reduction="none", precision="bf16")
    got.sum().backward()
    rounded = z.bfloat16().double().requires_grad_(True)
    exact_rounded = _ref.semantic_loss_reference(rounded, table.bfloat16().double(), index, offsets, sets, tau=tau,
                                                 reduction="none")  # fmt: skip
    exact_rounded.sum().backward()
    assert relative_error(got.detach(), exact_rounded.detach()) < 2e-6
    assert relative_error(v.grad, rounded.grad) < 2e-6, relative_error(v.grad, rounded.grad)
    single = spae_fast.semantic_loss(w, spae_fast.Codebook(table), index, offsets, sets, tau=tau, reduction="none",
                                     precision="bf16")  # fmt: skip
    single.sum().backward()
    assert relative_error(got.detach(), single.detach()) < 2e-6, relative_error(got.detach(), single.detach())
    weight_rounding = 2 * (2 / tau) * u * table.bfloat16().double().abs().amax(dim=0)  # [D]
    assert bool(((v.grad.double() - w.grad.double()).abs() <= weight_rounding).all())
    exact = _ref.semantic_loss_reference(z.double(), table.double(), index, offsets, sets, tau=tau, reduction="none")
    norms = table.double().norm(dim=1)
    delta = (2 * u + u * u) * (2 * z.double().norm(dim=1, keepdim=True) * norms + norms**2).amax(dim=1) / tau
    error = (got.detach().double() - exact).abs()
    assert bool((error <= 2 * delta + 1e-5 * exact.abs()).all()), float((error / (2 * delta)).max())
    assert float(error.max()) > 1e-4  # bf16 rounding shows: the bound is tested, not vacuous


# ----------------------------------------------------------------------------------------------------------
# Sharded codebook: building it, and clear errors
# ----------------------------------------------------------------------------------------------------------


@case
def from_file_reads_only_its_rows(rank, world, data):
    table = torch.load(data["table_path"])
    book = sd.ShardedCodebook.from_file(data["safetensors_path"])
    start, stop = sd.balanced_boundaries(table.shape[0], world)[rank]
    named = sd.ShardedCodebook.from_file(data["safetensors_path"], tensor="other.weight",
                                         boundaries=shardings(8, world)[1])  # fmt: skip
    assert (book.start, book.stop, book.num_rows) == (start, stop, table.shape[0])
    assert book.local.weight.shape == (stop - start, table.shape[1]) and book.dtype == torch.bfloat16
    assert torch.equal(book.local.weight, table[start:stop])
    assert named.num_rows == 8 and named.local.weight.dtype == torch.float32
    x = queries(23, 9, table.shape[1], "gaussian")
    got, want = sd.nearest(x, book), spae_fast.nearest(x, spae_fast.Codebook(table))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), mismatch(got[1], want[1])


def expect_error(build, *fragments: str) -> None:
    try:
        build()
    except ValueError as error:
        message = str(error)
        missing = [f for f in fragments if f not in message]
        assert not missing, f"message {message!r} lacks {missing}"
        return
    raise AssertionError(f"no ValueError (expected one mentioning {fragments})")


@case
def bad_shards_raise_on_every_rank(rank, world, data):
    torch.manual_seed(60)  # the same table on every rank
    table = torch.randn(20, 4)
    last = world - 1
    # a gap: the last rank starts one row late
    expect_error(lambda: sd.ShardedCodebook(table[rank * 5 + (rank == last) : (rank + 1) * 5], rank * 5 + (rank == last)),
                 "do not cover", f"rows [{last * 5}, {last * 5 + 1}) belong to no rank")  # fmt: skip
    # an overlap: the last rank starts one row early
    expect_error(lambda: sd.ShardedCodebook(table[rank * 5 - (rank == last) : (rank + 1) * 5], rank * 5 - (rank == last)),
                 "overlap", f"rank {last}")  # fmt: skip
    # shards that together miss the end of the table (num_rows given)
    expect_error(lambda: sd.ShardedCodebook(table[rank * 5 : (rank + 1) * 5], rank * 5, num_rows=20),
                 "do not cover the table of num_rows = 20", f"[0, {world * 5})")  # fmt: skip
    expect_error(lambda: sd.ShardedCodebook(table[rank * 5 : (rank + 1) * 5], rank * 5, num_rows=world * 5 - 1),
                 "go beyond")  # fmt: skip
    # D and dtype disagreements
    wide = torch.randn(5, 4 + (rank == last))
    expect_error(lambda: sd.ShardedCodebook(wide, rank * 5), "disagree on the row dimension D", f"rank {last}: D = 5")
    mixed = table[rank * 5 : (rank + 1) * 5].to(torch.float16 if rank == last else torch.float32)
    expect_error(lambda: sd.ShardedCodebook(mixed, rank * 5), "disagree on the dtype", "float16", "float32")
    # a local failure (a NaN row on one rank) reaches every rank
    bad = table[rank * 5 : (rank + 1) * 5].clone()
    if rank == last:
        bad[2, 1] = float("nan")
    expect_error(lambda: sd.ShardedCodebook(bad, rank * 5), f"rank {last} could not build its shard", "NaN")
    expect_error(lambda: sd.ShardedCodebook(table[:0], 0), "rank 0 could not build its shard", "empty")
    expect_error(lambda: sd.ShardedCodebook(table[:5], 0, metric="cosine"), "metric must be one of")
    expect_error(lambda: sd.ShardedCodebook.from_file(data["out_dir"] + "/missing.safetensors"), "does not exist")
    book = sd.ShardedCodebook(table[rank * 5 : (rank + 1) * 5], rank * 5)  # and a good one still works
    assert book.num_rows == world * 5 and book.boundaries == tuple((r * 5, r * 5 + 5) for r in range(world))


@case
def bad_queries_raise_on_every_rank(rank, world, data):
    torch.manual_seed(61)  # the same table and queries on every rank
    table = torch.randn(20, 4)
    book = sd.ShardedCodebook.from_full(table)
    x = torch.randn(6, 4)
    x[3, 2] = float("inf")
    expect_error(lambda: sd.nearest(x, book), "first bad row 3")
    z = torch.randn(1, 4, 4, 4)
    z[0, 1, 2, 3] = float("nan")
    expect_error(lambda: sd.saq(z, book, (1, 2, 4)), "row 2, column 3")
    huge = torch.full((2, 4), 1e36)
    expect_error(lambda: sd.topk(huge, book, 2), "too large")
    try:
        sd.topk(torch.randn(2, 5), book, 2)
    except ValueError as error:
        assert "D = 4" in str(error)
    else:
        raise AssertionError("a D mismatch of the queries was accepted")


@case
def data_by_vocab_groups(rank, world, data):
    """`vocab_parallel_groups`: the data x vocab grid; a ShardedCodebook over each vocabulary group, each data
    replica with its own queries, gives the single-process result of its queries."""
    table = integer_table(24)
    whole = spae_fast.Codebook(table)
    results = []
    for vocab_parallel in (1, world):
        vocab_group, data_group = sd.vocab_parallel_groups(vocab_parallel)
        replica = rank // vocab_parallel
        book = sd.ShardedCodebook.from_full(table, group=vocab_group)
        x = queries(50 + replica, 11, table.shape[1], "integer")  # the same within a vocabulary group
        got = sd.nearest(x, book)
        want = spae_fast.nearest(x, whole)
        sizes = (dist.get_world_size(vocab_group), dist.get_world_size(data_group))
        results.append((vocab_parallel, sizes, book.boundaries, torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])))
    try:
        sd.vocab_parallel_groups(world + 1)
        raised = False
    except ValueError as error:
        raised = "must divide the number of processes" in str(error)
    for vocab_parallel, sizes, boundaries, equal in results:
        assert sizes == (vocab_parallel, world // vocab_parallel), (vocab_parallel, sizes)
        assert len(boundaries) == vocab_parallel, boundaries
        assert equal, f"vocab_parallel={vocab_parallel}: nearest differs from the single-process op"
    assert raised, "vocab_parallel not dividing the world size was accepted"
