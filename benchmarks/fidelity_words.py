"""The headline section of the fidelity report (`fidelity.py`): do the words name the digit? Word -> class
accuracy per variant, and the issue's checks over seeds: the targets, guided vs unguided, and SAQ vs RQ at equal
or better reconstruction (seed by seed, and on RQ's accuracy / reconstruction curve)."""

from __future__ import annotations

import itertools
import statistics

# SAQ at alpha0 = 10 and tau 1 (the demo's setting until 2026-12-05) under several training seeds; and RQ under the
# same seeds, for SAQ vs RQ at equal reconstruction over seeds (one run's full PSNR moves by ~1.5 dB).
A10_SEEDS = ("saq_semantic", "saq_semantic_s1", "saq_semantic_s2", "saq_semantic_s3")
RQ_SEEDS = ("rq_semantic", "rq_semantic_s1", "rq_semantic_s2", "rq_semantic_s3")
SAQ_CURVE = ("saq_plain", "saq_semantic_a1", "saq_semantic_a3", "saq_semantic")  # alpha0 = 0, 1, 3, 10 (tau 1)
# SAQ with stronger guidance (alpha0 = 15) under seeds 0-2: spends SAQ's PSNR lead over RQ (alpha0 = 10) on the
# guided layers, for SAQ vs RQ at equal or better reconstruction over seeds.
SAQ_A15_SEEDS = ("saq_semantic_a15", "saq_semantic_a15_s1", "saq_semantic_a15_s2")
# ... and with more of it on layer 2, whose words are where SAQ trailed RQ.
SAQ_L2_SEEDS = ("saq_semantic_l2", "saq_semantic_l2_s1", "saq_semantic_l2_s2")
# ... and with tau 2 on layer 2 (SAQ's layer-2 target 2 z - e_1 then depends on z as RQ's does at tau 1), at
# alpha0 = 10, 15 and 20.
SAQ_T2_SEEDS = {alpha0: tuple(f"saq_semantic_t2{suffix}{seed}" for seed in ("", "_s1", "_s2"))
                for alpha0, suffix in ((10, ""), (15, "_a15"), (20, "_a20"))}  # fmt: skip
DEMO_SEEDS = SAQ_T2_SEEDS[20]  # `spae-fast demo`'s configuration (alpha0 = 20, tau 1 : 2) under seeds 0-2
# RQ's accuracy / reconstruction curve (alpha0 = 5 and 10, seeds 0-2) and the SAQ settings placed on it.
RQ_CURVE = {"alpha0 = 5": ("rq_semantic_a5", "rq_semantic_a5_s1", "rq_semantic_a5_s2"),
            "alpha0 = 10": RQ_SEEDS[:3]}  # fmt: skip
SAQ_SETTINGS = {"alpha0 = 10, tau 1 (the demo until 2026-12-05)": A10_SEEDS[:3], "alpha0 = 15": SAQ_A15_SEEDS,
                "alpha0 = 20, layers 1 : 2 = 3 : 5": SAQ_L2_SEEDS,
                **{f"alpha0 = {a}, tau 1 : 2{' (the demo)' if a == 20 else ''}": names
                   for a, names in SAQ_T2_SEEDS.items()}}  # fmt: skip


def mean_and_spread(values: list[float]) -> str:
    if len(values) < 2:
        return f"{100 * values[0]:.1f}%"
    return f"{100 * statistics.mean(values):.1f}% ({100 * min(values):.1f}-{100 * max(values):.1f}%)"


