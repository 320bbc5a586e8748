"""The ``spae-fast`` command line: one subcommand per job, each implemented in its own module.

    spae-fast demo [--out DIR]                                       the embedded default: train SPAE on digits
    spae-fast train --data digits|skimage|FOLDER --out DIR ...       train an SPAE (cli_train.py)
    spae-fast tokenize IMAGE --model DIR [--layers L]                image -> words per pyramid layer
    spae-fast decode --model DIR --words "..." --out PNG             words -> image
    spae-fast reconstruct IMAGE... --model DIR --out PNG             image -> words -> image, every prefix
    spae-fast fewshot --model DIR --llm smollm2 --ways 2 5 ...     few-shot classification table (cli_fewshot.py)
    spae-fast generate --model DIR --task denoise --out DIR          in-context generation, PNGs per layer
    spae-fast bench [--suite quick|default|full] [--out DIR] ...     benchmarks/bench_nearest.py of a checkout
    spae-fast info                                                   backends, machine and versions

Adding a subcommand: write a module with ``add_arguments(parser)`` and ``run(args) -> int`` (or name other
functions in its `Command`), and add one `Command` line to `COMMANDS`. The module is imported only when its
subcommand runs (or its ``--help`` is built), so a heavy dependency of one command never slows the others.
A command whose options belong to a script it runs sets ``raw_argv``: its run function then takes the
arguments unparsed.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class Command:
    name: str
    module: str  # relative to the spae_fast package
    help: str
    add_arguments: str = "add_arguments"  # the module's function (parser) -> None
    run: str = "run"  # the module's function (args) -> int
    raw_argv: bool = False  # run takes the command's arguments as a list of strings, unparsed


COMMANDS: tuple[Command, ...] = (
    Command("demo", ".demo", "the embedded default: train a small SPAE on digits with the SmolLM2 vocabulary and "
            "label-text semantic guidance, then write a report"),
    Command("train", ".cli_train", "train an SPAE on a folder of images, digits or skimage samples"),
    Command("tokenize", ".cli_codec", "print the words of an image, layer by layer", "add_tokenize_arguments",
            "run_tokenize"),
    Command("decode", ".cli_codec", "render words (a whole prefix of layers) as an image", "add_decode_arguments",
            "run_decode"),
    Command("reconstruct", ".cli_codec", "image -> words -> image from every prefix of layers, with PSNR",
            "add_reconstruct_arguments", "run_reconstruct"),
    Command("fewshot", ".cli_fewshot", "few-shot classification of images by a frozen LLM reading their SPAE words"),
    Command("generate", ".cli_generate", "a frozen LLM writes SPAE words in context (denoise, flip, shift, inpaint)"),
    Command("bench", ".cli_bench", "benchmark fused nearest-word search against torch and FAISS baselines "
            "(benchmarks/bench_nearest.py of a source checkout)", raw_argv=True),
    Command("info", ".cli", "show which backends can run here, the machine and the versions"),
)


def _load(command: Command):
    return importlib.import_module(command.module, __package__)


# `spae-fast info` is small enough to live here.
def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no options


def run(args: argparse.Namespace) -> int:
    del args
    import spae_fast

    from .sysinfo import machine_info, versions

    for key, value in {**machine_info(), **versions()}.items():
        print(f"{key:13s} {value}")
    print("backends:")
    for name, status in spae_fast.available().items():
        print(f"  {name:7s} {'yes' if status.available else 'no '}  {status.reason}")
    return 0


# Shared by the commands that take a set of classes (train, fewshot).
def parse_classes(text: str | None) -> list[int] | None:
    """``"5-9"`` -> [5, 6, 7, 8, 9]; ``"0,2,4"`` -> [0, 2, 4]; ``"0-2,7"`` -> [0, 1, 2, 7]; None -> None."""
    if text is None:
        return None
    classes: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                low, high = (int(x) for x in part.split("-", 1))
                if high < low:
                    raise ValueError
                classes += range(low, high + 1)
            elif part:
                classes.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"classes must look like '5-9' or '0,2,4', got {text!r}") from None
    if not classes:
        raise argparse.ArgumentTypeError(f"classes must name at least one class, got {text!r}")
    return sorted(set(classes))


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the ``selected`` subcommand's module is imported (all of them when None)."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="spae-fast",
        description="spae_fast: fast SPAE building blocks (fused nearest-word search against frozen LLM "
        "vocabularies).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        sub = subparsers.add_parser(
            command.name,
            help=command.help,
            description=command.help,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if selected is None or selected == command.name:
            module = _load(command)
            # A module serving several commands documents each in its run function.
            doc = module.__doc__ if command.run == "run" else getattr(module, command.run).__doc__
            if module.__name__ != __name__ and doc:
                sub.description = doc
            getattr(module, command.add_arguments)(sub)
        sub.set_defaults(_command=command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``spae-fast`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    selected = argv[0] if argv and not argv[0].startswith("-") else None
    raw = next((c for c in COMMANDS if c.name == selected and c.raw_argv), None)
    if raw is not None:
        return int(getattr(_load(raw), raw.run)(argv[1:]) or 0)
    args = build_parser(selected or "").parse_args(argv)
    args.argv = argv[1:]  # the subcommand's own arguments, for reports that say how they were made
    command = args._command
    return int(getattr(_load(command), command.run)(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
