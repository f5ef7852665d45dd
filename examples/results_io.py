"""What the scores of examples/results.py read and write: the data_prep settings and test references
of a data condition, fairseq-generate's output, fairseq-train's log, and results.csv."""
import csv
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

FIELDS = ["data", "method", "seed", "sacrebleu", "sacrebleu_ci95", "chrf", "chrf_ci95", "tokenized_bleu",
          "len_ratio", "sacrebleu_lc", "comet", "p_bleu", "p_chrf", "noise_auc", "sec_per_update", "bleu_signature",
          "chrf_signature", "bleu_lc_signature", "references", "lowercased", "run_dir", "command"]
BOOTSTRAP_SAMPLES = 1000  # sacrebleu's bootstrap resamples (CIs and paired test)
COMET_MODEL = os.environ.get("COMET_MODEL", "Unbabel/wmt22-comet-da")
DETOKENIZED = "detokenized"  # the ``references`` field of runs scored without raw references


def say(message):
    print(f"[results] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- references


def read_settings(path):
    """The key=value lines of a data_prep prep.settings file ({} if there is none)."""
    path = Path(path)
    if not path.is_file():
        return {}
    return dict(line.split("=", 1) for line in path.read_text(encoding="utf-8").splitlines() if "=" in line)


@dataclass
class References:
    """Where a data condition's test references come from, and what the data_prep settings say."""
    path: Optional[Path]  # the raw test references, or None: fairseq-generate's detokenized ones
    tgt: str = "en"  # target language (Moses detokenizer)
    src: str = "de"  # source language
    lowercased: Optional[bool] = None  # the data was lowercased by data_prep (None: unknown)
    source: Optional[Path] = None  # the raw test source (COMET), where there is one
    looked_at: tuple = ()  # where the raw references were looked for

    @property
    def field(self):
        """The ``references`` field of results.csv."""
        return str(self.path) if self.path else DETOKENIZED

    def describe(self):
        if self.path:
            return f"raw references {self.path}"
        return ("no raw references (looked for " + ", ".join(map(str, self.looked_at)) + "): fairseq-generate's "
                "tokenized-then-detokenized references" + (", lowercased" if self.lowercased else ""))


def language_pair(data_bin, split="test"):
    """(source, target) languages of a data-bin, from the file names of its binarized ``split``
    (``SPLIT.SRC-TGT.SRC.idx`` or ``SPLIT.SRC-TGT.TGT.idx``), or None where it has no such file."""
    for idx in sorted(Path(data_bin).glob(f"{split}.*-*.*.idx")):
        src, _, tgt = idx.name.split(".")[1].partition("-")
        if idx.name in (f"{split}.{src}-{tgt}.{src}.idx", f"{split}.{src}-{tgt}.{tgt}.idx"):
            return src, tgt
    return None


def find_references(data_bin, override=None):
    """The raw test references of a data-bin made by data_prep/: DATA_BIN/../raw/test.TGT, else, for a
    noisy variant (prep.settings ``clean_dir=``), CLEAN_DIR/raw/test.TGT; ``override`` (a file) wins.
    The languages and ``lowercase`` come from prep.settings (the clean directory's for a variant)."""
    prep = Path(data_bin).resolve().parent
    settings = read_settings(prep / "prep.settings")
    dirs = [prep]
    if settings.get("clean_dir"):
        clean = Path(settings["clean_dir"])
        dirs.append(clean)
        settings = {**read_settings(clean / "prep.settings"), **settings}
    src, tgt = language_pair(data_bin) or ("de", "en")
    src, tgt = settings.get("src") or src, settings.get("tgt") or tgt
    lowercased = {"1": True, "0": False}.get(settings.get("lowercase"))
    candidates = [d / "raw" / f"test.{tgt}" for d in dirs]
    path = Path(override) if override else next((c for c in candidates if c.is_file()), None)
    source = None
    if path and path.name == f"test.{tgt}" and path.with_name(f"test.{src}").is_file():
        source = path.with_name(f"test.{src}")
    return References(path, tgt, src, lowercased, source, () if override else tuple(candidates))


def read_lines(path):
    """The lines of a UTF-8 text file without their newlines (a last line without one counts)."""
    text = Path(path).read_text(encoding="utf-8")
    lines = text.split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def reference_lines(references, n):
    """The raw references' lines, checked against the test set's ``n`` sentences (None: fall back)."""
    if references.path is None:
        return None
    lines = read_lines(references.path)
    if len(lines) != n:
        raise ValueError(f"the raw references {references.path} have {len(lines)} lines but the test set has {n} "
                         "sentences: pass the right file with --raw-references NAME=FILE")
    return lines


# ----------------------------------------------------------------------------- fairseq's output


def training_figures(log_file):
    """(seconds per update, last logged noise_auc or None) from a fairseq-train log (simple format):
    each epoch summary's updates over its ``ups`` (updates per second over the epoch's training,
    meta-updates and the noise-AUC scoring included, validation and checkpointing not). An epoch that
    fairseq logs with ``ups 0`` (one update: its meter has no interval yet) is left out of the mean."""
    seconds, updates, timed, auc = 0.0, 0, 0, None
    for line in Path(log_file).read_text(encoding="utf-8", errors="replace").splitlines():
        found = re.search(r"noise_auc ([0-9.]+|nan)", line)
        if found:
            auc = None if found.group(1) == "nan" else float(found.group(1))
        if "| train | epoch" in line:
            total = int(re.search(r"num_updates ([0-9]+)", line).group(1))
            ups = float(re.search(r"\bups ([0-9.]+)", line).group(1))
            if ups > 0:
                seconds += (total - updates) / ups
                timed += total - updates
            updates = total
    return (seconds / timed if timed else float("nan")), auc


def read_generate(generate_file):
    """{"S": sources, "H": hypotheses, "T": references} of a ``fairseq-generate`` output, tokenized
    as it prints them, in corpus order."""
    lines = {"S": {}, "H": {}, "T": {}}
    for line in Path(generate_file).read_text(encoding="utf-8").splitlines():
        tag, _, rest = line.partition("-")
        if tag in lines:
            fields = rest.split("\t")
            lines[tag][int(fields[0])] = fields[-1]
    order = sorted(lines["T"])
    return {tag: [found.get(i, "") for i in order] for tag, found in lines.items()}


def read_hypotheses(generate_file):
    """Tokenized hypotheses and references of a ``fairseq-generate`` output, in corpus order."""
    lines = read_generate(generate_file)
    return lines["H"], lines["T"]


# ----------------------------------------------------------------------------- results.csv


def run_key(row):
    """A run's key in results.csv: (data, method, seed)."""
    return row["data"], row["method"], str(row["seed"])


def merge_csv(path, rows):
    """results.csv with ``rows`` added, replacing earlier rows of the same (data, method, seed)."""
    kept = {}
    if path.exists():
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                kept[run_key(row)] = {k: row.get(k) or "" for k in FIELDS}
    for row in rows:
        kept[run_key(row)] = {k: "" if row.get(k) is None else str(row[k]) for k in FIELDS}
    write_csv(path, kept.values())
    return list(kept.values())


def write_csv(path, rows):
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)