def word_accuracy_section(results: dict) -> list[str]:
    """The headline: do the words name the digit? Word -> class accuracy per variant, then the issue's checks:
    targets, guided vs unguided, SAQ vs RQ over seeds at equal or better reconstruction."""
    judged = {name: r for name, r in results.items() if "word_accuracy" in r}
    if not judged:
        return []
    lines = [
        (
            "Headline: word -> class accuracy on the held-out digits, the class whose name is most similar on average "
            "(MiniLM) to the words of layer 1, layers 1..2 and 1..3 (`spae_fast.word_accuracy`); chance = the "
            "commonest class's share; 'contains' = the words include the class name."
        ),
        "",
        "| variant | layer 1 | layers 1..2 | layers 1..3 | contains (1 / 1..2 / 1..3) | chance | full PSNR (dB) |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    for name, r in judged.items():
        accuracy = " | ".join(f"{100 * a:.1f}%" for a in r["word_accuracy"])
        contains = " / ".join(f"{100 * c:.0f}%" for c in r["contains_class_name"])
        lines.append(f"| {name} | {accuracy} | {contains} | {100 * r['chance']:.1f}% | {r['psnr'][-1]:.2f} |")
    lines.append("")
    demo = [judged[n] for n in DEMO_SEEDS if n in judged]
    saq = [judged[n] for n in A10_SEEDS if n in judged]
    rq = [judged[n] for n in RQ_SEEDS if n in judged]
    if demo:
        first = [r["word_accuracy"][0] for r in demo]
        both = [r["word_accuracy"][1] for r in demo]
        lines.append(f"- targets over {len(demo)} seeds of the demo (alpha0 = 20, tau 1 : 2): layer 1 {mean_and_spread(first)} (>= 80%: "
                     f"**{'met' if min(first) >= 0.8 else 'NOT met'}**), layers 1..2 {mean_and_spread(both)} (>= 90%: "
                     f"**{'met' if min(both) >= 0.9 else 'NOT met'}**)")  # fmt: skip
    if "saq_plain" in judged and demo:
        plain = judged["saq_plain"]
        lines.append(f"- unguided control (saq_plain): layer 1 {100 * plain['word_accuracy'][0]:.1f}%, layers 1..2 "
                     f"{100 * plain['word_accuracy'][1]:.1f}% against chance {100 * plain['chance']:.1f}%")  # fmt: skip
    if saq and rq:
        psnr_saq = statistics.mean(r["psnr"][-1] for r in saq)
        psnr_rq = statistics.mean(r["psnr"][-1] for r in rq)
        for i, label in enumerate(("layer 1", "layers 1..2", "layers 1..3")):
            a = statistics.mean(r["word_accuracy"][i] for r in saq)
            b = statistics.mean(r["word_accuracy"][i] for r in rq)
            lines.append(f"- SAQ vs RQ at alpha0 = 10, tau 1 ({len(saq)} vs {len(rq)} seeds), {label}: {100 * a:.1f}% vs {100 * b:.1f}% "
                         f"(SAQ {'>=' if a >= b else '<'} RQ) at full PSNR {psnr_saq:.2f} vs {psnr_rq:.2f} dB")  # fmt: skip
    lines += dominance_lines(
        judged, SAQ_A15_SEEDS, RQ_SEEDS, "SAQ at alpha0 = 15", "RQ at alpha0 = 10"
    )
    lines += dominance_lines(
        judged, SAQ_L2_SEEDS, RQ_SEEDS, "SAQ at alpha0 = 20 (layers 1 : 2 = 3 : 5)", "RQ at alpha0 = 10"
    )
    lines += dominance_lines(judged, DEMO_SEEDS, RQ_SEEDS, "the demo (SAQ at alpha0 = 20, tau 1 : 2)",
                             "RQ at alpha0 = 10")  # fmt: skip
    lines += equal_reconstruction_lines(judged)
    return lines + [""]


def dominance_lines(
    judged: dict, saq_names: tuple, rq_names: tuple, saq_label: str, rq_label: str
) -> list[str]:
    """SAQ runs against RQ runs, seed by seed (the i-th name of each) and on the mean over seeds: word -> class
    accuracy of layer 1 and layers 1..2 and full PSNR. SAQ dominates when, on the mean, both accuracies are at
    least RQ's and so is full PSNR."""
    pairs = [(s, r) for s, r in zip(saq_names, rq_names) if s in judged and r in judged]
    if not pairs:
        return []

    def row(r: dict) -> tuple[float, float, float]:
        return r["word_accuracy"][0], r["word_accuracy"][1], r["psnr"][-1]

    lines = ["", f"{saq_label} ({', '.join(saq_names)}) vs {rq_label} (the same seeds), per seed and on the mean:", "",
             "| seed | SAQ layer 1 | RQ layer 1 | SAQ layers 1..2 | RQ layers 1..2 | SAQ full PSNR | RQ full PSNR |",
             "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for s, r in pairs:
        (a1, a2, ap), (b1, b2, bp) = row(judged[s]), row(judged[r])
        lines.append(f"| {s} / {r} | {100 * a1:.1f}% | {100 * b1:.1f}% | {100 * a2:.1f}% | {100 * b2:.1f}% | "
                     f"{ap:.2f} | {bp:.2f} |")  # fmt: skip
    saq = [row(judged[s]) for s, _ in pairs]
    rq = [row(judged[r]) for _, r in pairs]
    mean_s = [statistics.mean(v) for v in zip(*saq)]
    mean_r = [statistics.mean(v) for v in zip(*rq)]
    lines.append(f"| mean | {100 * mean_s[0]:.1f}% | {100 * mean_r[0]:.1f}% | {100 * mean_s[1]:.1f}% | "
                 f"{100 * mean_r[1]:.1f}% | {mean_s[2]:.2f} | {mean_r[2]:.2f} |")  # fmt: skip
    per_seed = sum(all(a >= b for a, b in zip(x, y)) for x, y in zip(saq, rq))
    dominates = all(a >= b for a, b in zip(mean_s, mean_r))
    verdict = "dominates" if dominates else "does not dominate"
    lines.append("")
    lines.append(f"- {saq_label} vs {rq_label} over {len(pairs)} seeds: layer 1 {100 * mean_s[0]:.1f}% vs "
                 f"{100 * mean_r[0]:.1f}%, layers 1..2 {100 * mean_s[1]:.1f}% vs {100 * mean_r[1]:.1f}%, full PSNR "
                 f"{mean_s[2]:.2f} vs {mean_r[2]:.2f} dB: SAQ **{verdict}** on the mean (at least RQ's on all "
                 f"three); at least RQ's on all three seed by seed in {per_seed}/{len(pairs)}")  # fmt: skip
    return lines


def seed_means(judged: dict, names: tuple) -> tuple[float, ...] | None:
    """(full PSNR, accuracy of layer 1, 1..2, 1..3), each the mean over the seeds' runs; None unless all ran."""
    if not all(n in judged for n in names):
        return None
    runs = [(judged[n]["psnr"][-1], *judged[n]["word_accuracy"][:3]) for n in names]
    return tuple(statistics.mean(v) for v in zip(*runs))


def equal_reconstruction_lines(judged: dict) -> list[str]:
    """SAQ's settings against RQ's accuracy / reconstruction curve: RQ's accuracy at SAQ's full PSNR, linear in
    PSNR between RQ's points (means over seeds 0-2); above RQ's best-reconstructing point, that point (it
    reconstructs worse, so SAQ is compared at better reconstruction). Never extrapolated."""
    rq_points = {name: m for name, names in RQ_CURVE.items() if (m := seed_means(judged, names))}
    curve = sorted(rq_points.values())
    settings = {label: seed_means(judged, names) for label, names in SAQ_SETTINGS.items()}
    if len(curve) < 2 or not any(settings.values()):
        return []
    labels = ("layer 1", "layers 1..2", "layers 1..3")
    lines = ["", ("SAQ at equal reconstruction, on RQ's curve (RQ's alpha0 = 5 and 10 points, means over seeds 0-2; "
             "RQ's accuracy interpolated linearly in full PSNR at SAQ's):"), "",
             "| SAQ setting | full PSNR | " + " | ".join(f"SAQ {x} | RQ {x}" for x in labels) + " |",
             "|---|---:|" + "---:|" * 6]  # fmt: skip
    verdicts = []
    for label, saq in settings.items():
        if saq is None:
            continue
        psnr = saq[0]
        if psnr < curve[0][0]:  # no RQ point at equal or worse reconstruction
            verdicts.append(f"- SAQ at {label}, {psnr:.2f} dB: below RQ's curve ({curve[0][0]:.2f} dB), not compared")
            continue
        low, high = next(((a, b) for a, b in itertools.pairwise(curve) if a[0] <= psnr <= b[0]), (curve[-1], curve[-1]))
        weight = 0.0 if high[0] == low[0] else (psnr - low[0]) / (high[0] - low[0])
        rq = [lo + weight * (hi - lo) for lo, hi in zip(low[1:], high[1:])]
        lines.append(f"| {label} | {psnr:.2f} | "
                     + " | ".join(f"{100 * a:.1f}% | {100 * b:.1f}%" for a, b in zip(saq[1:], rq)) + " |")  # fmt: skip
        at_least = [a >= b for a, b in zip(saq[1:], rq)]
        verdicts.append(f"- SAQ at {label}, {psnr:.2f} dB: at least RQ's accuracy at equal reconstruction on "
                        + ", ".join(f"{x} **{'yes' if ok else 'no'}**" for x, ok in zip(labels, at_least)))  # fmt: skip
    points = "; ".join(f"{name}: {m[0]:.2f} dB, " + ", ".join(f"{x} {100 * a:.1f}%" for x, a in zip(labels, m[1:]))
                       for name, m in rq_points.items())  # fmt: skip
    return [*lines, "", f"- RQ's points: {points}", *verdicts]
