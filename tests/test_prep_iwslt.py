"""data_prep/ from an IWSLT14-layout archive to a clean data-bin (prepare_iwslt14.sh), a plain corpus to
a sentencepiece data-bin (prepare_parallel.sh), and the extraction and cleaning rules they use.

The scripts run as subprocesses on a small seeded synthetic corpus packed into an archive with the exact
IWSLT14 de-en.tgz layout (the session fixtures of prep_fixtures.py).
"""

import math
import os
import tarfile

import pytest

import clean_corpus
import iwslt14_extract
import make_iwslt_like_archive
from prep_helpers import MASK, N_BAD, TALK_SIZE, error_lines, leftovers, read_bytes, read_lines, run, tokenize

pytest_plugins = ["prep_fixtures"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("prep_iwslt")


# ----------------------------------------------------------------------------- archive + clean pipeline


def test_archive_has_the_iwslt14_layout(iwslt_archive):
    with tarfile.open(iwslt_archive) as tar:
        names = sorted(tar.getnames())
    sets = ["IWSLT14.TED.dev2010", "IWSLT14.TED.tst2010", "IWSLT14.TED.tst2011", "IWSLT14.TED.tst2012",
            "IWSLT14.TEDX.dev2012"]
    expected = [f"de-en/{s}.de-en.{lang}.xml" for s in sets for lang in ("de", "en")]
    expected += ["de-en/train.tags.de-en.de", "de-en/train.tags.de-en.en"]
    assert names == sorted(expected)
    with tarfile.open(iwslt_archive) as tar:
        tags = tar.extractfile("de-en/train.tags.de-en.en").read().decode().splitlines()
        xml = tar.extractfile("de-en/IWSLT14.TED.tst2011.de-en.de.xml").read().decode().splitlines()
    assert tags[0].startswith("<url>") and tags[2].startswith("<talkid>") and tags[3].startswith("<title>")
    assert any(line.startswith('<seg id="1"> ') and line.endswith(" </seg>") for line in xml)


def _expected_training_pairs(iwslt_archive, iwslt_corpus):
    """The cleaned training pairs in order, derived from the archive without the pipeline's code."""
    with tarfile.open(iwslt_archive) as tar:
        sides = [tar.extractfile(f"de-en/train.tags.de-en.{lang}").read().decode().split("\n")[:-1]
                 for lang in ("de", "en")]
    content = []
    for lines in sides:
        kept = [line for line in lines if not line.startswith(("<url>", "<talkid>", "<keywords>"))]
        for tag in ("<title>", "</title>", "<description>", "</description>"):
            kept = [line.replace(tag, "") for line in kept]
        content.append(kept)
    bad = set(make_iwslt_like_archive.bad_pairs(N_BAD))
    pairs = [p for p in zip(*content) if p not in bad]
    assert len(pairs) == len(content[0]) - 3 * N_BAD  # every injected bad pair was found
    n_talks = math.ceil((1500 + 3 * N_BAD) / TALK_SIZE)
    assert len(pairs) == 1500 + n_talks  # corpus pairs + one description per talk
    return pairs


def test_prepare_iwslt14_counts_split_and_text(iwslt_clean, iwslt_archive, iwslt_corpus):
    out, result = iwslt_clean
    pairs = _expected_training_pairs(iwslt_archive, iwslt_corpus)
    train = {lang: read_lines(out / "tok" / f"train.{lang}") for lang in ("de", "en")}
    valid = {lang: read_lines(out / "tok" / f"valid.{lang}") for lang in ("de", "en")}
    assert len(valid["de"]) == len(pairs) // 23 and len(valid["en"]) == len(pairs) // 23
    assert len(train["de"]) == len(pairs) - len(pairs) // 23 == len(train["en"])
    for column, lang in enumerate(("de", "en")):
        expected = tokenize([p[column] for p in pairs], lang)
        assert valid[lang] == expected[22::23]  # every 23rd pair, 1-based as awk NR % 23 == 0
        assert train[lang] == [line for i, line in enumerate(expected, 1) if i % 23]
    assert "removed" in result.stderr and f"({3 * N_BAD} removed)" in result.stderr


def test_test_set_is_the_five_xml_sets_in_fairseq_order(iwslt_clean, iwslt_corpus):
    out, _ = iwslt_clean
    for lang in ("de", "en"):
        assert read_lines(out / "tok" / f"test.{lang}") == tokenize(read_lines(iwslt_corpus / f"test.{lang}"), lang)


def test_data_bin_has_all_splits_and_a_joined_dictionary(iwslt_clean):
    out, _ = iwslt_clean
    bin_dir = out / "data-bin"
    for split in ("train", "valid", "test"):
        for lang in ("de", "en"):
            assert (bin_dir / f"{split}.de-en.{lang}.bin").is_file()
            assert (bin_dir / f"{split}.de-en.{lang}.idx").is_file()
    assert read_bytes(bin_dir / "dict.de.txt") == read_bytes(bin_dir / "dict.en.txt")
    symbols = [line.split(" ")[0] for line in read_lines(bin_dir / "dict.de.txt")]
    assert symbols.count(MASK) == 1
    assert (len(symbols) + 4) % 8 == 0  # fairseq's padding of the dictionary (4 special symbols)
    assert not leftovers(out.parent)


def test_rerun_is_a_no_op_and_other_settings_are_refused(iwslt_clean, iwslt_archive):
    out, _ = iwslt_clean
    before = os.stat(out / "data-bin" / "train.de-en.de.bin").st_mtime_ns
    again = run(["prepare_iwslt14.sh", "--archive", iwslt_archive, "--bpe-merges", 300, "--workers", 1, out])
    assert "nothing to do" in again.stderr
    other = run(["prepare_iwslt14.sh", "--archive", iwslt_archive, "--bpe-merges", 301, out], check=False)
    assert other.returncode != 0
    assert error_lines(other) == [f"prepare_iwslt14.sh: error: {out} was made with other settings or inputs "
                                  f"(see {out}/prep.settings): pass --force to rebuild it, or choose another directory"]
    assert os.stat(out / "data-bin" / "train.de-en.de.bin").st_mtime_ns == before
    assert not leftovers(out.parent)


# ----------------------------------------------------------------------------- plain corpus, sentencepiece


def test_prepare_parallel_with_sentencepiece_keeps_the_mask_whole(work, iwslt_corpus):
    small = work / "small"
    small.mkdir()
    sizes = {"train": 300, "valid": 20, "test": 30}
    extra = {"de": "ein satz , der viermal so viele wörter hat wie seine übersetzung .", "en": "too short ."}
    for split, n in sizes.items():
        for lang in ("de", "en"):  # n pairs of the corpus, then a pair whose sides differ 4-fold in length
            lines = read_lines(iwslt_corpus / f"{split}.{lang}")[:n] + [extra[lang]]
            (small / f"{split}.{lang}").write_text("\n".join(lines) + "\n")
    out = work / "spm" / "clean"
    run(["prepare_parallel.sh", "--spm", "--spm-vocab-size", 150, "--workers", 1, small, out])
    # train is cleaned (length ratio at most 1.5: the extra pair goes, the corpus's pairs stay), the others are not
    for lang in ("de", "en"):
        assert read_lines(out / "tok" / f"train.{lang}") == tokenize(read_lines(small / f"train.{lang}")[:300], lang)
        for split in ("valid", "test"):
            assert read_lines(out / "tok" / f"{split}.{lang}") == tokenize(read_lines(small / f"{split}.{lang}"), lang)
    noisy_out = work / "spm" / "noisy"
    run(["make_noisy_iwslt.sh", "-p", 0.5, "-q", 0.3, "--seed", 2, "--workers", 1, out, noisy_out])
    symbols = [line.split(" ")[0] for line in read_lines(noisy_out / "data-bin" / "dict.de.txt")]
    assert symbols.count(MASK) == 1
    for lang in ("de", "en"):
        tok_count = sum(line.split(" ").count(MASK) for line in read_lines(noisy_out / "tok" / f"train.{lang}"))
        pieces = [w for line in read_lines(noisy_out / "subword" / f"train.{lang}") for w in line.split(" ")]
        assert tok_count > 0 and pieces.count(MASK) == tok_count
        assert not [w for w in pieces if "mask" in w and w != MASK]


# ----------------------------------------------------------------------------- units


def test_fairseq_markup_stripping_rules():
    tags = ["<url>http://x</url>", "<keywords>a, b</keywords>", "<talkid>7</talkid>", "<speaker>Al</speaker>",
            "<title>Ein Titel</title>", "<description>TED: Text</description>", "Ein Satz."]
    assert iwslt14_extract.strip_train_tags(tags) == ["<speaker>Al</speaker>", "Ein Titel", "TED: Text", "Ein Satz."]
    xml = ['<doc docid="1">', "<title>T</title>", '<seg id="12">  It\u2019s here.  </seg>  ', '<seg id="13">Two</seg>']
    assert iwslt14_extract.extract_segments(xml) == ["It's here.", "Two"]


def test_clean_corpus_bounds_match_clean_corpus_n(tmp_path):
    def words(n):
        return " ".join(["w"] * n)

    pairs = [(words(3), words(2)), (words(4), words(2)), (words(175), words(175)), (words(176), words(176)),
             ("", words(1)), ("  a   b ", "c\td")]
    for name, column in (("src", 0), ("tgt", 1)):
        (tmp_path / name).write_text("\n".join(p[column] for p in pairs) + "\n")
    n_in, n_out = clean_corpus.clean_corpus(tmp_path / "src", tmp_path / "tgt", tmp_path / "so", tmp_path / "to")
    assert (n_in, n_out) == (6, 3)
    assert read_lines(tmp_path / "so") == [words(3), words(175), "a b"]
    assert read_lines(tmp_path / "to") == [words(2), words(175), "c d"]

