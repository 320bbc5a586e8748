"""Ahead-of-time compilation of the Triton kernels for NVIDIA targets, without a GPU.

    python -m spae_fast.triton_kernels.compile_check [--arch 80 90] [--json]

Compiles representative variants of every kernel (operand dtype x precision x k x SAQ) to PTX / cubin for each
architecture with Triton's own toolchain (ptxas ships with the triton wheel), with the divisibility hints a
real launch gets for aligned tensors, and reports whether the tensor-core path (wgmma on sm_90, mma on sm_80)
and the cp.async pipeline were generated. Catches front-end and lowering errors on machines without a GPU
(tests/test_triton_compile.py runs it in CI). Must run with TRITON_INTERPRET unset (it needs JIT kernels).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import nearest

_SEARCH_TYPES = {
    "BIAS": "*fp32", "COL_SCALE": "*fp32", "ROW_SCALE": "*fp32", "OUT_KEY": "*i64", "OUT_SCORE": "*fp32",
    "OUT_INDEX": "*i32", "N": "i32", "V": "i32", "D": "i32", "stride_xn": "i32", "stride_xd": "i32",
    "stride_ev": "i32", "stride_ed": "i32", "num_chunks": "i32", "tiles_per_chunk": "i32", "Z": "*fp32",
    "IDS": "*i64", "LAYER_SIDES": "*i32", "LAYER_FIRSTS": "*i32", "stride_zb": "i32", "stride_zd": "i32",
    "stride_zy": "i32", "stride_zx": "i32", "stride_ib": "i32", "grid": "i32", "layer": "i32", "coefficient": "fp32",
}  # fmt: skip
_ALIGNED = (
    "X",
    "E",
    "BIAS",
    "COL_SCALE",
    "ROW_SCALE",
    "OUT_KEY",
    "OUT_SCORE",
    "OUT_INDEX",
    "D",
    "stride_xn",
    "stride_ev",
)

# (name, operand dtype, input_precision, k_pad, saq, has_row_scale)
VARIANTS = (
    ("bf16 nearest", "bf16", "tf32", 1, False, False),
    ("bf16 top-8", "bf16", "tf32", 8, False, False),
    ("bf16 cosine top-2", "bf16", "tf32", 2, False, True),
    ("bf16 SAQ top-8", "bf16", "tf32", 8, True, False),
    ("fp16 nearest", "fp16", "tf32", 1, False, False),
    ("tf32 top-8", "fp32", "tf32", 8, False, False),
    ("tf32 SAQ top-8", "fp32", "tf32", 8, True, False),
    ("fp32 exact nearest", "fp32", "ieee", 1, False, False),
)


def _signature(fn, types: dict, constexprs: dict) -> dict:
    return {name: "constexpr" if name in constexprs else types[name] for name in fn.arg_names}


def _compile(fn, types, constexprs, aligned, arch, num_warps, num_stages=None):
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    source = ASTSource(fn, _signature(fn, types, constexprs), constexprs=constexprs, attrs=attrs)
    options = {"num_warps": num_warps}
    if num_stages is not None:
        options["num_stages"] = num_stages
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def compile_search(arch: int, dtype: str, precision: str, k_pad: int, saq: bool, row_scale: bool):
    torch_dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]
    import torch

    config = nearest.default_config(
        getattr(torch, torch_dtype), precision, torch.device("cuda"), capability=arch // 10
    )
    types = dict(_SEARCH_TYPES, X=f"*{dtype}", E=f"*{dtype}")
    constexprs = {
        "K_PAD": k_pad, "BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "BLOCK_K": config.block_k,
        "GROUP_M": config.group_m, "EVEN_K": True, "HAS_ROW_SCALE": row_scale, "INPUT_PRECISION": precision,
        "SAQ": saq, "stride_xd": 1, "stride_ed": 1,
    }  # fmt: skip
    return _compile(
        nearest._search_kernel, types, constexprs, _ALIGNED, arch, config.num_warps, config.num_stages
    )


def compile_pairs(arch: int):
    """The fp64 pair rescoring, of plain queries and (SAQ=True) of SAQ targets."""
    saq_types = {name: _SEARCH_TYPES[name] for name in ("Z", "IDS", "LAYER_SIDES", "LAYER_FIRSTS", "stride_zb",
                 "stride_zd", "stride_zy", "stride_zx", "stride_ib", "grid", "layer", "coefficient")}  # fmt: skip
    types = dict(saq_types, A="*fp32", B="*bf16", INDEX="*i64", OUT="*fp64", C="i32", D="i32", stride_am="i32",
                 stride_ad="i32", stride_br="i32", stride_bd="i32", stride_im="i32", stride_ic="i32")  # fmt: skip
    return tuple(
        _compile(nearest._pair_dot64_kernel, types, {"BLOCK_C": 8, "SAQ": saq}, (), arch, 4)
        for saq in (False, True)
    )


def check(archs) -> list[dict]:
    report = []
    for arch in archs:
        for name, dtype, precision, k_pad, saq, row_scale in VARIANTS:
            start = time.time()
            entry = {"arch": arch, "kernel": f"search: {name}"}
            try:
                ptx = compile_search(arch, dtype, precision, k_pad, saq, row_scale).asm["ptx"]
                entry.update(ok=True, wgmma="wgmma" in ptx, mma="mma.sync" in ptx, cp_async="cp.async" in ptx)
            except Exception as error:  # noqa: BLE001  (reported, the caller decides)
                entry.update(ok=False, error=f"{type(error).__name__}: {error}")
            entry["seconds"] = round(time.time() - start, 1)
            report.append(entry)
        start = time.time()
        entry = {"arch": arch, "kernel": "pair_dot64 (plain and SAQ)"}
        try:
            compile_pairs(arch)
            entry["ok"] = True
        except Exception as error:  # noqa: BLE001
            entry.update(ok=False, error=f"{type(error).__name__}: {error}")
        entry["seconds"] = round(time.time() - start, 1)
        report.append(entry)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    report = check(args.arch)
    if args.json:
        print(json.dumps(report))
    else:
        for entry in report:
            flags = " ".join(k for k in ("wgmma", "mma", "cp_async") if entry.get(k))
            status = "ok" if entry["ok"] else f"FAILED {entry['error']}"
            print(f"sm_{entry['arch']}  {entry['kernel']:32s} {status} {flags} ({entry['seconds']}s)")
    return 0 if all(entry["ok"] for entry in report) else 1


if __name__ == "__main__":
    sys.exit(main())
