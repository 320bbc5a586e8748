"""Vocabulary-parallel spae_fast (spae_fast.distributed) on 1, 2, 4 gloo ranks on this machine: peak memory per
rank, communication bytes per query and time per op.

    python benchmarks/bench_distributed.py [--ranks 1 2 4] [--vocab 49152] [--dim 576] [--queries 1024]
        [--table PATH.safetensors] [--out benchmarks/results]

The table (random Gaussian fp32, or ``--table``: a safetensors file whose input embedding is read) is written
once to a safetensors file; every rank builds its `ShardedCodebook` with ``from_file``, so it reads only its
rows. Per rank (one torch thread each, fresh processes per rank count):

- memory: the process's RSS high-water mark (VmHWM, reset through /proc/self/clear_refs after imports and
  process-group start) minus the RSS at that point: the shard, its packed copy, the queries and every op's
  buffers. Reported next to the table's share (shard + packed copies) and the whole table's bytes.
- communication: the bytes of every tensor each rank hands to torch.distributed (all_gather / all_reduce /
  all_gather_object are wrapped and counted), per query of each op.
- time: median of 3 calls after a warm-up, per op: nearest and topk (k = 16) of ``--queries`` replicated
  queries, saq of 2 images on a 16 x 16 grid (layers 1, 2, 4, 8, 16: 682 searches), semantic loss forward +
  backward of 256 positions. With 2 cores, 2 and 4 ranks show the overheads, not a speed-up.

Loading (``--vocab-source``, default the SmolLM2 vocabulary): each rank builds a `ShardedVocabCodebook` (its
rows of the file, the token metadata; rank 0 streams the fingerprint) and reports the RSS high-water mark above
the RSS before it; the 1-rank run also loads a whole `VocabCodebook` the single-process way.

The 1-rank run also times the single-process ops on the whole table and saves the semantic loss and its
gradient, which the other runs compare with (max relative error). Writes bench_distributed.{csv,md} under
``--out`` and prints the markdown table.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from harness import proc_status_kib, reset_peak

OPS = ("nearest", "topk16", "saq", "semantic_loss")


class _ByteCounter:
    """Wraps the torch.distributed collectives and adds up the bytes of the tensors handed to them."""

    def __init__(self) -> None:
        self.bytes = 0
        for name in ("all_gather", "all_reduce", "all_gather_object"):
            original = getattr(dist, name)
            setattr(dist, name, self._wrap(name, original))

    def _wrap(self, name, original):
        def counted(*args, **kwargs):
            payload = args[1] if name in ("all_gather", "all_gather_object") else args[0]
            if isinstance(payload, torch.Tensor):
                self.bytes += payload.numel() * payload.element_size()
            else:
                self.bytes += len(repr(payload))
            return original(*args, **kwargs)

        return counted


def _time(function, repeats: int = 3) -> float:
    function()
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _loading(source: str, world: int) -> dict:
    """Loading the vocabulary ``source`` ("words" filter, fp32) as a `ShardedVocabCodebook`: this rank's RSS
    high-water mark above the RSS before (its rows, their packed copy, the O(V) token metadata, one read chunk;
    rank 0 also streams the fingerprint), its share and the seconds; on 1 rank also a whole `VocabCodebook`
    (the single-process path, from the table cache)."""
    import gc

    import gguf  # noqa: F401 - imported before the baseline

    from spae_fast.distributed import ShardedVocabCodebook
    from spae_fast.vocab import VocabCodebook

    def measured(build):
        """(what build() returns, seconds, VmHWM above the RSS before it in MiB)."""
        gc.collect()
        base, _ = proc_status_kib("VmRSS"), reset_peak()
        started = time.perf_counter()
        built = build()
        return built, time.perf_counter() - started, (proc_status_kib("VmHWM") - base) / 2**10

    result = {}
    vocab, result["load_s"], result["load_peak_MiB"] = measured(lambda: ShardedVocabCodebook.from_pretrained(source))
    local = vocab.sharded.local
    result["load_share_MiB"] = (local.weight.nbytes + local.nbytes_packed()) / 2**20
    result["load_rows"] = vocab.sharded.shard_rows
    result["load_table_MiB"] = vocab.num_rows * vocab.dim * 4 / 2**20
    del vocab, local
    gc.collect()
    if world == 1:
        VocabCodebook.from_pretrained(source)  # builds the table cache if missing (not measured)
        whole, result["whole_load_s"], result["whole_load_peak_MiB"] = measured(
            lambda: VocabCodebook.from_pretrained(source)
        )
        del whole
        gc.collect()
    return result


def worker(rank: int, world: int, store: str, args: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=900))  # fmt: skip
    import spae_fast
    from spae_fast import distributed as sd

    counter = _ByteCounter()
    torch.manual_seed(0)
    x = torch.randn(args["queries"], args["dim"])
    z = torch.randn(2, args["dim"], 16, 16) * 0.05
    positions = torch.randn(256, args["dim"]) * 0.05
    candidate_index = torch.randint(0, args["vocab"], (64,))
    candidate_offsets = torch.arange(0, 65, 8)
    sets = torch.randint(0, 8, (256,))
    # Warm-up on a small table: libraries, op registration and allocator pools are loaded before the baseline.
    small = sd.ShardedCodebook.from_full(torch.randn(64 * world, args["dim"]))
    sd.nearest(x, small), sd.topk(x, small, 16), sd.saq(z, small, (1, 2, 4, 8, 16))
    warm = positions.clone().requires_grad_(True)
    sd.semantic_loss(warm, small, candidate_index % 64, candidate_offsets, sets).backward()
    del small, warm
    row = {"ranks": world, "rank": rank}
    if args["vocab_source"]:
        row.update(_loading(args["vocab_source"], world))
    dist.barrier()
    base = proc_status_kib("VmRSS")
    reset = reset_peak()
    book = sd.ShardedCodebook.from_file(args["table"], tensor=args["tensor"])
    share = book.local.weight.nbytes + book.local.nbytes_packed()
    row.update({"shard_rows": book.shard_rows, "table_MiB": args["table_bytes"] / 2**20, "share_MiB": share / 2**20,
                "peak_after_build_MiB": (proc_status_kib("VmHWM") - base) / 1024})  # fmt: skip
    layers = (1, 2, 4, 8, 16)

    def semantic():
        v = positions.clone().requires_grad_(True)
        sd.semantic_loss(v, book, candidate_index, candidate_offsets, sets).backward()

    runs = {
        "nearest": (lambda: sd.nearest(x, book), x.shape[0]),
        "topk16": (lambda: sd.topk(x, book, 16), x.shape[0]),
        "saq": (lambda: sd.saq(z, book, layers), 2 * sum(s * s for s in layers)),
        "semantic_loss": (semantic, positions.shape[0]),
    }
    for name, (function, count) in runs.items():
        before = counter.bytes
        function()
        row[f"{name}_bytes_per_query"] = (counter.bytes - before) / count
        row[f"{name}_ms"] = _time(function) * 1e3
    row["peak_MiB"] = (proc_status_kib("VmHWM") - base) / 1024
    row["peak_reset"] = reset

    v = positions.clone().requires_grad_(True)
    loss = sd.semantic_loss(v, book, candidate_index, candidate_offsets, sets, reduction="none")
    loss.sum().backward()
    reference = os.path.join(args["out_tmp"], "semantic_single.pt")
    if world == 1:  # the single-process ops on the whole table, after the memory measurement
        whole = spae_fast.Codebook(book.local.weight, copy=False)
        row["single_nearest_ms"] = _time(lambda: spae_fast.nearest(x, whole)) * 1e3
        row["single_topk16_ms"] = _time(lambda: spae_fast.topk(x, whole, 16)) * 1e3
        row["single_saq_ms"] = _time(lambda: spae_fast.saq(z, whole, layers)) * 1e3
        w = positions.clone().requires_grad_(True)
        single = spae_fast.semantic_loss(w, whole, candidate_index, candidate_offsets, sets, reduction="none")
        single.sum().backward()
        torch.save({"loss": single.detach(), "grad": w.grad}, reference)
        row["single_semantic_loss_ms"] = _time(
            lambda: spae_fast.semantic_loss(positions.clone().requires_grad_(True), whole, candidate_index,
                                            candidate_offsets, sets).backward()
        ) * 1e3
    saved = torch.load(reference)
    row["semantic_loss_max_rel_err"] = float((loss.detach() - saved["loss"]).abs().max() / saved["loss"].abs().max())
    row["semantic_grad_max_rel_err"] = float((v.grad - saved["grad"]).abs().max() / saved["grad"].abs().max())
    with open(os.path.join(args["out_tmp"], f"row_{world}_{rank}.json"), "w") as file:
        json.dump(row, file)
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--dim", type=int, default=576)
    parser.add_argument("--queries", type=int, default=1024)
    parser.add_argument("--table", default=None, help="a safetensors file holding a [V, D] table (default: random)")
    parser.add_argument("--tensor", default=None, help="the tensor's name in --table (default: its input embedding)")
    parser.add_argument("--vocab-source", default="smollm2",
                        help="a vocabulary whose sharded loading is measured ('' to skip; default: smollm2)")  # fmt: skip
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    from safetensors import safe_open
    from safetensors.torch import save_file

    work = tempfile.mkdtemp(prefix="bench_distributed_")
    table_path, tensor = args.table, args.tensor
    if table_path is None:
        table = torch.randn(args.vocab, args.dim, generator=torch.Generator().manual_seed(1)) * 0.05
        table_path, tensor = os.path.join(work, "table.safetensors"), "weight"
        save_file({"weight": table}, table_path)
        del table
    if tensor is None:
        from spae_fast.embedding_tables import pick_embedding_key

        with safe_open(table_path, framework="pt") as handle:
            tensor = pick_embedding_key(list(handle.keys()))
    with safe_open(table_path, framework="pt") as handle:
        shape = handle.get_slice(tensor).get_shape()
        table_bytes = handle.get_slice(tensor)[:1].element_size() * shape[0] * shape[1]
    settings = {"table": table_path, "tensor": tensor, "vocab": shape[0], "dim": shape[1], "queries": args.queries,
                "table_bytes": table_bytes, "out_tmp": work, "vocab_source": args.vocab_source}  # fmt: skip
    rows = []
    started = time.time()
    for world in sorted(args.ranks):
        mp.spawn(worker, args=(world, os.path.join(work, f"store{world}"), settings), nprocs=world)
        for rank in range(world):
            with open(os.path.join(work, f"row_{world}_{rank}.json")) as file:
                rows.append(json.load(file))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_distributed.csv"), "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=sorted({key for row in rows for key in row}))
        writer.writeheader()
        writer.writerows(rows)
    markdown = _markdown(rows, settings, time.time() - started)
    with open(os.path.join(args.out, "bench_distributed.md"), "w") as file:
        file.write(markdown)
    print(markdown)


def _markdown(rows, settings, wall) -> str:
    load = os.getloadavg()
    lines = [
        (f"V = {settings['vocab']}, D = {settings['dim']} (table {settings['table_bytes'] / 2**20:.0f} MiB), "
        f"{settings['queries']} queries; gloo, 1 torch thread per rank, {os.cpu_count()} cores; wall {wall:.0f} s; "
        f"load average at end {load[0]:.1f}; torch {torch.__version__}"),
        "",
        ("| ranks | rank | shard rows | share MiB | peak extra MiB | nearest ms | topk16 ms | saq ms | semantic fwd+bwd ms "
        "| B/query nearest | topk16 | saq | semantic | semantic loss / grad max rel err |"),
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['ranks']} | {row['rank']} | {row['shard_rows']} | {row['share_MiB']:.1f} | {row['peak_MiB']:.1f} "
            + "".join(f"| {row[f'{op}_ms']:.0f} " for op in OPS)
            + "".join(f"| {row[f'{op}_bytes_per_query']:.0f} " for op in OPS)
            + f"| {row['semantic_loss_max_rel_err']:.1e} / {row['semantic_grad_max_rel_err']:.1e} |"
        )
    if "load_peak_MiB" in rows[0]:
        lines += ["", (f"Loading the vocabulary {settings['vocab_source']!r} (\"words\" filter, fp32: "
                       f"{rows[0]['load_table_MiB']:.0f} MiB of kept rows) as a ShardedVocabCodebook, per rank:"), "",
                  "| ranks | rank | rows | share MiB (rows + packed copy) | load peak MiB | load s |", "|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        lines += [f"| {r['ranks']} | {r['rank']} | {r['load_rows']} | {r['load_share_MiB']:.1f} | {r['load_peak_MiB']:.1f} "
                  f"| {r['load_s']:.1f} |" for r in rows]  # fmt: skip
        whole = next((row for row in rows if "whole_load_peak_MiB" in row), None)
        if whole is not None:
            lines += ["", (f"A whole VocabCodebook (single process, from the table cache): load peak "
                           f"{whole['whole_load_peak_MiB']:.1f} MiB, {whole['whole_load_s']:.1f} s.")]  # fmt: skip
    single = next((row for row in rows if row["ranks"] == 1), None)
    if single is not None:
        lines += ["", "Single-process ops on the whole table (same process as the 1-rank run): "
                  + ", ".join(f"{op} {single[f'single_{op}_ms']:.0f} ms" for op in OPS) + "."]  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
