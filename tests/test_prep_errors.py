"""Bad input to data_prep/: missing, corrupt, partial, misaligned and non-UTF-8 archives and corpora,
a last line without a newline, out-of-range noise options and an interrupted run; each is one error line
(no traceback) and leaves no output behind.
"""

import os
import signal
import subprocess
import time

import pytest

import clean_corpus
import textfile
from prep_helpers import (DATA_PREP, ENV, HINT, LATIN1_LINE, error_lines, leftovers, plain_corpus, read_bytes,
                          read_lines, repack, run)

pytest_plugins = ["prep_fixtures"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("prep_bad_input")


# ----------------------------------------------------------------------------- the scripts


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


def test_archive_without_a_test_set_names_the_missing_file(work, iwslt_archive):
    partial = repack(iwslt_archive, work / "partial.tgz", lambda name, data: None if "tst2012" in name else data)
    out = work / "bad3" / "clean"
    result = run(["prepare_iwslt14.sh", "--archive", partial, out], check=False)
    assert result.returncode != 0
    [line] = error_lines(result)
    assert "lacks IWSLT14.TED.tst2012.de-en.de.xml" in line
    assert not out.exists() and not leftovers(out.parent)


def test_misaligned_archive_is_refused(work, iwslt_archive):
    shifted = repack(iwslt_archive, work / "misaligned.tgz", lambda name, data: data + b"One extra English line .\n"
                      if name.endswith("train.tags.de-en.en") else data)
    out = work / "bad4" / "clean"
    result = run(["prepare_iwslt14.sh", "--archive", shifted, out], check=False)
    assert result.returncode != 0
    [line] = error_lines(result)
    assert "misaligned corpus" in line and "train.tags.de-en.{de,en}" in line
    assert not out.exists() and not leftovers(out.parent)


def test_misaligned_plain_corpus_names_both_files(work, iwslt_corpus):
    plain = work / "plain_misaligned"
    plain.mkdir()
    for split in ("train", "valid", "test"):
        for lang in ("de", "en"):
            lines = read_lines(iwslt_corpus / f"{split}.{lang}")[:40]
            if split == "valid" and lang == "en":
                lines = lines[:-1]
            (plain / f"{split}.{lang}").write_text("\n".join(lines) + "\n")
    out = work / "bad5" / "clean"
    result = run(["prepare_parallel.sh", plain, out], check=False)
    assert result.returncode != 0
    assert error_lines(result) == [f"prepare_parallel.sh: error: misaligned corpus: {plain}/valid.de has "
                                   f"40 lines but {plain}/valid.en has 39"]
    assert not out.exists()


def test_non_utf8_corpus_is_one_line_naming_the_file_line_and_byte(work, iwslt_corpus):
    plain = plain_corpus(iwslt_corpus, work / "plain_latin1", {"train": 40, "valid": 10, "test": 10})
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


def test_non_utf8_archive_member_names_the_member_line_and_byte(work, iwslt_archive):
    member = "de-en/train.tags.de-en.de"
    lines = None

    def edit(name, data):
        nonlocal lines
        if name != member:
            return data
        lines = data.split(b"\n")
        lines[5] = LATIN1_LINE
        return b"\n".join(lines)

    latin1 = repack(iwslt_archive, work / "latin1.tgz", edit)
    out = work / "bad_utf8_archive" / "clean"
    result = run(["prepare_iwslt14.sh", "--archive", latin1, out], check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    offset = len(b"\n".join(lines[:5])) + 1 + 2
    assert error_lines(result) == [f"iwslt14_extract.py: error: not UTF-8 text: {latin1}: {member} line 6 (byte offset "
                                   f"{offset}): invalid byte 0xfc: convert the file to UTF-8 (e.g. for Latin-1 text: "
                                   "iconv -f ISO-8859-1 -t UTF-8) and pack the archive again"]
    assert not out.exists() and not leftovers(out.parent)


def test_last_line_without_newline_counts_as_a_line(work, iwslt_corpus):
    sizes = {"train": 200, "valid": 20, "test": 20}
    plains = [plain_corpus(iwslt_corpus, work / "plain_newline", sizes),
              # de: no final newline in any split; en: only test lacks it (so valid.{de,en} differ in `wc -l`)
              plain_corpus(iwslt_corpus, work / "plain_no_newline", sizes,
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
def test_noise_probability_outside_unit_interval_is_refused(work, iwslt_clean, option, value, name):
    out = work / "bad6" / "noisy"
    result = run(["make_noisy_iwslt.sh", option, value, iwslt_clean[0], out], check=False)
    assert result.returncode != 0
    assert error_lines(result) == [f"make_noisy_iwslt.sh: error: {name} must be a number in [0, 1], got '{value}'"]
    assert not out.exists()


def test_interrupted_run_leaves_no_output(work, iwslt_corpus):
    out = work / "interrupted" / "clean"
    cmd = ["bash", os.path.join(DATA_PREP, "prepare_parallel.sh"), "--workers", "1", str(iwslt_corpus), str(out)]
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


# ----------------------------------------------------------------------------- the Python helpers, in-process


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
