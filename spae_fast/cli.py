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

Errors: a command raises (`CommandError` for what it checks itself, or ValueError / TypeError / OSError /
RuntimeError / ImportError from the library); `main` prints one line, ``spae-fast: error: ...``, to stderr and
returns 2 (argparse's usage errors also exit 2). Anything else is a bug in spae_fast: one line saying so, with
the hint to rerun with ``--debug``, exit 1. Ctrl-C exits 130. ``--debug`` (anywhere on the command line, or
``SPAE_FAST_DEBUG=1``) lets every exception propagate with its traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

EXIT_USER_ERROR = 2  # bad arguments or inputs (argparse's usage errors exit 2 too)
EXIT_INTERNAL_ERROR = 1  # a bug in spae_fast
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE
DEBUG_FLAG = "--debug"
DEBUG_ENV = "SPAE_FAST_DEBUG"
# Exceptions that bad arguments, files or environments cause (missing files, corrupt checkpoints, unreadable
# images, invalid values, a missing optional package); each becomes one line. UnicodeDecodeError is a ValueError.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, OSError, RuntimeError, ImportError)


class CommandError(Exception):
    """An error a command found in its arguments or inputs: printed as one line, exit status 2."""


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


# Argument types and output checks shared by the commands: a bad value fails at parse time (argparse prints
# usage and the option's name) or before any slow work (loading models, training).
def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}")
    return value


def finite_float(text: str) -> float:
    """argparse type: a finite number (``nan`` and ``inf`` would pass ``float()``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _writable_parent(path: Path, option: str) -> None:
    """The nearest existing ancestor of ``path`` must be a writable folder (the command creates the rest)."""
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise CommandError(f"{option} {path}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK):
        raise CommandError(f"{option} {path}: the folder {ancestor} is not writable")


def output_file(text: str, option: str = "--out") -> Path:
    """A file a command will write, checked before it does its work: not a folder, in a writable place."""
    path = Path(text)
    if path.is_dir():
        raise CommandError(f"{option} {path} is a folder; give a file path (e.g. {path / 'out.png'})")
    _writable_parent(path, option)
    return path


def output_folder(text: str, option: str = "--out") -> Path:
    """A folder a command will create or fill, checked before it does its work."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise CommandError(f"{option} {path} is a file; give a folder")
    if not path.exists():
        _writable_parent(path, option)
    elif not os.access(path, os.W_OK):
        raise CommandError(f"{option} {path}: the folder is not writable")
    return path


def looks_like_path(text: str) -> bool:
    """Whether a model argument names a local path rather than a hub id (the rule `spae_fast.vocab` uses)."""
    return os.path.isabs(text) or text.startswith((".", "~")) or text.count("/") > 1 or os.sep in text[:1]


def existing_path(text: str, option: str) -> str:
    """``text`` unchanged when it exists or is not path-like (a hub id or an alias such as ``smollm2``);
    a CommandError naming the option for a path that does not exist."""
    if looks_like_path(text) and not os.path.exists(os.path.expanduser(text)):
        raise CommandError(f"{option} {text}: no such file or folder")
    return text


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
    parser.add_argument(DEBUG_FLAG, action="store_true", help="show the full traceback of an error")
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
        sub.add_argument(DEBUG_FLAG, action="store_true", default=argparse.SUPPRESS,
                         help="show the full traceback of an error")  # fmt: skip
        sub.set_defaults(_command=command)
    return parser


def _one_line(error: BaseException) -> str:
    """The exception's message on one line (torch and OS errors can span several)."""
    text = " ".join(str(error).split())
    if isinstance(error, KeyError) and len(error.args) == 1:  # str(KeyError) quotes its message
        text = str(error.args[0])
    return text or type(error).__name__


def _close_progress_bars() -> None:
    """Ends any tqdm bar an interrupted command left open, so the error starts on a line of its own."""
    tqdm = sys.modules.get("tqdm")  # only when a command used it
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        try:
            bar.close()
        except Exception:  # noqa: BLE001, S110 - a bar that cannot close must not hide the error
            pass


def _report(error: BaseException) -> int:
    """Prints the one-line message for ``error`` to stderr; returns the exit status."""
    _close_progress_bars()
    sys.stdout.flush()  # keep what the command printed before the error in order
    if isinstance(error, (CommandError, *USER_ERRORS)):
        print(f"spae-fast: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(f"spae-fast: error: internal error ({type(error).__name__}: {_one_line(error)}); rerun with "
          f"{DEBUG_FLAG} for the traceback and please report it", file=sys.stderr)  # fmt: skip
    return EXIT_INTERNAL_ERROR


def _run(argv: list[str]) -> int:
    selected = argv[0] if argv and not argv[0].startswith("-") else None
    raw = next((c for c in COMMANDS if c.name == selected and c.raw_argv), None)
    if raw is not None:
        return int(getattr(_load(raw), raw.run)(argv[1:]) or 0)
    args = build_parser(selected or "").parse_args(argv)
    args.argv = [a for a in argv[1:] if a != DEBUG_FLAG]  # the subcommand's own arguments, for reports
    command = args._command
    return int(getattr(_load(command), command.run)(args) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``spae-fast`` console script: the command's exit status; errors as one line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    while argv[:1] == [DEBUG_FLAG]:  # the global flag, before the command
        debug, argv = True, argv[1:]
    raw = bool(argv) and any(c.name == argv[0] and c.raw_argv for c in COMMANDS)
    if not raw and DEBUG_FLAG in argv:  # also accepted after the command (a raw command's script owns its own)
        debug = True
    try:
        return _run(argv)
    except SystemExit:
        raise  # argparse's --help / usage errors: it has printed them
    except KeyboardInterrupt:
        if debug:
            raise
        _close_progress_bars()
        sys.stdout.flush()
        print("spae-fast: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`spae-fast tokenize ... | head`): nothing left to tell it. Point stdout at
        # devnull so the interpreter's final flush does not raise again (the Python docs' recipe).
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass  # no real file descriptor (a captured stream)
        return EXIT_BROKEN_PIPE
    except Exception as error:
        if debug:
            raise
        return _report(error)


if __name__ == "__main__":
    sys.exit(main())
