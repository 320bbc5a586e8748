"""``spae-fast demo``: the embedded default. Trains a small SPAE on sklearn's digits (upscaled to 32 x 32) against
the frozen SmolLM2-135M vocabulary (47096 word tokens, dim 576) with label-text semantic guidance (the offline
MiniLM sentence encoder relates every token to the class names "zero" .. "nine"), then writes a report folder:

    report.md / report.json     whether the words name the digit (word -> class accuracy of layers 1, 1..2 and
                                1..3 on every held-out image, with chance), PSNR per number of layers, the words
                                of the first layers for a held-out image of every class, the timings
    reconstructions.png         held-out inputs, then their reconstructions from 1, 2, ... layers
    model/                      the trained SPAE (`SPAE.from_pretrained`, `spae-fast tokenize --model ...`)
    metrics.jsonl, samples/     the training log (see `spae_fast.trainer`)

Budget: 15 minutes on 2 CPU cores, about 5 used (the step count below was sized on such a machine; ``--max-minutes``
caps the training time on slower ones). The first run also dequantises SmolLM2's embedding table (~5 s) and
embeds its word tokens with MiniLM (~1 min); both are cached (`spae_fast.vocab.cache_dir()`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from .cli import output_folder, positive_float, positive_int
from .evaluation import evaluate_model
from .model import SPAE, SPAEConfig
from .trainer import TrainConfig, Trainer

DEMO_MODEL = SPAEConfig(
    image_size=32, base_channels=32, channel_multipliers=(1, 2, 2), num_res_blocks=1, layers=(1, 2, 4, 8, 8)
)  # 8 x 8 latent grid; 1 + 4 + 16 + 64 + 64 = 149 words per image; a 1.1M-parameter CNN (why this small:
# docs/DECISIONS.md, "The demo's CNN")
# Guidance on layers 1-2 (the 5 words the report shows; guiding layer 3's 16 words too cost ~1.5 dB of full PSNR in
# the demo's budget) with alpha0 = 20 and tau 2 on layer 2, whose SAQ target 2 z - e_1 then depends on z as RQ's
# does at tau 1. Over three seeds the words name the digit for 98.3% of held-out images (layer 1), 98.1% (layers
# 1..2) and 91.6% (1..3) at 24.8 dB, against 96.8% / 97.6% / 88.2% at 24.8 dB with alpha0 = 10 and tau 1 (alpha0
# = 1: 30%); docs/DECISIONS.md, "Semantic weighting".
DEMO_TRAINING = TrainConfig(
    steps=500, batch_size=16, eval_every=100, save_every=100, eval_images=10, alpha0=20.0, semantic_layers=2,
    semantic_layer_taus=(1.0, 2.0),
)
REPORT_LAYERS = 2  # the words of layers 1..2 (5 words) describe each sample image
JUDGED_LAYERS = 3  # word -> class accuracy of layers 1, 1..2 and 1..3 (1, 5 and 21 words)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="spae-demo", help="report folder (default: spae-demo)")
    parser.add_argument("--steps", type=positive_int, default=DEMO_TRAINING.steps,
                        help="training steps (default: %(default)s)")  # fmt: skip
    parser.add_argument("--batch-size", type=positive_int, default=DEMO_TRAINING.batch_size)
    parser.add_argument("--max-minutes", type=positive_float, default=12.0,
                        help="stop training after this many minutes (default: %(default)s)")  # fmt: skip
    parser.add_argument("--relevance", default="label", choices=("label", "none"),
                        help="'label' (default) or 'none' (no semantic guidance)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")


def held_out_per_class(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """The first held-out image of every class present, in class order."""
    images, labels = [], []
    for label in sorted(set(dataset.labels.tolist())):
        index = int((dataset.labels == label).nonzero()[0])
        image, _ = dataset[index]
        images.append(image)
        labels.append(label)
    return torch.stack(images), torch.tensor(labels)


def word_report(
    model: SPAE, relevance, images: torch.Tensor, labels: torch.Tensor, class_names
) -> list[dict]:
    """Per sample image: its class and the words of the first `REPORT_LAYERS` layers with their relevance to the
    class name (cosine under the provider, and the min-max normalised s in [0, 1])."""
    from .semantic import normalize_relevance

    ids = model.encode(images, REPORT_LAYERS)
    raw = getattr(relevance, "similarity", relevance)(images, labels) if relevance is not None else None
    scores = normalize_relevance(raw) if raw is not None else None
    rows = []
    for b, label in enumerate(labels.tolist()):
        words = [text.strip() for text in model.vocab.text(ids[b])]
        entry = {"class": class_names[label], "words": words}
        if raw is not None:
            entry["relevance"] = [round(float(raw[b, k]), 3) for k in ids[b]]
            entry["normalized"] = [round(float(scores[b, k]), 3) for k in ids[b]]
        rows.append(entry)
    return rows


def evaluate_held_out(
    model: SPAE, relevance, held_out, layers: int = REPORT_LAYERS, batch: int = 120
) -> dict:
    """PSNR per prefix and the relevance of the words of layers 1..``layers`` over a whole dataset split
    (image-weighted means of `evaluate_model` over batches of images)."""
    sums: dict[str, torch.Tensor] = {}
    count = 0
    for start in range(0, len(held_out), batch):
        items = [held_out[i] for i in range(start, min(start + batch, len(held_out)))]
        images = torch.stack([image for image, _ in items])
        labels = torch.as_tensor([int(label) for _, label in items])
        part = evaluate_model(model, images, labels, relevance, layers)
        for key in ("psnr", "relevance", "relevance_mean"):  # per prefix, per layer, scalar
            if key in part:
                value = torch.as_tensor(part[key], dtype=torch.float64) * len(items)
                sums[key] = sums[key] + value if key in sums else value
        count += len(items)
    means = {key: (total / count).tolist() for key, total in sums.items()}
    return {key: [round(v, 4) for v in m] if isinstance(m, list) else round(m, 4) for key, m in means.items()}


def word_accuracy_lines(accuracy: list[dict], images: int) -> list[str]:
    """The report's headline: does an image's words name its digit?"""
    lines = [
        f"## Do the words name the digit? (all {images} held-out images)",
        "",
        (
            "Word -> class accuracy: the class whose name is most similar, on average under the MiniLM text embedder, "
            "to the words of the first layers (`spae_fast.word_accuracy`); chance is the commonest class's share."
        ),
        "",
        "| layers | words per image | word -> class accuracy | words contain the class name | chance |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in accuracy:
        layers = "1" if row["layers"] == 1 else f"1..{row['layers']}"
        lines.append(f"| {layers} | {row['words']} | {100 * row['accuracy']:.1f}% | "
                     f"{100 * row['contains_class_name']:.1f}% | {100 * row['chance']:.1f}% |")  # fmt: skip
    return lines + [""]


def write_report(out: Path, report: dict) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# spae-fast demo report",
        "",
        (
            f"SPAE on digits ({report['image_size']}x{report['image_size']}), codebook {report['codebook']}, "
            f"semantic guidance: {report['relevance']}. {report['steps']} steps in {report['train_seconds']:.0f} s "
            f"(median step {report['median_step_seconds']:.2f} s); whole demo {report['wall_seconds']:.0f} s."
        ),
        "",
        *word_accuracy_lines(report["word_accuracy"], report["held_out_images"]),
        f"## Reconstruction per number of layers (mean over the {report['held_out_images']} held-out images)",
        "",
        "| layers | words per image | PSNR (dB) |",
        "|---:|---:|---:|",
    ]
    for n, (words, value) in enumerate(zip(report["words_per_prefix"], report["psnr"]), 1):
        lines.append(f"| {n} | {words} | {value:.2f} |")
    lines += ["", "![reconstructions](reconstructions.png)", ""]
    if "relevance_mean" in report:
        mean, per_layer = report["relevance_mean"], report["relevance_per_layer"]
        summary = (f"Secondary: mean normalised relevance (s in [0, 1], any number word scores high against any digit) "
                   f"of the layer-1..{REPORT_LAYERS} words to the image's class name (held-out images): ")  # fmt: skip
        lines += [summary + f"{mean:.3f} (per layer: {per_layer}).", ""]
    lines += [f"## Words of layers 1..{REPORT_LAYERS} for one held-out image per class", ""]
    scored = "relevance" in report["samples"][0]
    lines.append(
        "| class | words | relevance to the class name (cosine; normalised) |"
        if scored
        else "| class | words |"
    )
    lines.append("|---|---|---|" if scored else "|---|---|")
    for sample in report["samples"]:
        words = " ".join(sample["words"])
        if scored:
            pairs = ", ".join(f"{r:.2f}; {s:.2f}" for r, s in zip(sample["relevance"], sample["normalized"]))
            lines.append(f"| {sample['class']} | {words} | {pairs} |")
        else:
            lines.append(f"| {sample['class']} | {words} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")


def run(args: argparse.Namespace) -> int:
    from .cli_train import build_datasets, build_relevance, word_judge
    from .imaging import save_grid
    from .vocab import VocabCodebook
    from .word_accuracy import evaluate_words

    started = time.perf_counter()
    out = output_folder(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    train, held_out = build_datasets("digits", DEMO_MODEL.image_size)
    vocab = VocabCodebook.from_pretrained(DEMO_MODEL.codebook, token_filter=DEMO_MODEL.token_filter)
    relevance = build_relevance(args.relevance, vocab, train.class_names)
    similarity = word_judge(relevance, vocab, train.class_names)
    model = SPAE(DEMO_MODEL, vocab)
    config = dataclasses.replace(
        DEMO_TRAINING,
        steps=args.steps,
        batch_size=args.batch_size,
        seed=args.seed,
        max_minutes=args.max_minutes,
    )
    summary = Trainer(
        model, config, out, train, eval_dataset=held_out, relevance=relevance, word_similarity=similarity
    ).fit(progress=not args.no_progress)
    result = evaluate_held_out(model, relevance, held_out)
    word_accuracy = evaluate_words(model, held_out, similarity, JUDGED_LAYERS, train.class_names)
    images, labels = held_out_per_class(held_out)
    samples = evaluate_model(model, images, labels, None, REPORT_LAYERS)
    save_grid(out / "reconstructions.png", [images] + samples["reconstructions"],
              row_labels=["input"] + [f"{n} layers" for n in range(1, model.num_layers + 1)])  # fmt: skip
    pyramid = model.quantizer.pyramid
    report = {
        "image_size": DEMO_MODEL.image_size,
        "codebook": f"{DEMO_MODEL.codebook} ({vocab.num_rows} x {vocab.dim} words)",
        "relevance": args.relevance,
        "steps": summary["step"],
        "train_seconds": summary["seconds"],
        "median_step_seconds": summary["median_step_seconds"],
        "words_per_prefix": [pyramid.total(n) for n in range(1, model.num_layers + 1)],
        "held_out_images": len(held_out),
        "psnr": result["psnr"],
        "word_accuracy": [row.as_dict() for row in word_accuracy],
        "samples": word_report(model, relevance, images, labels, train.class_names),
    }
    if "relevance" in result:
        report["relevance_per_layer"] = result["relevance"]
        report["relevance_mean"] = result["relevance_mean"]
    report["wall_seconds"] = time.perf_counter() - started
    write_report(out, report)
    print((out / "report.md").read_text())
    return 0
