"""spae_fast.nn: options that vector-quantize-pytorch has and spae_fast.nn does not raise naming them; stochastic
sampling (exact: bitwise vqp's draws; top-k: the restricted distribution); ties; frozen LLM vocabularies."""

from __future__ import annotations

import pytest
import torch

import spae_fast
from spae_fast.nn import ResidualVQ, StreamingAverageVQ, VectorQuantize


@pytest.mark.parametrize("option, value", [("heads", 2), ("separate_codebook_per_head", True),
                                           ("orthogonal_reg_weight", 0.1), ("learnable_codebook", True),
                                           ("affine_param", True), ("directional_reparam", True),
                                           ("commitment_use_cross_entropy_loss", True), ("accept_3d_fmap", True),
                                           ("codebook_diversity_loss_weight", 1.0), ("sync_update_v", 0.5)])  # fmt: skip
def test_unsupported_options_are_named(option, value):
    with pytest.raises(NotImplementedError, match=f"{option}={value!r}"):
        VectorQuantize(dim=8, codebook_size=16, **{option: value})
    VectorQuantize(dim=8, codebook_size=16, **{option: _off(option)})  # the "off" value is accepted


def _off(option):
    from spae_fast.nn.vq import UNSUPPORTED

    return UNSUPPORTED[option]


def test_unknown_arguments_and_bad_values():
    with pytest.raises(TypeError, match="unexpected argument.*comitment_weight"):
        VectorQuantize(dim=8, codebook_size=16, comitment_weight=0.5)
    with pytest.raises(ValueError, match="codebook_size must be a positive int"):
        VectorQuantize(dim=8, codebook_size=0)
    with pytest.raises(ValueError, match="straight_through=True and rotation_trick=True"):
        VectorQuantize(dim=8, codebook_size=16, straight_through=True)
    with pytest.raises(NotImplementedError, match="beam_size"):
        ResidualVQ(dim=8, num_quantizers=2, codebook_size=16, beam_size=4)
    with pytest.raises(NotImplementedError, match="use_cosine_sim"):
        StreamingAverageVQ(dim=8, num_quantizers=2, codebook_size=16, use_cosine_sim=True)
    vq = VectorQuantize(dim=8, codebook_size=16)
    with pytest.raises(NotImplementedError, match="topk"):
        vq(torch.randn(2, 3, 8), topk=2)
    with pytest.raises(ValueError, match="8 features per vector"):
        vq(torch.randn(2, 3, 7))
    with pytest.raises(ValueError, match=r"mask must be a bool tensor \[B, N\]"):
        vq(torch.randn(2, 3, 8), mask=torch.ones(2, 4, dtype=torch.bool))


def test_exact_sampling_draws_what_vqp_draws():
    vqp = pytest.importorskip("vector_quantize_pytorch")
    table = torch.randn(300, 16) * 0.3
    layers = []
    for cls in (vqp.VectorQuantize, VectorQuantize):
        torch.manual_seed(0)
        layer = cls(
            dim=16,
            codebook_size=300,
            stochastic_sample_codes=True,
            sample_codebook_temp=0.1,
            freeze_codebook=True,
        )
        layer.codebook = table
        layers.append(layer)
    x = torch.randn(3, 200, 16)
    torch.manual_seed(5)
    theirs = layers[0](x)[1]
    torch.manual_seed(5)
    ours = layers[1](x)[1]
    assert torch.equal(ours, theirs)
    assert bool((ours != torch.cdist(x, table).argmin(-1)).any())  # it did sample
    layers[1].eval()
    assert torch.equal(layers[1](x)[1], torch.cdist(x, table).argmin(-1))  # eval: argmin


def test_topk_sampling_follows_the_restricted_softmax():
    torch.manual_seed(0)
    table = torch.randn(20, 4)
    vq = VectorQuantize(dim=4, codebook_size=20, stochastic_sample_codes=True, sample_codebook_temp=0.5,
                        freeze_codebook=True, stochastic_sample_topk=5)  # fmt: skip
    vq.codebook = table
    query = torch.randn(4)
    draws = vq(query.expand(1, 40000, 4))[1].reshape(-1)
    dist = torch.cdist(query[None], table)[0]
    top = dist.argsort()[:5]
    probs = torch.zeros(20)
    probs[top] = torch.softmax(-dist[top] / 0.5, 0)
    freq = torch.bincount(draws, minlength=20).float() / draws.numel()
    assert float((freq - probs).abs().max()) < 0.01  # 40000 draws: standard error < 0.0025
    assert set(draws.unique().tolist()) <= set(top.tolist())


def test_exact_ties_go_to_the_lowest_index():
    vq = VectorQuantize(dim=3, codebook_size=6, freeze_codebook=True).eval()
    vq.codebook = torch.tensor([[0.0, 0, 0], [1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0], [-1, 0, 0]])
    x = torch.tensor([[[1.0, 0, 0], [0, 1, 0], [0.5, 0.5, 0], [-1, 0, 0]]])
    assert vq(x)[1].tolist() == [[1, 3, 0, 5]]  # [0.5, 0.5, 0] is 0.5 from rows 0..4: row 0


def test_bf16_input_and_dtype_preserved():
    vq = VectorQuantize(dim=16, codebook_size=32)
    x = torch.randn(2, 10, 16, dtype=torch.bfloat16, requires_grad=True)
    q, idx, loss = vq(x)
    assert q.dtype == torch.bfloat16 and idx.dtype == torch.int64
    (q.float().sum() + loss).backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16


@pytest.fixture(scope="module")
def smollm2():
    return spae_fast.VocabCodebook.from_pretrained("smollm2")


def test_from_pretrained_vocab(smollm2):
    vq = VectorQuantize.from_pretrained_vocab(vocab=smollm2).eval()
    assert vq.codebook.shape == (smollm2.num_rows, 576) and vq.freeze_codebook
    rows = torch.tensor([10, 2000, 47000])
    x = smollm2.weight[rows][None] + 1e-4  # the embeddings themselves, slightly moved
    _, idx, _ = vq(x)
    assert idx[0].tolist() == rows.tolist()
    assert torch.equal(vq.indices_to_llm_ids(idx)[0], smollm2.token_ids[rows])
    assert vq.indices_to_words(idx) == smollm2.text(rows)
    vq.train()
    before = vq.codebook.clone()
    vq(torch.randn(2, 5, 576))
    assert torch.equal(vq.codebook, before)  # frozen in training too
    with pytest.raises(ValueError, match="dim=256 but the vocabulary's embeddings have D = 576"):
        VectorQuantize.from_pretrained_vocab(vocab=smollm2, dim=256)
    projected = VectorQuantize.from_pretrained_vocab(vocab=smollm2, dim=256, project=True)
    q, idx, _ = projected(torch.randn(2, 7, 256, requires_grad=True))
    assert q.shape == (2, 7, 256) and int(idx.max()) < smollm2.num_rows
    saq = StreamingAverageVQ.from_pretrained_vocab(vocab=smollm2, num_quantizers=3).eval()
    _, ids, _ = saq(smollm2.weight[rows][None])
    assert ids.shape == (1, 3, 3) and ids[0, :, 0].tolist() == rows.tolist()
    assert len(saq.indices_to_words(ids)) == 9
