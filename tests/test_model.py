"""`spae_fast.SPAE`: shapes, encode / decode of every prefix, words round trip, SAQ layer targets, checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

import spae_fast
from spae_fast.model import SPAE, SPAEConfig
from spae_fast.vocab import VocabCodebook

TINY = {"image_size": 16, "base_channels": 8, "channel_multipliers": (1, 2), "num_res_blocks": 1, "layers": (1, 2, 4, 8)}


def make_vocab(rows: int = 64, dim: int = 12, seed: int = 0) -> VocabCodebook:
    generator = torch.Generator().manual_seed(seed)
    tokens = [f"Ġw{chr(97 + i % 26)}{chr(97 + i // 26)}" for i in range(rows)]
    return VocabCodebook(torch.randn(rows, dim, generator=generator), tokens, token_filter=None)


@pytest.fixture(scope="module")
def vocab() -> VocabCodebook:
    return make_vocab()


@pytest.fixture()
def model(vocab) -> SPAE:
    torch.manual_seed(0)
    return SPAE(SPAEConfig(**TINY), vocab).eval()


def images(batch: int = 3, size: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_forward_shapes_and_gradients(model):
    x = images()
    out = model(x)
    assert out.reconstruction.shape == x.shape
    assert out.latent.shape == (3, 12, 8, 8)
    assert [tuple(ids.shape) for ids in out.quantizer.ids] == [(3, s, s) for s in (1, 2, 4, 8)]
    loss = ((out.reconstruction - x) ** 2).mean() + out.quantizer.loss
    loss.backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0  # straight-through reaches the encoder
    assert model.decoder.conv_out.weight.grad.abs().sum() > 0


def test_default_config_downsamples_8x(vocab):
    config = SPAEConfig(base_channels=8, num_res_blocks=0, layers=(1, 2, 4, 8, 16, 16))
    assert config.downsample_factor == 8 and config.grid == 16
    latent = SPAE(config, vocab).encoder(images(1, 128))
    assert latent.shape == (1, 12, 16, 16)


def test_encode_decode_every_prefix(model):
    x = images()
    ids = model.encode(x)
    assert ids.shape == (3, 1 + 4 + 16 + 64) and ids.dtype == torch.int64
    assert torch.equal(model.encode(x, num_layers=2), ids[:, :5])
    full = model(x).quantizer.ids
    assert torch.equal(model.quantizer.flatten_ids(full), ids)
    for layers in range(1, 5):
        decoded = model.decode(ids, num_layers=layers)
        assert decoded.shape == x.shape
        expected = model.decoder(model.quantizer.decode(ids, layers))
        torch.testing.assert_close(decoded, expected)
    torch.testing.assert_close(model.decode(ids), model(x).reconstruction, atol=1e-5, rtol=1e-5)


def test_words_round_trip(model):
    x = images()
    words = model.to_words(x, num_layers=2)
    assert len(words) == 3 and all(len(w) == 5 for w in words)
    assert torch.equal(model.quantizer.flatten_ids(model.quantizer.from_words(words)), model.encode(x, 2))
    torch.testing.assert_close(model.from_words(words), model.decode(model.encode(x, 2)))
    assert all(isinstance(text, str) for text in model.to_text(x, 2, layer_separator=" | "))


@pytest.mark.parametrize("mode", ["saq", "rq"])
def test_prefix_latents_decode_each_image_from_its_own_prefix(vocab, mode):
    """prefix_latents(ids, l) at image b = the running mean (SAQ) / sum (RQ) of its first l_b layers' covering
    embeddings, against fp64 and against `decode` of that prefix alone."""
    quantizer = spae_fast.SPAEQuantizer(vocab, layers=(1, 2, 4), grid=4, mode=mode)
    ids = quantizer.quantize(torch.randn(5, 12, 4, 4, generator=torch.Generator().manual_seed(2)))
    lengths = torch.tensor([1, 3, 2, 2, 1])
    latents = quantizer.prefix_latents(ids, lengths)
    assert latents.shape == (5, 12, 4, 4) and latents.dtype == torch.float32
    e = vocab.weight.double()
    for b, length in enumerate(lengths.tolist()):
        torch.testing.assert_close(latents[b : b + 1], quantizer.decode(ids[b : b + 1], length), atol=1e-6, rtol=1e-6)
        covering = torch.zeros(12, 4, 4, dtype=torch.float64)
        for layer, side in enumerate((1, 2, 4)[:length]):
            rows = quantizer.split_ids(ids[b : b + 1])[layer][0]  # [side, side]
            stride = 4 // side
            covering += e[rows].permute(2, 0, 1).repeat_interleave(stride, 1).repeat_interleave(stride, 2)
        expected = covering / length if mode == "saq" else covering
        torch.testing.assert_close(latents[b].double(), expected, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match=r"num_layers must be in 1 \.\. 3"):
        quantizer.prefix_latents(ids, torch.tensor([1, 4, 2, 2, 1]))
    with pytest.raises(ValueError, match=r"num_layers must be in 1 \.\. 2"):  # ids of two layers only
        quantizer.prefix_latents(ids[:, :5], torch.tensor([1, 3, 2, 2, 1]))
    with pytest.raises(TypeError, match=r"num_layers must be an integer tensor \[B\] = \[5\]"):
        quantizer.prefix_latents(ids, torch.tensor([1.0, 2, 2, 2, 1]))
    with pytest.raises(TypeError, match="num_layers must be an integer tensor"):
        quantizer.prefix_latents(ids, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"ids must be codebook rows in \[0, 64\)"):  # as `decode` says
        quantizer.prefix_latents(ids + 64, lengths)


def test_forward_decodes_the_prefixes_in_the_same_call(model):
    """forward(images, prefix_layers): the full reconstruction as without it, plus each image decoded from its
    own prefix; the prefix's pixel loss trains the decoder only (the prefix latent is detached)."""
    x = images(4)
    lengths = torch.tensor([1, 2, 3, 4])
    out = model(x, lengths)
    torch.testing.assert_close(out.reconstruction, model(x).reconstruction, atol=1e-5, rtol=1e-5)
    assert model(x).prefix_reconstruction is None
    ids = model.encode(x)
    for b, length in enumerate(lengths.tolist()):
        torch.testing.assert_close(out.prefix_reconstruction[b : b + 1], model.decode(ids[b : b + 1], length),
                                   atol=1e-5, rtol=1e-5)  # fmt: skip
    torch.testing.assert_close(out.prefix_reconstruction[3], out.reconstruction[3], atol=1e-5, rtol=1e-5)
    ((out.prefix_reconstruction - x) ** 2).mean().backward()
    assert model.decoder.conv_out.weight.grad.abs().sum() > 0
    encoder_grad = model.encoder.conv_in.weight.grad  # zeros: the shared decoder call's other half has no loss
    assert encoder_grad is None or not encoder_grad.any()


