#!/usr/bin/env python
"""Paired significance of one method against every other row of a run_experiment table.

    python examples/compare_methods.py --out OUT --data COND=DATA_BIN [--data ...] --method trusted \\
        [--exclude oracle pretrained]

run_experiment.py tests every run against the baseline of its seed. This asks the next question: is
``--method`` ahead of each *other* method? For each data condition and each other method run on the
same seeds (the oracle and the pretrained student excluded by default: a bound and a row that is no
fine-tune), per seed: Δ sacreBLEU of ``--method`` over it, and sacrebleu's paired bootstrap p-values
(BLEU, chrF; 1000 resamples) of ``--method``'s test translations against it as the baseline system,
on the references run_experiment scored them with (the data-bin's raw references, as it finds them).
It prints a markdown table: the mean Δ, each seed's Δ and p, and on how many seeds ``--method`` is
significantly ahead (Δ > 0 and p < 0.05) or behind (Δ < 0 and p < 0.05).
"""
import argparse
import csv
import statistics
import sys
from pathlib import Path

import results  # examples/results.py (this script's directory is on sys.path)

ALPHA = 0.05


def load_runs(out):
    """{(condition, method, seed): results.csv row} of an experiment directory."""
    path = Path(out) / "results.csv"
    if not path.is_file():
        sys.exit(f"[compare] error: {path} not found: give the --out of examples/run_experiment.py")
    with open(path, newline="") as fh:
        return {(r["data"], r["method"], r["seed"]): r for r in csv.DictReader(fh)}


def compare(runs, cond, references, method, other):
    """Per common seed: (seed, Δ sacreBLEU of ``method`` over ``other``, p BLEU, p chrF)."""
    seeds = sorted({s for c, m, s in runs if c == cond and m == method}
                   & {s for c, m, s in runs if c == cond and m == other}, key=int)
    rows = []
    for seed in seeds:
        mine, theirs = runs[(cond, method, seed)], runs[(cond, other, seed)]
        p_bleu, p_chrf = results.paired_p_values(theirs["run_dir"], mine["run_dir"], references)
        rows.append((seed, float(mine["sacrebleu"]) - float(theirs["sacrebleu"]), p_bleu, p_chrf))
    return rows


def table(runs, conditions, method, exclude):
    lines = [f"**{method}** against every other method (paired bootstrap, sacrebleu; Δ = {method} − row)", "",
             "| data | versus | seeds | mean Δ sacreBLEU | Δ per seed | p (BLEU) | p (chrF) | ahead / behind (p < 0.05) |",
             "|---|---|---|---|---|---|---|---|"]
    for cond, data in conditions.items():
        references = results.find_references(data)
        others = dict.fromkeys(m for c, m, _ in runs if c == cond and m != method and m not in exclude)
        for other in others:
            rows = compare(runs, cond, references, method, other)
            if not rows:
                continue
            ahead = sum(d > 0 and p < ALPHA for _, d, p, _ in rows)
            behind = sum(d < 0 and p < ALPHA for _, d, p, _ in rows)
            lines.append(f"| {cond} | {other} | {','.join(s for s, *_ in rows)} | "
                         f"{statistics.mean(d for _, d, _, _ in rows):+.2f} | "
                         f"{' '.join(f'{d:+.2f}' for _, d, _, _ in rows)} | {' '.join(f'{p:.3f}' for _, _, p, _ in rows)} | "
                         f"{' '.join(f'{p:.3f}' for *_, p in rows)} | {ahead} / {behind} of {len(rows)} |")
    return lines


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the experiment directory (its results.csv)")
    parser.add_argument("--data", action="append", required=True, metavar="COND=DATA_BIN",
                        help="a data condition of the table and its data-bin (for its references), as given to "
                        "run_experiment.py")
    parser.add_argument("--method", required=True, help="the method to compare with the others")
    parser.add_argument("--exclude", nargs="*", default=["oracle", "pretrained"],
                        help="methods left out (default: oracle pretrained)")
    args = parser.parse_args(argv)
    conditions = {}
    for spec in args.data:
        cond, sep, data = spec.partition("=")
        if not sep or not cond or not data:
            parser.error(f"--data {spec!r}: expected COND=DATA_BIN")
        conditions[cond] = data
    return args, conditions


def main(argv=None):
    args, conditions = parse_args(argv)
    runs = load_runs(args.out)
    if not any(m == args.method for _, m, _ in runs):
        sys.exit(f"[compare] error: no {args.method!r} run in {args.out}/results.csv")
    print("\n".join(table(runs, conditions, args.method, set(args.exclude))))


if __name__ == "__main__":
    main()
