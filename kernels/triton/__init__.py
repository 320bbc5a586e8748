"""Triton kernels of spae_fast, installed as ``spae_fast.triton_kernels`` (source: ``kernels/triton/``).

One op per file, the math in each module's docstring:

    search.py   fused nearest / top-k (tiled ``tl.dot`` over D, running top-k in the epilogue, persistent
                grid, grouped rasterisation, split-V with a deterministic packed 64-bit atomic-min merge)
                and ``pair_dot64``, the fp64 rescoring of chosen (query, row) pairs used by exact mode.
    saq.py      streaming average / residual quantization, one launch per layer with the target update
                fused into the search prologue.

Importing this package does not import Triton; the modules do. Set ``TRITON_INTERPRET=1`` before the
first import of Triton to run the kernels on CPU tensors (slow; for tests on machines without a GPU).
"""

__all__ = ["saq", "search"]
