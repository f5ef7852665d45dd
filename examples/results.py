"""Scores and the results table of examples/run_experiment.py (sacrebleu's own metrics and tests).

Per run, on the test set:

* ``sacrebleu`` and ``chrf``: sacrebleu's defaults (BLEU: 13a tokenizer, case-sensitive; chrF2),
  exactly what ``sacrebleu REF < HYP`` prints, of the Moses-detokenized hypotheses as fairseq-generate
  produced them against the raw (untokenized, original-case) references that data_prep/ keeps in
  ``raw/test.TGT`` (see `find_references`), with their signatures and the half-width of their 95 %
  confidence intervals (sacrebleu's bootstrap, `BOOTSTRAP_SAMPLES` resamples, sacrebleu's seed);
* ``sacrebleu_lc``: where the data was lowercased by data_prep (its hypotheses are lowercase) and
  raw references are used, the case-insensitive sacreBLEU (``sacrebleu -lc``) too, to compare with
  case-insensitive figures;
* ``tokenized_bleu``: BLEU of the tokenized (lower-case, if the data was) text fairseq-generate
  prints, ``tokenize none`` (the paper's multi-bleu-style number);
* ``comet``: only where the ``comet`` package is installed and its model loads;
* ``p_bleu`` and ``p_chrf``: sacrebleu's paired bootstrap of the run against the baseline of the
  same data condition and seed (`add_p_values`);
* the teacher's final noise AUC and the training time per update, parsed from fairseq's log.

Without raw references the scores fall back to the detokenized references fairseq-generate prints
(said once, and in the table's legend). Per method and data condition the table gives mean ± std over
seeds (one seed: the score and its CI), each seed's p-values, and the share of the oracle's gain
closed, ``(method - baseline) / (oracle - baseline)`` on sacreBLEU, where that gain is significant.
``results.csv`` accumulates runs across invocations (a run is a data condition, method and seed).
"""
import csv
import importlib.util
import logging
import os
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

FIELDS = ["data", "method", "seed", "sacrebleu", "sacrebleu_ci95", "chrf", "chrf_ci95", "tokenized_bleu",
          "sacrebleu_lc", "comet", "p_bleu", "p_chrf", "noise_auc", "sec_per_update", "bleu_signature",
          "chrf_signature", "bleu_lc_signature", "references", "lowercased", "run_dir", "command"]
BOOTSTRAP_SAMPLES = 1000
SIGNIFICANCE = 0.05
COMET_MODEL = os.environ.get("COMET_MODEL", "Unbabel/wmt22-comet-da")
DETOKENIZED = "detokenized"  # the ``references`` field of runs scored without raw references

# sacrebleu logs a line per system and bootstrap at INFO: dozens per table, between the progress lines
logging.getLogger("sacrebleu").setLevel(logging.WARNING)


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


def _languages(data_bin, settings):
    """(source, target) language of a data-bin: prep.settings', else its test.SRC-TGT.LANG.idx names."""
    for idx in sorted(Path(data_bin).glob("test.*-*.*.idx")):
        src, tgt = idx.name.split(".")[1].split("-", 1)
        return settings.get("src") or src, settings.get("tgt") or tgt
    return settings.get("src") or "de", settings.get("tgt") or "en"


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
    src, tgt = _languages(data_bin, settings)
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


# ----------------------------------------------------------------------------- scores


def detokenize(lines, lang="en"):
    from sacremoses import MosesDetokenizer

    detok = MosesDetokenizer(lang=lang)
    return [detok.detokenize(line.split()) for line in lines]


def bootstrap(hyps, refs, metrics, baseline=None):
    """sacrebleu's paired bootstrap (``PairedTest``, test_type "bs"): {metric name: [Result, ...]}, the
    baseline's first where ``baseline`` (its hypotheses) is given; each Result has the score, the
    bootstrap mean and the half-width of the 95 % CI, the system its p-value against the baseline."""
    from sacrebleu.significance import PairedTest

    systems = ([("baseline", baseline)] if baseline is not None else []) + [("system", hyps)]
    test = PairedTest(systems, metrics, references=[refs], test_type="bs", n_samples=BOOTSTRAP_SAMPLES)
    return test()[1]


