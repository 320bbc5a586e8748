"""Checkpoints as one verified, crash-safe unit (`spae_fast.checkpoint`, `spae_fast._atomic`): tampered configs
are refused before anything is built, a writer killed at any file operation leaves the old or the new
checkpoint, a resume logs each step once, and loading works inside ``torch.inference_mode()``."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import warnings

import pytest
import torch
from _tiny_llm import byte_level_tokenizer, save_tiny_model

from spae_fast import model as model_module
from spae_fast._integrity import CorruptFileError
from spae_fast.checkpoint import parameter_count
from spae_fast.data import build_dataset
from spae_fast.model import SPAE, SPAEConfig
from spae_fast.trainer import TrainConfig, Trainer
from spae_fast.vocab import VocabCodebook

TINY = {
    "image_size": 16,
    "base_channels": 8,
    "channel_multipliers": (1, 2),
    "num_res_blocks": 1,
    "layers": (1, 2, 4, 8),
}


def make_vocab(rows: int = 40, dim: int = 12, seed: int = 0) -> VocabCodebook:
    generator = torch.Generator().manual_seed(seed)
    tokens = [f"Ġw{chr(97 + i % 26)}{chr(97 + i // 26)}" for i in range(rows)]
    return VocabCodebook(torch.randn(rows, dim, generator=generator), tokens, token_filter=None)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPAE_FAST_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def vocab() -> VocabCodebook:
    return make_vocab()


def make_model(vocab, seed: int = 0, **overrides) -> SPAE:
    torch.manual_seed(seed)
    return SPAE(SPAEConfig(**{**TINY, "codebook": "unused", **overrides}), vocab)


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- verify before build -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [{}, {"num_res_blocks": 0}, {"num_res_blocks": 3, "channel_multipliers": (1, 2, 2), "image_size": 32}, {"in_channels": 1},
     {"channel_multipliers": (1,), "base_channels": 6}],
)  # fmt: skip
def test_parameter_count_is_the_built_models(vocab, overrides):
    model = make_model(vocab, **overrides)
    built = sum(t.numel() for t in model.state_dict().values())
    assert parameter_count(model.config, vocab.dim) == built


def rewrite_embedded_config(weights, change) -> None:
    """Rewrites model.safetensors with its metadata config changed (the tensors and digest left alone)."""
    from safetensors.torch import load_file, save_file

    raw = weights.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    metadata = json.loads(raw[8 : 8 + length])["__metadata__"]
    config = json.loads(metadata["spae_config"])
    change(config)
    metadata["spae_config"] = json.dumps(config, sort_keys=True, separators=(",", ":"))
    save_file(load_file(str(weights)), str(weights), metadata=metadata)


def forbid_building(monkeypatch) -> None:
    """From now on, constructing a model fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built from an unverified checkpoint")

    monkeypatch.setattr(model_module.Encoder, "__init__", refuse)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("num_res_blocks", 10**9, r"num_res_blocks must be an int in \[0, 64\], got 1000000000"),
        ("base_channels", 10**7, r"base_channels must be an int in \[1, 4096\]"),
        ("image_size", 2**40, r"image_size must be an int in \[1, 8192\]"),
        ("channel_multipliers", [1] * 1000, r"channel_multipliers must be a sequence of 1 to 8 ints"),
        ("layers", [1, True], r"layers\[1\] must be an int"),
        ("num_res_blocks", 5, r"implies \d+ parameters but the file holds \d+"),
        ("beta", 0.5, "do not match the content_sha256"),
    ],
)
def test_tampered_embedded_config_is_refused_before_building(
    vocab, tmp_path, monkeypatch, field, value, message
):
    folder = make_model(vocab).save_pretrained(tmp_path / "m")
    rewrite_embedded_config(folder / "model.safetensors", lambda config: config.__setitem__(field, value))
    forbid_building(monkeypatch)
    with pytest.raises(ValueError, match=message) as error:
        SPAE.from_pretrained(folder, codebook=vocab)
    assert "model.safetensors" in str(error.value)


