"""The EMA update of spae_fast.nn's EuclideanCodebook against vector-quantize-pytorch's arithmetic written out
densely (one-hot sums over all V codes, ``lerp_``, division by the smoothed counts, F.normalize): bitwise equal,
although only the hit codes get a sum row and the table is updated in place."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from spae_fast.nn.codebook import EuclideanCodebook


def dense_reference(book: EuclideanCodebook, flat: torch.Tensor, index: torch.Tensor):
    """(cluster_size, embed_avg, embed) after one step, as vector-quantize-pytorch 1.32 computes them."""
    num_codes = book.codebook_size
    onehot = F.one_hot(index, num_codes).float()  # [N, V]
    counts = onehot.sum(0)
    sums = torch.zeros(num_codes, flat.shape[1]).index_add_(
        0, index, flat
    )  # = onehot.t() @ flat, summed in order
    cluster_size = book.cluster_size.clone()
    embed_avg = book.embed_avg.clone()
    cluster_size[0].lerp_(counts, 1.0 - book.decay)
    embed_avg[0].lerp_(sums, 1.0 - book.decay)
    total = cluster_size.sum(-1, keepdim=True)
    smoothed = (cluster_size + book.eps) / (total + num_codes * book.eps) * total
    embed = embed_avg / smoothed[..., None]
    if book.use_cosine_sim:
        embed = F.normalize(embed, p=2, dim=-1, eps=1e-6)
    return cluster_size, embed_avg, embed


@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize(
    ("num_codes", "dim", "rows", "decay"), [(37, 5, 60, 0.8), (300, 33, 41, 0.99), (16, 64, 200, 0.5)]
)
def test_update_is_bitwise_the_dense_ema(num_codes, dim, rows, decay, cosine):
    torch.manual_seed(0)
    book = EuclideanCodebook(dim, num_codes, decay=decay, use_cosine_sim=cosine)
    storage = book.embed.data_ptr()
    for step in range(3):
        flat = book.transform_input(torch.randn(rows, dim) * (1 + step))
        index = torch.randint(0, num_codes // 2 + 1, (rows,))  # repeated codes, and codes nobody hits
        expected = dense_reference(book, flat, index)
        book.update(flat, index)
        assert torch.equal(book.cluster_size, expected[0])
        assert torch.equal(book.embed_avg, expected[1])
        assert torch.equal(book.embed, expected[2])
    assert book.embed.data_ptr() == storage  # written in place: no new [V, D] table per step


def test_empty_batch_only_decays():
    torch.manual_seed(0)
    book = EuclideanCodebook(8, 20)
    flat, index = torch.zeros(0, 8), torch.zeros(0, dtype=torch.int64)
    expected = dense_reference(book, flat, index)
    book.update(flat, index)
    assert torch.equal(book.embed_avg, expected[1]) and torch.equal(book.embed, expected[2])


def test_search_sees_the_updated_table():
    torch.manual_seed(0)
    book = EuclideanCodebook(16, 64)
    flat = torch.randn(100, 16)
    index = book.nearest(flat)
    book.update(flat, index)
    assert torch.equal(book.nearest(flat), torch.cdist(flat, book.embed[0]).argmin(-1))
    assert book.search_codebook().weight.data_ptr() == book.embed.data_ptr()  # no copy of the table
