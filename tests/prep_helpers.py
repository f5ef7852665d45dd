"""Helpers of the data_prep/ tests (test_prep_*.py, test_mask_noise.py, test_noise_kinds.py,
test_crawl_noise.py); their shared fixtures are in prep_fixtures.py.
"""

import io
import os
import random
import subprocess
import sys
import tarfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_PREP = os.path.join(REPO, "data_prep")
ENV = {**os.environ, "PYTHON": sys.executable}
MASK = "<mask>"
N_BAD = 2  # bad pairs of each of the 3 kinds injected into the archive
TALK_SIZE = 30

# A Latin-1 line: "ü" is the byte 0xfc, which is not UTF-8; it is the third byte of the line.
LATIN1_LINE = "Grüße aus Köln .".encode("latin-1")
HINT = "convert the file to UTF-8, e.g. for Latin-1 text: iconv -f ISO-8859-1 -t UTF-8 FILE >FILE.utf8"

CRAWL_KINDS = ("misaligned", "untranslated", "src-shuffle", "short")
KINDS_TEXT = "mask, misaligned, untranslated, src-shuffle, short, mix"


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


def repack(archive, path, edit):
    """Writes a copy of `archive` to `path` with each member's bytes replaced by edit(name, data) (None: left out)."""
    with tarfile.open(archive) as src, tarfile.open(path, "w:gz") as dst:
        for member in src.getmembers():
            data = edit(member.name, src.extractfile(member).read())
            if data is not None:
                member.size = len(data)
                dst.addfile(member, io.BytesIO(data))
    return path


def plain_corpus(corpus, path, sizes, end=lambda split, lang: "\n"):
    """Copies the first sizes[split] pairs of each split of `corpus` to `path`; each file ends with end(split, lang)."""
    path.mkdir()
    for split, n in sizes.items():
        for lang in ("de", "en"):
            lines = read_lines(corpus / f"{split}.{lang}")[:n]
            (path / f"{split}.{lang}").write_bytes(("\n".join(lines) + end(split, lang)).encode())
    return path


def tokenize(lines, lang):
    from sacremoses import MosesTokenizer

    tok = MosesTokenizer(lang=lang)
    return [tok.tokenize(line, escape=True, return_str=True).lower() for line in lines]


def write_token_corpus(path_src, path_tgt, n, seed):
    """n seeded random pairs of 1-12 words from a 50-word vocabulary."""
    rng = random.Random(seed)
    for path in (path_src, path_tgt):
        path.write_text("\n".join(" ".join(f"w{rng.randrange(50)}" for _ in range(rng.randint(1, 12)))
                                  for _ in range(n)) + "\n")


def check_pair(kind, src, tgt, new_src, new_tgt):
    """The defining property of a changed pair of a crawl-noise `kind` (misaligned: the target changed,
    source kept)."""
    pair = (kind, src, tgt, new_src, new_tgt)  # in the failure message: these asserts are not rewritten
    if kind == "src-shuffle":
        assert new_tgt == tgt and sorted(new_src) == sorted(src) and new_src != src, pair
    else:
        assert new_src == src and new_tgt != tgt, pair
    if kind == "untranslated":
        assert new_tgt == src, pair
    elif kind == "short":
        assert 1 <= len(new_tgt) <= 3 and len(new_tgt) < len(tgt) and new_tgt == tgt[:len(new_tgt)], pair