def score_run(hyps, refs, references=None, sources=None):
    """The score fields of one run's results.csv row, from the tokenized hypotheses and references that
    fairseq-generate printed (`read_hypotheses`) and the condition's `References`."""
    import sacrebleu
    from sacrebleu.metrics import BLEU, CHRF

    references = references or References(None)
    d_hyps = detokenize(hyps, references.tgt)
    raw = reference_lines(references, len(refs))
    d_refs = raw if raw is not None else detokenize(refs, references.tgt)
    bleu, chrf = BLEU(), CHRF()
    scores = bootstrap(d_hyps, d_refs, {"BLEU": bleu, "chrF": chrf})
    b, c = scores["BLEU"][0], scores["chrF2"][0]
    fields = dict(sacrebleu=round(b.score, 2), sacrebleu_ci95=round(float(b.ci), 2), chrf=round(c.score, 2),
                  chrf_ci95=round(float(c.ci), 2), bleu_signature=str(bleu.get_signature()),
                  chrf_signature=str(chrf.get_signature()), references=references.field,
                  lowercased={True: 1, False: 0}.get(references.lowercased, ""),
                  tokenized_bleu=round(sacrebleu.corpus_bleu(hyps, [refs], tokenize="none", force=True).score, 2))
    if references.lowercased and raw is not None:  # (the detokenized references are lowercase too)
        lc = BLEU(lowercase=True)
        fields.update(sacrebleu_lc=round(lc.corpus_score(d_hyps, [d_refs]).score, 2),
                      bleu_lc_signature=str(lc.get_signature()))
    comet = comet_score(sources, d_hyps, d_refs) if sources is not None else None
    if comet is not None:
        fields["comet"] = round(comet, 4)
    return fields


_comet = {}


def comet_available():
    """Whether the ``comet`` package is installed (then run_experiment reads the sources for it)."""
    return importlib.util.find_spec("comet") is not None


def comet_score(sources, hyps, refs):
    """COMET (``COMET_MODEL``) of the detokenized hypotheses, or None where the ``comet`` package is not
    installed or its model cannot be loaded (said once)."""
    if not comet_available():
        return None
    if "model" not in _comet:
        _comet["model"] = None
        try:
            from comet import download_model, load_from_checkpoint

            path = COMET_MODEL if Path(COMET_MODEL).is_file() else download_model(COMET_MODEL)
            _comet["model"] = load_from_checkpoint(path)
        except Exception as e:  # offline, no such model, ...: the column is optional
            reason = (str(e).splitlines() or [""])[0]
            say(f"COMET skipped: could not load {COMET_MODEL} ({type(e).__name__}: {reason})")
    if _comet["model"] is None:
        return None
    data = [dict(src=s, mt=h, ref=r) for s, h, r in zip(sources, hyps, refs)]
    try:
        return float(_comet["model"].predict(data, batch_size=32, gpus=0, progress_bar=False).system_score)
    except Exception as e:
        _comet["model"] = None
        say(f"COMET skipped: {COMET_MODEL} failed ({type(e).__name__}: {e})")
        return None


def training_figures(log_file):
    """(seconds per update, last logged noise_auc or None) from a fairseq-train log (simple format):
    each epoch summary's updates over its ``ups`` (updates per second over the epoch's training,
    meta-updates and the noise-AUC scoring included, validation and checkpointing not)."""
    seconds, updates, auc = 0.0, 0, None
    for line in Path(log_file).read_text(encoding="utf-8", errors="replace").splitlines():
        found = re.search(r"noise_auc ([0-9.]+|nan)", line)
        if found:
            auc = None if found.group(1) == "nan" else float(found.group(1))
        if "| train | epoch" in line:
            total = int(re.search(r"num_updates ([0-9]+)", line).group(1))
            seconds += (total - updates) / float(re.search(r"\bups ([0-9.]+)", line).group(1))
            updates = total
    return (seconds / updates if updates else float("nan")), auc


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


def read_sources(generate_file, references):
    """The test sources for COMET: the raw ones where data_prep kept them, else detokenized."""
    if references.source is not None:
        return read_lines(references.source)
    return detokenize(read_generate(generate_file)["S"], references.src)


# ----------------------------------------------------------------------------- results.csv


def _key(row):
    return row["data"], row["method"], str(row["seed"])


def merge_csv(path, rows):
    """results.csv with ``rows`` added, replacing earlier rows of the same (data, method, seed)."""
    kept = {}
    if path.exists():
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                kept[_key(row)] = {k: row.get(k) or "" for k in FIELDS}
    for row in rows:
        kept[_key(row)] = {k: "" if row.get(k) is None else str(row[k]) for k in FIELDS}
    write_csv(path, kept.values())
    return list(kept.values())


def write_csv(path, rows):
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def paired_p_values(base_dir, run_dir, references=None):
    """sacrebleu's paired bootstrap p-values (sacreBLEU, chrF) of a run against the baseline run, on the
    references its scores use."""
    from sacrebleu.metrics import BLEU, CHRF

    references = references or References(None)
    base, refs = read_hypotheses(Path(base_dir) / "test" / "generate-test.txt")
    hyps, _ = read_hypotheses(Path(run_dir) / "test" / "generate-test.txt")
    if hyps == base:  # sacrebleu's test gives 1 / (n + 1) to a system identical to the baseline
        return 1.0, 1.0
    raw = reference_lines(references, len(refs))
    d_refs = raw if raw is not None else detokenize(refs, references.tgt)
    scores = bootstrap(detokenize(hyps, references.tgt), d_refs, {"BLEU": BLEU(), "chrF": CHRF()},
                       baseline=detokenize(base, references.tgt))
    return scores["BLEU"][1].p_value, scores["chrF2"][1].p_value


