"""``spae-fast fewshot``: few-shot classification of images by a frozen LLM reading their SPAE words.

    spae-fast fewshot --model DIR [--llm smollm2|PATH] [--data digits] [--ways 2 5] [--shots 1 3 5]
                      [--layers 2 3] [--episodes 100] [--queries Q] [--labels names nonsense]
                      [--classes 5-9] [--repeats 1] [--task-induction] [--method shared|tree|kv_cache|naive|generate]
                      [--seed 0] [--out results.csv]

The open-ended mini-ImageNet protocol of Frozen / LQAE / SPAE (SPAE-METHOD.md §5, `spae_fast.llm`):
each episode draws N classes, K support images per class and Q query images (default one per class); the
prompt lists "Input: <words>\\nOutput: <label>\\n" per support image, then the query; the LLM scores every
label (closed set; ``--method generate``: open-ended answer, exact match). Every combination of the listed
ways, shots, layers, label kinds and repeats is one row of the table (like the paper's Table 1): accuracy
with its Wilson 95% interval and chance. ``--classes`` restricts the episodes to some classes (e.g. the
digits held out from semantic guidance); ``--labels nonsense`` replaces class names by Frozen's nonsense
words ("dax", "blicket", ...), so the LLM cannot lean on the names.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import time
from pathlib import Path

import torch

from .cli import CommandError, existing_path, output_file, parse_classes, positive_int


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``fewshot`` and ``generate``: the SPAE model, the LLM, the images."""
    parser.add_argument("--model", required=True, help="SPAE checkpoint folder (SPAE.save_pretrained)")
    parser.add_argument(
        "--llm", default="smollm2", help="causal LM: 'smollm2' (default), a model folder or a .gguf file"
    )
    parser.add_argument(
        "--data", default="digits", help="'digits', 'skimage' or an image folder (default digits)"
    )
    parser.add_argument("--split", default="test", choices=("train", "test", "all"),
                        help="digits split to draw images from (default test: not seen in training)")  # fmt: skip
    parser.add_argument("--image-tokens", default="auto", choices=("auto", "ids", "text"),
                        help="feed image words as LLM ids (the codebook's own LLM) or as text (default auto)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=positive_int, default=64, help="images per encoder batch")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads (default: torch's; 1 is faster on a busy machine)")  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--ways", type=positive_int, nargs="+", default=[2], help="classes per episode (default 2)")
    parser.add_argument(
        "--shots", type=positive_int, nargs="+", default=[1], help="support images per class (default 1)"
    )
    parser.add_argument("--layers", type=positive_int, nargs="+", default=[2],
                        help="pyramid layers describing each image (default 2: 5 words)")  # fmt: skip
    parser.add_argument("--episodes", type=positive_int, default=100, help="episodes per setting (default 100)")
    parser.add_argument(
        "--queries", type=positive_int, default=None, help="queries per episode (default: one per way)"
    )
    parser.add_argument("--labels", nargs="+", default=["names"], choices=("names", "nonsense"),
                        help="class names or Frozen's nonsense words (default names)")  # fmt: skip
    parser.add_argument("--classes", type=parse_classes, default=None,
                        help="class pool for the episodes, e.g. 5-9 (default: all classes)")  # fmt: skip
    parser.add_argument(
        "--repeats", type=positive_int, nargs="+", default=[1], help="times the support set is repeated"
    )
    parser.add_argument("--task-induction", action="store_true", help='start with "Answer with a or b."')
    parser.add_argument("--method", default="shared", choices=("shared", "tree", "kv_cache", "naive", "generate"),
                        help="closed-set scoring with the support set encoded once (default 'shared': 'tree' or "
                        "'kv_cache', whichever the model supports best), one forward per candidate ('naive'), "
                        "or open-ended greedy answers ('generate')")  # fmt: skip
    parser.add_argument("--out", default=None, help="CSV file for the table (one row per setting)")
    parser.add_argument(
        "--episodes-out", default=None, help="CSV file of every query (episode, image, answer)"
    )


def load_images(args, image_size: int):
    """The dataset named by ``args.data`` (``args.split`` for digits) at the model's image size."""
    from .data import build_dataset

    kwargs = {"split": args.split} if args.data == "digits" else {}
    return build_dataset(args.data, image_size=image_size, **kwargs)


@torch.no_grad()
def encode_dataset(spae, dataset, num_layers: int, batch_size: int) -> torch.Tensor:
    """``[N, total(num_layers)]`` codebook rows of every image of ``dataset``."""
    out = []
    for start in range(0, len(dataset), batch_size):
        indices = range(start, min(start + batch_size, len(dataset)))
        images = torch.stack([dataset[i][0] for i in indices])
        out.append(spae.encode(images, num_layers=num_layers).cpu())
    return torch.cat(out)


