"""The runner of the bad-input suite (tests/_bad_input_cases.py holds the cases): each case in its own process
with a time limit, classified as clear error / handled / wrong error / silently accepted / crash / hang /
setup failed (see the cases module's docstring), and a markdown report."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import re
import subprocess
import sys
import time

MARK = "@@spae-bad-input@@"
DEFAULT_TIMEOUT = 60.0
PASSING = ("clear error", "handled")


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    expect: str  # exception class name; a subclass passes too
    match: str  # regex the message must match (searched, case-sensitive)
    action: str  # the misuse
    setup: str = ""  # runs first; an exception here is "setup failed"
    ok_if_correct: bool = False  # no exception is fine when the snippet's own result check passes



# What runs in a case's process: caps the address space (unless ASan, which reserves terabytes of shadow memory,
# is preloaded; the runner then caps ASan's allocations instead) so that a case allocating a huge table fails
# instead of swapping a shared machine; runs prelude + setup, then the action; prints one JSON line after MARK.
CHILD = """
import json, os, sys

def run_case_here(prelude, setup, action, mark):
    if "libasan" not in os.environ.get("LD_PRELOAD", ""):
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))

    def report(**fields):
        sys.stdout.write("\\n" + mark + json.dumps(fields) + "\\n")
        sys.stdout.flush()

    def raised(phase, error):
        report(phase=phase, type=type(error).__name__, mro=[k.__name__ for k in type(error).__mro__],
               message=str(error))

    scope = {"__name__": "__bad_input_case__"}
    try:
        exec(compile(prelude + "\\n" + setup, "<setup>", "exec"), scope)
    except BaseException as error:
        raised("setup", error)
        return
    try:
        exec(compile(action, "<case>", "exec"), scope)
    except BaseException as error:
        raised("action", error)
    else:
        report(phase="action", type=None)
"""

# The fork server: one process pays for `import torch` and torch's first-custom-op imports (about 2 s) once,
# before any op has run (so no OpenMP thread pool exists yet and forking is safe), then forks a fresh child per
# case, `jobs` at a time, each with its own stdout / stderr files, killed past the time limit. Prints one JSON
# list: per case its exit status or signal, stdout, stderr and seconds.
SERVER = (
    CHILD
    + """
import signal, tempfile, time
import torch, spae_fast
try:
    import torch._dynamo  # what the first custom-op call imports
except Exception:
    pass
cases, jobs, timeout, prelude, mark = json.loads(sys.stdin.read())
results, running, queue = {}, {}, list(cases)
while queue or running:
    while queue and len(running) < jobs:
        case = queue.pop(0)
        out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        sys.stdout.flush(); sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            os.dup2(out.fileno(), 1); os.dup2(err.fileno(), 2)
            try:
                run_case_here(prelude, case["setup"], case["action"], mark)
            finally:
                sys.stdout.flush(); sys.stderr.flush()
                os._exit(0)
        running[pid] = (case["name"], time.monotonic(), out, err)
    pid, status = os.waitpid(-1, os.WNOHANG)
    now = time.monotonic()
    if pid == 0:
        for child, (name, start, out, err) in list(running.items()):
            if now - start > timeout:
                os.kill(child, signal.SIGKILL)
                os.waitpid(child, 0)
                results[name] = {"hang": True, "seconds": now - start}
                del running[child]
        time.sleep(0.005)
        continue
    name, start, out, err = running.pop(pid)
    streams = []
    for stream in (out, err):
        stream.seek(0)
        streams.append(stream.read().decode("utf-8", "replace")[-20000:])
    code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    results[name] = {"hang": False, "code": code, "stdout": streams[0], "stderr": streams[1], "seconds": now - start}
