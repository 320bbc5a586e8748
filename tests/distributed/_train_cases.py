"""Worker of tests/distributed/test_vocab_parallel_training.py: vocabulary-parallel training on a tiny SPAE
inside every rank of a gloo process group. The test process runs the 1-process reference and compares."""

from __future__ import annotations

import datetime
import json
import os
import traceback

import torch
import torch.distributed as dist
from _spae_checks import ClassRelevance  # tests/ is on the path the spawned ranks inherit

TINY_MODEL = {"image_size": 16, "base_channels": 8, "channel_multipliers": (1, 2), "num_res_blocks": 1,
              "layers": (1, 2, 4, 8), "codebook": "unused"}  # fmt: skip
NUM_ROWS, DIM = 37, 8  # V odd: the two shards hold 18 and 19 rows
NUM_CLASSES = 4


def make_vocab():
    from spae_fast.vocab import VocabCodebook

    weight = torch.randn(NUM_ROWS, DIM, generator=torch.Generator().manual_seed(5))
    return VocabCodebook(weight, [f"Ġw{i}" for i in range(NUM_ROWS)], token_filter=None)


def make_dataset(count: int = 12) -> list[tuple[torch.Tensor, int]]:
    g = torch.Generator().manual_seed(6)
    images = torch.rand(count, 3, 16, 16, generator=g) * 2 - 1
    return [(images[i], i % NUM_CLASSES) for i in range(count)]


def make_model(vocab):
    from spae_fast.model import SPAE, SPAEConfig

    torch.manual_seed(0)
    return SPAE(SPAEConfig(**TINY_MODEL), vocab)


def train_config():
    from spae_fast.trainer import TrainConfig

    return TrainConfig(steps=2, batch_size=4, log_every=1, eval_every=2, save_every=2, eval_images=4,
                       semantic_layers=2, semantic_precision="default")  # fmt: skip


def train(out_dir: str, semantic: bool, vocab_parallel: int = 1):
    """Trains the tiny model 2 steps (fit: loader, evaluation, checkpoint, final model); returns the trainer."""
    from spae_fast.trainer import Trainer

    vocab = make_vocab()
    trainer = Trainer(make_model(vocab), train_config(), out_dir, make_dataset(),
                      relevance=ClassRelevance(NUM_ROWS, NUM_CLASSES) if semantic else None,
                      vocab_parallel=vocab_parallel)  # fmt: skip
    trainer.fit(progress=False)
    return trainer


def step_gradients(out_dir: str, vocab_parallel: int = 1) -> dict[str, torch.Tensor]:
    """The gradient of every parameter after one semantic-guided `train_step` on a fixed batch, each guided layer
    at its own tau (one semantic-loss collective per layer; `train` covers the single call)."""
    import dataclasses

    from spae_fast.trainer import Trainer

    vocab = make_vocab()
    config = dataclasses.replace(train_config(), semantic_layer_taus=(1.0, 0.5))
    trainer = Trainer(make_model(vocab), config, out_dir, make_dataset(), relevance=ClassRelevance(NUM_ROWS, NUM_CLASSES),
                      vocab_parallel=vocab_parallel)  # fmt: skip
    items = make_dataset()[:4]
    trainer.train_step(torch.stack([image for image, _ in items]), torch.tensor([label for _, label in items]))
    return {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}


def probe_images() -> torch.Tensor:
    return torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(7)) * 2 - 1


def quantizer_matches(rank: int) -> dict:
    """VocabParallelQuantizer against SPAEQuantizer on the whole table, every method, bitwise."""
    from spae_fast.distributed import VocabParallelQuantizer
    from spae_fast.quantizer import SPAEQuantizer

    table = torch.randn(29, 5, generator=torch.Generator().manual_seed(8))
    whole = SPAEQuantizer(table, layers=(1, 2, 4, 4), grid=4)
    sharded = VocabParallelQuantizer.from_quantizer(whole, boundaries=[(0, 1), (1, 29)])  # a one-row shard
    z = (torch.randn(3, 5, 4, 4, generator=torch.Generator().manual_seed(9)) * 2).requires_grad_(True)
    want = whole(z)
    got = sharded(z)
    (want.loss + want.quantized.square().sum()).backward()
    grad_want, z.grad = z.grad, None
    (got.loss + got.quantized.square().sum()).backward()
    flat = whole.flatten_ids(want.ids)
    prefix = torch.tensor([1, 3, 4])
    checks = {
        "ids": all(torch.equal(a, b) for a, b in zip(want.ids, got.ids)),
        "quantized": torch.equal(want.quantized, got.quantized),
        "loss": torch.equal(want.loss, got.loss),
        "layer_errors": torch.equal(want.layer_errors, got.layer_errors),
        "grad": torch.equal(grad_want, z.grad),
        "quantize": torch.equal(whole.quantize(z), sharded.quantize(z)),
        "layer_targets": torch.equal(whole.layer_targets(z, want.ids, 3), sharded.layer_targets(z, want.ids, 3)),
        "decode": torch.equal(whole.decode(flat, 2), sharded.decode(flat, 2)),
        "prefix_latents": torch.equal(whole.prefix_latents(flat, prefix), sharded.prefix_latents(flat, prefix)),
        "no_table_in_state_dict": not any("weight" in k for k in sharded.state_dict()),
        "shard_rows": sharded.sharded.shard_rows,
    }
    try:
        sharded.decode(torch.full((1, 1), 29), 1)
        checks["bad_ids_raise"] = False
    except ValueError as error:
        checks["bad_ids_raise"] = "[0, 29)" in str(error)
    return checks


def run_worker(rank: int, world: int, store_path: str, folder: str) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip
    report: dict = {}
    try:
        report["quantizer"] = quantizer_matches(rank)
        for semantic in (False, True):
            name = "semantic" if semantic else "plain"
            trainer = train(os.path.join(folder, f"vp_{name}"), semantic, vocab_parallel=world)
            ids = trainer.model.encode(probe_images())
            report[name] = {"ids": ids.tolist(), "boundaries": list(trainer.model.quantizer.sharded.boundaries),
                            "shard_rows": trainer.model.quantizer.sharded.shard_rows}  # fmt: skip
        gradients = step_gradients(os.path.join(folder, "vp_step"), vocab_parallel=world)
        if rank == 0:
            from safetensors.torch import save_file

            save_file(gradients, os.path.join(folder, "vp_step_gradients.safetensors"))
        dist.barrier()  # every rank done before any tears gloo down (a late rank could abort otherwise)
    except Exception:  # noqa: BLE001 - reported to the test
        report["error"] = traceback.format_exc()
    finally:
        with open(os.path.join(folder, f"rank{rank}.json"), "w") as file:
            json.dump(report, file)
        dist.destroy_process_group()
