"""Codebook memory per table dtype, and the speed of narrow (bf16) panels against fp32 panels (issue #20).

Memory: the bytes a `spae_fast.Codebook` holds (its copy of the table, the packed panels + bias, the int8
pre-filter copy once a `nearest` call has built it) against the table's own bytes.
Speed: every op on a bf16 table, the Codebook packed in bf16 against the same Codebook with fp32 panels
(`pack_codebook(..., narrow=False)`), interleaved rounds in one process; the ratio is the median over rounds
of time(bf16 panels) / time(fp32 panels), beside an A/A control (a second, identical fp32-panel Codebook
against the first: the noise of the machine). Usage: python benchmarks/bench_codebook_memory.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

import spae_fast

MIB = 1 << 20


def _fp32_panels(codebook: spae_fast.Codebook) -> spae_fast.Codebook:
    wide = spae_fast.Codebook(codebook.weight, codebook.metric, copy=False)
    wide.cpu_panels, wide.cpu_bias, wide.cpu_norm_bound = torch.ops.spae_fast.pack_codebook(
        wide.weight, wide.metric, False
    )
    return wide


def memory_rows(tables):
    rows = []
    for name, table in tables:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            weight = table.to(dtype)
            codebook = spae_fast.Codebook(weight, "l2")
            table_bytes = weight.nbytes
            packed = codebook.nbytes_packed()  # panels + bias
            spae_fast.nearest(weight[:64].float(), codebook)  # builds the int8 copy where the CPU runs it
            with_int8 = codebook.nbytes_packed()
            own = codebook.weight.nbytes
            packed_only = spae_fast.Codebook(weight, "l2", keep_weight=False)
            alone = packed_only.nbytes_packed()
            spae_fast.nearest(weight[:64].float(), packed_only)
            alone_int8 = packed_only.nbytes_packed()
            rows.append([
                name, str(dtype).removeprefix("torch."), f"{table_bytes / MIB:.1f}",
                str(codebook.cpu_panels.dtype).removeprefix("torch."), f"{packed / MIB:.1f}",
                f"{(with_int8 - packed) / MIB:.1f}", f"{own / MIB:.1f}",
                f"{(own + packed) / table_bytes:.2f}x", f"{(own + with_int8) / table_bytes:.2f}x",
                f"{alone / table_bytes:.2f}x", f"{alone_int8 / table_bytes:.2f}x",
            ])  # fmt: skip
    return rows


def speed_rows(table, rounds):
    weight = table.to(torch.bfloat16)
    narrow = spae_fast.Codebook(weight, "l2")
    wide, control = _fp32_panels(narrow), _fp32_panels(narrow)
    generator = torch.Generator().manual_seed(0)
    rows_near = weight[torch.randint(0, weight.shape[0], (2048,), generator=generator)].float()
    queries = rows_near + 0.01 * rows_near.std() * torch.randn(rows_near.shape, generator=generator)
    z = 0.07 * torch.randn(4, weight.shape[1], 16, 16, generator=generator)
    z = z + weight[torch.randint(0, weight.shape[0], (4 * 256,), generator=generator)].float().T.reshape(
        weight.shape[1], 4, 16, 16
    ).permute(1, 0, 2, 3)
    index = torch.randint(0, weight.shape[0], (336 * 4,), generator=generator)
    offsets = torch.arange(0, 336 * 4 + 1, 4)
    zs = queries[:336].clone().requires_grad_(True)
    ops = {
        "nearest (2048 near-row queries)": lambda cb: spae_fast.nearest(queries, cb),
        "nearest, prefilter none": lambda cb: spae_fast.nearest(queries, cb, prefilter="none"),
        "topk k=16": lambda cb: spae_fast.topk(queries, cb, 16),
        "topk k=32 (fp32 search)": lambda cb: spae_fast.topk(queries[:512], cb, 32),
        "saq 4 x 16 x 16, 6 layers": lambda cb: spae_fast.saq(z, cb),
        "semantic_loss fp32, N=336, fwd+bwd": lambda cb: torch.autograd.grad(
            spae_fast.semantic_loss(zs, cb, index, offsets, tau=1.0), zs
        ),
    }
    out = []
    for name, op in ops.items():
        op(narrow), op(wide), op(control)  # warm-up (builds the int8 copies)
        calls = {label: (lambda op=op, cb=cb: op(cb)) for label, cb in (("bf16", narrow), ("fp32", wide),
                                                                         ("control", control))}  # fmt: skip
        times, results = harness.interleaved_rounds(calls, rounds)
        same = all(torch.equal(a, b) for a, b in zip(_flat(results["bf16"]), _flat(results["fp32"])))
        ratio = harness.paired_median(times["bf16"], times["fp32"])
        noise = harness.paired_median(times["control"], times["fp32"])
        out.append([name, f"{min(times['fp32']):.3f}", f"{min(times['bf16']):.3f}", f"{ratio:.3f}", f"{noise:.3f}",
                    str(same)])  # fmt: skip
        print(out[-1], flush=True)
    return out


def _flat(result):
    return result if isinstance(result, tuple) else (result,)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--memory-only", action="store_true")
    args = parser.parse_args()
    print(harness.machine_info(), harness.versions(), f"threads={torch.get_num_threads()}", flush=True)
    smollm2, description = harness.smollm2_table()
    print("table:", description, flush=True)
    random_table = torch.randn(32000, 1024, generator=torch.Generator().manual_seed(0))
    header = ["table", "dtype", "table MiB", "panels", "panels+bias MiB", "int8 copy MiB", "own copy MiB",
              "total / table", "total incl. int8 / table", "keep_weight=False / table",
              "keep_weight=False incl. int8 / table"]  # fmt: skip
    rows = memory_rows([("SmolLM2 49152 x 576", smollm2), ("random 32000 x 1024", random_table)])
    print("\n".join(harness.markdown_table(header, rows)), flush=True)
    if args.memory_only:
        return
    speed = speed_rows(smollm2, args.rounds)
    header = ["op (bf16 SmolLM2 table)", "fp32 panels s (best)", "bf16 panels s (best)", "ratio bf16/fp32",
              "A/A fp32/fp32", "bitwise equal"]  # fmt: skip
    print("\n".join(harness.markdown_table(header, speed)), flush=True)


if __name__ == "__main__":
    main()
