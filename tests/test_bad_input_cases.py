"""Bad inputs, each in its own process (the case table and runner: tests/_bad_input_cases.py): every kind must
end in a clear Python exception of the expected type whose message names the argument (a few: or a correct
result), never a crash, a hang, another exception or a silently accepted call. The cases run in parallel once
per session (forked from one process that imported torch), and each test reports its own case."""

from __future__ import annotations

import re
from pathlib import Path

import _bad_input_cases as bad
import pytest

CASES = {case.name: case for case in bad.CASES}


@pytest.fixture(scope="session")
def outcomes(request) -> dict[str, bad.Outcome]:
    """The outcomes of the cases selected in this session (all, unless -k narrows them)."""
    here = Path(__file__).resolve()
    names = [
        item.callspec.params["name"]
        for item in request.session.items
        if Path(str(item.fspath)).resolve() == here
        and hasattr(item, "callspec")
        and "name" in item.callspec.params
    ]
    return bad.run_cases([CASES[name] for name in names])


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_rejected_clearly(outcomes, name):
    case, outcome = CASES[name], outcomes[name]
    assert outcome.passed, (
        f"{outcome.kind}: {outcome.detail}\n  expected {case.expect} matching /{case.match}/"
        + (" or a correct result" if case.ok_if_correct else "")
    )


def test_the_table_covers_the_issue():
    assert len(CASES) >= 60
    for case in bad.CASES:
        re.compile(case.match)
        assert case.expect in ("ValueError", "TypeError", "RuntimeError", "FileNotFoundError"), case.name
        compile(case.setup + "\n" + case.action, case.name, "exec")
    prefixes = ("op nearest", "op topk", "op pack_codebook", "op saq", "op semantic_loss", "api", "file")
    for prefix in prefixes:
        assert any(name.startswith(prefix) for name in CASES), prefix


SYNTHETIC = [
    bad.Case("synthetic: clear", "ValueError", r"\bx\b", "raise ValueError('x is bad')"),
    bad.Case(
        "synthetic: subclass passes",
        "ValueError",
        "config",
        "raise UnicodeDecodeError('utf-8', b'', 0, 1, 'config')",
    ),
    bad.Case("synthetic: wrong type", "TypeError", r"\bx\b", "raise ValueError('x is bad')"),
    bad.Case("synthetic: message does not name it", "ValueError", r"\bx\b", "raise ValueError('bad input')"),
    bad.Case("synthetic: returns", "ValueError", "x", "y = 1"),
    bad.Case(
        "synthetic: stale", "RuntimeError", "x", "raise AssertionError('SILENT stale')", ok_if_correct=True
    ),
    bad.Case("synthetic: handled", "RuntimeError", "x", "y = 1", ok_if_correct=True),
    bad.Case("synthetic: abort", "ValueError", "x", "os.abort()"),
    bad.Case("synthetic: exit", "ValueError", "x", "os._exit(3)"),
    bad.Case("synthetic: hang", "ValueError", "x", "import time\nwhile True: time.sleep(0.1)"),
    bad.Case("synthetic: setup", "ValueError", "x", "pass", setup="raise KeyError('no such thing')"),
]
EXPECTED = [
    "clear error", "clear error", "wrong error", "wrong error", "silently accepted", "silently accepted", "handled",
    "crash (signal 6)", "crash (exit 3)", "hang", "setup failed",
]  # fmt: skip


def test_the_runner_tells_the_outcomes_apart():
    """The runner can fail a case: crashes, hangs, wrong and missing exceptions are each recognised."""
    outcomes = bad.run_cases(SYNTHETIC, timeout=5)
    assert [outcomes[case.name].kind for case in SYNTHETIC] == EXPECTED


def test_the_fresh_process_runner():
    """``--fresh``: a new ``python -c`` per case, classified the same way."""
    cases = [SYNTHETIC[0], SYNTHETIC[2], SYNTHETIC[7]]
    outcomes = bad.run_cases(cases, fresh=True)
    assert [outcomes[case.name].kind for case in cases] == [EXPECTED[0], EXPECTED[2], EXPECTED[7]]
