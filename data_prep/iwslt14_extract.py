"""Extracts untokenized train / valid-test text from the official IWSLT14 de-en.tgz archive.

    python iwslt14_extract.py ARCHIVE OUT_DIR

Writes OUT_DIR/train.{de,en} (from de-en/train.tags.de-en.{de,en}) and OUT_DIR/test.{de,en} (the
<seg> text of the five dev/test XML files, concatenated in fairseq's order), applying exactly the
markup stripping of fairseq's examples/translation/prepare-iwslt14.sh:

* train: drop lines containing `<url>`, `<talkid>` or `<keywords>`; delete the tags `<title>`,
  `</title>`, `<description>`, `</description>` (their text stays, as in fairseq);
* dev/test: keep lines containing `<seg id`, delete `<seg id="N">` with following spaces and
  `</seg>` with surrounding spaces, and replace the right single quote U+2019 by `'`.

Exits with a one-line error naming the archive or member when the archive is missing, unreadable,
lacks a file, has a file that is not UTF-8 (with the line and byte offset), or when the two languages
of a file pair have different numbers of lines.
"""

import argparse
import os
import re
import sys
import tarfile

import textfile

SRC, TGT = "de", "en"
TRAIN_TAGS = "train.tags.de-en.{lang}"
# fairseq's prepare-iwslt14.sh concatenates these into test.{de,en}, in this order.
TEST_SETS = (
    "IWSLT14.TED.dev2010.de-en",
    "IWSLT14.TEDX.dev2012.de-en",
    "IWSLT14.TED.tst2010.de-en",
    "IWSLT14.TED.tst2011.de-en",
    "IWSLT14.TED.tst2012.de-en",
)
_DROPPED_TRAIN_TAGS = ("<url>", "<talkid>", "<keywords>")
_DELETED_TRAIN_TAGS = ("<title>", "</title>", "<description>", "</description>")
_SEG_OPEN = re.compile(r'<seg id="[0-9]*">\s*')
_SEG_CLOSE = re.compile(r"\s*</seg>\s*")
_MEMBER_HINT = ("convert the file to UTF-8 (e.g. for Latin-1 text: iconv -f ISO-8859-1 -t UTF-8) and pack the "
                "archive again")


class ArchiveError(Exception):
    """A problem with the archive, reported as one line."""


def strip_train_tags(lines):
    """Applies fairseq's markup stripping to the lines of a train.tags file (newlines removed)."""
    out = []
    for line in lines:
        if any(tag in line for tag in _DROPPED_TRAIN_TAGS):
            continue
        for tag in _DELETED_TRAIN_TAGS:
            line = line.replace(tag, "")
        out.append(line)
    return out


def extract_segments(lines):
    """Returns the text of the `<seg id="N">` lines of an IWSLT XML file, as fairseq's sed does."""
    out = []
    for line in lines:
        if "<seg id" not in line:
            continue
        line = _SEG_OPEN.sub("", line)
        line = _SEG_CLOSE.sub("", line)
        out.append(line.replace("\u2019", "'"))
    return out


def _read_member(tar, members, archive, basename):
    member = members.get(basename)
    if member is None:
        raise ArchiveError(f"{archive} lacks {basename} (expected as de-en/{basename}): "
                           "is it the IWSLT14 de-en.tgz archive?")
    f = tar.extractfile(member)
    if f is None:
        raise ArchiveError(f"{archive}: {member.name} is not a regular file")
    # Split on "\n" only, as grep and sed do (str.splitlines also splits on U+2028, U+0085, ...).
    try:
        return textfile.decode_lines(f.read(), f"{archive}: {member.name}", hint=_MEMBER_HINT)
    except textfile.TextFileError as e:
        raise ArchiveError(str(e)) from None


def extract(archive, out_dir):
    """Extracts and strips the IWSLT14 text; returns {"train": n_pairs, "test": n_pairs}.

    Raises:
        ArchiveError: missing, corrupt or incomplete archive, or misaligned files.
    """
    if not os.path.isfile(archive):
        raise ArchiveError(f"archive not found: {archive}")
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
            texts = {}
            for lang in (SRC, TGT):
                name = TRAIN_TAGS.format(lang=lang)
                texts["train", lang] = strip_train_tags(_read_member(tar, members, archive, name))
                texts["test", lang] = []
                for test_set in TEST_SETS:
                    name = f"{test_set}.{lang}.xml"
                    texts[test_set, lang] = extract_segments(_read_member(tar, members, archive, name))
                    texts["test", lang] += texts[test_set, lang]
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        reason = "; ".join(line.strip(" -") for line in str(e).splitlines() if line.strip(" -"))
        raise ArchiveError(f"{archive} is not a readable .tgz archive ({type(e).__name__}: {reason})") from None
    for name in ("train",) + TEST_SETS:
        n_src, n_tgt = len(texts[name, SRC]), len(texts[name, TGT])
        if n_src != n_tgt:
            file_name = TRAIN_TAGS.format(lang="{de,en}") if name == "train" else f"{name}.{{de,en}}.xml"
            raise ArchiveError(f"misaligned corpus in {archive}: {file_name} has {n_src} {SRC} but {n_tgt} {TGT} "
                               "lines after stripping markup")
    os.makedirs(out_dir, exist_ok=True)
    for split in ("train", "test"):
        for lang in (SRC, TGT):
            with open(os.path.join(out_dir, f"{split}.{lang}"), "w", encoding="utf-8") as f:
                f.writelines(line + "\n" for line in texts[split, lang])
    return {"train": len(texts["train", SRC]), "test": len(texts["test", SRC]),
            **{name: len(texts[name, SRC]) for name in TEST_SETS}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("archive")
    parser.add_argument("out_dir")
    args = parser.parse_args(argv)
    try:
        counts = extract(args.archive, args.out_dir)
    except ArchiveError as e:
        sys.exit(f"iwslt14_extract.py: error: {e}")
    print(f"  extracted {counts['train']:,} training lines and {counts['test']:,} test lines ("
          + ", ".join(f"{name.split('.')[2]} {counts[name]}" for name in TEST_SETS) + ")", file=sys.stderr)


if __name__ == "__main__":
    main()
