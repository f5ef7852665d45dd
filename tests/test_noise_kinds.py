"""Tests of the crawl-noise kinds of data_prep: crawl_noise.py and make_noisy_parallel.sh.

The script runs as a subprocess on a tiny seeded synthetic corpus prepared by prepare_parallel.sh
(150 training pairs, 100 BPE merges); the per-pair logic is also tested in-process on generated
token corpora. The helpers come from test_data_prep.py.
"""

import collections
import json
import math
import random
import shutil
import struct

import pytest

from test_data_prep import _write_token_corpus, error_lines, leftovers, read_bytes, read_lines, run

import crawl_noise  # noqa: E402 (on sys.path through test_data_prep)

CRAWL_KINDS = ("misaligned", "untranslated", "src-shuffle", "short")
N_TRAIN = 150
LANGS = ("de", "en")


def words(line):
    return [w for w in line.split(" ") if w]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("noise_kinds")


@pytest.fixture(scope="module")
def clean(work):
    corpus = work / "corpus"
    run(["make_synthetic_corpus.py", corpus, "--train", N_TRAIN, "--valid", 20, "--test", 20, "--seed", 3])
    out = work / "bin" / "clean"
    run(["prepare_parallel.sh", "--bpe-merges", 100, "--workers", 1, corpus, out])
    assert len(read_lines(out / "tok" / "train.de")) == N_TRAIN  # the synthetic pairs all pass cleaning
    return out


@pytest.fixture(scope="module")
def noisy(work, clean):
    """noisy(kind, p, seed): the output dir of make_noisy_parallel.sh, made once per settings."""
    made = {}

    def make(kind, p, seed):
        if (kind, p, seed) not in made:
            out = work / "bin" / f"{kind}-{p}-{seed}"
            result = run(["make_noisy_parallel.sh", "--kind", kind, "-p", p, "--seed", seed, "--workers", 1,
                          clean, out])
            made[kind, p, seed] = out, result
        return made[kind, p, seed]

    return make


def _train(directory):
    return [[words(line) for line in read_lines(directory / "tok" / f"train.{lang}")] for lang in LANGS]


def _binarized_sizes(directory):
    """Sentences in data-bin/train.de-en.{de,en}, from the header of fairseq's mmap index (no fairseq import:
    magic, version <Q, dtype <B, then the number of sentences <Q)."""
    sizes = []
    for lang in LANGS:
        with open(directory / "data-bin" / f"train.de-en.{lang}.idx", "rb") as f:
            head = f.read(26)
        assert head[:9] == b"MMIDIDX\x00\x00"
        sizes.append(struct.unpack("<Q", head[18:26])[0])
    return sizes


def _check_layout(clean_dir, noisy_dir):
    """Line counts of the noisy training set, its sidecar and data-bin; valid/test/dictionary as the clean ones."""
    sidecar = read_lines(noisy_dir / "tok" / "train.noise")
    assert set(sidecar) <= {"0", "1"} and len(sidecar) == N_TRAIN
    assert read_bytes(noisy_dir / "data-bin" / "train.noise") == read_bytes(noisy_dir / "tok" / "train.noise")
    for lang in LANGS:
        assert len(read_lines(noisy_dir / "tok" / f"train.{lang}")) == N_TRAIN
        assert len(read_lines(noisy_dir / "subword" / f"train.{lang}")) == N_TRAIN
    assert _binarized_sizes(noisy_dir) == [N_TRAIN, N_TRAIN]
    same = ["data-bin/dict.de.txt", "data-bin/dict.en.txt", "subword/code"]
    same += [f"{sub}/{split}.{lang}" for sub in ("tok", "subword") for split in ("valid", "test") for lang in LANGS]
    same += [f"data-bin/{split}.de-en.{lang}.{ext}" for split in ("valid", "test") for lang in LANGS
             for ext in ("bin", "idx")]
    for name in same:
        assert read_bytes(clean_dir / name) == read_bytes(noisy_dir / name), name
    assert not leftovers(noisy_dir.parent)
    return [s == "1" for s in sidecar]


def _check_pair(kind, src, tgt, new_src, new_tgt):
    """The defining property of a changed pair of `kind` (misaligned: the target changed, source kept)."""
    if kind == "src-shuffle":
        assert new_tgt == tgt and sorted(new_src) == sorted(src) and new_src != src
    else:
        assert new_src == src and new_tgt != tgt
    if kind == "untranslated":
        assert new_tgt == src
    elif kind == "short":
        assert 1 <= len(new_tgt) <= 3 and len(new_tgt) < len(tgt) and new_tgt == tgt[:len(new_tgt)]


