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

The files read and written (references, fairseq's output, results.csv) are results_io.py's, the table
results_table.py's; this module gives both too, as run_experiment.py and the tests use them.
"""
import importlib.util
import logging
from pathlib import Path

from results_io import (BOOTSTRAP_SAMPLES, COMET_MODEL, DETOKENIZED, FIELDS, References, find_references,  # noqa: F401
                        language_pair, merge_csv, read_generate, read_hypotheses, read_lines, read_settings,
                        reference_lines, run_key, say, training_figures, write_csv)
from results_table import SIGNIFICANCE, condition_table, oracle_significant, write_tables  # noqa: F401

# sacrebleu logs a line per system and bootstrap at INFO: dozens per table, between the progress lines
logging.getLogger("sacrebleu").setLevel(logging.WARNING)


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
    # hypothesis / reference length (sacreBLEU's tokens): below 1 BLEU's brevity penalty applies, and a
    # fine-tune's BLEU can move with its length alone
    whole = bleu.corpus_score(d_hyps, [d_refs])
    fields["len_ratio"] = round(whole.sys_len / whole.ref_len, 3) if whole.ref_len else ""
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


def read_sources(generate_file, references):
    """The test sources for COMET: the raw ones where data_prep kept them, else detokenized."""
    if references.source is not None:
        return read_lines(references.source)
    return detokenize(read_generate(generate_file)["S"], references.src)


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
        if row["p_bleu"] and row["p_chrf"] and run_key(row) not in fresh and run_key(b) not in fresh:
            continue
        if not ((Path(row["run_dir"]) / "test" / "generate-test.txt").exists()
                and (Path(b["run_dir"]) / "test" / "generate-test.txt").exists()):
            continue
        p_bleu, p_chrf = paired_p_values(b["run_dir"], row["run_dir"], references[row["data"]])
        row["p_bleu"], row["p_chrf"] = f"{p_bleu:.4f}", f"{p_chrf:.4f}"
    return rows

