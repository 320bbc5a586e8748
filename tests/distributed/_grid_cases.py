"""Workers of tests/distributed/test_vocab_shard_and_grid.py, inside every rank of a gloo process group.

`pair_worker` (2 ranks): `ShardedVocabCodebook` read shard by shard from a tiny safetensors model folder (bf16
table, byte-level tokenizer, "words" filter) and a tiny GGUF file (Q8_0 rows), with every read of the file
recorded; an SPAE built on it; clear errors; a vocabulary-parallel run stopped at its step-1 checkpoint and
resumed; and 2 data replicas with the whole table (the reference of the grid). `grid_worker` (4 ranks): 2 data
replicas x 2 vocabulary shards. The test process builds the single-process references and compares.
"""

from __future__ import annotations

import datetime
import json
import os
import traceback

import _train_cases
import torch
import torch.distributed as dist

DIM = 8


def tiny_folder(folder: str) -> str:
    """A Hugging Face style folder: model.safetensors (a bf16 [V, 8] input embedding and an lm_head) and a
    byte-level tokenizer.json (V = its vocabulary)."""
    import _tiny_llm
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    tokenizer = _tiny_llm.byte_level_tokenizer(300)
    tokenizer.save(os.path.join(folder, "tokenizer.json"))
    rows = tokenizer.get_vocab_size(with_added_tokens=True)
    g = torch.Generator().manual_seed(11)
    save_file({"model.embed_tokens.weight": torch.randn(rows, DIM, generator=g).bfloat16(),
               "lm_head.weight": torch.randn(rows, DIM, generator=g)}, os.path.join(folder, "model.safetensors"))  # fmt: skip
    return folder