# ----------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("kind", CRAWL_KINDS)
def test_each_kind_end_to_end(clean, noisy, kind):
    out, result = noisy(kind, 0.5, 2)
    changed = _check_layout(clean, out)
    (src, tgt), (new_src, new_tgt) = _train(clean), _train(out)
    assert changed == [(a, b) != (c, d) for a, b, c, d in zip(src, tgt, new_src, new_tgt)]  # an honest sidecar
    for i in (i for i, c in enumerate(changed) if c):
        _check_pair(kind, src[i], tgt[i], new_src[i], new_tgt[i])
    if kind == "misaligned":  # the targets of the noised pairs are a permutation of their own targets
        noised = [i for i, c in enumerate(changed) if c]
        assert sorted(new_tgt[i] for i in noised) == sorted(tgt[i] for i in noised)
    stats = json.loads((out / "noise_stats.json").read_text())
    assert stats["kind"] == kind and stats["pairs"] == N_TRAIN and stats["pairs_changed"] == sum(changed)
    assert stats["per_kind"] == {kind: {"chosen": stats["pairs_chosen"], "changed": sum(changed)}}
    assert abs(stats["pairs_chosen"] / N_TRAIN - 0.5) < 4 * math.sqrt(0.25 / N_TRAIN)
    if kind in ("misaligned", "untranslated"):  # every target here is unique and differs from its source
        assert stats["pairs_chosen"] == sum(changed)
    assert not (out / "tok" / "train.noise_kind").exists()
    settings = read_lines(out / "prep.settings")
    assert f"kind={kind}" in settings and "p=0.5" in settings and not [s for s in settings if s.startswith("q=")]
    assert f"{kind}: {stats['pairs_chosen']} chosen, {sum(changed)} changed" in result.stderr


def test_mix_end_to_end_counts_per_kind(clean, noisy):
    out, _ = noisy("mix", 0.8, 1)
    changed = _check_layout(clean, out)
    (src, tgt), (new_src, new_tgt) = _train(clean), _train(out)
    kinds = read_lines(out / "tok" / "train.noise_kind")
    assert len(kinds) == N_TRAIN and set(kinds) == set(CRAWL_KINDS) | {"clean"}
    for i, kind in enumerate(kinds):
        assert changed[i] == (kind != "clean") == ((src[i], tgt[i]) != (new_src[i], new_tgt[i]))
        if kind != "clean":
            _check_pair(kind, src[i], tgt[i], new_src[i], new_tgt[i])
    misaligned = [i for i, kind in enumerate(kinds) if kind == "misaligned"]
    assert sorted(new_tgt[i] for i in misaligned) == sorted(tgt[i] for i in misaligned)
    stats = json.loads((out / "noise_stats.json").read_text())
    count = collections.Counter(kinds)
    assert {k: v["changed"] for k, v in stats["per_kind"].items()} == {k: count[k] for k in CRAWL_KINDS}
    assert sum(v["changed"] for v in stats["per_kind"].values()) == stats["pairs_changed"] == sum(changed)
    assert sum(v["chosen"] for v in stats["per_kind"].values()) == stats["pairs_chosen"]


def test_kind_mask_is_make_noisy_iwslt(work, clean):
    outs = [work / "bin" / "mask-parallel", work / "bin" / "mask-iwslt"]
    results = [run(["make_noisy_parallel.sh", "--kind", "mask", "-p", 0.5, "-q", 0.3, "--seed", 4, "--workers", 1,
                    clean, outs[0]]),
               run(["make_noisy_iwslt.sh", "-p", 0.5, "-q", 0.3, "--seed", 4, "--workers", 1, clean, outs[1]])]

    def files(out):  # preprocess.log names the temporary directory
        return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != "preprocess.log")

    assert files(outs[0]) == files(outs[1])
    assert "prep.settings" in files(outs[0]) and "noise_stats.json" in files(outs[0])
    for name in files(outs[0]):
        assert read_bytes(outs[0] / name) == read_bytes(outs[1] / name), name
    assert all("(q = 0.3)" in r.stderr for r in results)
    assert "<mask>" in (outs[0] / "tok" / "train.en").read_text()
    again = run(["make_noisy_iwslt.sh", "-p", 0.5, "-q", 0.3, "--seed", 4, clean, outs[0]])  # the same settings
    assert "nothing to do" in again.stderr


def test_rerun_is_a_no_op_and_another_kind_is_refused(clean, noisy):
    out, _ = noisy("short", 0.5, 2)
    before = read_bytes(out / "tok" / "train.en")
    again = run(["make_noisy_parallel.sh", "--kind", "short", "-p", 0.5, "--seed", 2, clean, out])
    assert "nothing to do" in again.stderr
    other = run(["make_noisy_parallel.sh", "--kind", "untranslated", "-p", 0.5, "--seed", 2, clean, out], check=False)
    assert other.returncode != 0
    assert error_lines(other) == [f"make_noisy_parallel.sh: error: {out} was made with other settings or inputs "
                                  f"(see {out}/prep.settings): pass --force to rebuild it, or choose another directory"]
    assert read_bytes(out / "tok" / "train.en") == before


