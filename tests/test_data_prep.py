"""End-to-end and unit tests of data_prep/: IWSLT14-layout archive -> data-bin, masked noise, errors.

The scripts run as subprocesses on a small seeded synthetic corpus packed into an archive with the
exact IWSLT14 de-en.tgz layout; the data-bin is then trained on for a few updates with fairseq's own
translation task.
"""

import io
import math
import os
import random
import signal
import subprocess
import sys
import tarfile
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_PREP = os.path.join(REPO, "data_prep")
sys.path.insert(0, DATA_PREP)

import clean_corpus  # noqa: E402
import iwslt14_extract  # noqa: E402
import make_iwslt_like_archive  # noqa: E402
import mask_noise  # noqa: E402
import textfile  # noqa: E402

MASK = "<mask>"
N_BAD = 2  # bad pairs of each of the 3 kinds injected into the archive
TALK_SIZE = 30
ENV = {**os.environ, "PYTHON": sys.executable}


def run(args, check=True, **kwargs):
    """Runs a data_prep script or helper; returns the CompletedProcess (text, captured)."""
    script = os.path.join(DATA_PREP, args[0])
    cmd = (["bash", script] if script.endswith(".sh") else [sys.executable, script]) + [str(a) for a in args[1:]]
    result = subprocess.run(cmd, capture_output=True, text=True, env=ENV, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def read_lines(path):
    with open(path, encoding="utf-8", newline="\n") as f:
        return [line.rstrip("\n") for line in f]


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def error_lines(result):
    return [line for line in result.stderr.splitlines() if "error" in line.lower()]


def leftovers(parent):
    """Temporary or half-written entries beside the outputs."""
    return sorted(name for name in os.listdir(parent) if ".tmp." in name or ".old." in name)


def _repack(archive, path, edit):
    """Writes a copy of `archive` to `path` with each member's bytes replaced by edit(name, data) (None: left out)."""
    with tarfile.open(archive) as src, tarfile.open(path, "w:gz") as dst:
        for member in src.getmembers():
            data = edit(member.name, src.extractfile(member).read())
            if data is not None:
                member.size = len(data)
                dst.addfile(member, io.BytesIO(data))
    return path


def _plain_corpus(corpus, path, sizes, end=lambda split, lang: "\n"):
    """Copies the first sizes[split] pairs of each split of `corpus` to `path`; each file ends with end(split, lang)."""
    path.mkdir()
    for split, n in sizes.items():
        for lang in ("de", "en"):
            lines = read_lines(corpus / f"{split}.{lang}")[:n]
            (path / f"{split}.{lang}").write_bytes(("\n".join(lines) + end(split, lang)).encode())
    return path


# A Latin-1 line: "ü" is the byte 0xfc, which is not UTF-8; it is the third byte of the line.
LATIN1_LINE = "Grüße aus Köln .".encode("latin-1")
HINT = "convert the file to UTF-8, e.g. for Latin-1 text: iconv -f ISO-8859-1 -t UTF-8 FILE >FILE.utf8"


def tokenize(lines, lang):
    from sacremoses import MosesTokenizer

    tok = MosesTokenizer(lang=lang)
    return [tok.tokenize(line, escape=True, return_str=True).lower() for line in lines]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("data_prep")


@pytest.fixture(scope="module")
def corpus(work):
    out = work / "corpus"
    run(["make_synthetic_corpus.py", out, "--train", 1500, "--valid", 40, "--test", 100, "--seed", 3])
    return out


@pytest.fixture(scope="module")
def archive(work, corpus):
    path = work / "de-en.tgz"
    run(["make_iwslt_like_archive.py", corpus, path, "--talk-size", TALK_SIZE, "--bad-pairs", N_BAD, "--seed", 5])
    return path


@pytest.fixture(scope="module")
def clean(work, archive):
    out = work / "bin" / "clean"
    result = run(["prepare_iwslt14.sh", "--archive", archive, "--bpe-merges", 300, "--workers", 1, out])
    return out, result


@pytest.fixture(scope="module")
def noisy(work, clean):
    out = work / "bin" / "noisy"
    result = run(["make_noisy_iwslt.sh", "--workers", 1, clean[0], out])  # defaults: p = 0.1, q = 0.15
    return out, result


# ----------------------------------------------------------------------------- archive + clean pipeline


def test_archive_has_the_iwslt14_layout(archive):
    with tarfile.open(archive) as tar:
        names = sorted(tar.getnames())
    sets = ["IWSLT14.TED.dev2010", "IWSLT14.TED.tst2010", "IWSLT14.TED.tst2011", "IWSLT14.TED.tst2012",
            "IWSLT14.TEDX.dev2012"]
    expected = [f"de-en/{s}.de-en.{lang}.xml" for s in sets for lang in ("de", "en")]
    expected += ["de-en/train.tags.de-en.de", "de-en/train.tags.de-en.en"]
    assert names == sorted(expected)
    with tarfile.open(archive) as tar:
        tags = tar.extractfile("de-en/train.tags.de-en.en").read().decode().splitlines()
        xml = tar.extractfile("de-en/IWSLT14.TED.tst2011.de-en.de.xml").read().decode().splitlines()
    assert tags[0].startswith("<url>") and tags[2].startswith("<talkid>") and tags[3].startswith("<title>")
    assert any(line.startswith('<seg id="1"> ') and line.endswith(" </seg>") for line in xml)


def _expected_training_pairs(archive, corpus):
    """The cleaned training pairs in order, derived from the archive without the pipeline's code."""
    with tarfile.open(archive) as tar:
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


def test_prepare_iwslt14_counts_split_and_text(clean, archive, corpus):
    out, result = clean
    pairs = _expected_training_pairs(archive, corpus)
    train = {lang: read_lines(out / "tok" / f"train.{lang}") for lang in ("de", "en")}
    valid = {lang: read_lines(out / "tok" / f"valid.{lang}") for lang in ("de", "en")}
    assert len(valid["de"]) == len(pairs) // 23 and len(valid["en"]) == len(pairs) // 23
    assert len(train["de"]) == len(pairs) - len(pairs) // 23 == len(train["en"])
    for column, lang in enumerate(("de", "en")):
        expected = tokenize([p[column] for p in pairs], lang)
        assert valid[lang] == expected[22::23]  # every 23rd pair, 1-based as awk NR % 23 == 0
        assert train[lang] == [line for i, line in enumerate(expected, 1) if i % 23]
    assert "removed" in result.stderr and f"({3 * N_BAD} removed)" in result.stderr


def test_test_set_is_the_five_xml_sets_in_fairseq_order(clean, corpus):
    out, _ = clean
    for lang in ("de", "en"):
        assert read_lines(out / "tok" / f"test.{lang}") == tokenize(read_lines(corpus / f"test.{lang}"), lang)


def test_data_bin_has_all_splits_and_a_joined_dictionary(clean):
    out, _ = clean
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


def test_rerun_is_a_no_op_and_other_settings_are_refused(clean, archive):
    out, _ = clean
    before = os.stat(out / "data-bin" / "train.de-en.de.bin").st_mtime_ns
    again = run(["prepare_iwslt14.sh", "--archive", archive, "--bpe-merges", 300, "--workers", 1, out])
    assert "nothing to do" in again.stderr
    other = run(["prepare_iwslt14.sh", "--archive", archive, "--bpe-merges", 301, out], check=False)
    assert other.returncode != 0
    assert error_lines(other) == [f"prepare_iwslt14.sh: error: {out} was made with other settings or inputs "
                                  f"(see {out}/prep.settings): pass --force to rebuild it, or choose another directory"]
    assert os.stat(out / "data-bin" / "train.de-en.de.bin").st_mtime_ns == before
    assert not leftovers(out.parent)


# ----------------------------------------------------------------------------- noise


def _noisy_pairs(clean_dir, noisy_dir, lang):
    return read_lines(clean_dir / "tok" / f"train.{lang}"), read_lines(noisy_dir / "tok" / f"train.{lang}")


def test_noisy_train_agrees_with_sidecar_and_rates(clean, noisy):
    import json

    clean_dir, noisy_dir = clean[0], noisy[0]
    sidecar = read_lines(noisy_dir / "tok" / "train.noise")
    assert read_bytes(noisy_dir / "data-bin" / "train.noise") == read_bytes(noisy_dir / "tok" / "train.noise")
    stats = json.loads((noisy_dir / "noise_stats.json").read_text())
    masked = {}
    changed = [False] * len(sidecar)
    for lang in ("de", "en"):
        clean_lines, noisy_lines = _noisy_pairs(clean_dir, noisy_dir, lang)
        assert len(clean_lines) == len(noisy_lines) == len(sidecar)
        masked[lang] = 0
        for i, (c, n) in enumerate(zip(clean_lines, noisy_lines)):
            c_words, n_words = c.split(" "), n.split(" ")
            assert len(c_words) == len(n_words)
            diff = [(a, b) for a, b in zip(c_words, n_words) if a != b]
            assert all(b == MASK for _, b in diff)  # only whole words replaced by the mask
            masked[lang] += len(diff)
            changed[i] |= bool(diff)
    assert sidecar == ["1" if c else "0" for c in changed]
    assert stats["src_tokens_masked"] == masked["de"] and stats["tgt_tokens_masked"] == masked["en"]
    assert stats["pairs_changed"] == sum(changed)
    # Observed rates within 4 binomial standard deviations of p = 0.1 and q = 0.15.
    n, chosen = stats["pairs"], stats["pairs_chosen"]
    assert abs(chosen / n - 0.1) < 4 * math.sqrt(0.1 * 0.9 / n)
    for side in ("src", "tgt"):
        m = stats[f"{side}_tokens_in_chosen"]
        assert abs(stats[f"{side}_tokens_masked"] / m - 0.15) < 4 * math.sqrt(0.15 * 0.85 / m)
    assert "pairs chosen:" in noisy[1].stderr and "(q = 0.15)" in noisy[1].stderr


def test_mask_is_one_symbol_after_bpe_and_binarization(noisy):
    from fairseq.data import Dictionary, data_utils

    noisy_dir = noisy[0]
    dictionary = Dictionary.load(str(noisy_dir / "data-bin" / "dict.de.txt"))
    mask_index = dictionary.index(MASK)
    assert mask_index != dictionary.unk()
    for lang in ("de", "en"):
        tok_count = sum(line.split(" ").count(MASK) for line in read_lines(noisy_dir / "tok" / f"train.{lang}"))
        assert tok_count > 0
        subword_words = [w for line in read_lines(noisy_dir / "subword" / f"train.{lang}") for w in line.split(" ")]
        assert subword_words.count(MASK) == tok_count
        assert not [w for w in subword_words if "mask" in w and w != MASK]  # never split or glued
        dataset = data_utils.load_indexed_dataset(str(noisy_dir / "data-bin" / f"train.de-en.{lang}"), dictionary)
        assert sum(int((dataset[i] == mask_index).sum()) for i in range(len(dataset))) == tok_count
        assert all(int((dataset[i] == dictionary.unk()).sum()) == 0 for i in range(len(dataset)))


def test_valid_and_test_stay_clean(clean, noisy):
    clean_dir, noisy_dir = clean[0], noisy[0]
    for split in ("valid", "test"):
        for lang in ("de", "en"):
            for sub in (f"tok/{split}.{lang}", f"subword/{split}.{lang}", f"data-bin/{split}.de-en.{lang}.bin",
                        f"data-bin/{split}.de-en.{lang}.idx"):
                assert read_bytes(clean_dir / sub) == read_bytes(noisy_dir / sub), sub
    assert read_bytes(clean_dir / "data-bin" / "dict.de.txt") == read_bytes(noisy_dir / "data-bin" / "dict.de.txt")


def test_same_seed_gives_the_same_data_bin(noisy):
    noisy_dir = noisy[0]
    files = ["tok/train.de", "tok/train.en", "tok/train.noise", "data-bin/train.de-en.de.bin",
             "data-bin/train.de-en.en.bin", "data-bin/train.de-en.de.idx", "data-bin/dict.en.txt"]
    before = {f: read_bytes(noisy_dir / f) for f in files}
    settings = (noisy_dir / "prep.settings").read_text()
    clean_dir = settings.split("clean_dir=")[1].split("\n")[0]
    run(["make_noisy_iwslt.sh", "--force", "--workers", 1, clean_dir, noisy_dir])  # rebuilt from scratch
    assert {f: read_bytes(noisy_dir / f) for f in files} == before
    assert not leftovers(noisy_dir.parent)


def test_fairseq_translation_trains_on_the_noisy_data_bin(noisy):
    train = os.path.join(os.path.dirname(sys.executable), "fairseq-train")
    cmd = [train, str(noisy[0] / "data-bin"), "--task", "translation", "--arch", "transformer",
           "--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "16", "--decoder-embed-dim", "16",
           "--encoder-ffn-embed-dim", "32", "--decoder-ffn-embed-dim", "32", "--encoder-attention-heads", "2",
           "--decoder-attention-heads", "2", "--max-update", "3", "--max-tokens", "500", "--cpu",
           "--optimizer", "sgd", "--lr", "0.1", "--no-save", "--log-format", "simple", "--seed", "1",
           "--num-workers", "0"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    log = result.stdout + result.stderr
    assert "num_updates 3" in log and "valid on 'valid' subset" in log


# ----------------------------------------------------------------------------- plain corpus, sentencepiece


def test_prepare_parallel_with_sentencepiece_keeps_the_mask_whole(work, corpus):
    small = work / "small"
    small.mkdir()
    sizes = {"train": 300, "valid": 20, "test": 30}
    for split, n in sizes.items():
        for lang in ("de", "en"):
            (small / f"{split}.{lang}").write_text("\n".join(read_lines(corpus / f"{split}.{lang}")[:n]) + "\n")
    out = work / "spm" / "clean"
    run(["prepare_parallel.sh", "--spm", "--spm-vocab-size", 150, "--workers", 1, small, out])
    assert len(read_lines(out / "tok" / "valid.de")) == 20 and len(read_lines(out / "tok" / "test.en")) == 30
    assert 250 < len(read_lines(out / "tok" / "train.de")) <= 300  # train is cleaned, the others are not
    noisy_out = work / "spm" / "noisy"
    run(["make_noisy_iwslt.sh", "-p", 0.5, "-q", 0.3, "--seed", 2, "--workers", 1, out, noisy_out])
    symbols = [line.split(" ")[0] for line in read_lines(noisy_out / "data-bin" / "dict.de.txt")]
    assert symbols.count(MASK) == 1
    for lang in ("de", "en"):
        tok_count = sum(line.split(" ").count(MASK) for line in read_lines(noisy_out / "tok" / f"train.{lang}"))
        pieces = [w for line in read_lines(noisy_out / "subword" / f"train.{lang}") for w in line.split(" ")]
        assert tok_count > 0 and pieces.count(MASK) == tok_count
        assert not [w for w in pieces if "mask" in w and w != MASK]


# ----------------------------------------------------------------------------- bad input


def test_missing_archive_is_a_one_line_error(work):
    out = work / "bad1" / "clean"
    result = run(["prepare_iwslt14.sh", "--archive", work / "nope.tgz", out], check=False)
    assert result.returncode != 0
    assert error_lines(result) == [f"prepare_iwslt14.sh: error: archive not found: {work / 'nope.tgz'}"]
    assert not out.exists()


def test_corrupt_archive_leaves_nothing_behind(work):
    bad = work / "corrupt.tgz"
    bad.write_bytes(b"\x1f\x8b\x08\x00 this is not a gzip stream" * 10)
    out = work / "bad2" / "clean"
    result = run(["prepare_iwslt14.sh", "--archive", bad, out], check=False)
    assert result.returncode != 0
    [line] = error_lines(result)
    assert line.startswith(f"iwslt14_extract.py: error: {bad} is not a readable .tgz archive")
    assert not out.exists() and not leftovers(out.parent)


def test_archive_without_a_test_set_names_the_missing_file(work, archive):
    partial = _repack(archive, work / "partial.tgz", lambda name, data: None if "tst2012" in name else data)
    out = work / "bad3" / "clean"
    result = run(["prepare_iwslt14.sh", "--archive", partial, out], check=False)
    assert result.returncode != 0
    [line] = error_lines(result)
    assert "lacks IWSLT14.TED.tst2012.de-en.de.xml" in line
    assert not out.exists() and not leftovers(out.parent)


def test_misaligned_archive_is_refused(work, archive):
    shifted = _repack(archive, work / "misaligned.tgz", lambda name, data: data + b"One extra English line .\n"
                      if name.endswith("train.tags.de-en.en") else data)
    out = work / "bad4" / "clean"
    result = run(["prepare_iwslt14.sh", "--archive", shifted, out], check=False)
    assert result.returncode != 0
    [line] = error_lines(result)
    assert "misaligned corpus" in line and "train.tags.de-en.{de,en}" in line
    assert not out.exists() and not leftovers(out.parent)


def test_misaligned_plain_corpus_names_both_files(work, corpus):
    plain = work / "plain_misaligned"
    plain.mkdir()
    for split in ("train", "valid", "test"):
        for lang in ("de", "en"):
            lines = read_lines(corpus / f"{split}.{lang}")[:40]
            if split == "valid" and lang == "en":
                lines = lines[:-1]
            (plain / f"{split}.{lang}").write_text("\n".join(lines) + "\n")
    out = work / "bad5" / "clean"
    result = run(["prepare_parallel.sh", plain, out], check=False)
    assert result.returncode != 0
    assert error_lines(result) == [f"prepare_parallel.sh: error: misaligned corpus: {plain}/valid.de has "
                                   f"40 lines but {plain}/valid.en has 39"]
    assert not out.exists()


def test_non_utf8_corpus_is_one_line_naming_the_file_line_and_byte(work, corpus):
    plain = _plain_corpus(corpus, work / "plain_latin1", {"train": 40, "valid": 10, "test": 10})
    lines = read_bytes(plain / "train.de").split(b"\n")
    lines[2] = LATIN1_LINE
    (plain / "train.de").write_bytes(b"\n".join(lines))
    offset = len(b"\n".join(lines[:2])) + 1 + 2
    out = work / "bad_utf8" / "clean"
    result = run(["prepare_parallel.sh", plain, out], check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert error_lines(result) == [f"prepare_parallel.sh: error: not UTF-8 text: {plain}/train.de line 3 "
                                   f"(byte offset {offset}): invalid byte 0xfc: {HINT}"]
    assert not out.exists()


@pytest.mark.parametrize("helper", [["moses_tokenize.py", "de", "{de}", "{out}.de"],
                                    ["clean_corpus.py", "{en}", "{de}", "{out}.en", "{out}.de"],
                                    ["crawl_noise.py", "--kind", "mask", "{en}", "{de}", "{out}.en", "{out}.de",
                                     "{out}.noise"],
                                    ["subwords.py", "learn-bpe", "--merges", "5", "--out", "{out}.code",
                                     "{en}", "{de}"],
                                    ["subwords.py", "train-spm", "--vocab-size", "20", "--model-prefix", "{out}",
                                     "{en}", "{de}"]])
def test_python_helpers_report_non_utf8_input_in_one_line(tmp_path, helper):
    (tmp_path / "de").write_bytes(b"Ein Satz .\n" + LATIN1_LINE + b"\n")
    (tmp_path / "en").write_bytes(b"One sentence .\nGreetings from Cologne .\n")
    args = [a.format(de=tmp_path / "de", en=tmp_path / "en", out=tmp_path / "out") for a in helper]
    result = run(args, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert error_lines(result) == [f"{helper[0]}: error: not UTF-8 text: {tmp_path / 'de'} line 2 (byte offset 13): "
                                   f"invalid byte 0xfc: {HINT}"]


def test_non_utf8_archive_member_names_the_member_line_and_byte(work, archive):
    member = "de-en/train.tags.de-en.de"
    lines = None

    def edit(name, data):
        nonlocal lines
        if name != member:
            return data
        lines = data.split(b"\n")
        lines[5] = LATIN1_LINE
        return b"\n".join(lines)

    latin1 = _repack(archive, work / "latin1.tgz", edit)
    out = work / "bad_utf8_archive" / "clean"
    result = run(["prepare_iwslt14.sh", "--archive", latin1, out], check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    offset = len(b"\n".join(lines[:5])) + 1 + 2
    assert error_lines(result) == [f"iwslt14_extract.py: error: not UTF-8 text: {latin1}: {member} line 6 (byte offset "
                                   f"{offset}): invalid byte 0xfc: convert the file to UTF-8 (e.g. for Latin-1 text: "
                                   "iconv -f ISO-8859-1 -t UTF-8) and pack the archive again"]
    assert not out.exists() and not leftovers(out.parent)


def test_last_line_without_newline_counts_as_a_line(work, corpus):
    sizes = {"train": 200, "valid": 20, "test": 20}
    plains = [_plain_corpus(corpus, work / "plain_newline", sizes),
              # de: no final newline in any split; en: only test lacks it (so valid.{de,en} differ in `wc -l`)
              _plain_corpus(corpus, work / "plain_no_newline", sizes,
                            end=lambda split, lang: "" if lang == "de" or split == "test" else "\n")]
    outs = [work / "final_newline" / plain.name for plain in plains]
    for plain, out in zip(plains, outs):
        run(["prepare_parallel.sh", "--bpe-merges", 100, "--workers", 1, plain, out])

    def output_files(out):  # all but those naming the input or output directory
        return sorted(str(p.relative_to(out)) for p in out.rglob("*")
                      if p.is_file() and p.name not in ("prep.settings", "preprocess.log"))

    files = output_files(outs[0])
    assert "data-bin/dict.de.txt" in files and "data-bin/train.de-en.en.bin" in files and "tok/valid.de" in files
    assert output_files(outs[1]) == files
    for name in files:
        assert read_bytes(outs[1] / name) == read_bytes(outs[0] / name), name
    assert len(read_lines(outs[1] / "tok" / "valid.de")) == 20 and len(read_lines(outs[1] / "tok" / "test.en")) == 20


@pytest.mark.parametrize("option,value,name", [("-p", "1.5", "p (--pair-prob)"), ("-q", "-0.1", "q (--word-prob)"),
                                               ("-p", "abc", "p (--pair-prob)"), ("-q", "nan", "q (--word-prob)")])
def test_noise_probability_outside_unit_interval_is_refused(work, clean, option, value, name):
    out = work / "bad6" / "noisy"
    result = run(["make_noisy_iwslt.sh", option, value, clean[0], out], check=False)
    assert result.returncode != 0
    assert error_lines(result) == [f"make_noisy_iwslt.sh: error: {name} must be a number in [0, 1], got '{value}'"]
    assert not out.exists()


def test_interrupted_run_leaves_no_output(work, corpus):
    out = work / "interrupted" / "clean"
    cmd = ["bash", os.path.join(DATA_PREP, "prepare_parallel.sh"), "--workers", "1", str(corpus), str(out)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 60
    while not (out.parent.exists() and leftovers(out.parent)) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # inside the tokenization step
    assert proc.poll() is None, "finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr  # the script's TERM trap ran (exit 128 + 15)
    assert "tokenizing" in stderr and "done in" not in stderr
    assert not out.exists() and not leftovers(out.parent)


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


def _write_token_corpus(path_src, path_tgt, n, seed):
    rng = random.Random(seed)
    for path in (path_src, path_tgt):
        path.write_text("\n".join(" ".join(f"w{rng.randrange(50)}" for _ in range(rng.randint(1, 12)))
                                  for _ in range(n)) + "\n")


@pytest.mark.parametrize("p,q", [(0.1, 0.15), (0.3, 0.5)])
def test_noise_rates_on_a_large_corpus(tmp_path, p, q):
    _write_token_corpus(tmp_path / "s", tmp_path / "t", 20000, seed=0)
    stats = mask_noise.noise_corpus(tmp_path / "s", tmp_path / "t", tmp_path / "so", tmp_path / "to",
                                    tmp_path / "noise", p, q, seed=1)
    assert abs(stats.pairs_chosen / stats.pairs - p) < 4 * math.sqrt(p * (1 - p) / stats.pairs)
    for masked, total in ((stats.src_tokens_masked, stats.src_tokens_in_chosen),
                          (stats.tgt_tokens_masked, stats.tgt_tokens_in_chosen)):
        assert abs(masked / total - q) < 4 * math.sqrt(q * (1 - q) / total)


def test_noise_seed_determinism_and_extremes(tmp_path):
    _write_token_corpus(tmp_path / "s", tmp_path / "t", 500, seed=0)

    def noised(p, q, seed, tag):
        mask_noise.noise_corpus(tmp_path / "s", tmp_path / "t", tmp_path / f"so{tag}", tmp_path / f"to{tag}",
                                tmp_path / f"n{tag}", p, q, seed)
        return [read_lines(tmp_path / f"{name}{tag}") for name in ("so", "to", "n")]

    assert noised(0.2, 0.3, 7, "a") == noised(0.2, 0.3, 7, "b")
    assert noised(0.2, 0.3, 7, "a")[2] != noised(0.2, 0.3, 8, "c")[2]
    src, tgt, noise = noised(0.0, 1.0, 1, "zero")
    assert src == read_lines(tmp_path / "s") and tgt == read_lines(tmp_path / "t") and set(noise) == {"0"}
    src, tgt, noise = noised(1.0, 1.0, 1, "all")
    assert all(set(line.split(" ")) == {MASK} for line in src + tgt) and set(noise) == {"1"}
    src, _, noise = noised(1.0, 0.0, 1, "none")
    assert src == read_lines(tmp_path / "s") and set(noise) == {"0"}


@pytest.mark.parametrize("p,q", [(-0.01, 0.1), (1.01, 0.1), (0.1, float("nan")), (0.1, 2.0)])
def test_noise_corpus_rejects_bad_probabilities(tmp_path, p, q):
    _write_token_corpus(tmp_path / "s", tmp_path / "t", 5, seed=0)
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        mask_noise.noise_corpus(tmp_path / "s", tmp_path / "t", tmp_path / "so", tmp_path / "to", tmp_path / "n", p, q, 1)


def test_noise_corpus_rejects_mask_token_in_input(tmp_path):
    (tmp_path / "s").write_text("a b\nc <mask> d\n")
    (tmp_path / "t").write_text("x\ny\n")
    with pytest.raises(ValueError, match="line 2 .* already contains the mask token"):
        mask_noise.noise_corpus(tmp_path / "s", tmp_path / "t", tmp_path / "so", tmp_path / "to", tmp_path / "n",
                                0.5, 0.5, 1)


def test_textfile_reads_a_last_line_without_newline_and_names_bad_bytes(tmp_path):
    path = tmp_path / "text"
    path.write_bytes(b"a b\n\nc\r\nd")
    assert list(textfile.read_lines(path)) == ["a b", "", "c\r", "d"]
    assert textfile.count_lines(path) == 4
    path.write_bytes(b"eins\nzwei drei\n" + "vier fünf\n".encode("latin-1"))
    with pytest.raises(textfile.TextFileError) as e:
        textfile.count_lines(path)
    assert str(e.value) == f"not UTF-8 text: {path} line 3 (byte offset 21): invalid byte 0xfc: {HINT}"
    assert textfile.decode_lines(b"x\ny", "name") == textfile.decode_lines(b"x\ny\n", "name") == ["x", "y"]


def test_clean_corpus_pairs_a_last_line_without_newline_and_refuses_an_extra_line(tmp_path):
    (tmp_path / "s").write_text("a b\nc d")
    (tmp_path / "t").write_text("x y\nz w\n")
    assert clean_corpus.clean_corpus(tmp_path / "s", tmp_path / "t", tmp_path / "so", tmp_path / "to") == (2, 2)
    assert read_lines(tmp_path / "so") == ["a b", "c d"]
    (tmp_path / "t").write_text("x y\nz w\nextra\n")
    with pytest.raises(ValueError, match="misaligned corpus"):
        clean_corpus.clean_corpus(tmp_path / "s", tmp_path / "t", tmp_path / "so", tmp_path / "to")
