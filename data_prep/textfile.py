"""Reading the text files of data_prep: UTF-8, one sentence a line.

    python textfile.py count FILE [FILE ...]

A line ends at "\\n" only (as for wc, grep, sed and awk), and a last line without "\\n" is a line too
(unlike in `wc -l`). Bytes that are not UTF-8 raise `TextFileError`, whose one-line message names
the file, the line, the byte offset and the bytes, and says how to convert the file. `count` prints
the numbers of lines of the files on one line (lib.sh's require_aligned reads them), or exits 1 with
that message (no program prefix: the caller adds its own).
"""

import sys
from itertools import zip_longest


class TextFileError(ValueError):
    """A file that is not UTF-8 text (or cannot be read), reported as one line."""


_FILE_HINT = "convert the file to UTF-8, e.g. for Latin-1 text: iconv -f ISO-8859-1 -t UTF-8 FILE >FILE.utf8"


def decode_line(raw, name, line_no, offset, hint=_FILE_HINT):
    """Decodes the bytes `raw` of line `line_no` of `name`, which start at byte `offset` of it.

    Raises:
        TextFileError: `raw` is not UTF-8; the message names the line, the byte offset and the bytes.
    """
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = raw[e.start:e.end]
        shown = " ".join(f"0x{b:02x}" for b in bad)
        raise TextFileError(f"not UTF-8 text: {name} line {line_no} (byte offset {offset + e.start}): invalid "
                            f"byte{'s' if len(bad) > 1 else ''} {shown}: {hint}") from None


def decode_lines(data, name, hint=_FILE_HINT):
    """Returns the lines (without "\\n") of the UTF-8 bytes `data` of the file or archive member `name`."""
    lines, offset = [], 0
    for line_no, raw in enumerate(data.split(b"\n"), 1):
        lines.append(decode_line(raw, name, line_no, offset, hint))
        offset += len(raw) + 1
    return lines[:-1] if lines and lines[-1] == "" else lines


def read_lines(path):
    """Yields the lines of the UTF-8 text file `path` without their "\\n", the last one with or without it.

    Raises:
        TextFileError: at the first line that is not UTF-8 (the lines before it are yielded).
    """
    offset = 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            line = decode_line(raw, path, line_no, offset)
            offset += len(raw)
            yield line[:-1] if line.endswith("\n") else line


def count_lines(path):
    """Returns the number of lines of `path` (see `read_lines`), checking that all of it is UTF-8."""
    return sum(1 for _ in read_lines(path))


def read_pairs(src_path, tgt_path):
    """Yields the (source, target) line pairs of a line-aligned parallel corpus (see `read_lines`).

    Raises:
        TextFileError: a file is not UTF-8.
        ValueError: the two files have different numbers of lines (after the common ones are yielded).
    """
    for src, tgt in zip_longest(read_lines(src_path), read_lines(tgt_path)):
        if src is None or tgt is None:
            raise ValueError(f"misaligned corpus: {src_path} and {tgt_path} have different numbers of lines")
        yield src, tgt


def main(argv=None):
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2 or args[0] != "count":
        sys.exit("usage: textfile.py count FILE [FILE ...]")
    counts = []
    for path in args[1:]:
        try:
            counts.append(count_lines(path))
        except TextFileError as e:
            sys.exit(str(e))
        except OSError as e:
            sys.exit(f"cannot read {path}: {e.strerror or e}")
    print(" ".join(map(str, counts)))


if __name__ == "__main__":
    main()
