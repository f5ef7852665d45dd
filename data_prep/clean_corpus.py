"""Removes sentence pairs by length and length ratio, as Moses' clean-corpus-n.perl does.

    python clean_corpus.py --min 1 --max 175 --ratio 1.5 SRC_IN TGT_IN SRC_OUT TGT_OUT

Whitespace is normalised (runs of whitespace -> one space, stripped), then a pair is dropped when a
side is empty, has fewer than `min` or more than `max` words, a word longer than 1000 characters, or
when one side has more than `ratio` times the words of the other. Unlike the Perl script, `|`
characters are left alone (the Perl script deletes them from unfactored corpora; Moses-escaped text
has none, as `|` becomes `&#124;`).
"""

import argparse
import re
import sys

import textfile

_WHITESPACE = re.compile(r"\s+")
_MAX_WORD_CHARS = 1000


def keep_pair(src_words, tgt_words, min_len, max_len, ratio):
    """Returns whether a pair of word lists passes clean-corpus-n's filters."""
    ns, nt = len(src_words), len(tgt_words)
    if ns == 0 or nt == 0:
        return False
    if not (min_len <= ns <= max_len and min_len <= nt <= max_len):
        return False
    if ns / nt > ratio or nt / ns > ratio:
        return False
    return all(len(w) <= _MAX_WORD_CHARS for w in src_words) and all(len(w) <= _MAX_WORD_CHARS for w in tgt_words)


def clean_corpus(src_in, tgt_in, src_out, tgt_out, min_len=1, max_len=175, ratio=1.5):
    """Writes the pairs of (src_in, tgt_in) that pass the filters; returns (pairs read, pairs kept).

    Raises:
        ValueError: if the two inputs have different numbers of lines, or one is not UTF-8
            (`textfile.TextFileError`).
    """
    n_in = n_out = 0
    with open(src_out, "w", encoding="utf-8") as fso, open(tgt_out, "w", encoding="utf-8") as fto:
        for s, t in textfile.read_pairs(src_in, tgt_in):
            n_in += 1
            s = _WHITESPACE.sub(" ", s).strip(" ")
            t = _WHITESPACE.sub(" ", t).strip(" ")
            if keep_pair(s.split(" ") if s else [], t.split(" ") if t else [], min_len, max_len, ratio):
                fso.write(s + "\n")
                fto.write(t + "\n")
                n_out += 1
    return n_in, n_out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--min", type=int, default=1)
    parser.add_argument("--max", type=int, default=175)
    parser.add_argument("--ratio", type=float, default=1.5)
    parser.add_argument("src_in")
    parser.add_argument("tgt_in")
    parser.add_argument("src_out")
    parser.add_argument("tgt_out")
    args = parser.parse_args(argv)
    try:
        n_in, n_out = clean_corpus(args.src_in, args.tgt_in, args.src_out, args.tgt_out,
                                   args.min, args.max, args.ratio)
    except ValueError as e:
        sys.exit(f"clean_corpus.py: error: {e}")
    print(f"  clean (length {args.min}-{args.max}, ratio {args.ratio}): kept {n_out:,} of {n_in:,} pairs "
          f"({n_in - n_out:,} removed)", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
