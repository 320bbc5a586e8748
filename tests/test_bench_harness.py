"""The shared benchmark harness (benchmarks/harness.py): interleaved rounds, paired ratios, long-format CSV,
markdown tables and sections."""

from __future__ import annotations

import csv

from _benchmarks import load


def test_interleaved_rounds_rotate_and_time_every_call():
    harness = load("harness")
    order = []
    calls = {name: (lambda name=name: order.append(name) or name) for name in "abc"}
    times, results = harness.interleaved_rounds(calls, 3, before_each=lambda: order.append("|"))
    assert "".join(order).replace("|", "") == "abc" + "bca" + "cab"
    assert order.count("|") == 9
    assert {name: len(t) for name, t in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert results == {"a": "a", "b": "b", "c": "c"}
    order.clear()
    harness.interleaved_rounds(calls, 2, rotate=False)
    assert "".join(order) == "abcabc"


def test_paired_median_is_the_median_of_per_round_ratios():
    harness = load("harness")
    assert harness.paired_median([2.0, 9.0, 3.0], [1.0, 3.0, 1.0]) == 3.0


def test_write_csv_long_format(tmp_path):
    harness = load("harness")
    path = tmp_path / "out.csv"
    harness.write_csv(path, [{"op": "nearest", "provider": "spae_fast", "metric": "gflops", "value": 1.5}])
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert tuple(reader.fieldnames) == harness.CSV_COLUMNS
    assert rows[0]["value"] == "1.5" and rows[0]["note"] == ""
    harness.write_csv(path, [], harness.CSV_COLUMNS[:9])
    assert path.read_text() == ",".join(harness.CSV_COLUMNS[:9]) + "\n"


def test_markdown_table():
    harness = load("harness")
    assert harness.markdown_table(("a", "b"), [(1, "x")], "lr") == ["| a | b |", "|---|---:|", "| 1 | x |"]


def test_replace_markdown_section_keeps_the_other_sections(tmp_path):
    harness = load("harness")
    path = tmp_path / "BENCHMARKS.md"
    harness.replace_markdown_section(path, "## B", "## B\n\nfirst\n")
    assert path.read_text() == "# Benchmarks\n\n## B\n\nfirst\n"
    path.write_text("# Benchmarks\n\n## A\n\na\n\n## B\n\nold\n<!-- x:start -->\n## C\n<!-- x:end -->\n")
    harness.replace_markdown_section(path, "## B", "## B\n\nnew\n")
    assert path.read_text() == "# Benchmarks\n\n## A\n\na\n\n## B\n\nnew\n\n<!-- x:start -->\n## C\n<!-- x:end -->\n"
    harness.replace_markdown_section(path, "## Z", "## Z\n\nz\n", first=True)
    assert path.read_text().startswith("# Benchmarks\n\n## Z\n\nz\n\n## A\n")


def test_fmt_cells():
    harness = load("harness")
    assert harness.fmt(None) == "—" and harness.fmt(float("nan")) == "—"
    assert harness.fmt(1234.5678, 2) == "1,234.57" and harness.fmt(3) == "3"