def tiny_gguf(path: str, rows: int = 45, dim: int = 32) -> str:
    """A GGUF file with a Q8_0 token_embd.weight [rows, dim] and its token strings."""
    import gguf
    import numpy as np
    from gguf import quants

    table = torch.randn(rows, dim, generator=torch.Generator().manual_seed(12)).numpy().astype(np.float32)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_token_list([f"\u0120w{chr(97 + i % 26)}{chr(97 + i // 26)}" for i in range(rows)])
    packed = quants.quantize(table, gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("token_embd.weight", packed, raw_shape=packed.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _init(rank: int, world: int, store_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip


def _finish(rank: int, folder: str, name: str, report: dict) -> None:
    with open(os.path.join(folder, f"{name}{rank}.json"), "w") as file:
        json.dump(report, file)
    dist.destroy_process_group()


def _reads_recorded():
    """Records the (start, stop) file rows of every read of a `_TableFile`, and makes reads small (2 rows of
    fp32 D = 8, 4 of D = 32 ... per chunk) so that the chunking is exercised."""
    from spae_fast.distributed import vocab_shard

    reads: list[tuple[int, int]] = []
    original = vocab_shard._TableFile.rows

    def rows(self, start, stop):
        reads.append((start, stop))
        return original(self, start, stop)

    vocab_shard._TableFile.rows = rows
    vocab_shard.CHUNK_BYTES = 64
    return reads


def pair_worker(rank: int, world: int, store_path: str, folder: str) -> None:
    _init(rank, world, store_path)
    report: dict = {}
    try:
        report["vocab"] = vocab_checks(rank, folder)
        report["resume"] = resume_run(rank, world, folder)
        report["ddp"] = grid_run(folder, 1, "ddp")
        dist.barrier()
    except Exception:  # noqa: BLE001 - reported to the test
        report["error"] = traceback.format_exc()
    _finish(rank, folder, "pair", report)


def grid_worker(rank: int, world: int, store_path: str, folder: str) -> None:
    _init(rank, world, store_path)
    report: dict = {}
    try:
        report = grid_run(folder, 2, "grid")
        dist.barrier()
    except Exception:  # noqa: BLE001 - reported to the test
        report["error"] = traceback.format_exc()
    _finish(rank, folder, "grid", report)


def vocab_checks(rank: int, folder: str) -> dict:
    report: dict = {}
    from spae_fast.distributed import ShardedVocabCodebook, VocabParallelQuantizer
    from spae_fast.model import SPAE, SPAEConfig

    reads = _reads_recorded()
    sources = {"safetensors": (os.path.join(folder, "hf"), "words", torch.bfloat16),
               "gguf": (os.path.join(folder, "tiny.gguf"), None, torch.float32)}  # fmt: skip
    for name, (path, token_filter, dtype) in sources.items():
        reads.clear()
        vocab = ShardedVocabCodebook.from_pretrained(path, token_filter=token_filter, dtype=dtype)
        try:
            vocab.weight  # noqa: B018 - must raise
            refused = False
        except AttributeError as error:
            refused = "never loaded" in str(error)
        report[name] = {"rows": vocab.sharded.local.weight.float().tolist(), "start": vocab.sharded.start,
                        "stop": vocab.sharded.stop, "fingerprint": vocab.fingerprint(),
                        "token_ids": vocab.token_ids.tolist(), "texts": vocab.texts, "reads": list(reads),
                        "weight_refused": refused, "encode": vocab.encode([vocab.texts[-1]]).tolist()}  # fmt: skip
    # An SPAE on the sharded vocabulary: the vocabulary-parallel quantizer, the single-process fingerprint.
    vocab = ShardedVocabCodebook.from_pretrained(sources["gguf"][0], token_filter=None)
    torch.manual_seed(0)
    model = SPAE(SPAEConfig(**{**_train_cases.TINY_MODEL, "codebook": sources["gguf"][0]}), vocab)
    report["model"] = {"quantizer": type(model.quantizer) is VocabParallelQuantizer,
                       "fingerprint": model.config.codebook_fingerprint,
                       "ids": model.encode(_train_cases.probe_images()).tolist()}  # fmt: skip
    if rank == 0:
        model.save_pretrained(os.path.join(folder, "vp_model"))
    dist.barrier()
    loaded = SPAE.from_pretrained(os.path.join(folder, "single_model"), codebook=vocab)  # saved by 1 process
    report["loaded_ids"] = loaded.encode(_train_cases.probe_images()).tolist()
    try:
        SPAE(SPAEConfig(**{**_train_cases.TINY_MODEL, "metric": "cosine"}), vocab)
        report["cosine_refused"] = False
    except ValueError as error:
        report["cosine_refused"] = "metric must be 'l2'" in str(error)
    report["errors"] = errors(rank, folder)
    return report


def errors(rank: int, folder: str) -> dict:
    """The message each bad construction raised on this rank (every rank must raise)."""
    from spae_fast.distributed import ShardedVocabCodebook

    cases = {
        # rank 1 reads a file that does not exist
        "missing": lambda: ShardedVocabCodebook.from_pretrained(os.path.join(folder, "tiny.gguf" if rank == 0 else "none.gguf")),
        # the ranks read different vocabularies: rank 1 the model folder, rank 0 the GGUF file
        "different": lambda: ShardedVocabCodebook.from_pretrained(
            os.path.join(folder, "tiny.gguf") if rank == 0 else os.path.join(folder, "hf"), token_filter=None),
        # boundaries that leave a gap
        "gap": lambda: ShardedVocabCodebook.from_pretrained(os.path.join(folder, "tiny.gguf"), token_filter=None,
                                                            boundaries=[(0, 10), (11, 45)]),
        "bad_filter": lambda: ShardedVocabCodebook.from_pretrained(os.path.join(folder, "tiny.gguf"), token_filter="nouns"),
    }  # fmt: skip
    messages = {}
    for name, build in cases.items():
        try:
            build()
            messages[name] = None
        except (ValueError, TypeError, FileNotFoundError) as error:
            messages[name] = f"{type(error).__name__}: {error}"
    return messages


# ----------------------------------------------------------------------------------------------------------
# Training: the data x vocabulary grid, and resume
# ----------------------------------------------------------------------------------------------------------


def grid_run(folder: str, vocab_parallel: int, name: str) -> dict:
    """Two `fit` steps of the tiny SPAE (no semantic loss) on every rank of the world with ``vocab_parallel``."""
    trainer = _train_cases.train(os.path.join(folder, name), False, vocab_parallel=vocab_parallel)
    report = {"ids": trainer.model.encode(_train_cases.probe_images()).tolist(), "data_rank": trainer.data_rank,
              "data_world": trainer.data_world_size, "weights": _digest(trainer.model)}  # fmt: skip
    if vocab_parallel > 1:
        report["boundaries"] = [list(b) for b in trainer.model.quantizer.sharded.boundaries]
    return report


def _digest(model) -> str:
    from spae_fast._integrity import tensors_sha256

    return tensors_sha256({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})


def resume_config(steps: int):
    import dataclasses

    return dataclasses.replace(_train_cases.train_config(), steps=steps, save_every=1, eval_every=1)


def resume_run(rank: int, world: int, folder: str) -> dict:
    """Stops a 2-rank vocabulary-parallel run at its step-1 checkpoint, then resumes it to step 2 on 2 ranks."""
    import shutil

    from spae_fast.trainer import Trainer

    out = os.path.join(folder, "vp_resumed")
    for steps, resume in ((1, False), (2, True)):
        trainer = Trainer(_train_cases.make_model(_train_cases.make_vocab()), resume_config(steps), out,
                          _train_cases.make_dataset(), vocab_parallel=world)  # fmt: skip
        trainer.fit(resume=resume, progress=False)
        if steps == 1 and rank == 0:  # a copy of the step-1 checkpoint, for the 1-process resume
            shutil.copytree(out, os.path.join(folder, "stopped"))
        dist.barrier()
    return {"step": trainer.step, "weights": _digest(trainer.model)}