KINDS_TEXT = "mask, misaligned, untranslated, src-shuffle, short, mix"


@pytest.mark.parametrize("script,args,message", [
    ("make_noisy_parallel.sh", [], f"--kind is required: one of {KINDS_TEXT} (see -h)"),
    ("make_noisy_parallel.sh", ["--kind", "typo"], f"unknown --kind 'typo': one of {KINDS_TEXT}"),
    ("make_noisy_parallel.sh", ["--kind", "wrong-lang"], "--kind wrong-lang needs a second target language, which "
     "this repository's data does not have: it is not available (see -h)"),
    ("make_noisy_parallel.sh", ["--kind", "short", "-p", "1.5"],
     "p (--pair-prob) must be a number in [0, 1], got '1.5'"),
    ("make_noisy_parallel.sh", ["--kind", "mix", "-p", "nan"], "p (--pair-prob) must be a number in [0, 1], got 'nan'"),
    ("make_noisy_parallel.sh", ["--kind", "mask", "-q", "2"], "q (--word-prob) must be a number in [0, 1], got '2'"),
    ("make_noisy_parallel.sh", ["--kind", "short", "-q", "0.2"], "-q (--word-prob) is for --kind mask only, not short"),
    ("make_noisy_iwslt.sh", ["--kind", "short"], "make_noisy_iwslt.sh makes the masked noise only: for --kind use "
     "make_noisy_parallel.sh"),
])
def test_bad_options_are_one_line_errors(work, clean, script, args, message):
    out = work / "bad" / "noisy"
    result = run([script, *args, clean, out], check=False)
    assert result.returncode != 0
    assert error_lines(result) == [f"{script}: error: {message}"]
    assert not out.exists()


@pytest.mark.parametrize("kind", ["misaligned", "mix"])
def test_misaligned_needs_two_training_pairs(work, clean, kind):
    one = work / "one-pair"
    if not one.exists():
        shutil.copytree(clean, one)
        for lang in LANGS:
            path = one / "tok" / f"train.{lang}"
            path.write_text(read_lines(path)[0] + "\n")
    out = work / "bad" / kind
    result = run(["make_noisy_parallel.sh", "--kind", kind, one, out], check=False)
    assert result.returncode != 0
    assert error_lines(result) == [f"make_noisy_parallel.sh: error: --kind {kind} needs at least 2 training pairs "
                                   f"(a chosen pair takes another pair's target), {one}/tok/train.de has 1"]
    assert not out.exists() and not out.parent.exists()  # refused before any output was begun


# ----------------------------------------------------------------------------- per-pair logic


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
        assert min(seen.values()) > 100  # roughly uniform
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
    assert 100 < len(chosen) < 200
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
            _check_pair(kind_i, src, tgt, new_src, new_tgt)
    if kind == "mix":
        assert set(result.drawn) == set(CRAWL_KINDS) | {None}
    else:
        assert set(result.drawn) == {kind, None}


def test_every_kind_chooses_the_same_pairs_for_a_seed():
    pairs = _corpus(200)
    chosen = {kind: [d is not None for d in crawl_noise.noise_pairs(pairs, kind, 0.3, random.Random(5)).drawn]
              for kind in CRAWL_KINDS + ("mix",)}
    assert len({tuple(c) for c in chosen.values()}) == 1 and 30 < sum(chosen["mix"]) < 90


def _noise_files(tmp_path, kind, p, seed, tag, src="s", tgt="t"):
    kind_out = tmp_path / f"k{tag}" if kind != "mask" else None
    stats = crawl_noise.noise_corpus(tmp_path / src, tmp_path / tgt, tmp_path / f"so{tag}", tmp_path / f"to{tag}",
                                     tmp_path / f"n{tag}", kind, p, seed, kind_out=kind_out)
    texts = [read_lines(tmp_path / f"{name}{tag}") for name in ("so", "to", "n")]
    return stats, texts + ([read_lines(kind_out)] if kind_out else [])


@pytest.mark.parametrize("kind", CRAWL_KINDS + ("mix", "mask"))
def test_same_seed_same_output_other_seed_other_output(tmp_path, kind):
    _write_token_corpus(tmp_path / "s", tmp_path / "t", 200, seed=0)
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
    _write_token_corpus(tmp_path / "s", tmp_path / "t", 50, seed=1)
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