def test_edited_config_json_is_refused_and_a_stale_one_ignored(vocab, tmp_path):
    model = make_model(vocab)
    folder = model.save_pretrained(tmp_path / "m")
    original = (folder / "config.json").read_text()
    record = json.loads(original)
    record["config"]["num_res_blocks"] = 10**9  # the hang: now refused at once, naming file and field
    (folder / "config.json").write_text(json.dumps(record))
    with pytest.raises(
        ValueError, match=r"config.json is not a valid SPAE config: SPAEConfig.num_res_blocks must"
    ):
        SPAE.from_pretrained(folder, codebook=vocab)
    record["config"]["num_res_blocks"] = 2
    (folder / "config.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="config.json was edited"):
        SPAE.from_pretrained(folder, codebook=vocab)
    record["content_sha256"] = (
        "0" * 64
    )  # looks like another save's copy: the verified embedded config is used
    (folder / "config.json").write_text(json.dumps(record))
    with pytest.warns(RuntimeWarning, match="belongs to another save"):
        loaded = SPAE.from_pretrained(folder, codebook=vocab)
    assert loaded.config == model.config and states_equal(loaded.state_dict(), model.state_dict())
    (folder / "config.json").unlink()  # model.safetensors alone is a complete checkpoint
    assert states_equal(SPAE.from_pretrained(folder, codebook=vocab).state_dict(), model.state_dict())
    (folder / "config.json").write_bytes(b"\xff\xfe{" + original.encode()[1:])
    with pytest.raises(
        ValueError, match=r"config.json: the SPAE config must be UTF-8 JSON, but byte 0 \(0xff\)"
    ):
        SPAE.from_pretrained(folder, codebook=vocab)


def test_truncated_or_padded_weights_name_the_file(vocab, tmp_path):
    folder = make_model(vocab).save_pretrained(tmp_path / "m")
    data = (folder / "model.safetensors").read_bytes()
    for cut, message in [
        (5, "8-byte header length"),
        (100, "header claims"),
        (len(data) - 7, "does not fit|cover"),
    ]:
        (folder / "model.safetensors").write_bytes(data[:cut])
        with pytest.raises(CorruptFileError, match=message) as error:
            SPAE.from_pretrained(folder, codebook=vocab)
        assert str(folder / "model.safetensors") in str(error.value)
    (folder / "model.safetensors").write_bytes(data + b"\0" * 8)
    with pytest.raises(CorruptFileError, match="bytes appended or cut off"):
        SPAE.from_pretrained(folder, codebook=vocab)


def save_format_1(model: SPAE, folder) -> None:
    """What spae_fast wrote before the config moved into the weights file."""
    import hashlib

    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt", "spae_fast_format": "1"})
    record = {"spae_fast_format": 1, "config": model.config.to_dict(),
              "weights_sha256": hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest(),
              "tensors": {k: list(v.shape) for k, v in state.items()}}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(record))


def test_format_1_checkpoints_still_load_with_the_new_checks(vocab, tmp_path, monkeypatch):
    model = make_model(vocab)
    save_format_1(model, tmp_path / "old")
    assert states_equal(
        SPAE.from_pretrained(tmp_path / "old", codebook=vocab).state_dict(), model.state_dict()
    )
    record = json.loads((tmp_path / "old" / "config.json").read_text())
    for value, message in [(10**9, r"num_res_blocks must be an int in \[0, 64\]"), (4, "implies")]:
        record["config"]["num_res_blocks"] = value
        (tmp_path / "old" / "config.json").write_text(json.dumps(record))
        with pytest.raises(ValueError, match=message):
            SPAE.from_pretrained(tmp_path / "old", codebook=vocab)


def test_pre_manifest_trainer_checkpoints_still_resume(vocab, tmp_path):
    dataset = build_dataset("digits", 16, split="train")
    config = TrainConfig(steps=3, batch_size=2, log_every=1, eval_every=3, save_every=3, eval_images=2)
    old = Trainer(make_model(vocab, seed=1), config, tmp_path, dataset)
    save_format_1(old.model, tmp_path / "checkpoint")
    torch.save(
        {"step": 2, "elapsed": 1.5, "optimizer": old.optimizer.state_dict()},
        tmp_path / "checkpoint" / "trainer_state.pt",
    )
    resumed = Trainer(make_model(vocab, seed=2), config, tmp_path, dataset)
    resumed.load_checkpoint()
    assert resumed.step == 2 and resumed.elapsed == 1.5
    assert states_equal(resumed.model.state_dict(), old.model.state_dict())
    (tmp_path / "checkpoint" / "trainer_state.pt").write_bytes(b"PK\x03\x04 cut")
    with pytest.raises(ValueError, match="trainer_state.pt is not a readable trainer state"):
        resumed.load_checkpoint()


