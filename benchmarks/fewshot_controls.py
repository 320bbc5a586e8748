#!/usr/bin/env python
"""Controls for the few-shot table (issue #6): what the words allow, and what the LLM can do at best.

    python benchmarks/fewshot_controls.py --model DIR [--llm smollm2] [--episodes 2000] [--llm-episodes 100]

1. Word-overlap classifier: 1-shot 2-way episodes on the held-out digits, the query takes the label of the
   support image whose words (first 2 or 3 layers, position by position) agree with its own in more places
   (ties count half). No LLM: it measures how class-consistent the SPAE words are.
2. LLM copying ceiling: the same prompt format as `spae-fast fewshot` ("Input: <words>\\nOutput: <label>\\n" per
   support example, then the query, labels scored by log-likelihood), but the query's words are IDENTICAL to
   its class's support words (5 random English words per class, nonsense labels "dax" / "blicket"). A perfect
   in-context learner scores 100%; this bounds what the LLM can reach with ideal words. Reported plain, and
   with Frozen's task induction line ("Answer with dax or blicket.") and the support set repeated 3 times,
   the protocol's strongest setting.
"""

from __future__ import annotations

import argparse
import random

import torch

from spae_fast.cli_train import build_datasets
from spae_fast.llm import FrozenLM, task_induction_text
from spae_fast.model import SPAE

PLAIN_WORDS = ["apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "chair", "ocean", "music", "green",
               "table"]  # fmt: skip


def word_overlap_accuracy(model: SPAE, num_layers: int, episodes: int, seed: int = 0) -> float:
    _, held_out = build_datasets("digits", model.config.image_size)
    images = torch.stack([held_out[i][0] for i in range(len(held_out))])
    labels = held_out.labels
    words = model.encode(images, num_layers)
    generator = torch.Generator().manual_seed(seed)
    score = 0.0
    for _ in range(episodes):
        a, b = torch.randperm(10, generator=generator)[:2].tolist()
        in_a, in_b = (labels == a).nonzero().flatten(), (labels == b).nonzero().flatten()
        query, support_a = in_a[torch.randperm(len(in_a), generator=generator)[:2]]
        support_b = in_b[torch.randint(len(in_b), (1,), generator=generator)][0]
        agree_a = int((words[query] == words[support_a]).sum())
        agree_b = int((words[query] == words[support_b]).sum())
        score += 1.0 if agree_a > agree_b else 0.5 if agree_a == agree_b else 0.0
    return score / episodes


def llm_copying_ceiling(lm: FrozenLM, episodes: int, seed: int = 0, induction: bool = False, repeats: int = 1) -> float:
    rng = random.Random(seed)
    correct = 0
    for _ in range(episodes):
        first = " ".join(rng.choice(PLAIN_WORDS[:6]) for _ in range(5))
        second = " ".join(rng.choice(PLAIN_WORDS[6:]) for _ in range(5))
        support = [(first, "dax"), (second, "blicket")]
        rng.shuffle(support)
        query_is_first = rng.random() < 0.5
        prefix = task_induction_text(["dax", "blicket"]) if induction else ""
        prefix += "".join(f"Input: {words}\nOutput: {label}\n" for words, label in support * repeats)
        query = f"Input: {first if query_is_first else second}\nOutput:"
        scores = lm.score_continuations(lm.piece(prefix), [lm.piece(query)], [lm.piece(" dax\n"), lm.piece(" blicket\n")])
        correct += int(scores[0].argmax()) == (0 if query_is_first else 1)
    return correct / episodes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="an SPAE folder (e.g. the demo's model/)")
    parser.add_argument("--llm", default="smollm2")
    parser.add_argument("--episodes", type=int, default=2000, help="word-overlap episodes")
    parser.add_argument("--llm-episodes", type=int, default=100, help="LLM copying-ceiling episodes")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = SPAE.from_pretrained(args.model).eval()
    for layers in (2, 3):
        accuracy = word_overlap_accuracy(model, layers, args.episodes)
        words = model.quantizer.pyramid.total(layers)
        print(f"word-overlap 1-shot 2-way accuracy, {layers} layers ({words} words): {100 * accuracy:.1f}%")
    lm = FrozenLM.from_pretrained(args.llm)
    for induction, repeats in ((False, 1), (True, 3)):
        ceiling = llm_copying_ceiling(lm, args.llm_episodes, induction=induction, repeats=repeats)
        setting = "task induction, support repeated 3 times" if induction else "plain"
        print(f"LLM ({args.llm}) 1-shot 2-way accuracy with identical query and support words ({setting}): "
              f"{100 * ceiling:.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
