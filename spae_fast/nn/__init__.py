"""Drop-in quantizer layers with vector-quantize-pytorch's contract on the fused native search.

    from spae_fast.nn import VectorQuantize, ResidualVQ, StreamingAverageVQ

`VectorQuantize` (vq.py), `ResidualVQ` (residual.py), `StreamingAverageVQ` (SPAE's streaming average
quantization on sequences, saq.py) and the EMA codebook they share (codebook.py).
"""

from .codebook import EuclideanCodebook
from .residual import ResidualVQ
from .saq import StreamingAverageVQ
from .vq import LossBreakdown, VectorQuantize

__all__ = ["EuclideanCodebook", "LossBreakdown", "ResidualVQ", "StreamingAverageVQ", "VectorQuantize"]