def test_from_pretrained_inside_inference_mode(tmp_path):
    """The codebook comes from the config (a tiny saved LLM), so VocabCodebook is also built inside the block."""
    llm = tmp_path / "llm"
    save_tiny_model(llm, "gpt2", byte_level_tokenizer())
    vocab = VocabCodebook.from_pretrained(llm, use_cache=False)
    model = SPAE(SPAEConfig(**{**TINY, "codebook": str(llm)}), vocab).eval()
    folder = model.save_pretrained(tmp_path / "m")
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.inference_mode():
        loaded = SPAE.from_pretrained(folder).eval()
        ids = loaded.encode(images)
        built_inside = VocabCodebook(
            torch.randn(5, 4), ["Ġab", "Ġcd", "Ġef", "Ġgh", "Ġij"], token_filter=None
        )
    assert torch.equal(ids, model.encode(images))
    assert not any(p.is_inference() for p in loaded.parameters()) and not built_inside.weight.is_inference()
    loaded.train()
    out = loaded(images)  # still trainable outside the block
    ((out.reconstruction - images) ** 2).mean().backward()
    assert loaded.encoder.conv_in.weight.grad is not None


# ---- a writer killed at every file operation -----------------------------------------------------------------


class Killed(BaseException):
    """A simulated kill: a BaseException, so the writers' `except Exception` clean-ups do not run."""


FILE_OPERATIONS = ("write", "fsync", "replace", "rename", "mkdir", "unlink", "rmdir")


