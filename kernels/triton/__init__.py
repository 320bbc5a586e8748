"""Triton kernels of spae_fast, installed as ``spae_fast.triton_kernels`` (source: ``kernels/triton/``):
``kernels/triton/<name>.py`` is ``spae_fast.triton_kernels.<name>``.

One op per file, the math in each module's docstring:

    nearest.py        fused nearest / top-k (tiled ``tl.dot`` over D, running top-k in the epilogue,
                      persistent grid, grouped rasterisation, split-V with a deterministic packed 64-bit
                      atomic-min merge) and ``pair_dot64``, the fp64 rescoring of chosen (query, row) pairs
                      used by exact mode.
    saq.py            streaming average / residual quantization: one launch of the fused search per layer
                      with the target update fused into its prologue (``layer_args``); ``nearest.pair_dot64``
                      rescores its (target, row) pairs.
    semantic_loss.py  the softmax statistics of the fused semantic loss (online logsumexp over vocabulary
                      tiles) and the candidate-set means.
    compile_check.py  ahead-of-time compilation of the nearest / SAQ kernel variants for sm_80 / sm_90, no GPU.

Importing this package does not import Triton; the modules do. Set ``TRITON_INTERPRET=1`` before the
first import of Triton to run the kernels on CPU tensors (slow; for tests on machines without a GPU).
"""

__all__ = ["nearest", "saq", "semantic_loss"]
