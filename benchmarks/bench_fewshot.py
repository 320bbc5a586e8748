#!/usr/bin/env python
"""Benchmark: few-shot evaluation throughput of a frozen LLM on SPAE words, shared-prefix KV cache vs naive.

    python benchmarks/bench_fewshot.py [--llm smollm2] [--episodes 6] [--rounds 3] [--threads N]
                                       [--out benchmarks/results] [--no-update-benchmarks-md]

Prompts are shaped like the demo's (SPAE-METHOD.md §5, open-ended mini-ImageNet protocol): N-way 1-shot
(N = 2, 5), each image as the words of its first 2 or 3 layers (5 or 21 tokens), one query per way per
episode, labels scored as " <label>\\n" (digit names). The image words are random codebook rows of the
embedded SmolLM2 vocabulary (the words' identity does not change the cost), fed as LLM ids.

Providers (same prompts, same process), all scoring every (query, candidate) of an episode:
    tree      `FrozenLM.score_continuations(strategy="tree")` (the default, "auto", on this model): ONE
              forward over the packed prefix, queries and candidate tokens with a tree attention mask
    kv_cache  `FrozenLM.score_continuations(strategy="kv_cache")`: the shared prefix (support set) runs once;
              its KV cache is repeated for the episode's queries (one batched forward) and again for every
              (query, candidate) pair, whose label tokens run as one more batched forward
    naive     `FrozenLM.score_naive`: one full forward of prefix + query + candidate per (query, candidate)

What bounds the ratio: per episode the naive provider runs Q C forwards and Q C (P + L_q + L_c) tokens (P
prefix, L_q query, L_c candidate tokens, Q queries, C = N candidates), the shared ones P + Q L_q + Q C (L_c - 1)
tokens in 1 (tree) or 3 (kv_cache) forwards. On this CPU a SmolLM2 forward costs ~70 ms plus ~2.7 ms per
token, so with 2 ways and one query per way (a 2-example support set) the fixed cost of the kv_cache path's
three forwards caps it near 2x, and the tree's single forward is what reaches 3x; more queries per episode (or
more ways) amortise the prefix further, hence the 10-query rows.

Timing: one warm-up episode per provider, then ``rounds`` rounds; each round runs every provider over the
same ``episodes`` episodes, in an order that alternates between rounds; the ratio is taken per round
(paired) and the median reported. Also checked: both providers pick the same label for every query and
their scores agree (max abs difference).

Writes bench_fewshot.csv (long format: op, provider, shape, dtype, metric, value, device, versions, git sha)
and bench_fewshot.md under --out, and replaces the "Few-shot evaluation" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import torch
from harness import git_sha, machine_info, replace_markdown_section, versions

from spae_fast import SPAEQuantizer, VocabCodebook
from spae_fast.llm import FrozenLM, ImageVocabulary, build_episode_prompt, sample_episodes

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Few-shot evaluation: shared-prefix KV cache vs naive (CPU)"
# (ways, shots, layers, queries per episode): one query per way (the CLI default), and 5 per way
SETTINGS = ((2, 1, 2, 2), (2, 1, 3, 2), (5, 1, 2, 5), (5, 1, 3, 5), (2, 1, 2, 10), (2, 1, 3, 10))
NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TARGET = 3.0
CSV_COLUMNS = ("op", "provider", "shape", "dtype", "metric", "value", "device", "versions", "git_sha")


def build_prompts(
    images: ImageVocabulary, ways: int, shots: int, layers: int, queries: int, episodes: int, seed: int
):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(200) % 10
    ids = torch.randint(images.vocab.num_rows, (200, images.pyramid.total(layers)), generator=generator)
    prompts = []
    for episode in sample_episodes(labels, ways, shots, queries, episodes + 1, seed):
        words = [NAMES[c] for c in episode.classes]
        prompts.append(build_episode_prompt(images, ids, episode, words, num_layers=layers))
    return prompts[0], prompts[1:]  # warm-up, timed


PROVIDERS = ("tree", "kv_cache", "naive")


def run(lm: FrozenLM, prompts, provider: str) -> tuple[float, list[torch.Tensor]]:
    started = time.perf_counter()
    if provider == "naive":
        tables = [lm.score_naive(p.prefix, p.queries, p.candidates) for p in prompts]
    else:
        tables = [lm.score_continuations(p.prefix, p.queries, p.candidates, provider) for p in prompts]
    return time.perf_counter() - started, tables


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llm", default="smollm2", help="LLM (its own vocabulary is the codebook)")
    parser.add_argument("--episodes", type=int, default=3, help="episodes per setting and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--no-update-benchmarks-md", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    info = {**machine_info(), **versions()}
    import transformers

    info["transformers"] = transformers.__version__
    for key, value in info.items():
        print(f"{key:13s} {value}")
    lm = FrozenLM.from_pretrained(args.llm)
    vocab = VocabCodebook.from_pretrained(args.llm)
    images = ImageVocabulary(SPAEQuantizer(vocab), lm)
    print(
        f"llm          {args.llm}: {type(lm.model).__name__}, vocab {lm.vocab_size}, image tokens as {images.mode}"
    )

    rows, table = [], []
    device = f"cpu ({info['cpu']}, {torch.get_num_threads()} threads)"
    version_text = f"torch {torch.__version__}, transformers {transformers.__version__}"
    sha = git_sha(ROOT)
    for ways, shots, layers, queries in SETTINGS:
        warm, prompts = build_prompts(images, ways, shots, layers, queries, args.episodes, args.seed)
        tokens = images.pyramid.total(layers)
        for provider in PROVIDERS:
            run(lm, [warm], provider)
        times = {provider: [] for provider in PROVIDERS}
        tables = {}
        for round_index in range(args.rounds):
            shift = round_index % len(PROVIDERS)
            for provider in PROVIDERS[shift:] + PROVIDERS[:shift]:  # rotated order, paired rounds
                seconds, tables[provider] = run(lm, prompts, provider)
                times[provider].append(seconds)
        naive_scores = torch.cat(tables["naive"])
        candidates = sum(len(p.queries) * len(p.candidates) for p in prompts)
        prefix = statistics.mean(len(p.prefix) for p in prompts)
        shape = (
            f"{ways}-way {shots}-shot, {layers} layers ({tokens} tokens/image), {queries} queries/episode, prefix "
            f"{prefix:.0f} tokens"
        )
        entry = {"shape": shape}
        for provider in PROVIDERS:
            median = statistics.median(times[provider])
            entry[provider] = (args.episodes / median, candidates / median)
            for metric, value in (("episodes_per_s", args.episodes / median), ("candidates_per_s", candidates / median),
                                  ("seconds", median)):  # fmt: skip
                rows.append({"op": "fewshot", "provider": provider, "shape": shape, "dtype": "float32",
                             "metric": metric, "value": value, "device": device, "versions": version_text,
                             "git_sha": sha})  # fmt: skip
        report = []
        for provider in PROVIDERS[:2]:
            ratios = [n / t for n, t in zip(times["naive"], times[provider])]
            scores = torch.cat(tables[provider])
            entry[f"{provider}_ratio"] = statistics.median(ratios)
            entry[f"{provider}_agree"] = float((scores.argmax(1) == naive_scores.argmax(1)).float().mean())
            entry[f"{provider}_difference"] = float((scores - naive_scores).abs().max())
            rows.append({"op": "fewshot", "provider": f"{provider}/naive", "shape": shape, "dtype": "float32",
                         "metric": "speedup", "value": entry[f"{provider}_ratio"], "device": device,
                         "versions": version_text, "git_sha": sha})  # fmt: skip
            report.append(
                f"{provider} {entry[provider][0]:.2f} ep/s = {entry[f'{provider}_ratio']:.2f}x naive (rounds "
                f"{', '.join(f'{r:.2f}' for r in ratios)}; same labels {entry[f'{provider}_agree']:.0%}, max |diff| "
                f"{entry[f'{provider}_difference']:.1e})"
            )
        table.append(entry)
        print(f"{shape}: naive {entry['naive'][0]:.2f} ep/s; " + "; ".join(report), flush=True)

    header = (
        "| setting | tree episodes/s | kv_cache episodes/s | naive episodes/s | tree candidates/s | naive "
        "candidates/s | tree / naive | kv_cache / naive | max abs score diff |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e in table:
        difference = max(e["tree_difference"], e["kv_cache_difference"])
        lines.append(
            f"| {e['shape']} | {e['tree'][0]:.2f} | {e['kv_cache'][0]:.2f} | {e['naive'][0]:.2f} | "
            f"{e['tree'][1]:.1f} | {e['naive'][1]:.1f} | **{e['tree_ratio']:.2f}x** | {e['kv_cache_ratio']:.2f}x | "
            f"{difference:.1e} |"
        )
    worst = min(e["tree_ratio"] for e in table)
    agree = min(min(e["tree_agree"], e["kv_cache_agree"]) for e in table)
    machine = ", ".join(f"{k}: {info[k]}" for k in ("cpu", "cores", "threads", "load_average"))
    markdown = (
        f"{SECTION}\n\nReproduce: `python benchmarks/bench_fewshot.py` (results: `benchmarks/results/"
        f"bench_fewshot.csv`, `.md`). LLM: {args.llm} ({type(lm.model).__name__}, fp32), image words as LLM "
        f'ids; {args.episodes} episodes per setting, labels scored as " <name>\\n"; median of '
        f"{args.rounds} paired rounds. Method: the docstring of `benchmarks/bench_fewshot.py`.\n\n"
        f"Machine: {machine}; {version_text}; git {sha}.\n\n" + "\n".join(lines) + "\n\n"
        f"Target: shared prefix >= {TARGET:.0f}x naive. Default strategy (tree), slowest setting: {worst:.2f}x "
        f"({'met' if worst >= TARGET else 'not met'}). Both strategies pick the naive label for "
        f"{agree:.0%} of the queries.\n"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "bench_fewshot.csv", "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    (out / "bench_fewshot.md").write_text(markdown, encoding="utf-8")
    if not args.no_update_benchmarks_md:
        replace_markdown_section(ROOT / "BENCHMARKS.md", SECTION, markdown)
    print("\n" + markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