def load_setup(args, layers: int | None = None):
    """(spae, FrozenLM, ImageVocabulary) for the command's --model, --llm and --image-tokens; ``layers`` (the
    most the command describes images with) is checked against the model before the LLM is loaded."""
    from .llm import FrozenLM, ImageVocabulary
    from .model import SPAE

    existing_path(args.llm, "--llm")  # a missing folder, not a Hub id with a confusing message
    if args.threads:
        torch.set_num_threads(args.threads)
    spae = SPAE.from_pretrained(args.model).eval()
    if layers is not None and layers > spae.quantizer.num_layers:
        raise CommandError(f"--layers {layers}: the model has {spae.quantizer.num_layers} layers")
    lm = FrozenLM.from_pretrained(args.llm)
    images = ImageVocabulary(spae.quantizer, lm, mode=args.image_tokens)
    return spae, lm, images


def format_table(results) -> str:
    """A markdown table in the shape of the paper's Table 1: one row per setting."""
    lines = [
        "| ways | shots | layers (words) | repeats | labels | induction | accuracy (95% CI) | chance | queries |",
        "|---:|---:|---|---:|---|---|---|---:|---:|",
    ]
    for r in results:
        low, high = r.interval
        lines.append(
            f"| {r.ways} | {r.shots} | {r.num_layers} ({r.tokens_per_image}) | {r.repeats} | {r.label_kind} | "
            f"{'yes' if r.task_induction else 'no'} | {100 * r.accuracy:.1f}% [{100 * low:.1f}, {100 * high:.1f}] | "
            f"{100 * r.chance:.0f}% | {r.total} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from .llm import evaluate_fewshot

    for option, path in (("--out", args.out), ("--episodes-out", args.episodes_out)):
        if path:
            output_file(path, option)  # before the slow part, not after it
    spae, lm, images = load_setup(args, max(args.layers))
    dataset = load_images(args, spae.config.image_size)
    labels = torch.as_tensor(dataset.labels)
    class_names = list(getattr(dataset, "class_names", [])) or None
    started = time.perf_counter()
    ids = encode_dataset(spae, dataset, max(args.layers), args.batch_size)
    print(
        f"{len(dataset)} images of {args.data} ({args.split}) encoded in {time.perf_counter() - started:.1f} s; "
        f"LLM {args.llm} ({type(lm.model).__name__}, vocabulary {lm.vocab_size}), image words as {images.mode}"
        + ("" if images.matches else f" ({images.match_reason})"),
        flush=True,
    )
    results, queries = [], []
    settings = list(itertools.product(args.ways, args.shots, args.layers, args.labels, args.repeats))
    for ways, shots, layers, label_kind, repeats in settings:
        result = evaluate_fewshot(  # a ValueError (e.g. more ways than classes) is reported by spae_fast.cli
            images, ids, labels, ways=ways, shots=shots, num_layers=layers, num_episodes=args.episodes,
            num_queries=args.queries, repeats=repeats, label_kind=label_kind, class_names=class_names,
            task_induction=args.task_induction, method=args.method, seed=args.seed, class_pool=args.classes,
        )  # fmt: skip
        results.append(result)
        low, high = result.interval
        print(
            f"{ways}-way {shots}-shot, {layers} layers, {label_kind}, repeats {repeats}: "
            f"{100 * result.accuracy:.1f}% [{100 * low:.1f}, {100 * high:.1f}] over {result.total} queries "
            f"(chance {100 * result.chance:.0f}%), {result.seconds:.1f} s",
            flush=True,
        )
        for record in result.records:
            for image, target, prediction, answer in zip(record.queries, record.targets, record.predictions,
                                                         record.answers):  # fmt: skip
                queries.append({"ways": ways, "shots": shots, "layers": layers, "labels": label_kind,
                                "repeats": repeats, "episode": record.index, "image": image,
                                "class": record.classes[target], "label": record.labels[target],
                                "answer": answer, "correct": int(prediction == target)})  # fmt: skip
    pool = "all classes" if args.classes is None else f"classes {args.classes}"
    print(f"\nFew-shot classification, {args.data} ({args.split}, {pool}), LLM {args.llm}, {args.method}:\n")
    print(format_table(results))
    if args.out:
        _write_csv(args.out, [r.summary() for r in results])
        print(f"\ntable: {args.out}")
    if args.episodes_out:
        _write_csv(args.episodes_out, queries)
        print(f"queries: {args.episodes_out}")
    return 0


def _write_csv(path: str, rows: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]) if rows else [], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
