"""Tiny randomly initialised causal LMs with trained in-memory tokenizers, saved with save_pretrained, and tiny
GGUF files: the offline stand-ins for real LLM checkpoints in the vocabulary, model, cache and CLI tests."""

from __future__ import annotations

import pytest
import torch

CORPUS = [
    "the cat sat on the mat and the dog ran over the hill",
    "a quick brown fox jumps over the lazy dog, 12 times in 2024!",
    "hello world: café naïve Straße über déjà vu",
    "models read words; images become words of a frozen language model",
] * 8


def byte_level_tokenizer(vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


def sentencepiece_style_tokenizer(vocab_size: int = 200):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"]))
    return tokenizer


def write_gguf(path, tokens, weight) -> None:
    """A GGUF file (llama, gpt2 tokenizer) holding the token strings and an fp32 token_embd.weight [V, D]."""
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_tensor("token_embd.weight", weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def save_tiny_model(folder, architecture: str, tokenizer, extra_rows: int = 0, **save_kwargs):
    """A randomly initialised tiny causal LM + its tokenizer, written with save_pretrained."""
    transformers = pytest.importorskip("transformers")
    hf_tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer)
    vocab_size = len(hf_tokenizer) + extra_rows  # embedding rows beyond the tokenizer (padding), as real models
    torch.manual_seed(0)
    if architecture == "gpt2":
        config = transformers.GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=1, n_head=2, n_positions=32,
                                         bos_token_id=0, eos_token_id=0)  # fmt: skip
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)  # fmt: skip
        model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(folder, **save_kwargs)
    hf_tokenizer.save_pretrained(folder)
    return model.get_input_embeddings().weight.detach().clone(), hf_tokenizer
