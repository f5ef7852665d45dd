"""Masked-word noise of Fan et al. (AAAI 2021), applied to a tokenized parallel training corpus
(``crawl_noise.py --kind mask``, which make_noisy_parallel.sh and make_noisy_iwslt.sh run).

Each sentence pair is chosen with probability p; in a chosen pair every word (whitespace-separated
token, punctuation included) of the source and of the target is replaced by the mask token with
probability q. One `random.Random(seed)` stream drives both draws, pair by pair, so the same seed and
input give the same output. NOISE_OUT gets one line per pair: 1 if at least one word of the pair was
masked, 0 if the pair is unchanged (a chosen pair in which no word was drawn stays 0).
"""

import random
from dataclasses import dataclass

import textfile


@dataclass
class NoiseStats:
    """Counts of a noising run (per side: tokens in chosen pairs and tokens masked)."""

    pairs: int = 0
    pairs_chosen: int = 0
    pairs_changed: int = 0
    src_tokens_in_chosen: int = 0
    src_tokens_masked: int = 0
    tgt_tokens_in_chosen: int = 0
    tgt_tokens_masked: int = 0
    p: float = 0.0
    q: float = 0.0
    seed: int = 0
    mask_token: str = ""

    def summary_lines(self):
        """Human-readable report: observed rates next to p and q."""
        def frac(a, b):
            return a / b if b else float("nan")

        return [
            f"pairs chosen: {self.pairs_chosen:,} of {self.pairs:,} = {frac(self.pairs_chosen, self.pairs):.4f} "
            f"(p = {self.p})",
            f"pairs changed (>= 1 word masked, marked 1 in the sidecar): {self.pairs_changed:,} "
            f"= {frac(self.pairs_changed, self.pairs):.4f}",
            f"source words masked in chosen pairs: {self.src_tokens_masked:,} of {self.src_tokens_in_chosen:,} "
            f"= {frac(self.src_tokens_masked, self.src_tokens_in_chosen):.4f} (q = {self.q})",
            f"target words masked in chosen pairs: {self.tgt_tokens_masked:,} of {self.tgt_tokens_in_chosen:,} "
            f"= {frac(self.tgt_tokens_masked, self.tgt_tokens_in_chosen):.4f} (q = {self.q})",
        ]


def check_probability(name, value):
    """Raises ValueError unless 0 <= value <= 1."""
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def mask_words(words, q, rng, mask_token):
    """Replaces each word by `mask_token` with probability q; returns (new words, number masked)."""
    draws = [rng.random() < q for _ in words]
    return [mask_token if d else w for w, d in zip(words, draws)], sum(draws)


def noise_pair(src, tgt, p, q, rng, mask_token="<mask>"):
    """Noises one pair of word lists.

    Args:
        src: source words.
        tgt: target words.
        p: probability that the pair is chosen.
        q: probability that a word of a chosen pair is masked (source and target alike).
        rng: a `random.Random`; one draw for the choice, then one per word of a chosen pair.
        mask_token: the replacement word.

    Returns:
        (new source words, new target words, chosen, source words masked, target words masked).
    """
    if rng.random() >= p:
        return src, tgt, False, 0, 0
    src, n_src = mask_words(src, q, rng, mask_token)
    tgt, n_tgt = mask_words(tgt, q, rng, mask_token)
    return src, tgt, True, n_src, n_tgt


def _words(line):
    return [w for w in line.split(" ") if w]


def noise_corpus(src_in, tgt_in, src_out, tgt_out, noise_out, p, q, seed, mask_token="<mask>"):
    """Noises a tokenized parallel corpus file pair and writes the sidecar; returns its `NoiseStats`.

    Raises:
        ValueError: bad p or q, mask token in the input, inputs with different line counts, or an input
            that is not UTF-8 (`textfile.TextFileError`).
    """
    check_probability("p", p)
    check_probability("q", q)
    rng = random.Random(seed)
    stats = NoiseStats(p=p, q=q, seed=seed, mask_token=mask_token)
    with open(src_out, "w", encoding="utf-8") as fso, open(tgt_out, "w", encoding="utf-8") as fto, \
            open(noise_out, "w", encoding="utf-8") as fno:
        for src_line, tgt_line in textfile.read_pairs(src_in, tgt_in):
            src, tgt = _words(src_line), _words(tgt_line)
            stats.pairs += 1
            if mask_token in src or mask_token in tgt:
                raise ValueError(f"line {stats.pairs} of {src_in} / {tgt_in} already contains the mask token "
                                 f"{mask_token!r}: choose another --mask-token")
            src, tgt, chosen, n_src, n_tgt = noise_pair(src, tgt, p, q, rng, mask_token)
            if chosen:
                stats.pairs_chosen += 1
                stats.src_tokens_in_chosen += len(src)
                stats.tgt_tokens_in_chosen += len(tgt)
                stats.src_tokens_masked += n_src
                stats.tgt_tokens_masked += n_tgt
            changed = n_src + n_tgt > 0
            stats.pairs_changed += changed
            fso.write(" ".join(src) + "\n")
            fto.write(" ".join(tgt) + "\n")
            fno.write("1\n" if changed else "0\n")
    return stats

