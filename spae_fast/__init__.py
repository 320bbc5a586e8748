"""spae_fast: fast SPAE (Semantic Pyramid AutoEncoder) building blocks.

Fused nearest-word search of encoder vectors against a frozen LLM's token-embedding table, without the
N x V distance matrix. Public API:

    spae_fast.nearest(x, codebook, *, metric=None, backend="auto", check_finite=True) -> (dist, index)
    spae_fast.topk(x, codebook, k, *, metric=None, backend="auto", check_finite=True) -> (dist, index)
    spae_fast.Codebook(weight, metric="l2")   # frozen table, packed once for the kernels
    spae_fast.available()                      # which backends can run here, and why not
    spae_fast.nearest(..., backend="cuda" | "triton", precision="exact")   # GPU; exact: fp64-certified argmin
    spae_fast.last_search_stats()              # rows rescored by the last exact-mode GPU call
    spae_fast.saq(z, codebook, layers, *, mode="saq", backend="auto") -> ids   # fused pyramid quantization
    spae_fast.VocabCodebook.from_pretrained("smollm2" | path | repo id, token_filter="words")
    spae_fast.SPAEQuantizer(codebook, layers=(1, 2, 4, 8, 16, 16), grid=16, mode="saq")   # nn.Module
    spae_fast.semantic_loss(z, codebook, candidate_index, candidate_offsets, set_of_position, *, tau=1.0,
                            reduction="mean")   # fused CLIP-guided semantic loss (candidate sets: spae_fast.semantic)
    spae_fast.VectorQuantize / ResidualVQ / StreamingAverageVQ   # vector-quantize-pytorch-compatible layers (spae_fast.nn)
    spae_fast.SPAE(SPAEConfig(...), codebook)    # the autoencoder: encode(images) -> ids, decode(ids, num_layers)
    spae_fast.FrozenLM.from_pretrained("smollm2" | path)   # a frozen causal LM for in-context prompting
    spae_fast.ImageVocabulary(spae.quantizer, lm)           # image words as LLM ids (own vocabulary) or text
    spae_fast.llm.evaluate_fewshot / denoise / image_to_image         # few-shot classification, generation
"""

from .codebook import Codebook
from .llm import FrozenLM, ImageVocabulary
from .model import SPAE, SPAEConfig
from .nn import ResidualVQ, StreamingAverageVQ, VectorQuantize
from .ops import (
    BackendStatus,
    SearchStats,
    available,
    last_search_stats,
    nearest,
    saq,
    semantic_loss,
    semantic_loss_from_sets,
    topk,
)
from .pyramid import TokenPyramid
from .quantizer import SPAEQuantizer, SPAEQuantizerOutput
from .vocab import VocabCodebook

__version__ = "0.1.0"

__all__ = [
    "SPAE",
    "BackendStatus",
    "Codebook",
    "FrozenLM",
    "ImageVocabulary",
    "ResidualVQ",
    "SPAEConfig",
    "SPAEQuantizer",
    "SPAEQuantizerOutput",
    "SearchStats",
    "StreamingAverageVQ",
    "TokenPyramid",
    "VectorQuantize",
    "VocabCodebook",
    "__version__",
    "available",
    "last_search_stats",
    "nearest",
    "saq",
    "semantic_loss",
    "semantic_loss_from_sets",
    "topk",
]
