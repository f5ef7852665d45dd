"""Packs a plain de-en corpus into a de-en.tgz with the layout of the official IWSLT14 archive.

    python make_iwslt_like_archive.py CORPUS_DIR OUT.tgz [--talk-size 40] [--bad-pairs 0] [--seed 1]

CORPUS_DIR holds train.{de,en} and test.{de,en} (e.g. from make_synthetic_corpus.py). The archive
gets, under de-en/:

* train.tags.de-en.{de,en}: talks of --talk-size training pairs, each headed by `<url>`,
  `<keywords>`, `<talkid>`, `<title>` (the talk's first pair) and `<description>` (a fixed
  translated sentence) lines; fairseq's recipe keeps title and description text as training pairs,
  so the archive holds (training pairs + number of talks) content pairs;
* IWSLT14.TED.dev2010, IWSLT14.TEDX.dev2012, IWSLT14.TED.tst2010/2011/2012 .de-en.{de,en}.xml:
  the test pairs split into five `<mteval>` files of `<doc>`s with `<seg id="N">` lines.

--bad-pairs N adds N training pairs of each kind that cleaning must remove (an empty target, a
source over 175 words, a length ratio over 1.5) at seeded positions. Used by the tests, and to try
prepare_iwslt14.sh offline.
"""

import argparse
import io
import os
import random
import sys
import tarfile

import textfile
from iwslt14_extract import TEST_SETS  # the five sets prepare_iwslt14.sh reads, in its order

_LANG_NAMES = {"de": "german", "en": "english"}


def _read(path):
    return list(textfile.read_lines(path))


def bad_pairs(n):
    """Returns 3*n (de, en) pairs that clean-corpus-n (length 1-175, ratio 1.5) removes."""
    one_of_each = [
        ("Dieser Satz hat keine Übersetzung .", ""),
        (" ".join(["Wort"] * 180), "A sentence that is far too long ."),
        ("Ja .", "Yes , this is a much longer answer than the question ."),
    ]
    return one_of_each * n


def train_tags(pairs, talk_size, first_talk_id):
    """Returns the (de, en) train.tags lines and the number of content pairs in them.

    Each talk: `<url>`, `<keywords>`, `<talkid>` lines, a `<title>` holding the talk's first pair,
    a `<description>` holding a fixed translated sentence, then the talk's other pairs.
    """
    de, en = [], []
    talk_id = first_talk_id
    n_content = 0
    for start in range(0, len(pairs), talk_size):
        talk = pairs[start:start + talk_size]
        description = (f"TED Talk Untertitel und Transkript: Vortrag {talk_id}",
                       f"TED Talk Subtitles and Transcript: talk {talk_id}")
        for lines, lang, column in ((de, "de", 0), (en, "en", 1)):
            lines.append(f"<url>http://www.ted.com/talks/lang/{lang}/synthetic_talk_{talk_id}.html</url>")
            lines.append(f"<keywords>talks, synthetic, {'Test' if lang == 'en' else 'Prüfung'}</keywords>")
            lines.append(f"<talkid>{talk_id}</talkid>")
            lines.append(f"<title>{talk[0][column]}</title>")
            lines.append(f"<description>{description[column]}</description>")
            lines.extend(pair[column] for pair in talk[1:])
        n_content += len(talk) + 1
        talk_id += 1
    return de, en, n_content


def xml_file(set_name, lang, docs, first_talk_id):
    """Returns the text of one IWSLT dev/test XML file holding `docs` (lists of sentences)."""
    set_id = "iwslt2014-" + set_name.split(".")[2]
    if lang == "de":
        open_tag = f'<srcset setid="{set_id}" srclang="german">'
        close_tag = "</srcset>"
    else:
        open_tag = f'<refset setid="{set_id}" srclang="german" trglang="{_LANG_NAMES[lang]}" refid="ref">'
        close_tag = "</refset>"
    out = ['<?xml version="1.0" encoding="UTF-8"?>', "<mteval>", open_tag]
    for k, sentences in enumerate(docs):
        talk_id = first_talk_id + k
        out.append(f'<doc docid="{talk_id}" genre="lectures">')
        out.append(f"<url>http://www.ted.com/talks/synthetic_{talk_id}.html</url>")
        out.append("<description>TED Talk Subtitles and Transcript: a synthetic talk</description>")
        out.append("<keywords>talks, synthetic</keywords>")
        out.append(f"<talkid>{talk_id}</talkid>")
        out.append(f"<title>Synthetic talk {talk_id}</title>")
        out.extend(f'<seg id="{i}"> {s} </seg>' for i, s in enumerate(sentences, 1))
        out.append("</doc>")
    out += [close_tag, "</mteval>"]
    return "\n".join(out) + "\n"


def make_archive(corpus_dir, out_path, talk_size=40, n_bad=0, seed=1):
    """Writes the archive; returns the number of (train.tags content pairs, test segments)."""
    if talk_size < 1:
        raise ValueError(f"talk_size must be >= 1, got {talk_size}")
    rng = random.Random(seed)
    train = list(zip(_read(os.path.join(corpus_dir, "train.de")), _read(os.path.join(corpus_dir, "train.en"))))
    test = list(zip(_read(os.path.join(corpus_dir, "test.de")), _read(os.path.join(corpus_dir, "test.en"))))
    if len(test) < len(TEST_SETS):
        raise ValueError(f"need at least {len(TEST_SETS)} test pairs in {corpus_dir}, got {len(test)}")
    for bad in bad_pairs(n_bad):
        train.insert(rng.randrange(len(train) + 1), bad)
    files = {}
    files["train.tags.de-en.de"], files["train.tags.de-en.en"], n_content = train_tags(train, talk_size, 1)
    files = {name: "\n".join(lines) + "\n" for name, lines in files.items()}
    talk_id = 10000
    bounds = [round(i * len(test) / len(TEST_SETS)) for i in range(len(TEST_SETS) + 1)]
    for set_name, lo, hi in zip(TEST_SETS, bounds, bounds[1:]):
        part = test[lo:hi]
        docs = [part[i:i + talk_size] for i in range(0, len(part), talk_size)]
        for lang, column in (("de", 0), ("en", 1)):
            files[f"{set_name}.{lang}.xml"] = xml_file(set_name, lang, [[p[column] for p in d] for d in docs], talk_id)
        talk_id += len(docs)
    tmp = out_path + ".tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for name in sorted(files):
            data = files[name].encode("utf-8")
            info = tarfile.TarInfo("de-en/" + name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, out_path)
    return n_content, len(test)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("corpus_dir")
    parser.add_argument("out")
    parser.add_argument("--talk-size", type=int, default=40)
    parser.add_argument("--bad-pairs", type=int, default=0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        n_train, n_test = make_archive(args.corpus_dir, args.out, args.talk_size, args.bad_pairs, args.seed)
    except (ValueError, OSError) as e:
        sys.exit(f"make_iwslt_like_archive.py: error: {e}")
    print(f"wrote {args.out}: {n_train} content pairs in train.tags (bad ones included), {n_test} test segments",
          file=sys.stderr)


if __name__ == "__main__":
    main()
