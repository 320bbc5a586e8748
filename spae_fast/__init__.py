"""spae_fast: fast SPAE (Semantic Pyramid AutoEncoder) building blocks.

Fused nearest-word search of encoder vectors against a frozen LLM's token-embedding table, without the
N x V distance matrix. Public API:

    spae_fast.nearest(x, codebook, *, metric=None, backend="auto", check_finite=True) -> (dist, index)
    spae_fast.topk(x, codebook, k, *, metric=None, backend="auto", check_finite=True) -> (dist, index)
    spae_fast.Codebook(weight, metric="l2")   # frozen table, packed once for the kernels
    spae_fast.available()                      # which backends can run here, and why not
"""

from .codebook import Codebook
from .ops import BackendStatus, available, nearest, saq, topk
from .pyramid import TokenPyramid

__version__ = "0.1.0"

__all__ = ["BackendStatus", "Codebook", "TokenPyramid", "available", "nearest", "saq", "topk", "__version__"]
