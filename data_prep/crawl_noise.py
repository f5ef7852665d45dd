"""Kinds of crawl-like noise (Khayrallah & Koehn 2018) for a tokenized parallel training corpus.

    python crawl_noise.py --kind KIND -p 0.1 --seed 1 [-q 0.15 --mask-token '<mask>'] \
        SRC_IN TGT_IN SRC_OUT TGT_OUT NOISE_OUT [--kind-out FILE] [--stats-json FILE]

Each sentence pair is chosen independently with probability p; a chosen pair gets the noise of KIND:

- mask: each word of source and target is replaced by the mask token with probability q (the paper's
  noise: mask_noise.py's code, with its output and statistics byte for byte);
- misaligned: the target is the target of another chosen pair. The chosen pairs' targets are
  deranged: permuted uniformly at random among the permutations in which no pair keeps its own. A
  pair chosen alone (no other chosen pair to swap with) takes the target of another pair of the
  corpus, drawn uniformly;
- untranslated: the target is a copy of the source;
- src-shuffle: the source words are shuffled (the target is kept);
- short: the target is cut to its first K words, K drawn uniformly from 1..3 (SHORT_WORDS);
- mix: each chosen pair gets one of misaligned, untranslated, src-shuffle and short, drawn uniformly
  (MIX_KINDS); the pairs that drew misaligned are deranged among themselves.

Khayrallah & Koehn's sixth kind, wrong-lang (a target in a third language), needs a second target
language, which this repository's data does not have: it is not available.

"Words" are whitespace-separated tokens (punctuation included). NOISE_OUT gets one line per pair: 1 if
the pair's text changed, 0 if it is unchanged. A chosen pair whose noise leaves its text as it was
(misaligned onto a string-identical target, untranslated with target == source, a shuffle in the
original order, e.g. of a one-word source, a target of K words or fewer) is 0 and counted as chosen
but unchanged. --kind-out (not for mask) gets one line per pair: the kind of a changed pair, `clean`
for the others.

For the kinds other than mask, one `random.Random(seed)` stream is drawn in this order: one draw per
pair for the choice (so the same seed and p choose the same pairs for every one of these kinds), for
mix one kind per chosen pair, the derangement (or the lone pair's donor), then, pair by pair, the
shuffles and cut lengths. The same seed and input give the same output.
"""

import argparse
import json
import random
import sys
from dataclasses import asdict, dataclass, field

import mask_noise
import textfile

KINDS = ("mask", "misaligned", "untranslated", "src-shuffle", "short", "mix")
MIX_KINDS = ("misaligned", "untranslated", "src-shuffle", "short")
NOT_AVAILABLE = {"wrong-lang": "--kind wrong-lang needs a second target language, which this repository's data "
                               "does not have: it is not available"}
SHORT_WORDS = (1, 3)  # a short target keeps its first K words, K uniform in this range (both ends included)
CLEAN = "clean"  # the --kind-out line of a pair whose text is unchanged


def check_kind(kind):
    """Raises ValueError unless `kind` is one of KINDS."""
    if kind in NOT_AVAILABLE:
        raise ValueError(NOT_AVAILABLE[kind])
    if kind not in KINDS:
        raise ValueError(f"unknown --kind {kind!r}: one of {', '.join(KINDS)}")


def needs_two_pairs(kind):
    """Whether `kind` can give a pair another pair's target (then the corpus needs two pairs at least)."""
    return kind in ("misaligned", "mix")


def choose_pairs(n, p, rng):
    """Indices of the pairs chosen among n, each with probability p (one draw per pair, in order)."""
    return [i for i in range(n) if rng.random() < p]


def draw_kinds(chosen, rng, kinds=MIX_KINDS):
    """{pair index: kind} for the chosen indices, each kind drawn uniformly from `kinds`, in order."""
    return {i: rng.choice(kinds) for i in chosen}


def derangement(n, rng):
    """A permutation `perm` of range(n) with perm[k] != k for every k, uniform among those (n >= 2).

    Shuffles until no element stays in place: 1/e of the shuffles qualify for large n, 1/2 for n = 2.
    """
    if n < 2:
        raise ValueError(f"no derangement of {n} element(s)")
    perm = list(range(n))
    while True:
        rng.shuffle(perm)
        if all(k != j for k, j in enumerate(perm)):
            return perm


