"""Scores and the results table of examples/run_experiment.py (sacrebleu's own metrics and tests).

Per run: tokenized lower-case BLEU (the paper's multi-bleu-style number), detokenized sacreBLEU and
chrF with their signatures, the teacher's final noise AUC and the training time per update, parsed
from fairseq's log. Per method and data condition: mean ± std over seeds, the paired significance
of each seed's run against the baseline of the same seed (sacrebleu's paired bootstrap resampling,
1000 samples), and the share of the oracle's gain closed, ``(method - baseline) / (oracle - baseline)``.
``results.csv`` accumulates runs across invocations (a run is a data condition, method and seed).
"""
import csv
import re
import statistics
from pathlib import Path

FIELDS = ["data", "method", "seed", "tokenized_bleu", "sacrebleu", "chrf", "noise_auc", "sec_per_update",
          "bleu_signature", "chrf_signature", "run_dir", "command"]
BOOTSTRAP_SAMPLES = 1000


def detokenize(lines):
    from sacremoses import MosesDetokenizer

    detok = MosesDetokenizer(lang="en")
    return [detok.detokenize(line.split()) for line in lines]


def score(hyps, refs):
    """(tokenized BLEU, sacreBLEU, chrF, BLEU signature, chrF signature) of tokenized lines."""
    import sacrebleu

    tok_bleu = sacrebleu.corpus_bleu(hyps, [refs], tokenize="none", force=True).score
    d_hyps, d_refs = detokenize(hyps), detokenize(refs)
    bleu, chrf = sacrebleu.metrics.BLEU(lowercase=True), sacrebleu.metrics.CHRF()
    return (tok_bleu, bleu.corpus_score(d_hyps, [d_refs]).score, chrf.corpus_score(d_hyps, [d_refs]).score,
            str(bleu.get_signature()), str(chrf.get_signature()))


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


def read_hypotheses(generate_file):
    """Tokenized hypotheses and references of a ``fairseq-generate`` output, in corpus order."""
    hyps, refs = {}, {}
    for line in Path(generate_file).read_text(encoding="utf-8").splitlines():
        tag, _, rest = line.partition("-")
        if tag in ("H", "T"):
            fields = rest.split("\t")
            (hyps if tag == "H" else refs)[int(fields[0])] = fields[-1]
    order = sorted(refs)
    return [hyps.get(i, "") for i in order], [refs[i] for i in order]


def merge_csv(path, rows):
    """results.csv with ``rows`` added, replacing earlier rows of the same (data, method, seed)."""
    kept = {}
    if path.exists():
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                kept[(row["data"], row["method"], str(row["seed"]))] = row
    for row in rows:
        kept[(row["data"], row["method"], str(row["seed"]))] = {
            k: "" if row.get(k) is None else str(row[k]) for k in FIELDS}
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(kept.values())
    return list(kept.values())


def paired_p_values(base_dir, run_dir):
    """sacrebleu's paired bootstrap p-values (BLEU, chrF) of a run against the baseline run."""
    from sacrebleu.metrics import BLEU, CHRF
    from sacrebleu.significance import PairedTest

    base, refs = read_hypotheses(Path(base_dir) / "test" / "generate-test.txt")
    hyps, _ = read_hypotheses(Path(run_dir) / "test" / "generate-test.txt")
    d_refs = detokenize(refs)
    test = PairedTest([("baseline", detokenize(base)), ("method", detokenize(hyps))],
                      {"BLEU": BLEU(lowercase=True), "chrF": CHRF()}, references=[d_refs], test_type="bs",
                      n_samples=BOOTSTRAP_SAMPLES)
    _, scores = test()
    return scores["BLEU"][1].p_value, scores["chrF2"][1].p_value


def _mean_std(values, digits=2):
    values = [v for v in values if v == v]  # drop nan
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _floats(rows, key):
    return [float(r[key]) if r[key] != "" else float("nan") for r in rows]


def _mean_of_seeds(rows, seeds):
    """Mean tokenized BLEU of ``rows`` over ``seeds``, or None unless every seed is there."""
    by_seed = {r["seed"]: float(r["tokenized_bleu"]) for r in rows}
    return statistics.mean(by_seed[s] for s in seeds) if all(s in by_seed for s in seeds) else None


def condition_table(rows, condition, methods):
    """Markdown lines of one data condition's table."""
    runs = {m: sorted((r for r in rows if r["data"] == condition and r["method"] == m), key=lambda r: int(r["seed"]))
            for m in methods}
    base = {r["seed"]: r for r in runs.get("baseline", [])}
    mean = {m: statistics.mean(_floats(rs, "tokenized_bleu")) for m, rs in runs.items() if rs}
    lines = [f"**{condition}**", "",
             "| method | seeds | BLEU (tok.) | sacreBLEU | chrF | Δ BLEU | p (BLEU, per seed) | oracle gap closed "
             "| noise AUC | s/update |", "|---|---|---|---|---|---|---|---|---|---|"]
    for method, method_rows in runs.items():
        if not method_rows:
            continue
        p_values = []
        for r in method_rows:
            if method != "baseline" and r["seed"] in base:
                p_values.append(f"{paired_p_values(base[r['seed']]['run_dir'], r['run_dir'])[0]:.3f}")
        delta = gap = "–"
        # against the baseline (and oracle) of the same seeds: a one-seed pilot is compared with its
        # own seed's runs, not with a mean over seeds it did not run
        seeds_run = [r["seed"] for r in method_rows]
        baseline = _mean_of_seeds(runs.get("baseline", []), seeds_run)
        if method != "baseline" and baseline is not None:
            delta = f"{mean[method] - baseline:+.2f}"
            oracle = _mean_of_seeds(runs.get("oracle", []), seeds_run)
            if method != "oracle" and oracle is not None and oracle != baseline:
                gap = f"{(mean[method] - baseline) / (oracle - baseline):.0%}"
        seeds = ",".join(r["seed"] for r in method_rows)
        lines.append(f"| {method} | {seeds} | {_mean_std(_floats(method_rows, 'tokenized_bleu'))} | "
                     f"{_mean_std(_floats(method_rows, 'sacrebleu'))} | {_mean_std(_floats(method_rows, 'chrf'))} | "
                     f"{delta} | {' '.join(p_values) or '–'} | {gap} | {_mean_std(_floats(method_rows, 'noise_auc'), 3)} | "
                     f"{_mean_std(_floats(method_rows, 'sec_per_update'), 3)} |")
    return lines


def write_tables(rows, out, conditions, methods, note):
    """OUT/results.md from every run in results.csv; returns its text."""
    lines = []
    for condition in conditions:
        lines += condition_table(rows, condition, methods) + [""]
    signatures = sorted({r["bleu_signature"] for r in rows} | {r["chrf_signature"] for r in rows})
    lines += [note, "", "Signatures: " + "; ".join(signatures), "",
              f"p: sacrebleu's paired bootstrap ({BOOTSTRAP_SAMPLES} samples) of each seed's run against the "
              "baseline of the same seed, on sacreBLEU. Commands: results.csv."]
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    return text
