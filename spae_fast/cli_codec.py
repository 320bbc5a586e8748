"""``spae-fast tokenize / decode / reconstruct``: images <-> words with a trained SPAE (`SPAE.save_pretrained`).

Words are printed and read as raw vocabulary entries (``Ġseven``: the LLM tokenizer's own spelling, with its
leading-space marker), so what ``tokenize`` prints is exactly what ``decode`` reads back.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

from .cli import CommandError, output_file, positive_int
from .ops import BACKENDS

_LAYER_PREFIX = re.compile(r"^\s*layer\s+\d+\s*(\(\s*\d+\s*x\s*\d+\s*\))?\s*:")


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="an SPAE folder written by save_pretrained / spae-fast train")
    parser.add_argument("--backend", default="auto", choices=BACKENDS, help="search backend (default: auto)")


def _load_model(args: argparse.Namespace):
    from .model import SPAE

    try:
        return SPAE.from_pretrained(args.model, backend=args.backend).eval()
    except (ValueError, TypeError, OSError) as error:
        if args.model in str(error):
            raise
        # name the folder (e.g. a config whose layers do not fit its grid, or a codebook that has moved)
        raise CommandError(f"--model {args.model}: {error}") from error


def _load_images(paths: list[str], size: int) -> torch.Tensor:
    from .imaging import load_image

    return torch.stack([load_image(path, size) for path in paths])


def add_tokenize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", help="an image file")
    _add_model_arguments(parser)
    parser.add_argument("--layers", type=positive_int, default=None, help="number of pyramid layers (default: all)")
    parser.add_argument("--text", action="store_true", help="print the tokens' text instead of raw vocabulary entries")


def run_tokenize(args: argparse.Namespace) -> int:
    """Prints the words of IMAGE, one line per pyramid layer (``layer l (s x s): w w ...``, raster order)."""
    model = _load_model(args)
    if args.layers is not None and args.layers > model.num_layers:
        raise CommandError(f"--layers {args.layers}: the model has {model.num_layers} layers")
    images = _load_images([args.image], model.config.image_size)
    ids = model.encode(images, args.layers)
    vocab = model.vocab
    for layer, layer_ids in enumerate(model.quantizer.split_ids(ids), 1):
        words = vocab.text(layer_ids) if args.text else vocab.decode(layer_ids)
        words = [word.strip() for word in words] if args.text else words
        side = layer_ids.shape[-1]
        print(f"layer {layer} ({side}x{side}): {' '.join(words)}")
    return 0


def parse_words(text: str) -> list[str]:
    """Whitespace-separated words; ``layer l (s x s):`` prefixes as ``tokenize`` prints them are skipped."""
    words: list[str] = []
    for line in text.splitlines():
        words.extend(_LAYER_PREFIX.sub("", line).split())
    return words


def add_decode_arguments(parser: argparse.ArgumentParser) -> None:
    _add_model_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--words", help="the words of a whole prefix of layers (as tokenize prints them); '-' "
                        "reads them from stdin")  # fmt: skip
    source.add_argument("--words-file", help="a file holding the words (e.g. tokenize's output)")
    parser.add_argument("--out", required=True, help="PNG to write")


def run_decode(args: argparse.Namespace) -> int:
    """Renders words (a whole prefix of pyramid layers, as ``tokenize`` prints them) as an image."""
    from .imaging import save_image

    out = output_file(args.out)
    if args.words_file:
        try:
            text = Path(args.words_file).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise CommandError(f"--words-file {args.words_file}: no such file") from None
        except IsADirectoryError:
            raise CommandError(f"--words-file {args.words_file} is a folder, not a text file") from None
        except UnicodeDecodeError:
            raise CommandError(f"--words-file {args.words_file} is not UTF-8 text") from None
    else:
        text = sys.stdin.read() if args.words == "-" else args.words
    words = parse_words(text)
    model = _load_model(args)
    totals = [model.quantizer.pyramid.total(n) for n in range(1, model.num_layers + 1)]
    if len(words) not in totals:
        raise CommandError(f"decode got {len(words)} words; a whole prefix of layers has one of {totals}")
    try:
        image = model.from_words([words])
    except KeyError as error:  # a word that is not in the codebook
        raise CommandError(f"decode: {error.args[0]}") from None
    path = save_image(out, image[0].clamp(-1, 1))
    print(f"wrote {path} ({model.quantizer.pyramid.prefix_layers(len(words))} layers, {len(words)} words)")
    return 0


def add_reconstruct_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", help="image files")
    _add_model_arguments(parser)
    parser.add_argument("--out", required=True, help="PNG grid to write: inputs, then one row per prefix")


def run_reconstruct(args: argparse.Namespace) -> int:
    """Image -> words -> image from every prefix of layers: writes a grid and prints the PSNR per prefix."""
    from .evaluation import evaluate_model
    from .imaging import save_grid

    out = output_file(args.out)
    model = _load_model(args)
    images = _load_images(args.images, model.config.image_size)
    result = evaluate_model(model, images)
    rows = [images] + result["reconstructions"]
    pyramid = model.quantizer.pyramid
    labels = ["input"] + [f"{n} ({pyramid.total(n)} words)" for n in range(1, model.num_layers + 1)]
    path = save_grid(out, rows, row_labels=labels)
    print(f"wrote {path}")
    print("layers  words  PSNR (dB)")
    for n, value in enumerate(result["psnr"], 1):
        print(f"{n:6d} {pyramid.total(n):6d}  {value:8.2f}")
    return 0