@contextlib.contextmanager
def killed_at(k: int):
    """Raises `Killed` at the k-th call of any of `FILE_OPERATIONS` (a write first writes half its bytes).
    Yields the list of operations that ran."""
    log: list[str] = []
    originals = {name: getattr(os, name) for name in FILE_OPERATIONS}

    def wrap(name):
        original = originals[name]

        def operation(*args, **kwargs):
            log.append(name)
            if len(log) == k:
                if name == "write":
                    data = memoryview(args[1])
                    original(args[0], data[: len(data) // 2])
                raise Killed(name)
            return original(*args, **kwargs)

        return operation

    try:
        for name in FILE_OPERATIONS:
            setattr(os, name, wrap(name))
        yield log
    finally:
        for name, original in originals.items():
            setattr(os, name, original)


def kill_everywhere(save, restore_baseline, check, operations: int) -> list[str]:
    """Runs ``save`` killed at operation 1, 2, ... until it completes; after each kill ``check()`` must load the
        old or the new state (returns which). A complete save must run ``operations`` file operations (so that
    each was a kill point). Returns the outcomes."""
    outcomes = []
    for k in range(1, 500):
        restore_baseline()
        try:
            with killed_at(k) as log:
                save()
        except Killed:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # the stale-copy / fallback notices
                outcomes.append(check())
            continue
        assert check() == "new"
        assert len(log) == k - 1 == operations, " ".join(log)
        return outcomes
    raise AssertionError("the save never completed")


def test_save_pretrained_killed_at_every_operation(vocab, tmp_path):
    old, new = make_model(vocab, seed=0), make_model(vocab, seed=1)
    baseline, folder = tmp_path / "baseline", tmp_path / "m"
    old.save_pretrained(baseline)

    def restore():
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(baseline, folder)

    def check():
        state = SPAE.from_pretrained(folder, codebook=vocab).state_dict()
        return (
            "old"
            if states_equal(state, old.state_dict())
            else "new"
            if states_equal(state, new.state_dict())
            else "?"
        )

    # mkdir; weights: write, fsync, replace, fsync folder; config.json: the same
    outcomes = kill_everywhere(lambda: new.save_pretrained(folder), restore, check, operations=9)
    assert set(outcomes) == {"old", "new"}, outcomes  # killed before the weights' rename: old; after: new


def tiny_trainer(vocab, out_dir, seed=0) -> Trainer:
    dataset = build_dataset("digits", 16, split="train")
    config = TrainConfig(
        steps=2, batch_size=2, log_every=1, eval_every=1, save_every=1, eval_images=2, gan_weight=0.1
    )
    return Trainer(make_model(vocab, seed=seed), config, out_dir, dataset)


def trainer_snapshot(trainer: Trainer) -> dict:
    return {"step": trainer.step, "model": {k: v.clone() for k, v in trainer.model.state_dict().items()},
            "discriminator": {k: v.clone() for k, v in trainer.discriminator.state_dict().items()}}  # fmt: skip


def test_trainer_checkpoint_killed_at_every_operation(vocab, tmp_path):
    writer = tiny_trainer(vocab, tmp_path / "run")
    images, labels = next(iter(torch.utils.data.DataLoader(writer.dataset, batch_size=2)))
    writer.train_step(images, labels)  # optimizer state exists
    writer.step = 2
    writer.save_checkpoint()
    old = trainer_snapshot(writer)
    baseline = tmp_path / "baseline"
    shutil.copytree(tmp_path / "run" / "checkpoint", baseline)
    writer.train_step(images, labels)
    writer.step = 3
    new = trainer_snapshot(writer)
    reader = tiny_trainer(vocab, tmp_path / "run", seed=5)
    folder = tmp_path / "run" / "checkpoint"

    def restore():
        for path in (tmp_path / "run").glob("checkpoint*"):
            shutil.rmtree(path)
        shutil.copytree(baseline, folder)

    def check():
        reader.load_checkpoint()  # verifies every file against the manifest
        loaded = trainer_snapshot(reader)
        for name, expected in (("old", old), ("new", new)):
            if loaded["step"] == expected["step"]:
                assert states_equal(loaded["model"], expected["model"]), name
                assert states_equal(loaded["discriminator"], expected["discriminator"]), name
                return name
        raise AssertionError(f"step {loaded['step']}")

    # mkdir parent, staging, model folder; 5 files (write, fsync, replace, fsync folder); commit: fsync staging,
    # 2 renames, fsync parent, rmtree of the previous version (unlink its 5 files, rmdir)
    outcomes = kill_everywhere(writer.save_checkpoint, restore, check, operations=3 + 5 * 4 + 4 + 6)
    assert set(outcomes) == {"old", "new"}, outcomes
    # After a kill between the two renames, the next save repairs the folder and commits.
    second_rename = 1 + kill_point(writer.save_checkpoint, restore, "rename", 2)
    restore()
    with pytest.raises(Killed), killed_at(second_rename):
        writer.save_checkpoint()
    assert not folder.exists() and (tmp_path / "run" / "checkpoint.previous").is_dir()
    with pytest.warns(RuntimeWarning, match="reading the previous version"):
        assert check() == "old"
    writer.save_checkpoint()
    assert check() == "new" and not (tmp_path / "run" / "checkpoint.previous").exists()
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith("checkpoint")) == [
        "checkpoint"
    ]


def kill_point(save, restore, operation: str, occurrence: int) -> int:
    """How many file operations ``save`` runs before the ``occurrence``-th call of ``operation``."""
    restore()
    with killed_at(0) as log:
        save()
    return [i for i, name in enumerate(log) if name == operation][occurrence - 1]


def test_trainer_checkpoint_refuses_tampering_and_foreign_folders(vocab, tmp_path):
    trainer = tiny_trainer(vocab, tmp_path / "run")
    folder = trainer.save_checkpoint()
    state = folder / "trainer_state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0x01
    state.write_bytes(bytes(data))
    with pytest.raises(
        ValueError, match=r"trainer_state.pt does not match the size / sha256 recorded in checkpoint.json"
    ):
        tiny_trainer(vocab, tmp_path / "run").load_checkpoint()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not part of this checkpoint"):
        trainer.save_checkpoint(foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"


# ---- metrics.jsonl after a resume ----------------------------------------------------------------------------


def test_resume_logs_each_step_once(vocab, tmp_path, monkeypatch):
    dataset = build_dataset("digits", 16, split="train")
    config = TrainConfig(steps=6, batch_size=2, log_every=1, eval_every=2, save_every=2, eval_images=2)
    crashing = Trainer(make_model(vocab), config, tmp_path, dataset)
    original_step = Trainer.train_step

    def crash_at_step_4(self, images, labels):
        if self.step == 3:
            raise KeyboardInterrupt  # killed while computing step 4; the last checkpoint is step 2
        return original_step(self, images, labels)

    monkeypatch.setattr(Trainer, "train_step", crash_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        crashing.fit(progress=False)
    monkeypatch.setattr(Trainer, "train_step", original_step)

    def records():
        return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]

    assert [r["step"] for r in records() if "eval" not in r] == [1, 2, 3]
    with open(tmp_path / "metrics.jsonl", "a") as file:
        file.write('{"step": 3, "pix')  # and a line cut off by the kill
    with pytest.warns(RuntimeWarning, match="dropped 1 unreadable line"):
        Trainer(make_model(vocab, seed=3), config, tmp_path, dataset).fit(resume=True, progress=False)
    assert [r["step"] for r in records() if "eval" not in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records() if "eval" in r] == [2, 4, 6]
    # Resuming a finished run adds nothing (its last evaluation is reused, not repeated).
    summary = Trainer(make_model(vocab, seed=3), config, tmp_path, dataset).fit(resume=True, progress=False)
    assert [r["step"] for r in records()] == [1, 2, 2, 3, 4, 4, 5, 6, 6]
    assert summary["eval"] == records()[-1]["eval"]
