"""The crawl-noise kinds of data_prep/ end to end: make_noisy_parallel.sh (and make_noisy_iwslt.sh for
--kind mask) on a tiny seeded synthetic corpus prepared by prepare_parallel.sh (150 training pairs, 100
BPE merges). The per-pair logic of crawl_noise.py is tested in-process in test_crawl_noise.py.
"""

import collections
import json
import math
import shutil
import struct

import pytest

from prep_helpers import CRAWL_KINDS, KINDS_TEXT, check_pair, error_lines, leftovers, read_bytes, read_lines, run

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


# ----------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("kind", CRAWL_KINDS)
def test_each_kind_end_to_end(clean, noisy, kind):
    out, result = noisy(kind, 0.5, 2)
    changed = _check_layout(clean, out)
    (src, tgt), (new_src, new_tgt) = _train(clean), _train(out)
    assert changed == [(a, b) != (c, d) for a, b, c, d in zip(src, tgt, new_src, new_tgt)]  # an honest sidecar
    for i in (i for i, c in enumerate(changed) if c):
        check_pair(kind, src[i], tgt[i], new_src[i], new_tgt[i])
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
            check_pair(kind, src[i], tgt[i], new_src[i], new_tgt[i])
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

