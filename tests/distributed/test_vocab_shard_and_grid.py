"""A vocabulary read shard by shard (`ShardedVocabCodebook`: no rank reads or holds the whole table), the data x
vocabulary grid (4 gloo processes: 2 data replicas x 2 vocabulary shards), resume under vocabulary parallelism
(on 2 ranks and on 1 process) and checkpoints that do not depend on the number of ranks."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # children import the case modules from here
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # and tests/_tiny_llm

import _grid_cases
import _train_cases
from _spawn import rank_reports, run_ranks

TIMEOUT_S = 240


def _spawn(worker, world: int, folder, name: str) -> list[dict]:
    run_ranks(worker, (world, str(folder / f"store_{name}"), str(folder)), world, TIMEOUT_S)
    return rank_reports(folder, name, world)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    pytest.importorskip("gguf")
    pytest.importorskip("tokenizers")
    folder = tmp_path_factory.mktemp("vocab_shard_and_grid")
    _grid_cases.tiny_folder(str(folder / "hf"))
    gguf_path = _grid_cases.tiny_gguf(str(folder / "tiny.gguf"))
    from spae_fast.model import SPAE, SPAEConfig
    from spae_fast.vocab import VocabCodebook

    torch.manual_seed(1)
    vocab = VocabCodebook.from_pretrained(gguf_path, token_filter=None, use_cache=False)
    SPAE(SPAEConfig(**{**_train_cases.TINY_MODEL, "codebook": gguf_path}), vocab).save_pretrained(folder / "single_model")
    pair = _spawn(_grid_cases.pair_worker, 2, folder, "pair")
    grid = _spawn(_grid_cases.grid_worker, 4, folder, "grid")
    return folder, pair, grid


def _single_vocab(folder, name: str):
    from spae_fast.vocab import VocabCodebook

    if name == "safetensors":
        return VocabCodebook.from_pretrained(folder / "hf", token_filter="words", dtype=torch.bfloat16, use_cache=False)
    return VocabCodebook.from_pretrained(folder / "tiny.gguf", token_filter=None, use_cache=False)


@pytest.mark.parametrize("name", ["safetensors", "gguf"])
def test_each_rank_holds_the_rows_of_the_single_process_vocabulary(runs, name):
    folder, pair, _ = runs
    single = _single_vocab(folder, name)
    rows = single.num_rows
    assert rows > 20 and (name == "gguf" or rows < single.llm_vocab_size)  # the "words" filter drops some tokens
    bounds = [(rows * r // 2, rows * (r + 1) // 2) for r in range(2)]
    for rank, report in enumerate(pair):
        got = report["vocab"][name]
        start, stop = bounds[rank]
        assert (got["start"], got["stop"]) == (start, stop)
        assert torch.equal(torch.tensor(got["rows"]), single.weight[start:stop].float())
        assert got["fingerprint"] == single.fingerprint()
        assert got["token_ids"] == single.token_ids.tolist() and got["texts"] == single.texts
        assert got["encode"] == [rows - 1] and got["weight_refused"]


@pytest.mark.parametrize("name", ["safetensors", "gguf"])
def test_no_rank_reads_more_than_its_rows_and_one_chunk(runs, name):
    folder, pair, _ = runs
    single = _single_vocab(folder, name)
    ids = single.token_ids.tolist()
    chunk_rows = max(1, 64 // (4 * single.dim))  # the workers set CHUNK_BYTES = 64
    for rank, report in enumerate(pair):
        got = report["vocab"][name]
        reads = [tuple(r) for r in got["reads"]]
        assert reads and all(stop - start <= chunk_rows for start, stop in reads), reads[:5]
        own = [r for r in reads if ids[got["start"]] <= r[0] <= ids[got["stop"] - 1]]
        if rank == 0:  # the fingerprint: every kept row once, chunk by chunk (its own rows kept on the way)
            assert reads == list(_chunks(ids, chunk_rows))
        else:  # its shard only
            assert own == reads
            assert {i for start, stop in reads for i in range(start, stop)} >= set(ids[got["start"] : got["stop"]])


def _chunks(ids, step):
    position = 0
    while position < len(ids):
        first = ids[position]
        end = next((j for j in range(position, len(ids)) if ids[j] >= first + step), len(ids))
        yield (first, ids[end - 1] + 1)
        position = end


def test_an_spae_on_the_sharded_vocabulary_is_the_single_process_model(runs):
    from spae_fast.model import SPAE

    folder, pair, _ = runs
    vocab = _single_vocab(folder, "gguf")
    single = SPAE.from_pretrained(folder / "single_model", codebook=vocab)
    vp = SPAE.from_pretrained(folder / "vp_model", codebook=vocab)  # saved by rank 0 of the 2-rank model
    probe = _train_cases.probe_images()
    for report in pair:
        assert report["vocab"]["model"]["quantizer"]
        assert report["vocab"]["model"]["fingerprint"] == single.config.codebook_fingerprint
        assert report["vocab"]["model"]["ids"] == vp.encode(probe).tolist()
        assert report["vocab"]["loaded_ids"] == single.encode(probe).tolist()  # a 1-process checkpoint on 2 ranks
        assert report["vocab"]["cosine_refused"]


def test_clear_errors_on_every_rank(runs):
    _, pair, _ = runs
    expected = {
        "missing": ("rank 1 could not read the vocabulary", "none.gguf"),
        "different": ("kept different token ids",),
        "gap": ("do not cover the table",),
        "bad_filter": ("rank 0 could not read the vocabulary", "token_filter must be"),
    }
    for rank, report in enumerate(pair):
        for case, parts in expected.items():
            message = report["vocab"]["errors"][case]
            assert message is not None, f"rank {rank}: {case} raised nothing"
            assert all(part in message for part in parts), f"rank {rank}, {case}: {message}"


def test_grid_of_two_data_replicas_and_two_vocabulary_shards(runs):
    """4 ranks = 2 data replicas x 2 vocabulary shards, against 2 data replicas with the whole table (DDP on 2
    ranks): the same weights bit for bit after 2 steps, and the same words."""
    _, pair, grid = runs
    assert [(r["data_rank"], r["data_world"]) for r in grid] == [(0, 2), (0, 2), (1, 2), (1, 2)]
    assert [(r["ddp"]["data_rank"], r["ddp"]["data_world"]) for r in pair] == [(0, 2), (1, 2)]
    rows = _train_cases.NUM_ROWS
    assert all(r["boundaries"] == [[0, rows // 2], [rows // 2, rows]] for r in grid)
    reference = pair[0]["ddp"]
    for rank, report in enumerate(grid):
        assert report["weights"] == reference["weights"], f"grid rank {rank} differs from data parallel"
        assert report["ids"] == reference["ids"]


def test_the_grids_checkpoint_is_the_data_parallel_one(runs):
    """The saved models of the grid and of 2-rank DDP hold the same tensors and metadata (config, content digest):
    nothing in a checkpoint depends on the rank layout. (Not the same bytes: safetensors writes its metadata map
    in an arbitrary order.)"""
    from safetensors.torch import load_file

    from spae_fast._integrity import read_safetensors_header

    folder, _, _ = runs
    for sub in ("model", "checkpoint"):
        grid, ddp = folder / "grid" / sub / "model.safetensors", folder / "ddp" / sub / "model.safetensors"
        assert read_safetensors_header(grid).metadata == read_safetensors_header(ddp).metadata, sub
        want = load_file(str(ddp))
        assert all(torch.equal(tensor, want[name]) for name, tensor in load_file(str(grid)).items()), sub


def test_resume_on_two_ranks_and_on_one_process_equals_the_uninterrupted_run(runs, tmp_path):
    """A 2-rank vocabulary-parallel run stopped at its step-1 checkpoint and resumed to step 2 on 2 ranks, and
    the same checkpoint resumed on 1 process, against the uninterrupted 1-process run: bitwise (without semantic
    loss the vocabulary-parallel step is bitwise the 1-process one)."""
    import shutil

    from spae_fast.trainer import Trainer

    folder, pair, _ = runs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the children: conv kernels are bitwise only at the same thread count
    try:
        straight = Trainer(_train_cases.make_model(_train_cases.make_vocab()), _grid_cases.resume_config(2),
                           tmp_path / "straight", _train_cases.make_dataset())  # fmt: skip
        straight.fit(progress=False)
        shutil.copytree(folder / "stopped", tmp_path / "one")
        resumed = Trainer(_train_cases.make_model(_train_cases.make_vocab()), _grid_cases.resume_config(2),
                          tmp_path / "one", _train_cases.make_dataset())  # fmt: skip
        resumed.fit(resume=True, progress=False)
    finally:
        torch.set_num_threads(threads)
    want = _grid_cases._digest(straight.model)
    assert resumed.step == 2 and _grid_cases._digest(resumed.model) == want
    for rank, report in enumerate(pair):
        assert report["resume"]["step"] == 2
        assert report["resume"]["weights"] == want, f"rank {rank}: the 2-rank resume differs"
