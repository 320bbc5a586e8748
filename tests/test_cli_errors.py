"""Every ``spae-fast`` error is one clear line: ``spae-fast: error: ...`` on stderr, exit status 2 (argparse's usage
errors: its usage text and ``error: argument ...``, exit 2), never a traceback unless ``--debug`` asks for one.

The cases run in-process through `spae_fast.cli.main` against a tiny saved SPAE whose codebook is a tiny
"LLM" folder (a safetensors embedding table and a tokenizer.json), so none of them loads a real model or trains;
a few run through the installed ``spae-fast`` console script as a user would.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("tokenizers")
pytest.importorskip("sklearn")

from spae_fast import cli

# (id, argv with {fx} = the fixtures, {bad} = broken files, {tmp} = a fresh empty folder, a fragment the one-line
# message must hold). Each is a mistake a user can make; "usage" marks those argparse rejects while parsing.
# fmt: off
TINY = ["--image-size", "16", "--channel-multipliers", "1,2", "--layers", "1,2,4", "--relevance", "none"]
TRAIN = ["train", "--out", "{tmp}/run", "--codebook", "{fx}/llm", "--no-progress"]
CASES = [
    # tokenize: images
    ("image missing", ["tokenize", "{tmp}/nope.png", "--model", "{fx}/spae"], "image file not found"),
    ("image is a folder", ["tokenize", "{tmp}", "--model", "{fx}/spae"], "is a folder, not an image file"),
    ("image is text", ["tokenize", "{bad}/text.png", "--model", "{fx}/spae"], "is not a readable image"),
    ("image truncated", ["tokenize", "{bad}/truncated.png", "--model", "{fx}/spae"], "truncated"),
    ("image empty file", ["tokenize", "{bad}/empty.png", "--model", "{fx}/spae"], "is not a readable image"),
    # tokenize: models
    ("model missing", ["tokenize", "{fx}/img.png", "--model", "{tmp}/nomodel"], "not an SPAE checkpoint"),
    ("model is a file", ["tokenize", "{fx}/img.png", "--model", "{fx}/img.png"], "not an SPAE checkpoint"),
    ("model folder empty", ["tokenize", "{fx}/img.png", "--model", "{bad}/empty"], "config.json"),
    ("config.json garbage", ["tokenize", "{fx}/img.png", "--model", "{bad}/garbage_config"], "config.json"),
    ("config.json a list", ["tokenize", "{fx}/img.png", "--model", "{bad}/list_config"], "config.json"),
    ("weights garbage", ["tokenize", "{fx}/img.png", "--model", "{bad}/garbage_weights"], "model.safetensors"),
    ("weights truncated", ["tokenize", "{fx}/img.png", "--model", "{bad}/truncated_weights"], "model.safetensors"),
    ("config edited", ["tokenize", "{fx}/img.png", "--model", "{bad}/bad_layers"], "bad_layers"),
    ("codebook moved", ["tokenize", "{fx}/img.png", "--model", "{bad}/codebook_moved"], "gone_llm"),
    ("--layers 99", ["tokenize", "{fx}/img.png", "--model", "{fx}/spae", "--layers", "99"], "the model has 3 layers"),
    ("usage --layers 0", ["tokenize", "{fx}/img.png", "--model", "{fx}/spae", "--layers", "0"], "--layers"),
    ("usage --layers abc", ["tokenize", "{fx}/img.png", "--model", "{fx}/spae", "--layers", "abc"], "--layers"),
    ("usage --backend bogus", ["tokenize", "{fx}/img.png", "--model", "{fx}/spae", "--backend", "x"], "--backend"),
    ("usage no --model", ["tokenize", "{fx}/img.png"], "--model"),
    # decode
    ("decode word count", ["decode", "--model", "{fx}/spae", "--words", "a b c", "--out", "{tmp}/x.png"], "3 words"),
    ("decode unknown word", ["decode", "--model", "{fx}/spae", "--words", "zzqq", "--out", "{tmp}/x.png"], "zzqq"),
    ("decode no words", ["decode", "--model", "{fx}/spae", "--words", "", "--out", "{tmp}/x.png"], "0 words"),
    ("words file missing", ["decode", "--model", "{fx}/spae", "--words-file", "{tmp}/w.txt", "--out", "{tmp}/x.png"],
     "--words-file"),
    ("words file a folder", ["decode", "--model", "{fx}/spae", "--words-file", "{tmp}", "--out", "{tmp}/x.png"],
     "is a folder"),
    ("words file binary", ["decode", "--model", "{fx}/spae", "--words-file", "{bad}/binary.bin", "--out",
                           "{tmp}/x.png"], "not UTF-8"),
    ("decode --out a folder", ["decode", "--model", "{fx}/spae", "--words", "the", "--out", "{tmp}"], "is a folder"),
    ("decode --out under a file", ["decode", "--model", "{fx}/spae", "--words", "the", "--out", "{fx}/img.png/x.png"],
     "is a file, not a folder"),
    ("usage decode no words", ["decode", "--model", "{fx}/spae", "--out", "{tmp}/x.png"], "--words"),
    # reconstruct
    ("reconstruct one missing", ["reconstruct", "{fx}/img.png", "{tmp}/nope.png", "--model", "{fx}/spae", "--out",
                                 "{tmp}/g.png"], "nope.png"),
    ("reconstruct image text", ["reconstruct", "{bad}/text.png", "--model", "{fx}/spae", "--out", "{tmp}/g.png"],
     "is not a readable image"),
    ("reconstruct --out folder", ["reconstruct", "{fx}/img.png", "--model", "{fx}/spae", "--out", "{tmp}"],
     "is a folder"),
    ("reconstruct corrupt model", ["reconstruct", "{fx}/img.png", "--model", "{bad}/garbage_weights", "--out",
                                   "{tmp}/g.png"], "model.safetensors"),
    # train: data, values, paths (each fails before any training step)
    ("train data folder missing", [*TRAIN, "--data", "{tmp}/nodata"], "nodata"),
    ("train data folder empty", [*TRAIN, "--data", "{bad}/empty"], "holds no images"),
    ("train data not images", [*TRAIN, *TINY, "--data", "{bad}/text_images", "--steps", "1"], "not a readable image"),
    ("train --layers 1,3", [*TRAIN, "--layers", "1,3"], "not divisible"),
    ("train --layers 0,1", [*TRAIN, "--layers", "0,1"], "layers"),
    ("train --layers empty", [*TRAIN, "--layers", ","], "layers"),
    ("train --image-size 30", [*TRAIN, "--image-size", "30"], "image_size"),
    ("train --steps -1", [*TRAIN, "--steps", "-1"], "steps"),
    ("train --batch-size 0", [*TRAIN, "--batch-size", "0"], "batch_size"),
    ("train --classes 12", [*TRAIN, "--classes", "12"], "classes"),
    ("train --classes skimage", [*TRAIN, "--data", "skimage", "--classes", "1"], "--classes"),
    ("train --relevance bogus", [*TRAIN, *TINY[:6], "--relevance", "bogus"], "--relevance"),
    ("train clip folder missing", [*TRAIN, *TINY[:6], "--relevance", "clip:{tmp}/noclip"], "noclip"),
    ("train --codebook missing", ["train", "--out", "{tmp}/run", "--codebook", "{tmp}/nollm"], "--codebook"),
    ("usage train --mode bogus", [*TRAIN, "--mode", "bogus"], "--mode"),
    ("train --out a file", [*TRAIN[:1], "--out", "{fx}/img.png", "--codebook", "{fx}/llm"], "is a file"),
    ("train resume nothing", [*TRAIN, *TINY, "--data", "{fx}/images", "--resume", "--steps", "1"], "resume"),
    ("usage train --beta inf", [*TRAIN, "--beta", "inf"], "--beta"),
    ("usage train --lr nan", [*TRAIN, "--learning-rate", "nan"], "--learning-rate"),
    ("usage train --layers 1.5,2", [*TRAIN, "--layers", "1.5,2"], "--layers"),
    ("usage train --classes x", [*TRAIN, "--classes", "x"], "--classes"),
    ("usage train --device", [*TRAIN, "--device", "bogus"], "--device"),
    # fewshot / generate: checked before any LLM is loaded
    ("fewshot model missing", ["fewshot", "--model", "{tmp}/nomodel", "--llm", "{fx}/llm"], "not an SPAE checkpoint"),
    ("fewshot --layers 9", ["fewshot", "--model", "{fx}/spae", "--llm", "{fx}/llm", "--layers", "9"], "3 layers"),
    ("fewshot --llm missing", ["fewshot", "--model", "{fx}/spae", "--llm", "{tmp}/nollm"], "--llm"),
    ("fewshot --out a folder", ["fewshot", "--model", "{fx}/spae", "--out", "{tmp}"], "is a folder"),
    ("usage fewshot --ways 0", ["fewshot", "--model", "{fx}/spae", "--ways", "0"], "--ways"),
    ("generate --llm missing", ["generate", "--model", "{fx}/spae", "--llm", "{tmp}/nollm", "--task", "flip",
                                "--out", "{tmp}/gen"], "--llm"),
    ("generate --layers 5", ["generate", "--model", "{fx}/spae", "--llm", "{fx}/llm", "--task", "flip", "--layers",
                             "5", "--out", "{tmp}/gen"], "3 layers"),
    ("usage generate --count 0", ["generate", "--model", "{fx}/spae", "--task", "flip", "--count", "0", "--out",
                                  "{tmp}/g"], "--count"),
    ("usage generate --rates", ["generate", "--model", "{fx}/spae", "--task", "denoise", "--rates", "2", "0",
                                "--out", "{tmp}/g"], "--rates"),
    # demo, bench, the top level
    ("usage demo --steps 0", ["demo", "--out", "{tmp}/demo", "--steps", "0"], "--steps"),
    ("usage demo --relevance", ["demo", "--relevance", "bogus"], "--relevance"),
    ("bench without a checkout", ["bench", "--suite", "quick"], "source checkout"),
    ("usage no command", [], "COMMAND"),
    ("usage unknown command", ["frobnicate"], "frobnicate"),
]
# fmt: on


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A tiny SPAE (grid 8, layers 1, 2, 4) over a 12-dim table of a trained BPE vocabulary, an image, and the
    broken files and folders the cases point at."""
    from _tiny_llm import byte_level_tokenizer
    from safetensors.torch import save_file

    from spae_fast.imaging import save_image
    from spae_fast.model import SPAE, SPAEConfig
    from spae_fast.vocab import VocabCodebook

    fx, bad = tmp_path_factory.mktemp("fixtures"), tmp_path_factory.mktemp("bad")
    llm = fx / "llm"
    llm.mkdir()
    tokenizer = byte_level_tokenizer(300)
    tokenizer.save(str(llm / "tokenizer.json"))
    table = torch.randn(tokenizer.get_vocab_size(), 12, generator=torch.Generator().manual_seed(0))
    save_file({"model.embed_tokens.weight": table}, str(llm / "model.safetensors"))
    vocab = VocabCodebook.from_pretrained(llm, use_cache=False)
    config = SPAEConfig(image_size=16, base_channels=8, channel_multipliers=(1, 2), num_res_blocks=0,
                        layers=(1, 2, 4), codebook=str(llm))
    torch.manual_seed(0)
    SPAE(config, vocab).save_pretrained(fx / "spae")
    save_image(fx / "img.png", torch.rand(3, 16, 16) * 2 - 1)
    (fx / "images").mkdir()  # one class: training on it loads no sentence encoder to judge words
    for index in range(2):
        shutil.copy(fx / "img.png", fx / "images" / f"{index}.png")

    (bad / "text.png").write_text("this is not an image\n")
    png = (fx / "img.png").read_bytes()
    (bad / "truncated.png").write_bytes(png[: len(png) // 2])
    (bad / "empty.png").write_bytes(b"")
    (bad / "binary.bin").write_bytes(bytes(range(256)) * 4)
    (bad / "empty").mkdir()
    (bad / "text_images").mkdir()
    for index in range(3):
        (bad / "text_images" / f"{index}.png").write_text("not a png")
    record = json.loads((fx / "spae" / "config.json").read_text())
    broken = {
        "garbage_config": {"config.json": "{not json"},
        "list_config": {"config.json": "[1, 2]"},
        "garbage_weights": {"model.safetensors": os.urandom(300)},
        "truncated_weights": {"model.safetensors": (fx / "spae" / "model.safetensors").read_bytes()[:1000]},
        "bad_layers": {"config.json": json.dumps({**record, "config": {**record["config"], "layers": [1, 3]}})},
    }
    # a model whose codebook folder was moved away after saving
    shutil.copytree(llm, bad / "gone_llm")
    SPAE(dataclasses.replace(config, codebook=str(bad / "gone_llm")), vocab).save_pretrained(bad / "codebook_moved")
    (bad / "gone_llm").rename(bad / "moved_llm")
    for name, replaced in broken.items():
        shutil.copytree(fx / "spae", bad / name)
        for file, content in replaced.items():
            target = bad / name / file
            target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content)
    return {"fx": fx, "bad": bad}


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("SPAE_FAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SPAE_FAST_SOURCE", raising=False)
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    monkeypatch.chdir(tmp_path)  # `bench` looks for a checkout from here


def _argv(template: list[str], files: dict[str, Path], tmp: Path) -> list[str]:
    scratch = tmp / "scratch"
    scratch.mkdir(exist_ok=True)
    return [part.format(fx=files["fx"], bad=files["bad"], tmp=scratch) for part in template]


def test_there_are_enough_cases():
    assert len(CASES) >= 34 and len({name for name, *_ in CASES}) == len(CASES)


@pytest.mark.parametrize(("name", "template", "fragment"), CASES, ids=[case[0] for case in CASES])
def test_error_is_one_clear_line(name, template, fragment, files, tmp_path, capsys):
    argv = _argv(template, files, tmp_path)
    if name.startswith("usage"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.strip().splitlines()[-1].startswith("spae-fast") and "error:" in err
    else:
        assert cli.main(argv) == cli.EXIT_USER_ERROR
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert lines[0].startswith("spae-fast: error: ") and "internal error" not in lines[0], lines[0]
    assert fragment in err, err
    assert "Traceback" not in err


def test_debug_flag_shows_the_traceback(files, tmp_path, capsys):
    argv = _argv(["tokenize", "{tmp}/nope.png", "--model", "{fx}/spae"], files, tmp_path)
    for debug_argv in (["--debug", *argv], [*argv, "--debug"]):
        with pytest.raises(FileNotFoundError, match="image file not found"):
            cli.main(debug_argv)
    assert cli.main(argv) == 2  # and without it, one line
    assert capsys.readouterr().err.count("\n") == 1


def test_debug_environment_variable(files, tmp_path, monkeypatch):
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(FileNotFoundError):
        cli.main(_argv(["tokenize", "{tmp}/nope.png", "--model", "{fx}/spae"], files, tmp_path))


@pytest.mark.parametrize(
    ("raised", "status", "fragments"),
    [
        (PermissionError(13, "Permission denied", "/out/x.png"), 2, ["Permission denied", "/out/x.png"]),
        (RuntimeError("first line\n  second line"), 2, ["first line second line"]),
        (ImportError("reading this needs `transformers`"), 2, ["transformers"]),
        (ZeroDivisionError("float division by zero"), 1, ["internal error (ZeroDivisionError", "--debug"]),
        (KeyError("rows"), 1, ["internal error (KeyError: rows)"]),
        (KeyboardInterrupt(), 130, ["interrupted"]),
    ],
    ids=["permission", "multiline-runtime", "import", "bug", "keyerror-bug", "ctrl-c"],
)
def test_how_each_kind_of_exception_is_reported(raised, status, fragments, monkeypatch, capsys):
    from spae_fast import cli_codec

    def fail(args):
        print("partial output")
        raise raised

    monkeypatch.setattr(cli_codec, "run_tokenize", fail)
    assert cli.main(["tokenize", "x.png", "--model", "m"]) == status
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spae-fast: "), captured.err
    assert all(fragment in lines[0] for fragment in fragments), lines[0]
    assert captured.out == "partial output\n"
    with pytest.raises(type(raised)):  # --debug: the exception itself
        cli.main(["--debug", "tokenize", "x.png", "--model", "m"])


def test_help_documents_debug(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "--debug" in capsys.readouterr().out


# ---- through the installed console script ------------------------------------------------------------------


def _console_script() -> str:
    script = shutil.which("spae-fast") or str(Path(sys.executable).with_name("spae-fast"))
    if not os.path.exists(script):
        pytest.skip("the spae-fast console script is not installed")
    return script


def test_console_script_errors(files, tmp_path):
    """Three runs side by side: a missing image, a corrupt checkpoint (one line each, exit 2) and --debug."""
    script = _console_script()
    env = {**os.environ, "SPAE_FAST_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    env.pop(cli.DEBUG_ENV, None)
    runs = {
        "missing image": ["tokenize", "{tmp}/nope.png", "--model", "{fx}/spae"],
        "corrupt checkpoint": ["reconstruct", "{fx}/img.png", "--model", "{bad}/garbage_weights", "--out",
                               "{tmp}/g.png"],
        "debug": ["--debug", "tokenize", "{tmp}/nope.png", "--model", "{fx}/spae"],
    }
    processes = {
        name: subprocess.Popen([script, *_argv(argv, files, tmp_path)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
        for name, argv in runs.items()
    }
    results = {name: (process.wait(timeout=120), process.stderr.read()) for name, process in processes.items()}
    for name in ("missing image", "corrupt checkpoint"):
        status, err = results[name]
        assert status == 2, (name, err)
        assert len(err.strip().splitlines()) == 1 and err.startswith("spae-fast: error: "), (name, err)
        assert "Traceback" not in err
    status, err = results["debug"]
    assert status == 1 and "Traceback" in err and "FileNotFoundError: image file not found" in err
