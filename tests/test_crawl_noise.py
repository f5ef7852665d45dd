"""The per-pair logic of data_prep/crawl_noise.py, in-process on generated token corpora, and its
command line's errors (the scripts around it: test_noise_kinds.py).
"""

import collections
import math
import random

import pytest

import crawl_noise
from prep_helpers import CRAWL_KINDS, KINDS_TEXT, check_pair, error_lines, read_lines, run, write_token_corpus


def _corpus(n=300, seed=0):
    """Random pairs of 1-8 words, with one-word sources and targets among them."""
    rng = random.Random(seed)
    return [([f"s{rng.randrange(40)}" for _ in range(rng.randint(1, 8))],
             [f"t{rng.randrange(40)}" for _ in range(rng.randint(1, 8))]) for _ in range(n)]


def test_derangements_have_no_fixed_point_and_cover_all():
    rng = random.Random(0)
    for n, count in ((2, 1), (3, 2), (4, 9)):  # the numbers of derangements of n elements
        seen = collections.Counter(tuple(crawl_noise.derangement(n, rng)) for _ in range(200 * count))
        assert len(seen) == count and all(sorted(p) == list(range(n)) for p in seen)
        assert all(p[k] != k for p in seen for k in range(n))
        # each derangement equally likely: 200 draws of each expected, within 4 binomial standard deviations
        assert all(abs(c - 200) <= 4 * math.sqrt(200 * (1 - 1 / count)) for c in seen.values())
    with pytest.raises(ValueError):
        crawl_noise.derangement(1, rng)


def test_a_lone_misaligned_pair_takes_another_pairs_target():
    rng = random.Random(0)
    donors = collections.Counter(crawl_noise.misalign(5, [2], rng)[2] for _ in range(400))
    assert set(donors) == {0, 1, 3, 4}
    with pytest.raises(ValueError, match="at least 2 training pairs"):
        crawl_noise.misalign(1, [0], rng)
    assert crawl_noise.misalign(5, [], rng) == {}


@pytest.mark.parametrize("kind", CRAWL_KINDS + ("mix",))
def test_defining_property_of_each_kind(kind):
    pairs = _corpus()
    result = crawl_noise.noise_pairs(pairs, kind, 0.5, random.Random(7))
    changed = result.changed(pairs)
    chosen = [i for i, d in enumerate(result.drawn) if d is not None]
    assert abs(len(chosen) - 150) < 4 * math.sqrt(300 * 0.5 * 0.5)  # each pair chosen with p = 0.5
    assert all(result.pairs[i] == pairs[i] for i, d in enumerate(result.drawn) if d is None)
    misaligned = [i for i in chosen if result.drawn[i] == "misaligned"]
    # no misaligned pair keeps its own target; the donors are a permutation of the group
    assert all(result.donors[i] != i and result.pairs[i] == (pairs[i][0], pairs[result.donors[i]][1])
               for i in misaligned)
    assert sorted(result.donors) == sorted(result.donors.values()) == misaligned
    for i in chosen:
        (src, tgt), (new_src, new_tgt) = pairs[i], result.pairs[i]
        kind_i = result.drawn[i]
        if kind_i == "untranslated":
            assert new_tgt == src and new_src == src
        elif kind_i == "src-shuffle":
            assert new_tgt == tgt and collections.Counter(new_src) == collections.Counter(src)
            if len(src) == 1:
                assert not changed[i]
        elif kind_i == "short":
            assert new_src == src and new_tgt == tgt[:len(new_tgt)] and 1 <= len(new_tgt) <= 3
            assert changed[i] == (len(new_tgt) < len(tgt))
        if changed[i]:
            check_pair(kind_i, src, tgt, new_src, new_tgt)
    if kind == "mix":
        assert set(result.drawn) == set(CRAWL_KINDS) | {None}
    else:
        assert set(result.drawn) == {kind, None}


def test_every_kind_chooses_the_same_pairs_for_a_seed():
    pairs = _corpus(200)
    chosen = {kind: [d is not None for d in crawl_noise.noise_pairs(pairs, kind, 0.3, random.Random(5)).drawn]
              for kind in CRAWL_KINDS + ("mix",)}
    assert len({tuple(c) for c in chosen.values()}) == 1
    assert abs(sum(chosen["mix"]) - 60) < 4 * math.sqrt(200 * 0.3 * 0.7)  # each pair chosen with p = 0.3


def _noise_files(tmp_path, kind, p, seed, tag, src="s", tgt="t"):
    kind_out = tmp_path / f"k{tag}" if kind != "mask" else None
    stats = crawl_noise.noise_corpus(tmp_path / src, tmp_path / tgt, tmp_path / f"so{tag}", tmp_path / f"to{tag}",
                                     tmp_path / f"n{tag}", kind, p, seed, kind_out=kind_out)
    texts = [read_lines(tmp_path / f"{name}{tag}") for name in ("so", "to", "n")]
    return stats, texts + ([read_lines(kind_out)] if kind_out else [])