sys.stdout.write(mark + json.dumps(results) + "\\n")
"""
)


@dataclasses.dataclass
class Outcome:
    kind: str  # one of the outcomes in the module docstring
    detail: str  # the exception or what happened
    seconds: float

    @property
    def passed(self) -> bool:
        return self.kind in PASSING


def _child_env(pythonpath: str | None) -> dict[str, str]:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "2")
    if "libasan" in env.get("LD_PRELOAD", ""):  # no address-space cap possible: cap ASan's allocations
        extra = "max_allocation_size_mb=6144:allocator_may_return_null=1"
        env["ASAN_OPTIONS"] = f"{env['ASAN_OPTIONS']}:{extra}" if env.get("ASAN_OPTIONS") else extra
    return env


def _classify(case: Case, returncode: int, stdout: str, stderr: str, seconds: float) -> Outcome:
    tail = (stderr.strip().splitlines() or [""])[-1][:200]
    if returncode < 0:
        return Outcome(f"crash (signal {-returncode})", tail, seconds)
    lines = [line for line in stdout.splitlines() if line.startswith(MARK)]
    if returncode != 0 or not lines:
        sanitizer = re.search(r"ERROR: (AddressSanitizer|LeakSanitizer)[^\n]*|runtime error:[^\n]*", stderr)
        return Outcome(f"crash (exit {returncode})", sanitizer.group(0) if sanitizer else tail, seconds)
    result = json.loads(lines[-1][len(MARK) :])
    if result["phase"] == "setup":
        return Outcome("setup failed", f"{result['type']}: {result['message']}", seconds)
    if result["type"] is None:
        if case.ok_if_correct:
            return Outcome("handled", "returned; its result check passed", seconds)
        return Outcome("silently accepted", "returned without an exception", seconds)
    detail = f"{result['type']}: {result['message']}"
    if result["type"] == "AssertionError" and result["message"].startswith("SILENT"):
        return Outcome("silently accepted", result["message"], seconds)
    if case.expect in result["mro"] and re.search(case.match, result["message"]):
        return Outcome("clear error", detail, seconds)
    return Outcome("wrong error", detail, seconds)


def run_case(case: Case, *, prelude: str, pythonpath: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> Outcome:
    """Runs one case in a fresh ``python -c`` process (from the root directory, so the source tree is not on
    sys.path) and classifies what happened."""
    start = time.monotonic()
    command = [
        sys.executable,
        "-c",
        CHILD + "\nrun_case_here(*sys.argv[1:5])",
        prelude,
        case.setup,
        case.action,
        MARK,
    ]
    try:
        process = subprocess.run(
            command, cwd=os.sep, env=_child_env(pythonpath), capture_output=True, text=True, errors="replace",
            timeout=timeout, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return Outcome("hang", f"no result after {timeout:.0f} s", time.monotonic() - start)
    return _classify(case, process.returncode, process.stdout, process.stderr, time.monotonic() - start)


def run_cases(
    cases, *, prelude: str, pythonpath=None, timeout=DEFAULT_TIMEOUT, jobs=None, fresh=False
) -> dict[str, Outcome]:
    """{name: Outcome} of every case, `jobs` at a time (default: the CPU count, at least 2). Each case runs in
    its own process: forked from a server process that imported torch once (default), or with ``fresh`` a new
    ``python -c`` per case (about 2 s more each)."""
    cases = list(cases)
    jobs = jobs or max(2, os.cpu_count() or 2)
    if fresh:
        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            futures = {
                c.name: pool.submit(run_case, c, prelude=prelude, pythonpath=pythonpath, timeout=timeout)
                for c in cases
            }
            return {name: future.result() for name, future in futures.items()}
    request = [
        [{"name": c.name, "setup": c.setup, "action": c.action} for c in cases],
        jobs,
        timeout,
        prelude,
        MARK,
    ]
    server = subprocess.run(
        [sys.executable, "-c", SERVER], input=json.dumps(request), cwd=os.sep, env=_child_env(pythonpath),
        capture_output=True, text=True, errors="replace", timeout=timeout * len(cases) + 120, check=False,
    )  # fmt: skip
    lines = [line for line in server.stdout.splitlines() if line.startswith(MARK)]
    if server.returncode != 0 or not lines:
        raise RuntimeError(
            f"the bad-input fork server failed (exit {server.returncode}): {server.stderr[-3000:]}"
        )
    results = json.loads(lines[-1][len(MARK) :])
    outcomes = {}
    for case in cases:
        result = results[case.name]
        if result["hang"]:
            outcomes[case.name] = Outcome("hang", f"no result after {timeout:.0f} s", result["seconds"])
        else:
            outcomes[case.name] = _classify(
                case, result["code"], result["stdout"], result["stderr"], result["seconds"]
            )
    return outcomes


def markdown_table(cases, outcomes: dict[str, Outcome]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")[:160]

    lines = ["| kind | expected | outcome | what happened |", "|---|---|---|---|"]
    for case in cases:
        outcome = outcomes[case.name]
        expected = f"{case.expect} /{case.match}/" + (" or correct result" if case.ok_if_correct else "")
        lines.append(f"| {cell(case.name)} | {cell(expected)} | {outcome.kind} | {cell(outcome.detail)} |")
    counts: dict[str, int] = {}
    for outcome in outcomes.values():
        counts[outcome.kind] = counts.get(outcome.kind, 0) + 1
    summary = ", ".join(
        f"{kind}: {count}" for kind, count in sorted(counts.items(), key=lambda item: -item[1])
    )
    return "\n".join(lines) + f"\n\n{len(outcomes)} kinds. {summary}\n"
