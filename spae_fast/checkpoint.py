"""SPAE checkpoints on disk: the model folder (`SPAE.save_pretrained` / `SPAE.from_pretrained`) and the trainer's
checkpoint folder. Each is one consistent unit, verified in full before anything is built from it.

Model folder, format 2::

    model.safetensors   the weights; the safetensors metadata holds the whole record:
                          spae_fast_format  "2"
                          spae_config       the `SPAEConfig` as canonical JSON (sorted keys, no spaces)
                          content_sha256    `tensors_sha256(weights, prefix=spae_config)`: config and weights
                                            covered by one digest
                        so this file alone is a complete, self-checking checkpoint, and replacing it (one atomic
                        rename) is the commit point of a save.
    config.json         a readable copy, written after the weights (also atomically): spae_fast_format, config,
                        content_sha256, weights_sha256 (of the file), tensors (name -> shape).

`load_model` checks, in this order, before the codebook is loaded or a module is built:

1. the safetensors header against the file (`_integrity.read_safetensors_header`);
2. the config from the metadata: known fields, types and bounds (`SPAEConfig`), and the parameter count it
   implies (`parameter_count`, arithmetic only) equal to the number of elements the file holds, so a config
   that asks for a larger network than the file holds is refused instead of allocated;
3. the tensors (read into memory, at most the file's size) against ``content_sha256``;
4. config.json: when it records the same ``content_sha256`` its config must equal the verified one (an edited
   config.json is refused); when it records another, it is the stale copy of a save that was killed between
   its two writes (or was copied from elsewhere): it is ignored with a warning.

Then the model is built and every tensor name and shape compared. Format 1 folders (before the config lived in
the weights: config.json holds the config and the weights file's sha256) still load, with steps 1-2 applied to
config.json's config and the file's sha256 compared.

Trainer checkpoint folder (``out_dir/checkpoint``), written whole into a sibling folder and committed with
`_atomic.commit_directory` (a kill leaves the previous checkpoint or the new one)::

    model.safetensors, config.json   the model folder above
    discriminator.safetensors        GAN runs: discriminator and LeCAM state
    trainer_state.pt                 step, elapsed seconds, optimizer states (tensors and numbers;
                                     ``torch.load(weights_only=True)``)
    checkpoint.json                  {"spae_fast_checkpoint": 1, "step": N, "files": {name: {"size", "sha256"}}}

`verify_training_checkpoint` checks every listed file's size and sha256 before anything is read from them.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ._atomic import (
    atomic_write_bytes,
    atomic_write_json,
    commit_directory,
    new_staging_directory,
    readable_directory,
    remove_partial_files,
)
from ._integrity import (
    CorruptFileError,
    load_safetensors,
    read_json,
    read_safetensors_header,
    sha256_bytes,
    sha256_file,
    tensors_sha256,
)

if TYPE_CHECKING:
    from .model import SPAE, SPAEConfig
    from .vocab import VocabCodebook

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 2
MANIFEST_NAME = "checkpoint.json"
MANIFEST_FORMAT = 1


# ---- the parameter count a config implies -------------------------------------------------------------------


def _conv(in_channels: int, out_channels: int, kernel: int) -> int:
    return in_channels * out_channels * kernel * kernel + out_channels


def _res_block(in_channels: int, out_channels: int) -> int:
    shortcut = _conv(in_channels, out_channels, 1) if in_channels != out_channels else 0
    return (
        2 * in_channels
        + _conv(in_channels, out_channels, 3)
        + 2 * out_channels
        + _conv(out_channels, out_channels, 3)
        + shortcut
    )


def parameter_count(config: SPAEConfig, latent_dim: int) -> int:
    """Number of parameters of ``SPAE(config)`` with a codebook of dimension ``latent_dim``, from the config alone
    (mirrors `model.Encoder` / `model.Decoder`; a test compares it with built models)."""
    widths = [config.base_channels * m for m in config.channel_multipliers]
    total = 0
    for encoder in (True, False):
        levels = widths if encoder else widths[::-1]
        channels = levels[0]
        total += _conv(config.in_channels, channels, 3) if encoder else _conv(latent_dim, channels, 3)
        if not encoder:
            total += 2 * _res_block(channels, channels)  # middle
        for level, width in enumerate(levels):
            for _ in range(config.num_res_blocks):
                total += _res_block(channels, width)
                channels = width
            if level < len(levels) - 1:
                total += _conv(channels, channels, 3)  # down- / upsampling conv
        if encoder:
            total += 2 * _res_block(channels, channels)  # middle
        total += 2 * channels  # norm_out
        total += _conv(channels, latent_dim, 1) if encoder else _conv(channels, config.in_channels, 3)
    return total


# ---- the model folder ----------------------------------------------------------------------------------------


def canonical_config(config: SPAEConfig) -> str:
    return json.dumps(config.to_dict(), sort_keys=True, separators=(",", ":"))


def save_model(model: SPAE, directory: str | os.PathLike) -> Path:
    """Writes the format-2 model folder (module docstring): the weights (the commit), then config.json."""
    from safetensors.torch import save

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        remove_partial_files(directory, name)  # leftovers of a killed save
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}
    config_json = canonical_config(model.config)
    content = tensors_sha256(state, prefix=config_json.encode())
    metadata = {"format": "pt", "spae_fast_format": str(FORMAT_VERSION), "spae_config": config_json,
                "content_sha256": content}  # fmt: skip
    data = save(state, metadata=metadata)
    atomic_write_bytes(directory / WEIGHTS_NAME, data)
    record = {
        "spae_fast_format": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "content_sha256": content,
        "weights_sha256": sha256_bytes(data),
        "tensors": {name: list(tensor.shape) for name, tensor in state.items()},
    }
    atomic_write_json(directory / CONFIG_NAME, record)
    return directory


def _config_from(values: object, source: Path, config_class: type[SPAEConfig]) -> SPAEConfig:
    if not isinstance(values, dict):
        raise CorruptFileError(
            f"{source}: the SPAE config must be a JSON object, got {type(values).__name__}"
        )
    try:
        return config_class.from_dict(values)
    except (TypeError, ValueError) as error:
        raise CorruptFileError(f"{source} is not a valid SPAE config: {error}") from None


def _check_size(config: SPAEConfig, weights: Path, elements: int) -> None:
    """Refuses a config whose network is not the one the weights file holds (before anything is allocated)."""
    if config.codebook_dim is None:
        raise CorruptFileError(f"{weights}: the checkpoint's config records no codebook_dim")
    implied = parameter_count(config, config.codebook_dim)
    if implied != elements:
        raise CorruptFileError(
            f"{weights} does not fit the architecture of its config: the config (base_channels="
            f"{config.base_channels}, channel_multipliers={list(config.channel_multipliers)}, num_res_blocks="
            f"{config.num_res_blocks}, codebook_dim={config.codebook_dim}) implies {implied} parameters but the file "
            f"holds {elements}"
        )


def read_model_checkpoint(
    directory: str | os.PathLike, config_class: type[SPAEConfig]
) -> tuple[SPAEConfig, dict[str, torch.Tensor]]:
    """(config, CPU state dict) of a model folder, checked as the module docstring says (steps 1-4)."""
    directory = readable_directory(directory)
    config_file, weights = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not weights.is_file():
        missing = CONFIG_NAME if not config_file.is_file() else WEIGHTS_NAME
        raise FileNotFoundError(f"{directory} is not an SPAE checkpoint: {missing} is missing")
    header = read_safetensors_header(weights)
    if header.metadata.get("spae_fast_format") != str(FORMAT_VERSION):
        return _read_format_1(directory, header, config_class)
    raw_config = header.metadata.get("spae_config")
    recorded = header.metadata.get("content_sha256")
    if raw_config is None or recorded is None:
        raise CorruptFileError(f"{weights}: format-2 metadata without spae_config / content_sha256")
    try:
        values = json.loads(raw_config)
    except json.JSONDecodeError as error:
        raise CorruptFileError(f"{weights}: the spae_config metadata is not valid JSON ({error})") from None
    config = _config_from(values, weights, config_class)
    _check_size(config, weights, header.total_elements())
    state = load_safetensors(weights)
    if tensors_sha256(state, prefix=raw_config.encode()) != recorded:
        raise CorruptFileError(
            f"{weights}: its tensors and config do not match the content_sha256 in its metadata (tampered with or "
            "corrupted)"
        )
    if config_file.is_file():
        copy = read_json(config_file, "the SPAE config")
        if not isinstance(copy, dict):
            raise CorruptFileError(f"{config_file}: expected a JSON object, got {type(copy).__name__}")
        if copy.get("content_sha256") == recorded:
            if _config_from(copy.get("config"), config_file, config_class) != config:
                raise CorruptFileError(
                    f"{config_file} was edited: its config differs from the one {WEIGHTS_NAME} was saved with "
                    "(a checkpoint's config cannot be changed without its weights)"
                )
        else:
            warnings.warn(
                f"{config_file} belongs to another save than {WEIGHTS_NAME} (a save interrupted between its two "
                f"writes, or a copied file); using the config verified inside {WEIGHTS_NAME}",
                RuntimeWarning,
                stacklevel=3,
            )
    return config, state


def _read_format_1(
    directory: Path, header, config_class: type[SPAEConfig]
) -> tuple[SPAEConfig, dict[str, torch.Tensor]]:
    config_file, weights = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{directory} is not an SPAE checkpoint: {CONFIG_NAME} is missing")
    record = read_json(config_file, "the SPAE config")
    if not isinstance(record, dict) or "config" not in record:
        raise CorruptFileError(
            f"{config_file} is not a valid SPAE config: expected an object with a 'config' field"
        )
    if record.get("spae_fast_format") != 1:
        raise CorruptFileError(
            f"{config_file}: unsupported checkpoint format {record.get('spae_fast_format')!r} for a weights file "
            f"without embedded config (format 1); this spae_fast writes format {FORMAT_VERSION}"
        )
    config = _config_from(record["config"], config_file, config_class)
    _check_size(config, weights, header.total_elements())
    digest = sha256_file(weights)
    if digest != record.get("weights_sha256"):
        raise CorruptFileError(
            f"{weights} does not match the sha256 recorded in {config_file.name} (tampered with, truncated or from "
            f"another checkpoint): {digest} != {record.get('weights_sha256')}"
        )
    return config, load_safetensors(weights)


def load_model(
    cls: type[SPAE],
    directory: str | os.PathLike,
    codebook: VocabCodebook | None,
    backend: str,
    map_location: str | torch.device,
) -> SPAE:
    """`SPAE.from_pretrained`: verify (`read_model_checkpoint`), then build and fill the model."""
    from .model import SPAEConfig

    # A model built inside torch.inference_mode() would hold inference tensors that cannot be trained or
    # loaded into later; loading is never part of an inference graph.
    with torch.inference_mode(False):
        config, state = read_model_checkpoint(directory, SPAEConfig)
        model = cls(config, codebook, backend=backend)
        expected = model.state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        wrong = sorted(
            f"{name}: {tuple(state[name].shape)} != {tuple(expected[name].shape)}"
            for name in set(state) & set(expected)
            if state[name].shape != expected[name].shape
        )
        if missing or unexpected or wrong:
            raise CorruptFileError(
                f"{Path(directory) / WEIGHTS_NAME} does not fit the architecture in its config: missing "
                f"{missing[:5]}, unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}"
            )
        model.load_state_dict(state)
        return model.to(map_location)


# ---- the trainer's checkpoint folder ------------------------------------------------------------------------

CHECKPOINT_FILES = (CONFIG_NAME, WEIGHTS_NAME, "discriminator.safetensors", "trainer_state.pt", MANIFEST_NAME)


def save_training_checkpoint(
    folder: str | os.PathLike, model: SPAE, files: dict[str, bytes], step: int
) -> Path:
    """Writes the model and ``files`` (name -> bytes) as a new version of ``folder`` and commits it (module
    docstring); returns ``folder``."""
    folder = Path(folder)
    unknown = sorted(set(files) - set(CHECKPOINT_FILES))
    if unknown:
        raise ValueError(f"files {unknown} are not checkpoint files {CHECKPOINT_FILES}")
    staging = new_staging_directory(folder)
    save_model(model, staging)
    for name, data in files.items():
        atomic_write_bytes(staging / name, data)
    listed = {}
    for path in sorted(staging.iterdir()):  # read back: the manifest records what is on disk
        listed[path.name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    atomic_write_json(
        staging / MANIFEST_NAME, {"spae_fast_checkpoint": MANIFEST_FORMAT, "step": int(step), "files": listed}
    )
    return commit_directory(staging, folder, replaceable=CHECKPOINT_FILES)


def verify_training_checkpoint(folder: str | os.PathLike, required: str) -> tuple[Path, dict | None]:
    """(the folder to read, its manifest) after checking every listed file's size and sha256; the manifest is
    None for a checkpoint written before manifests (nothing to check beyond the model's own record).
    FileNotFoundError when ``required`` is not there."""
    folder = readable_directory(folder)
    if not (folder / required).is_file():
        raise FileNotFoundError(f"cannot resume: {folder / required} does not exist")
    manifest_file = folder / MANIFEST_NAME
    if not manifest_file.is_file():
        return folder, None
    manifest = read_json(manifest_file, "the checkpoint manifest")
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (
        not isinstance(files, dict)
        or manifest.get("spae_fast_checkpoint") != MANIFEST_FORMAT
        or not isinstance(manifest.get("step"), int)
    ):
        raise CorruptFileError(
            f"{manifest_file}: expected {{'spae_fast_checkpoint': 1, 'step': int, 'files': {{...}}}}"
        )
    for name, entry in files.items():
        path = folder / name
        if not isinstance(entry, dict) or set(entry) != {"size", "sha256"}:
            raise CorruptFileError(f"{manifest_file}: malformed entry for {name!r}")
        if name not in CHECKPOINT_FILES or not path.is_file():
            raise CorruptFileError(
                f"cannot resume: {path} is listed in {MANIFEST_NAME} but missing (or not a checkpoint file)"
            )
        if path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
            raise CorruptFileError(
                f"cannot resume: {path} does not match the size / sha256 recorded in {MANIFEST_NAME} (tampered with "
                "or corrupted)"
            )
    if required not in files:
        raise CorruptFileError(f"{manifest_file} does not list {required}")
    return folder, manifest


# ---- metrics.jsonl ------------------------------------------------------------------------------------------


def truncate_metrics(path: str | os.PathLike, step: int) -> dict | None:
    """Rewrites ``metrics.jsonl`` (atomically, only when something changes) so that it holds each record of steps
    ``<= step`` once: records of later steps (written after the checkpoint a resume restarts from), earlier
    duplicates of a (step, kind) and a line cut off by a kill are dropped. Returns the evaluation record of
    ``step`` when there is one (the resumed run need not repeat it)."""
    path = Path(path)
    if not path.is_file():
        return None
    data = path.read_bytes()
    lines = data.decode("utf-8", errors="replace").splitlines()
    latest: dict[tuple[int, bool], int] = {}
    records: list[dict] = []
    dropped_lines = 0
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped_lines += 1
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int) or record["step"] > step:
            continue
        latest[(record["step"], "eval" in record)] = len(records)
        records.append(record)
    kept = [records[i] for i in sorted(latest.values())]
    if dropped_lines:
        warnings.warn(
            f"{path}: dropped {dropped_lines} unreadable line(s) (a write cut off by a kill)",
            RuntimeWarning,
            stacklevel=2,
        )
    if len(kept) != len(lines) or not data.endswith(b"\n"):  # (an unterminated last line would join the next)
        atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in kept).encode())
    index = latest.get((step, True))
    return records[index] if index is not None else None