def misalign(n, group, rng):
    """Donors of the misaligned pairs: {pair index: index of the pair whose target it takes}.

    Args:
        n: the number of pairs of the corpus.
        group: the indices of the pairs to misalign.
        rng: a `random.Random`.

    Two or more pairs take each other's targets (a uniform derangement of `group`); a lone pair takes
    the target of another pair of the corpus, drawn uniformly among the n - 1 others.
    """
    group = list(group)
    if len(group) >= 2:
        perm = derangement(len(group), rng)
        return {i: group[j] for i, j in zip(group, perm)}
    if len(group) == 1:
        if n < 2:
            raise ValueError(f"misaligned noise needs at least 2 training pairs, got {n}")
        i = group[0]
        j = rng.randrange(n - 1)
        return {i: j + (j >= i)}
    return {}


def shuffle_words(words, rng):
    """A shuffled copy of `words` (a one-word list consumes no draw and comes back as it was)."""
    words = list(words)
    rng.shuffle(words)
    return words


def shorten(words, rng, lo=SHORT_WORDS[0], hi=SHORT_WORDS[1]):
    """The first K words of `words`, K drawn uniformly from lo..hi (always drawn, so the stream does not
    depend on the length); a list of K words or fewer comes back whole."""
    return list(words[:rng.randint(lo, hi)])


@dataclass
class NoisedPairs:
    """The result of `noise_pairs`."""

    pairs: list  # the new (source words, target words) of every pair
    drawn: list  # per pair: the kind drawn for a chosen pair, None for the others
    donors: dict  # {misaligned pair index: index of the pair whose original target it took}

    def changed(self, original):
        """Per pair: whether its text differs from `original` (the pairs given to `noise_pairs`)."""
        return [new != (list(src), list(tgt)) for new, (src, tgt) in zip(self.pairs, original)]


def noise_pairs(pairs, kind, p, rng):
    """Applies one kind of noise (not mask) to a list of (source words, target words) pairs.

    Args:
        pairs: the corpus, a list of (source words, target words); not modified.
        kind: one of KINDS other than "mask".
        p: probability that a pair is chosen.
        rng: a `random.Random`, drawn as the module's docstring says.

    Returns:
        `NoisedPairs`: new pairs as (list, list), the kind drawn per pair (None if not chosen), donors.

    Raises:
        ValueError: unknown kind, mask, p outside [0, 1], or misaligned / mix with fewer than 2 pairs.
    """
    check_kind(kind)
    if kind == "mask":
        raise ValueError("noise_pairs does not do mask: use mask_noise.noise_pair")
    mask_noise.check_probability("p", p)
    n = len(pairs)
    if needs_two_pairs(kind) and n < 2:
        raise ValueError(f"--kind {kind} needs at least 2 training pairs (a chosen pair takes another pair's "
                         f"target), got {n}")
    chosen = choose_pairs(n, p, rng)
    kinds = draw_kinds(chosen, rng) if kind == "mix" else {i: kind for i in chosen}
    donors = misalign(n, [i for i in chosen if kinds[i] == "misaligned"], rng)
    new_pairs = []
    for i, (src, tgt) in enumerate(pairs):
        src, tgt = list(src), list(tgt)
        k = kinds.get(i)
        if k == "misaligned":
            tgt = list(pairs[donors[i]][1])
        elif k == "untranslated":
            tgt = list(src)
        elif k == "src-shuffle":
            src = shuffle_words(src, rng)
        elif k == "short":
            tgt = shorten(tgt, rng)
        new_pairs.append((src, tgt))
    return NoisedPairs(new_pairs, [kinds.get(i) for i in range(n)], donors)


@dataclass
class CrawlNoiseStats:
    """Counts of a noising run with a kind other than mask (`pairs_changed` = the 1s of the sidecar)."""

    kind: str = ""
    pairs: int = 0
    pairs_chosen: int = 0
    pairs_changed: int = 0
    per_kind: dict = field(default_factory=dict)  # {kind: {"chosen": n, "changed": m}}; one entry unless mix
    misaligned_lone: int = 0  # 1 if a lone misaligned pair took the target of a pair outside its group
    p: float = 0.0
    seed: int = 0
    short_words: list = field(default_factory=lambda: list(SHORT_WORDS))

    def summary_lines(self):
        """Human-readable report: observed rate next to p, and per kind chosen / changed."""
        def frac(a, b):
            return a / b if b else float("nan")

        lines = [
            f"pairs chosen: {self.pairs_chosen:,} of {self.pairs:,} = {frac(self.pairs_chosen, self.pairs):.4f} "
            f"(p = {self.p})",
            f"pairs changed (marked 1 in the sidecar): {self.pairs_changed:,} = "
            f"{frac(self.pairs_changed, self.pairs):.4f}",
        ]
        for kind, counts in self.per_kind.items():
            lines.append(f"{kind}: {counts['chosen']:,} chosen, {counts['changed']:,} changed")
        if self.misaligned_lone:
            lines.append("misaligned: one pair only, so it took the target of a random other pair")
        return lines


