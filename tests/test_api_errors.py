"""Bad arguments to the Python API outside the ops are refused with an error that names the argument: layer
sides, numbers that must be finite (no NaN / inf), flags that must be bools, ints that must not be floats or
bools; and an empty batch works through the quantizer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import spae_fast
from spae_fast import SPAEQuantizer, TokenPyramid
from spae_fast.imaging import load_image, make_grid, save_image
from spae_fast.losses import (
    LeCAMRegularizer,
    PatchDiscriminator,
    PerceptualLoss,
    adaptive_gan_weight,
    dynamic_semantic_weight,
    psnr,
)
from spae_fast.semantic import candidates_from_relevance, pyramid_set_of_position

LAYERS_MESSAGE = "layers must be a non-empty sequence of positive ints"


def quantizer(**kwargs) -> SPAEQuantizer:
    weight = torch.randn(40, 6, generator=torch.Generator().manual_seed(0))
    return SPAEQuantizer(weight, **{"layers": (1, 2, 4), "grid": 4, **kwargs})


# ---- layers: TokenPyramid, used by SPAEQuantizer and spae_fast.saq --------------------------------------------


@pytest.mark.parametrize(
    ("layers", "error", "match"),
    [
        (4, TypeError, r"got 4 \(an int\)"),
        ("124", TypeError, "got '124'"),
        ([1.9, 2.5], TypeError, r"layers\[0\] = 1.9 is a float"),
        ([1, 2.0], TypeError, r"layers\[1\] = 2.0 is a float"),
        ([True, True], TypeError, r"layers\[0\] = True is a bool"),
        ({1, 2}, TypeError, "a set"),
        (None, TypeError, "NoneType"),
        ([], ValueError, "got an empty list"),
        ([0, 2], ValueError, "is not positive"),
        ([-1], ValueError, "is not positive"),
    ],
)
def test_bad_layers_everywhere(layers, error, match):
    for build in (
        lambda: TokenPyramid(layers, 4),
        lambda: quantizer(layers=layers),
        lambda: spae_fast.saq(torch.randn(2, 6, 4, 4), torch.randn(40, 6), layers),
    ):
        with pytest.raises(error, match=match) as info:
            build()
        assert LAYERS_MESSAGE in str(info.value)


@pytest.mark.parametrize("layers", [(1, 2, 4), [1, 2, 4], range(1, 3), np.array([1, 2, 4]), torch.tensor([1, 4]),
                                    [np.int64(1), np.int64(2)]])  # fmt: skip
def test_integer_sequences_are_layers(layers):
    pyramid = TokenPyramid(layers, 4)
    assert pyramid.sides == tuple(int(side) for side in layers)
    assert all(type(side) is int for side in pyramid.sides)


# ---- SPAEQuantizer ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"beta": math.inf}, ValueError, "beta must be a finite number >= 0, got inf"),
        ({"beta": math.nan}, ValueError, "beta must be a finite number >= 0, got nan"),
        ({"beta": -0.5}, ValueError, "beta must be a finite number >= 0"),
        ({"beta": True}, TypeError, "beta must be a finite number >= 0, got bool"),
        ({"beta": "0.25"}, TypeError, "beta"),
        ({"check_finite": None}, TypeError, "check_finite must be a bool, got NoneType"),
        ({"check_finite": 1}, TypeError, "check_finite must be a bool, got int"),
    ],
)
def test_bad_quantizer_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        quantizer(**kwargs)


@pytest.mark.parametrize("mode", ["saq", "rq"])
def test_empty_batch_works(mode):
    q = quantizer(mode=mode)
    z = torch.randn(0, 6, 4, 4, requires_grad=True)
    out = q(z)
    assert out.quantized.shape == (0, 6, 4, 4)
    assert [tuple(ids.shape) for ids in out.ids] == [(0, 1, 1), (0, 2, 2), (0, 4, 4)]
    assert float(out.loss) == 0.0 and out.layer_errors.tolist() == [0.0, 0.0, 0.0]
    out.loss.backward()
    assert z.grad is not None and z.grad.shape == z.shape
    assert q.quantize(z).shape == (0, 21)
    assert q.decode(out.ids).shape == (0, 6, 4, 4)
    assert q.decode(torch.zeros(0, 5, dtype=torch.int64)).shape == (0, 6, 4, 4)  # two layers of none
    assert q.prefix_latents(out.ids, torch.zeros(0, dtype=torch.int64)).shape == (0, 6, 4, 4)
    assert q.layer_targets(z, out.ids, 2).shape == (0, 5, 6)


def test_bad_ids():
    q = quantizer()
    ids = q.quantize(torch.randn(2, 6, 4, 4))
    for dtype in (torch.bool, torch.float32):
        with pytest.raises(TypeError, match=f"ids must be integer codebook rows, got {dtype}"):
            q.decode(ids.to(dtype))
    layers = q.split_ids(ids)
    with pytest.raises(TypeError, match=r"got torch.bool \(layer 2\)"):  # not promoted to 0 / 1 by torch.cat
        q.decode([layers[0], layers[1].bool(), layers[2]])
    with pytest.raises(TypeError, match="ids of layer 2 must be a tensor"):
        q.decode([layers[0], layers[1].tolist(), layers[2]])
    with pytest.raises(TypeError, match="got str"):
        q.decode("ids")
    with pytest.raises(ValueError, match="ids of layer 2 hold 1 images, layer 1 holds 2"):
        q.decode([layers[0], layers[1][:1], layers[2]])
    assert torch.equal(q.decode(layers), q.decode(ids))  # the good forms still agree


# ---- losses -------------------------------------------------------------------------------------------------


def test_loss_numbers_must_be_finite_and_not_bools():
    x = torch.zeros(2, 3, 8, 8)
    app, sem = torch.tensor(1.0), torch.tensor(2.0)
    weight = torch.randn(3, requires_grad=True)
    cases = [
        (lambda: psnr(x, x, data_range=math.inf), "data_range must be a finite number > 0, got inf"),
        (lambda: psnr(x, x, data_range=True), "data_range must be a finite number > 0, got True"),
        (lambda: dynamic_semantic_weight(app, sem, alpha0=math.inf), "alpha0 must be a finite number >= 0"),
        (lambda: dynamic_semantic_weight(app, sem, alpha0=True), "alpha0 must be a finite number >= 0, got True"),
        (lambda: dynamic_semantic_weight(app, sem, alpha0=1.0, eps=math.nan), "eps must be a finite number > 0"),
        (lambda: adaptive_gan_weight((weight**2).sum(), weight.sum(), weight, max_weight=math.inf), "max_weight"),
        (lambda: LeCAMRegularizer(decay=True), "decay must be a finite number >= 0, got True"),
        (lambda: LeCAMRegularizer(decay=math.nan), "decay"),
        (lambda: PatchDiscriminator(num_layers=True), "num_layers must be a positive int, got True"),
        (lambda: PerceptualLoss(eps=math.nan), "eps must be a finite number > 0, got nan"),
        (lambda: PerceptualLoss(torch.nn.Sequential(torch.nn.ReLU()), layers=[0.5]), "layers must be int indices"),
        (lambda: PerceptualLoss(torch.nn.Sequential(torch.nn.ReLU()), layers=[0], weights=[math.nan]),
         r"weights\[0\] must be a finite number >= 0, got nan"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()
    # the good values still work
    assert float(dynamic_semantic_weight(app, sem, alpha0=2, mode="constant")) == 2.0
    assert torch.isinf(psnr(x, x)).all()


# ---- semantic candidate sets --------------------------------------------------------------------------------


def test_candidate_thresholds_and_sides():
    relevance = torch.rand(2, 10)
    with pytest.raises(ValueError, match=r"thresholds\[1\] must be a number in \[0, 1\].*got nan"):
        candidates_from_relevance(relevance, (0.9, math.nan))
    with pytest.raises(ValueError, match=r"thresholds\[0\] must be a number in \[0, 1\].*got 1.5"):
        candidates_from_relevance(relevance, (1.5,))
    with pytest.raises(ValueError, match=r"thresholds\[0\] must be a finite number, got inf"):
        candidates_from_relevance(relevance, (math.inf,), normalize=False)
    with pytest.raises(TypeError, match="normalize must be a bool, got NoneType"):
        candidates_from_relevance(relevance, (0.9,), normalize=None)
    with pytest.raises(TypeError, match="thresholds must be a sequence"):
        candidates_from_relevance(relevance, 0.9)
    assert candidates_from_relevance(relevance, (1.5,), normalize=False)[1].shape == (3,)  # raw scores: any rho
    with pytest.raises(TypeError, match=r"sides\[0\] = 2.5 is a float"):
        pyramid_set_of_position(2, [2.5])
    with pytest.raises(TypeError, match=r"sides\[0\] = True is a bool"):
        pyramid_set_of_position(2, [True])
    with pytest.raises(ValueError, match="batch must be an int >= 0, got 1.5"):
        pyramid_set_of_position(1.5, [1, 2])
    assert pyramid_set_of_position(0, [1, 2]).shape == (0, 5)


# ---- data and images ----------------------------------------------------------------------------------------


def test_dataset_ints_are_not_truncated():
    pytest.importorskip("sklearn")
    from spae_fast.data import DigitsDataset, infinite_loader

    with pytest.raises(ValueError, match=r"classes must be a non-empty subset of 0..9 \(ints\), got \[1.5\]"):
        DigitsDataset(8, classes=[1.5])
    with pytest.raises(ValueError, match="classes"):
        DigitsDataset(8, classes=[True, 3])
    with pytest.raises(ValueError, match="seed must be an int, got 1.5"):
        DigitsDataset(8, seed=1.5)
    with pytest.raises(ValueError, match="test_fraction"):
        DigitsDataset(8, test_fraction=math.nan)
    assert set(DigitsDataset(8, split="test", classes=np.array([3, 7])).labels.tolist()) == {3, 7}
    with pytest.raises(ValueError, match="seed must be an int, got 0.5"):
        infinite_loader([(torch.zeros(3, 2, 2), 0)], batch_size=1, seed=0.5)


def test_image_errors_name_the_file(tmp_path):
    save_image(tmp_path / "good.png", torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    (tmp_path / "text.png").write_text("not an image")
    png = (tmp_path / "good.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(png[: len(png) // 2])
    for name in ("text.png", "truncated.png"):
        with pytest.raises(ValueError, match=f"{name}' is not a readable image"):
            load_image(tmp_path / name, 8)
    with pytest.raises(IsADirectoryError, match="is a folder, not an image file"):
        load_image(tmp_path, 8)
    with pytest.raises(ValueError, match="size must be a positive int, got True"):
        load_image(tmp_path / "good.png", True)
    with pytest.raises(ValueError, match="nrow must be a positive int, got True"):
        make_grid(torch.zeros(2, 3, 4, 4), nrow=True)
    with pytest.raises(ValueError, match="pad_value must be a finite number"):
        make_grid(torch.zeros(2, 3, 4, 4), pad_value=math.nan)
    assert load_image(tmp_path / "good.png", 8).shape == (3, 8, 8)


# ---- relevance providers ------------------------------------------------------------------------------------


def test_relevance_options():
    pytest.importorskip("transformers")
    from spae_fast.relevance import CLIPRelevance, LabelTextRelevance
    from spae_fast.vocab import VocabCodebook

    vocab = VocabCodebook(torch.randn(4, 3), ["Ġcat", "Ġdog", "Ġsun", "Ġsea"], token_filter=None)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 2.5"):
        LabelTextRelevance(vocab, ["a", "b"], batch_size=2.5)
    with pytest.raises(TypeError, match="cache must be a bool, got NoneType"):
        LabelTextRelevance(vocab, ["a", "b"], cache=None)
    with pytest.raises(ValueError, match="margin must be a finite number >= 0, got True"):
        LabelTextRelevance(vocab, ["a", "b"], margin=True)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got True"):
        CLIPRelevance(vocab, "/nowhere/clip", batch_size=True)
    with pytest.raises(FileNotFoundError, match="CLIP model folder not found: /nowhere/clip"):
        CLIPRelevance(vocab, "/nowhere/clip")  # not sent to the Hub as a repo id


@pytest.mark.parametrize(("field", "value"), [("mode", "vq"), ("metric", "ip")])
def test_config_refuses_an_unknown_mode_or_metric_before_loading_anything(field, value):
    from spae_fast.model import SPAEConfig

    with pytest.raises(ValueError, match=rf"SPAEConfig.{field} must be one of .*got '{value}'"):
        SPAEConfig(**{field: value})


@pytest.mark.parametrize("path", ["/no/such/model", "./missing-llm", "a/b/c"])
def test_llm_path_that_does_not_exist_is_a_file_not_found(path):
    from spae_fast.llm.loading import load_causal_lm

    with pytest.raises(FileNotFoundError, match=f"LLM path not found: {path}"):
        load_causal_lm(path)


def test_vocab_codebook_keeps_one_copy_of_its_table():
    from spae_fast.vocab import VocabCodebook

    weight = torch.randn(30, 6, generator=torch.Generator().manual_seed(0))
    vocab = VocabCodebook(weight, [f"t{i}" for i in range(30)], token_filter=None)
    assert vocab.weight.data_ptr() == vocab.codebook.weight.data_ptr() != weight.data_ptr()
    weight.data[3] = 100.0  # the caller's table: the vocabulary keeps its own
    assert float(vocab.weight[3].abs().max()) < 100.0