@pytest.mark.parametrize("mode", ["saq", "rq"])
def test_layer_targets_are_the_saq_targets(vocab, mode):
    """z_l(p) = c_l z(p) - sum_{m<l} e(k_m(Up_m(p))) against an fp64 computation, and the search of each target
    reproduces the op's ids (SPAE-METHOD.md §3)."""
    quantizer = spae_fast.SPAEQuantizer(vocab, layers=(1, 2, 4), grid=4, mode=mode)
    z = torch.randn(2, 12, 4, 4, requires_grad=True)
    ids = quantizer.quantize(z.detach())
    targets = quantizer.layer_targets(z, ids, 3)
    assert targets.shape == (2, 21, 12)
    e = vocab.weight.double()
    per_layer = quantizer.split_ids(ids)
    covering_sum = torch.zeros(2, 12, 4, 4, dtype=torch.float64)
    expected = []
    for layer, side in enumerate((1, 2, 4)):
        stride = 4 // side
        pos = torch.arange(side) * stride + (stride - (stride + 1) // 2)
        coefficient = layer + 1.0 if mode == "saq" else 1.0
        target = coefficient * z.detach().double()[:, :, pos][:, :, :, pos] - covering_sum[:, :, pos][:, :, :, pos]
        expected.append(target.permute(0, 2, 3, 1).reshape(2, side * side, 12))
        chosen = e[per_layer[layer]].permute(0, 3, 1, 2)
        covering_sum = covering_sum + chosen.repeat_interleave(stride, 2).repeat_interleave(stride, 3)
    torch.testing.assert_close(targets.double(), torch.cat(expected, 1), atol=1e-5, rtol=1e-5)
    _, nearest = spae_fast.nearest(targets.detach(), vocab.codebook)
    assert torch.equal(nearest, ids)
    targets.sum().backward()  # gradient reaches z through c_l z(p) only
    # cell (2, 2) is sampled by layer 1 (side 1) and layer 3 (side 4), not by layer 2 (rows / cols 1, 3)
    assert z.grad[0, 0, 2, 2].item() == pytest.approx(1.0 + 3.0 if mode == "saq" else 2.0)
    assert z.grad[0, 0, 1, 1].item() == pytest.approx(2.0 + 3.0 if mode == "saq" else 2.0)


def test_save_load_round_trip(model, vocab, tmp_path):
    model.save_pretrained(tmp_path / "m")
    record = json.loads((tmp_path / "m" / "config.json").read_text())
    assert record["config"]["codebook_rows"] == 64 and len(record["weights_sha256"]) == 64
    loaded = SPAE.from_pretrained(tmp_path / "m", codebook=vocab).eval()
    assert loaded.config == model.config
    x = images()
    assert torch.equal(loaded.encode(x), model.encode(x))
    torch.testing.assert_close(loaded(x).reconstruction, model(x).reconstruction, rtol=0, atol=0)


def test_tampered_checkpoint_is_refused(model, vocab, tmp_path):
    folder = model.save_pretrained(tmp_path / "m")
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        SPAE.from_pretrained(folder, codebook=vocab)


def test_mismatched_architecture_is_refused(model, vocab, tmp_path):
    folder = model.save_pretrained(tmp_path / "m")
    record = json.loads((folder / "config.json").read_text())
    record["config"]["base_channels"] = 16
    (folder / "config.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="config.json was edited"):  # the verified config is in the weights
        SPAE.from_pretrained(folder, codebook=vocab)


def test_other_codebook_is_refused(model, tmp_path):
    folder = model.save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="fingerprint"):
        SPAE.from_pretrained(folder, codebook=make_vocab(seed=5))


def test_missing_or_broken_checkpoint(tmp_path, vocab):
    with pytest.raises(FileNotFoundError, match="config.json"):
        SPAE.from_pretrained(tmp_path, codebook=vocab)
    (tmp_path / "config.json").write_text("{not json")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="model.safetensors: a safetensors file starts with an 8-byte header"):
        SPAE.from_pretrained(tmp_path, codebook=vocab)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "model.safetensors"))  # no embedded config: format 1
    with pytest.raises(ValueError, match=r"config.json: the SPAE config is not valid JSON \(.* line 1, column 2\)"):
        SPAE.from_pretrained(tmp_path, codebook=vocab)
    (tmp_path / "config.json").write_text(json.dumps({"spae_fast_format": 1, "config": {"bogus": 1}}))
    with pytest.raises(ValueError, match="unknown SPAEConfig fields"):
        SPAE.from_pretrained(tmp_path, codebook=vocab)


def test_bad_configs_and_images(model, vocab):
    with pytest.raises(ValueError, match="not divisible by the encoder's downsampling factor"):
        SPAEConfig(image_size=30, channel_multipliers=(1, 2, 2))
    with pytest.raises(ValueError, match="not divisible"):  # pyramid side 3 does not divide the 8x8 grid
        SPAE(SPAEConfig(**{**TINY, "layers": (1, 3)}), vocab)
    with pytest.raises(ValueError, match=r"images must have shape \[B, 3, 16, 16\]"):
        model(torch.zeros(1, 3, 8, 8))
    with pytest.raises(TypeError, match="images must be a floating tensor"):
        model.encode(torch.zeros(1, 3, 16, 16, dtype=torch.int64))
    with pytest.raises(TypeError, match="VocabCodebook"):
        SPAE(SPAEConfig(**TINY), torch.randn(4, 12))