def noise_corpus(src_in, tgt_in, src_out, tgt_out, noise_out, kind, p, seed, q=0.15, mask_token="<mask>",
                 kind_out=None):
    """Noises a tokenized parallel corpus file pair with one kind of noise and writes the sidecar(s).

    For "mask" this is mask_noise.noise_corpus (q and mask_token are used only there) and the result its
    `NoiseStats`; for the other kinds the result is a `CrawlNoiseStats`, and `kind_out`, if given, gets
    each pair's kind (`clean` for an unchanged pair).

    Raises:
        ValueError: bad kind or p (or q), --kind-out with mask, misaligned or mix with fewer than 2 pairs,
            inputs with different line counts, or an input that is not UTF-8 (`textfile.TextFileError`).
    """
    check_kind(kind)
    if kind == "mask":
        if kind_out:
            raise ValueError("--kind-out is for the kinds other than mask (whose sidecar says it all)")
        return mask_noise.noise_corpus(src_in, tgt_in, src_out, tgt_out, noise_out, p, q, seed, mask_token)
    mask_noise.check_probability("p", p)
    original = [(mask_noise._words(s), mask_noise._words(t)) for s, t in textfile.read_pairs(src_in, tgt_in)]
    result = noise_pairs(original, kind, p, random.Random(seed))
    changed = result.changed(original)
    stats = CrawlNoiseStats(kind=kind, pairs=len(original), p=p, seed=seed)
    per_kind = {k: {"chosen": 0, "changed": 0} for k in (MIX_KINDS if kind == "mix" else (kind,))}
    for drawn, was_changed in zip(result.drawn, changed):
        if drawn is not None:
            stats.pairs_chosen += 1
            per_kind[drawn]["chosen"] += 1
            per_kind[drawn]["changed"] += was_changed
        stats.pairs_changed += was_changed
    stats.per_kind = per_kind
    stats.misaligned_lone = int(len(result.donors) == 1)
    with open(src_out, "w", encoding="utf-8") as fso, open(tgt_out, "w", encoding="utf-8") as fto, \
            open(noise_out, "w", encoding="utf-8") as fno:
        for src, tgt in result.pairs:
            fso.write(" ".join(src) + "\n")
            fto.write(" ".join(tgt) + "\n")
        fno.writelines("1\n" if c else "0\n" for c in changed)
    if kind_out:
        with open(kind_out, "w", encoding="utf-8") as fko:
            fko.writelines(f"{d if c else CLEAN}\n" for d, c in zip(result.drawn, changed))
    return stats


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kind", required=True, help=f"one of {', '.join(KINDS)}")
    parser.add_argument("-p", type=float, default=0.1, help="probability that a pair is chosen")
    parser.add_argument("-q", type=float, help="mask only: probability that a word of a chosen pair is masked "
                                               "(default 0.15)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--mask-token", default="<mask>", help="mask only")
    parser.add_argument("--kind-out", help="not for mask: also write each pair's kind (or 'clean') here")
    parser.add_argument("--stats-json", help="also write the counts as JSON here")
    parser.add_argument("src_in")
    parser.add_argument("tgt_in")
    parser.add_argument("src_out")
    parser.add_argument("tgt_out")
    parser.add_argument("noise_out", help="sidecar: one line per pair, 1 = noised, 0 = unchanged")
    args = parser.parse_args(argv)

    def fail(message):
        sys.exit(f"crawl_noise.py: error: {message}")

    try:
        check_kind(args.kind)
    except ValueError as e:
        fail(e)
    if args.kind == "mask":
        if not args.mask_token or any(c.isspace() for c in args.mask_token):
            fail(f"--mask-token must be one non-empty word without spaces, got {args.mask_token!r}")
    elif args.q is not None:
        fail(f"-q (the word probability) is for --kind mask only, not {args.kind}")
    try:
        stats = noise_corpus(args.src_in, args.tgt_in, args.src_out, args.tgt_out, args.noise_out, args.kind,
                             args.p, args.seed, 0.15 if args.q is None else args.q, args.mask_token, args.kind_out)
    except ValueError as e:
        fail(e)
    for line in stats.summary_lines():
        print("  noise: " + line, file=sys.stderr)
    if args.stats_json:
        with open(args.stats_json, "w", encoding="utf-8") as f:  # as mask_noise.py writes it
            json.dump(asdict(stats), f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
