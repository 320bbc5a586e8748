"""Two tiny random Llama LMs with in-memory BPE tokenizers, the offline stand-ins for a real LLM in the
tests of `spae_fast.llm` (the fixtures that build them are in this folder's conftest.py):

- model A reads its own vocabulary: the codebook is a `VocabCodebook` over A's input embeddings (30 whole-word
  tokens "Ġcat", "Ġdog", ...), so image words go in as LLM ids;
- model B has another (smaller) vocabulary in which most words split into several tokens: image words go in
  as text and constrained decoding walks the trie of their tokenizations.
"""

from __future__ import annotations

import torch

from spae_fast.llm import NONSENSE_LABELS

WORDS = [
    "cat",
    "dog",
    "bird",
    "fish",
    "tree",
    "house",
    "car",
    "boat",
    "star",
    "moon",
    "sun",
    "rain",
    "snow",
    "wind",
    "fire",
    "water",
    "stone",
    "river",
    "hill",
    "road",
    "door",
    "window",
    "table",
    "chair",
    "apple",
    "lemon",
    "grape",
    "bread",
    "cheese",
    "milk",
]
LAYERS = (1, 2, 4)  # 1 + 4 + 16 = 21 tokens on a 4 x 4 grid
GRID = 4


def make_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    labels = " ".join(NONSENSE_LABELS[:5])
    corpus = [
        f"Input: {' '.join(WORDS[i : i + 5])}\nOutput: {labels}\nAnswer with dax or blicket.\n"
        for i in range(len(WORDS))
    ] * 3
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def make_model(vocab_size: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # a sharper random model: distinct scores, no near-ties between candidates
        model.lm_head.weight.mul_(20)
    return model



def snapshot(model):
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training


def episode_text(vocab, ids, episode, labels, num_layers_tokens, induction=""):
    def words(i):
        return " " + " ".join(t.strip() for t in vocab.text(ids[i][:num_layers_tokens]))

    text = induction
    for index, way in episode.support:
        text += f"Input:{words(index)}\nOutput: {labels[way]}\n"
    queries = [f"Input:{words(index)}\nOutput:" for index, _ in episode.queries]
    return text, queries
