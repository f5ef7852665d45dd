"""Tokenizes a text file with sacremoses (Moses tokenizer.perl in Python), optionally lowercasing it.

    python moses_tokenize.py [--lowercase] [--workers 2] LANG IN OUT [LANG IN OUT ...]

Matches fairseq's prepare-iwslt14.sh, which runs `tokenizer.perl -l LANG` (default options: Moses
escaping of & | < > ' " [ ] on, no aggressive hyphen splitting) and then `lowercase.perl`. One output
line per input line; a blank line stays blank.
"""

import argparse
import multiprocessing
import sys
import time

import textfile

_CHUNK_LINES = 2000
_PROGRESS_EVERY_S = 10.0

_tokenizer = None
_lowercase = False


def _init_worker(lang, lowercase):
    global _tokenizer, _lowercase
    from sacremoses import MosesTokenizer

    _tokenizer = MosesTokenizer(lang=lang)
    _lowercase = lowercase


def tokenize_line(line):
    """Tokenizes one line with the worker's tokenizer (call `_init_worker` first)."""
    text = _tokenizer.tokenize(line.strip(), escape=True, aggressive_dash_splits=False, return_str=True)
    return text.lower() if _lowercase else text


def _tokenize_chunk(lines):
    return [tokenize_line(line) for line in lines]


def _chunks(lines, size):
    chunk = []
    for line in lines:
        chunk.append(line)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def tokenize_file(in_path, out_path, lang, lowercase=False, workers=1):
    """Tokenizes `in_path` line by line into `out_path`, printing progress to stderr.

    Args:
        in_path: UTF-8 text, one sentence per line (a last line without a newline counts).
        out_path: output file (same number of lines).
        lang: language code for Moses' non-breaking prefixes (e.g. "de", "en").
        lowercase: lowercase after tokenizing (fairseq's IWSLT14 recipe does).
        workers: number of processes.

    Raises:
        textfile.TextFileError: `in_path` is not UTF-8 (found before anything is written).
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    total = textfile.count_lines(in_path)  # also checks the whole file, before the pool reads it
    start = last = time.monotonic()
    done = 0
    lines = textfile.read_lines(in_path)
    with open(out_path, "w", encoding="utf-8") as fout:
        if workers == 1:
            _init_worker(lang, lowercase)
            results = map(_tokenize_chunk, _chunks(lines, _CHUNK_LINES))
            pool = None
        else:
            pool = multiprocessing.Pool(workers, initializer=_init_worker, initargs=(lang, lowercase))
            results = pool.imap(_tokenize_chunk, _chunks(lines, _CHUNK_LINES))
        try:
            for chunk in results:
                fout.writelines(line + "\n" for line in chunk)
                done += len(chunk)
                if time.monotonic() - last > _PROGRESS_EVERY_S:
                    last = time.monotonic()
                    print(f"  tokenize {in_path}: {done:,}/{total:,} lines ({last - start:.0f}s)",
                          file=sys.stderr, flush=True)
        finally:
            if pool is not None:
                pool.close()
                pool.join()
    print(f"  tokenized {in_path}: {done:,} lines ({time.monotonic() - start:.0f}s)", file=sys.stderr, flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lowercase", action="store_true")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("files", nargs="+", metavar="LANG IN OUT", help="language code, input and output file")
    args = parser.parse_args(argv)
    if len(args.files) % 3:
        parser.error("give files as LANG IN OUT triples")
    try:
        for lang, in_path, out_path in zip(*[iter(args.files)] * 3):
            tokenize_file(in_path, out_path, lang, args.lowercase, args.workers)
    except textfile.TextFileError as e:
        sys.exit(f"moses_tokenize.py: error: {e}")


if __name__ == "__main__":
    main()
