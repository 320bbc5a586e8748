"""The op table: every op is one `torch.library` custom op, defined once in the module named after it with
its schema, fake implementation and autograd rule, and kernels registered per device
(``register_kernel("cpu" | "cuda")``; the decorated function is the default kernel for other devices: the
reference).

    nearest.py        spae_fast::topk, spae_fast::nearest     -> `nearest`, `topk`
    saq.py            spae_fast::saq                          -> `saq`
    semantic_loss.py  spae_fast::semantic_loss                -> `semantic_loss`, `semantic_loss_from_sets`
    common.py         spae_fast::pack_codebook, the codebook operands of every op, the stats of the last call,
                      the semantic loss's status codes
    backends.py       which backends exist and run here (`available`), ``backend="auto"`` (`resolve_backend`)
    gpu_kernels.py    the CUDA and Triton kernels behind one interface
    gpu_search.py     device "cuda" search of nearest / topk, exact mode
    gpu_saq.py        device "cuda" SAQ
    gpu_semantic_loss.py  the Triton semantic loss

The device of the tensors picks the kernel; the op's ``backend`` argument picks among the kernels that run on
that device ("cpu": native, "torch": reference, "triton": the interpreter on CPU tensors; "cuda" / "triton" on
CUDA tensors), and ``precision`` is an argument of its own. The plain-PyTorch references stay together in
`spae_fast._ref` (each names the op it specifies): one readable spec that tests and kernels' docstrings cite.

The package re-exports the public functions, so `spae_fast.ops.nearest`, `.saq` and `.semantic_loss` are
the functions, not the same-named modules (reach those with ``importlib.import_module``).

Semantics every backend shares: distances are fp32, indices int64; fp32 / bf16 / fp16 inputs are upcast
exactly and accumulated in fp32; ties go to the lowest index, bitwise identical for any batch split, thread
count and call order; non-finite inputs raise ``ValueError`` unless ``check_finite=False``; gradients flow to
the queries only (the codebook is frozen).
"""

from .backends import BACKENDS, BackendStatus, available, resolve_backend
from .common import (
    PREFILTER_ENV,
    PREFILTERS,
    SearchStats,
    cpu_has_bf16_semantic_kernel,
    int8_prefilter_available,
    last_cpu_search_stats,
    last_saq_stats,
    last_search_stats,
    pack_semantic_bf16,
)
from .nearest import nearest, topk
from .saq import SAQ_MAX_LAYERS, SAQ_MODES, saq
from .semantic_loss import SEMANTIC_PRECISIONS, SEMANTIC_REDUCTIONS, semantic_loss, semantic_loss_from_sets

SAQ_PREFILTERS = PREFILTERS

__all__ = [
    "BACKENDS",
    "PREFILTERS",
    "PREFILTER_ENV",
    "SAQ_MAX_LAYERS",
    "SAQ_MODES",
    "SAQ_PREFILTERS",
    "SEMANTIC_PRECISIONS",
    "SEMANTIC_REDUCTIONS",
    "BackendStatus",
    "SearchStats",
    "available",
    "cpu_has_bf16_semantic_kernel",
    "int8_prefilter_available",
    "last_cpu_search_stats",
    "last_saq_stats",
    "last_search_stats",
    "nearest",
    "pack_semantic_bf16",
    "resolve_backend",
    "saq",
    "semantic_loss",
    "semantic_loss_from_sets",
    "topk",
]
