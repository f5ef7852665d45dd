"""The results table of examples/run_experiment.py (OUT/results.md): per data condition and method
the scores' mean ± std over seeds, the p-values against the baseline and the share of the oracle's
gain closed, with a legend on the references, the case and the signatures."""
import statistics

from results_io import BOOTSTRAP_SAMPLES, COMET_MODEL, DETOKENIZED

SIGNIFICANCE = 0.05  # the oracle's gain over the baseline must be significant on every seed


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
    ratio = _has(mine, "len_ratio")
    header = (["method", "seeds", "sacreBLEU", "chrF", "BLEU (tok.)"] + [t for _, t in extra]
              + ["Δ sacreBLEU", "p (BLEU)", "p (chrF)", "oracle gap closed", "noise AUC", "s/update"]
              + (["length ratio"] if ratio else []))
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
                    _cell(method_rows, "sec_per_update", 3)]
                 + ([_cell(method_rows, "len_ratio", 3)] if ratio else []))
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
              "fairseq-generate prints (tokenize none), the paper's multi-bleu-style number. Length ratio: the "
              "hypotheses' length over the references' (sacreBLEU's tokens); below 1 BLEU's brevity penalty "
              "applies, so two rows can differ in BLEU by their length alone.",
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