@pytest.mark.parametrize("kind", CRAWL_KINDS + ("mix", "mask"))
def test_same_seed_same_output_other_seed_other_output(tmp_path, kind):
    write_token_corpus(tmp_path / "s", tmp_path / "t", 200, seed=0)
    _, a = _noise_files(tmp_path, kind, 0.4, 11, "a")
    _, b = _noise_files(tmp_path, kind, 0.4, 11, "b")
    _, c = _noise_files(tmp_path, kind, 0.4, 12, "c")
    assert a == b and a[2] != c[2] and a[:2] != c[:2]
    assert len(a[0]) == len(a[1]) == len(a[2]) == 200


def test_sidecar_marks_chosen_pairs_whose_text_is_unchanged_as_0(tmp_path):
    # pairs 0 and 1 have the same target; pair 2's target is its source; pair 3 has one word a side
    (tmp_path / "s").write_text("ein haus .\nzwei häuser .\nok\nja\n")
    (tmp_path / "t").write_text("a house .\na house .\nok\nyes\n")
    stats, (src, tgt, noise, kinds) = _noise_files(tmp_path, "untranslated", 1.0, 1, "u")
    assert tgt == ["ein haus .", "zwei häuser .", "ok", "ja"] and noise == ["1", "1", "0", "1"]
    assert (stats.pairs_chosen, stats.pairs_changed) == (4, 3) and kinds[2] == "clean"
    stats, (src, tgt, noise, _) = _noise_files(tmp_path, "src-shuffle", 1.0, 1, "s")
    assert noise[2:] == ["0", "0"] and src[2:] == ["ok", "ja"]
    stats, (src, tgt, noise, _) = _noise_files(tmp_path, "short", 1.0, 1, "h")
    assert noise[2:] == ["0", "0"] and tgt[2:] == ["ok", "yes"]
    assert stats.per_kind == {"short": {"chosen": 4, "changed": sum(n == "1" for n in noise)}}
    (tmp_path / "s2").write_text("ein haus .\nzwei häuser .\n")
    (tmp_path / "t2").write_text("a house .\na house .\n")
    stats, (src, tgt, noise, kinds) = _noise_files(tmp_path, "misaligned", 1.0, 1, "m", "s2", "t2")
    assert tgt == ["a house .", "a house ."] and noise == ["0", "0"] and kinds == ["clean", "clean"]
    assert (stats.pairs_chosen, stats.pairs_changed) == (2, 0)


def test_extreme_probabilities_and_a_lone_chosen_pair(tmp_path):
    write_token_corpus(tmp_path / "s", tmp_path / "t", 50, seed=1)
    for kind in CRAWL_KINDS + ("mix",):
        stats, (src, tgt, noise, _) = _noise_files(tmp_path, kind, 0.0, 1, f"0{kind}")
        assert src == read_lines(tmp_path / "s") and tgt == read_lines(tmp_path / "t") and set(noise) == {"0"}
        stats, _ = _noise_files(tmp_path, kind, 1.0, 1, f"1{kind}")
        assert stats.pairs_chosen == 50
    # a seed that chooses a single pair: it takes the target of one of the others
    pairs = [(s.split(), t.split()) for s, t in zip(read_lines(tmp_path / "s"), read_lines(tmp_path / "t"))]
    seed = next(s for s in range(1000) if len(crawl_noise.choose_pairs(50, 0.02, random.Random(s))) == 1)
    stats, (src, tgt, noise, _) = _noise_files(tmp_path, "misaligned", 0.02, seed, "lone")
    assert stats.pairs_chosen == stats.pairs_changed == 1 and stats.misaligned_lone == 1
    i = noise.index("1")
    assert tgt[i].split() in [t for k, (_, t) in enumerate(pairs) if k != i]


@pytest.mark.parametrize("args,message", [
    (["--kind", "typo"], f"unknown --kind 'typo': one of {KINDS_TEXT}"),
    (["--kind", "wrong-lang"], "--kind wrong-lang needs a second target language, which this repository's data "
     "does not have: it is not available"),
    (["--kind", "short", "-p", "1.5"], "p must be in [0, 1], got 1.5"),
    (["--kind", "mask", "-q", "-0.5"], "q must be in [0, 1], got -0.5"),
    (["--kind", "untranslated", "-q", "0.2"], "-q (the word probability) is for --kind mask only, not untranslated"),
    (["--kind", "mask", "--kind-out", "{out}.k"], "--kind-out is for the kinds other than mask (whose sidecar says it "
     "all)"),
    (["--kind", "misaligned", "--one-pair"], "--kind misaligned needs at least 2 training pairs (a chosen pair takes "
     "another pair's target), got 1"),
])
def test_crawl_noise_cli_errors_are_one_line(tmp_path, args, message):
    (tmp_path / "s").write_text("ein satz .\nnoch einer .\n")
    (tmp_path / "t").write_text("a sentence .\nanother .\n")
    (tmp_path / "s1").write_text("ein satz .\n")
    (tmp_path / "t1").write_text("a sentence .\n")
    files = ["s1", "t1"] if "--one-pair" in args else ["s", "t"]
    args = [a.format(out=tmp_path / "out") for a in args if a != "--one-pair"]
    result = run(["crawl_noise.py", *args, *[tmp_path / f for f in files], tmp_path / "so", tmp_path / "to",
                  tmp_path / "n"], check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert error_lines(result) == [f"crawl_noise.py: error: {message}"]
