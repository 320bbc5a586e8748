"""``spae-fast generate``: a frozen LLM writes SPAE words coarse to fine from in-context examples; the SPAE
decoder renders every prefix of layers.

    spae-fast generate --model DIR [--llm smollm2|PATH] --task denoise|flip|shift|inpaint [--data digits]
                       [--layers 3] [--count 4] [--examples 10] [--rates 0.5 0.23] [--chunk-size N]
                       [--temperature 0] [--top-k K] [--seed 0] --out DIR

Tasks (`spae_fast.llm`, SPAE-METHOD.md §5):
    denoise   progressive in-context denoising: the context is the target image's words corrupted with random
              codebook words at linearly decreasing rates (``--examples`` lines, ``--rates`` first last;
              default 10 lines, 0.50 -> 0.23); the LLM writes the next, cleaner line. The clean words never
              enter the prompt.
    flip / shift / inpaint
              image-to-image from ``--examples`` pairs (default 4) "Input: <A>\\nOutput: <f(A)>\\n" with f =
              mirror, shift right by a quarter of the side, or fill a masked centre (input masked, output
              whole); then the query's input, and the LLM writes its output.

Every step writes one layer (or ``--chunk-size`` words of it) conditioned on the layers already written,
with decoding constrained to the codebook's words. Writes under ``--out``: ``<task>.png`` (one row per
stage: the query input, the expected output, its SPAE reconstruction, the generation after 1, 2, ...
layers), ``<task>_layer<l>.png`` (the generated images after l layers), ``<task>.json`` (the generated words
and the PSNR of each prefix against the expected image; for denoising also against the least corrupted
context line).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from .cli import CommandError, finite_float, output_folder, positive_int
from .cli_fewshot import add_common_arguments, load_images, load_setup
from .losses import psnr

TASKS = ("denoise", "flip", "shift", "inpaint")


def _rate(text: str) -> float:
    """argparse type: a corruption rate in [0, 1]."""
    value = finite_float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a rate in [0, 1], got {text!r}")
    return value


def _temperature(text: str) -> float:
    """argparse type: a finite number >= 0."""
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--layers", type=positive_int, default=3, help="layers to generate (default 3)")
    parser.add_argument("--count", type=positive_int, default=4, help="images to generate (default 4)")
    parser.add_argument("--examples", type=positive_int, default=None,
                        help="in-context examples (default: 10 corrupted lines for denoise, 4 pairs otherwise)")  # fmt: skip
    parser.add_argument("--rates", type=_rate, nargs=2, default=(0.50, 0.23), metavar=("FIRST", "LAST"),
                        help="denoise: corruption rate of the first and the last context line")  # fmt: skip
    parser.add_argument(
        "--chunk-size", type=positive_int, default=None, help="words per step within a layer (default: whole layer)"
    )
    parser.add_argument("--temperature", type=_temperature, default=0.0, help="0: greedy (default); > 0: sampling")
    parser.add_argument("--top-k", type=positive_int, default=None, help="sample among the k likeliest codebook words")
    parser.add_argument("--out", required=True, help="output folder for the PNGs and the JSON report")


def run(args: argparse.Namespace) -> int:
    from .imaging import save_grid, save_image
    from .llm import denoise, denoising_rates, image_to_image, task_pairs

    output_folder(args.out)
    spae, _, images = load_setup(args, args.layers)
    quantizer = spae.quantizer
    dataset = load_images(args, spae.config.image_size)
    num_examples = args.examples or (10 if args.task == "denoise" else 4)
    needed = args.count + (0 if args.task == "denoise" else num_examples)
    if len(dataset) < needed:
        raise CommandError(f"{args.task} with --count {args.count} needs {needed} images, {args.data} has {len(dataset)}")
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(dataset), generator=generator)[:needed].tolist()
    pictures = torch.stack([dataset[i][0] for i in order])
    targets = pictures[: args.count]
    options = {"chunk_size": args.chunk_size, "temperature": args.temperature, "top_k": args.top_k}
    print(
        f"{args.task}: {args.count} images of {args.data}, {num_examples} in-context examples, {args.layers} layers "
        f"({quantizer.pyramid.total(args.layers)} words), LLM {args.llm}, image words as {images.mode}",
        flush=True,
    )
    with torch.no_grad():
        if args.task == "denoise":
            inputs, expected = targets, targets
        else:
            inputs, expected = task_pairs(args.task, targets)
            example_inputs, example_outputs = task_pairs(args.task, pictures[args.count :])
            example_inputs = spae.encode(example_inputs, num_layers=args.layers)
            example_outputs = spae.encode(example_outputs, num_layers=args.layers)
        input_ids = spae.encode(inputs, num_layers=args.layers)
        expected_ids = spae.encode(expected, num_layers=args.layers)
    results, report = [], {"task": args.task, "llm": args.llm, "layers": args.layers, "image_tokens": images.mode,
                           "examples": num_examples, "images": []}  # fmt: skip
    rates = denoising_rates(num_examples, *args.rates)
    for index in range(args.count):
        started = time.perf_counter()
        if args.task == "denoise":
            result = denoise(images, input_ids[index], num_layers=args.layers, rates=rates,
                             seed=args.seed + index, **options)  # fmt: skip
        else:
            result = image_to_image(images, example_inputs, example_outputs, input_ids[index],
                                    num_layers=args.layers, seed=args.seed + index, **options)  # fmt: skip
        results.append(result)
        seconds = time.perf_counter() - started
        entry = {"image": order[index], "seconds": seconds, "words": quantizer.to_text(result.ids[None])[0]}
        with torch.no_grad():
            prefixes = [spae.decode(p, num_layers=n) for n, p in enumerate(result.prefixes, 1)]
            target = expected[index : index + 1]
            entry["psnr_per_layer"] = [float(psnr(p, target)[0]) for p in prefixes]
            entry["psnr_reconstruction"] = float(psnr(spae.decode(expected_ids[index : index + 1]), target)[0])
            if args.task == "denoise":
                least = result.context[-1][1][: quantizer.pyramid.total(args.layers)][None]
                entry["psnr_least_corrupted"] = float(psnr(spae.decode(least), target)[0])
                entry["words_changed_vs_clean"] = int((result.ids != expected_ids[index]).sum())
                entry["words_changed_least_corrupted"] = int((least[0] != expected_ids[index]).sum())
        report["images"].append(entry)
        extra = ""
        if args.task == "denoise":
            extra = (f", least corrupted context line {entry['psnr_least_corrupted']:.2f} dB; words differing from "
                     f"the clean ones {entry['words_changed_vs_clean']} (least corrupted line "
                     f"{entry['words_changed_least_corrupted']})")  # fmt: skip
        print(
            f"image {index} ({order[index]}): generated {entry['psnr_per_layer'][-1]:.2f} dB vs expected "
            f"(its SPAE reconstruction {entry['psnr_reconstruction']:.2f} dB){extra}; {seconds:.1f} s",
            flush=True,
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        rows = [inputs, expected, spae.decode(expected_ids)]
        labels = ["input" if args.task != "denoise" else "clean", "expected", "SPAE reconstruction"]
        if args.task == "denoise":
            rows[0] = spae.decode(torch.stack([r.context[0][1][: expected_ids.shape[1]] for r in results]))
            labels[0] = f"context line 1 (rate {rates[0]:.2f})"
            rows.insert(
                1, spae.decode(torch.stack([r.context[-1][1][: expected_ids.shape[1]] for r in results]))
            )
            labels.insert(1, f"context line {num_examples} (rate {rates[-1]:.2f})")
        for layer in range(1, args.layers + 1):
            generated = spae.decode(torch.cat([r.prefixes[layer - 1] for r in results]), num_layers=layer)
            save_image(out / f"{args.task}_layer{layer}.png", generated, nrow=args.count)
            rows.append(generated)
            labels.append(f"generated, {layer} layer{'s' if layer > 1 else ''}")
    save_grid(out / f"{args.task}.png", rows, row_labels=labels)
    summary = {key: sum(e[key] for e in report["images"]) / args.count
               for key in ("psnr_reconstruction", "psnr_least_corrupted") if key in report["images"][0]}  # fmt: skip
    summary["psnr_generated"] = sum(e["psnr_per_layer"][-1] for e in report["images"]) / args.count
    report["mean"] = summary
    (out / f"{args.task}.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print("\nmean PSNR: " + ", ".join(f"{k} {v:.2f} dB" for k, v in summary.items()))
    print(f"wrote {out / (args.task + '.png')}, {args.task}_layer1..{args.layers}.png, {args.task}.json")
    return 0