def add_p_values(rows, references, fresh=()):
    """Sets ``p_bleu`` and ``p_chrf`` of every run of the conditions in ``references`` ({condition:
    References}) that has a baseline of the same seed: computed where missing, or where the run or its
    baseline is among ``fresh`` (the (data, method, seed) keys scored now); other rows keep theirs."""
    fresh = {(d, m, str(s)) for d, m, s in fresh}
    base = {(r["data"], r["seed"]): r for r in rows if r["method"] == "baseline"}
    for row in rows:
        b = base.get((row["data"], row["seed"]))
        if row["method"] == "baseline" or b is None or row["data"] not in references:
            continue
        if row["p_bleu"] and row["p_chrf"] and _key(row) not in fresh and _key(b) not in fresh:
            continue
        if not ((Path(row["run_dir"]) / "test" / "generate-test.txt").exists()
                and (Path(b["run_dir"]) / "test" / "generate-test.txt").exists()):
            continue
        p_bleu, p_chrf = paired_p_values(b["run_dir"], row["run_dir"], references[row["data"]])
        row["p_bleu"], row["p_chrf"] = f"{p_bleu:.4f}", f"{p_chrf:.4f}"
    return rows


# ----------------------------------------------------------------------------- the table


def _number(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _cell(rows, key, digits=2, ci=None):
    """mean ± std over the rows' ``key`` (nan dropped); one row: its value, and (± its 95 % CI
    half-width) where ``ci`` names that field."""
    values = [v for v in (_number(r.get(key)) for r in rows) if v == v]
    if not values:
        return "–"
    if len(values) == 1:
        half = _number(rows[0].get(ci)) if ci and len(rows) == 1 else float("nan")
        return f"{values[0]:.{digits}f}" + (f" (± {half:.{digits}f})" if half == half else "")
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _by_seed(rows, key="sacrebleu"):
    return {r["seed"]: _number(r.get(key)) for r in rows}


def _mean_of_seeds(rows, seeds):
    """Mean sacreBLEU of ``rows`` over ``seeds``, or None unless every seed is there."""
    by_seed = _by_seed(rows)
    return statistics.mean(by_seed[s] for s in seeds) if all(s in by_seed for s in seeds) else None


def oracle_significant(oracle_rows, baseline_rows, seeds):
    """(whether the oracle's sacreBLEU gain over the baseline is significant on every seed, the reason
    where not)."""
    oracle, base = {r["seed"]: r for r in oracle_rows}, _by_seed(baseline_rows)
    for seed in seeds:
        if seed not in oracle or seed not in base:
            return False, f"no oracle or baseline run of seed {seed}"
        p, gain = _number(oracle[seed].get("p_bleu")), _number(oracle[seed]["sacrebleu"]) - base[seed]
        if p != p:
            return False, f"no p-value for seed {seed}"
        if not (p < SIGNIFICANCE and gain > 0):
            return False, f"seed {seed}: oracle − baseline {gain:+.2f} sacreBLEU, p = {p:.3f}"
    return True, ""


def _has(rows, key):
    return any(r.get(key) not in (None, "") for r in rows)


def condition_table(rows, condition, methods, notes=None):
    """Markdown lines of one data condition's table; the reasons for a '–' gap go to ``notes``."""
    notes = [] if notes is None else notes
    runs = {m: sorted((r for r in rows if r["data"] == condition and r["method"] == m), key=lambda r: int(r["seed"]))
            for m in methods}
    mine = [r for rs in runs.values() for r in rs]
    extra = [(key, title) for key, title in (("sacrebleu_lc", "sacreBLEU (lc)"), ("comet", "COMET")) if _has(mine, key)]
    header = (["method", "seeds", "sacreBLEU", "chrF", "BLEU (tok.)"] + [t for _, t in extra]
              + ["Δ sacreBLEU", "p (BLEU)", "p (chrF)", "oracle gap closed", "noise AUC", "s/update"])
    lines = [f"**{condition}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    gap_reasons = {}
    for method, method_rows in runs.items():
        if not method_rows:
            continue
        delta = gap = "–"
        # against the baseline (and oracle) of the same seeds: a one-seed pilot is compared with its
        # own seed's runs, not with a mean over seeds it did not run
        seeds_run = [r["seed"] for r in method_rows]
        mean = statistics.mean(_by_seed(method_rows).values())
        baseline = _mean_of_seeds(runs.get("baseline", []), seeds_run)
        if method != "baseline" and baseline is not None:
            delta = f"{mean - baseline:+.2f}"
            oracle = _mean_of_seeds(runs.get("oracle", []), seeds_run)
            # (the pretrained student is not a fine-tune: no share of the fine-tune's gap)
            if method not in ("oracle", "pretrained") and oracle is not None:  # (significant on every seed)
                significant, why = oracle_significant(runs["oracle"], runs["baseline"], seeds_run)
                if significant:
                    gap = f"{(mean - baseline) / (oracle - baseline):.0%}"
                else:
                    gap_reasons.setdefault(why, []).append(method)
        p = {key: " ".join(f"{_number(r[key]):.3f}" for r in method_rows if _number(r.get(key)) == _number(r.get(key)))
             for key in ("p_bleu", "p_chrf")}
        cells = ([method, ",".join(seeds_run), _cell(method_rows, "sacrebleu", ci="sacrebleu_ci95"),
                  _cell(method_rows, "chrf", ci="chrf_ci95"), _cell(method_rows, "tokenized_bleu")]
                 + [_cell(method_rows, key, 4 if key == "comet" else 2) for key, _ in extra]
                 + [delta, p["p_bleu"] or "–", p["p_chrf"] or "–", gap, _cell(method_rows, "noise_auc", 3),
                    _cell(method_rows, "sec_per_update", 3)])
        lines.append("| " + " | ".join(cells) + " |")
    for why, names in gap_reasons.items():
        notes.append(f"{condition}: oracle gap closed not shown for {', '.join(names)}: the oracle's gain over the "
                     f"baseline is not significant ({why}).")
    return lines


def _condition_notes(rows, condition):
    """The legend's lines on a condition's references and case."""
    mine = [r for r in rows if r["data"] == condition]
    refs = sorted({r.get("references") or DETOKENIZED for r in mine})
    notes = []
    for ref in refs:
        if ref == DETOKENIZED:
            notes.append(f"{condition}: **not comparable with published sacreBLEU**: no raw test references were "
                         "found, so sacreBLEU and chrF are scored against the references fairseq-generate prints "
                         "(tokenized then Moses-detokenized, lowercased where the data was); keep data_prep's raw/ "
                         "or pass --raw-references.")
        else:
            notes.append(f"{condition}: references {ref} (raw: untokenized, original case).")
    if any(r.get("lowercased") == "1" and r.get("references", DETOKENIZED) != DETOKENIZED for r in mine):
        notes.append(f"{condition}: the data was lowercased by data_prep (prep.settings lowercase=1), so the "
                     "hypotheses are lowercase and the case-sensitive sacreBLEU and chrF count each capital of the "
                     "references as an error; sacreBLEU (lc) is the case-insensitive score (sacrebleu -lc) of the "
                     "same text, for case-insensitive published figures.")
    return notes


def write_tables(rows, out, conditions, methods, note):
    """OUT/results.md from every run in results.csv; returns its text."""
    lines, notes, gap_notes = [], [], []
    for condition in conditions:
        lines += condition_table(rows, condition, methods, gap_notes) + [""]
        notes += _condition_notes(rows, condition)
    notes += gap_notes
    mine = [r for r in rows if r["data"] in conditions]
    signatures = sorted({r[k] for r in mine for k in ("bleu_signature", "chrf_signature", "bleu_lc_signature")
                         if r.get(k)})
    lines += [note, "",
              "sacreBLEU and chrF: sacrebleu's defaults (13a tokenizer, case-sensitive; chrF2) of the Moses-"
              "detokenized hypotheses against the test references below. One seed: the score (± the half-width of "
              f"its 95 % confidence interval: sacrebleu's bootstrap, {BOOTSTRAP_SAMPLES} resamples); several seeds: "
              "mean ± std over seeds (each run's CI is in results.csv). BLEU (tok.): the tokenized text "
              "fairseq-generate prints (tokenize none), the paper's multi-bleu-style number.",
              "",
              f"p (BLEU), p (chrF): sacrebleu's paired bootstrap ({BOOTSTRAP_SAMPLES} resamples) of each seed's run "
              "against the baseline of the same seed, one per seed. Δ and the oracle gap closed, "
              "(method − baseline) / (oracle − baseline), are on sacreBLEU over the same seeds; the gap is shown "
              f"only where the oracle's gain over the baseline is significant (p < {SIGNIFICANCE}) on every seed, "
              "else '–': a share of a gap that may be noise means nothing.", ""]
    if _has(mine, "comet"):
        notes.append(f"COMET: {COMET_MODEL} (unbabel-comet) of the detokenized hypotheses, with the raw sources "
                     "and references.")
    lines += [f"- {n}" for n in notes] + ["", "Signatures: " + "; ".join(signatures) + ". Commands: results.csv."]
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    return text
