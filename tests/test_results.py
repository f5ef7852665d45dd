"""examples/results.py on hand-made hypotheses and references: every score is checked against what
sacrebleu itself computes for the same text (its metrics, its single-system bootstrap CI, its paired
test), the references' lookup (raw/, a noisy variant's clean_dir, an override, none), and the table
(CI and p columns, the oracle gap only where the oracle's gain is significant, the legend)."""
import os
import subprocess
import sys

import pytest
import sacrebleu
from sacrebleu.metrics import BLEU, CHRF
from sacrebleu.significance import PairedTest

import results  # examples/results.py (pytest.ini puts examples/ on sys.path)
import results_io
from conftest import REPO

# tokenized, lower-cased lines as fairseq-generate prints them (Moses escaping), and the raw references
HYPS = ["the cat sat on the mat .", "it &apos;s a dog , not a cat .", "we went home early today .",
        "hello world !", "the weather is nice in berlin ."] * 4
TOK_REFS = ["the cat sat on the mat .", "it &apos;s a cat , not a dog .", "we went home late yesterday .",
            "hello , world !", "the weather is fine in berlin ."] * 4
RAW_REFS = ["The cat sat on the mat.", "It's a cat, not a dog.", "We went home late yesterday.",
            "Hello, world!", "The weather is fine in Berlin."] * 4
OTHER = ["the cat sat on a mat .", "it &apos;s a dog .", "we went home late yesterday .",
         "hello , world !", "the weather is fine in berlin ."] * 4


def _write(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _detok(lines):
    from sacremoses import MosesDetokenizer

    detok = MosesDetokenizer(lang="en")
    return [detok.detokenize(line.split()) for line in lines]


def _prepared(tmp_path, name="clean", lowercase=1, raw=True):
    """A directory laid out as data_prep's prepare scripts leave it (raw/, prep.settings, data-bin/)."""
    out = tmp_path / name
    (out / "data-bin").mkdir(parents=True)
    (out / "data-bin" / "test.de-en.en.idx").write_bytes(b"")
    (out / "prep.settings").write_text(f"recipe=prepare_parallel v1\nsrc=de\ntgt=en\nlowercase={lowercase}\n")
    if raw:
        _write(out / "raw" / "test.en", RAW_REFS)
        _write(out / "raw" / "test.de", ["Quelle"] * len(RAW_REFS))
    return out


def test_scores_are_sacrebleus_defaults_on_the_raw_references(tmp_path):
    refs = results.find_references(_prepared(tmp_path) / "data-bin")
    fields = results.score_run(HYPS, TOK_REFS, refs)
    hyps = _detok(HYPS)
    assert hyps[1] == "it's a dog, not a cat."  # Moses-detokenized, escapes undone, case as produced
    # what `sacrebleu --confidence` computes: its default --confidence-n 1000 resamples, its default seed
    bleu = BLEU().corpus_score(hyps, [RAW_REFS], n_bootstrap=1000)
    chrf = CHRF().corpus_score(hyps, [RAW_REFS], n_bootstrap=1000)
    assert fields["sacrebleu"] == round(sacrebleu.corpus_bleu(hyps, [RAW_REFS]).score, 2) == round(bleu.score, 2)
    assert fields["chrf"] == round(sacrebleu.corpus_chrf(hyps, [RAW_REFS]).score, 2) == round(chrf.score, 2)
    assert fields["sacrebleu_ci95"] == round(bleu._ci, 2) and fields["chrf_ci95"] == round(chrf._ci, 2)
    plain = BLEU()
    plain.corpus_score(hyps, [RAW_REFS])
    assert fields["bleu_signature"] == str(plain.get_signature())  # what `sacrebleu REF < HYP` prints
    assert "case:mixed" in fields["bleu_signature"] and "tok:13a" in fields["bleu_signature"]
    assert fields["chrf_signature"].startswith("nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no")
    assert fields["tokenized_bleu"] == round(sacrebleu.corpus_bleu(HYPS, [TOK_REFS], tokenize="none").score, 2)
    # the length ratio behind BLEU's brevity penalty: hypothesis over reference tokens (13a), as sacrebleu prints it
    assert fields["len_ratio"] == round(bleu.sys_len / bleu.ref_len, 3)
    assert fields["len_ratio"] == float(sacrebleu.corpus_bleu(hyps, [RAW_REFS]).format().split("ratio = ")[1].split()[0])
    # lowercased data: also the case-insensitive sacreBLEU, which is higher here (capitals only in the refs)
    assert fields["sacrebleu_lc"] == round(sacrebleu.corpus_bleu(hyps, [RAW_REFS], lowercase=True).score, 2)
    assert fields["sacrebleu_lc"] > fields["sacrebleu"] and "case:lc" in fields["bleu_lc_signature"]
    assert fields["references"] == str(tmp_path / "clean" / "raw" / "test.en") and fields["lowercased"] == 1
    assert "comet" not in fields  # no sources given (and no comet package here)


def test_cased_data_has_no_lc_column_and_no_raw_refs_fall_back_to_the_detokenized_ones(tmp_path):
    cased = results.score_run(HYPS, TOK_REFS, results.find_references(_prepared(tmp_path, lowercase=0) / "data-bin"))
    assert "sacrebleu_lc" not in cased and cased["lowercased"] == 0
    bare = results.find_references(_prepared(tmp_path, "bare", raw=False) / "data-bin")
    assert bare.path is None and bare.looked_at == (tmp_path / "bare" / "raw" / "test.en",)
    fields = results.score_run(HYPS, TOK_REFS, bare)
    assert fields["references"] == results.DETOKENIZED
    assert fields["sacrebleu"] == round(sacrebleu.corpus_bleu(_detok(HYPS), [_detok(TOK_REFS)]).score, 2)
    row = dict(fields, data="bare", method="baseline", seed="1", run_dir="", noise_auc="", sec_per_update="")
    text = results.write_tables([{k: str(row.get(k, "")) for k in results.FIELDS}], tmp_path, ["bare"],
                                ["baseline"], "note")
    assert "bare: **not comparable with published sacreBLEU**" in text and "(lc)" not in text.split("note")[0]


def test_references_of_a_noisy_variant_an_override_and_a_wrong_file(tmp_path):
    clean = _prepared(tmp_path)
    noisy = tmp_path / "noisy"
    (noisy / "data-bin").mkdir(parents=True)
    (noisy / "prep.settings").write_text(f"recipe=make_noisy v1\nclean_dir={clean}\nsrc=de\ntgt=en\n")
    refs = results.find_references(noisy / "data-bin")
    assert refs.path == clean / "raw" / "test.en" and refs.source == clean / "raw" / "test.de"
    assert refs.lowercased is True and refs.tgt == "en"  # lowercase= from the clean directory's settings
    other = _write(tmp_path / "elsewhere" / "refs.txt", RAW_REFS)
    assert results.find_references(noisy / "data-bin", other).path == other
    short = results.References(_write(tmp_path / "short.en", RAW_REFS[:3]))
    with pytest.raises(ValueError, match="have 3 lines but the test set has 20 sentences"):
        results.score_run(HYPS, TOK_REFS, short)


def test_p_values_are_sacrebleus_paired_bootstrap(tmp_path):
    for name, hyps in (("base", HYPS), ("run", OTHER), ("same", HYPS)):
        _write(tmp_path / name / "test" / "generate-test.txt",
               [line for i, (h, t) in enumerate(zip(hyps, TOK_REFS)) for line in (f"T-{i}\t{t}", f"H-{i}\t-1.0\t{h}")])
    refs = results.References(_write(tmp_path / "test.en", RAW_REFS))
    p_bleu, p_chrf = results.paired_p_values(tmp_path / "base", tmp_path / "run", refs)
    _, scores = PairedTest([("b", _detok(HYPS)), ("s", _detok(OTHER))], {"BLEU": BLEU(), "chrF": CHRF()},
                           references=[RAW_REFS], test_type="bs", n_samples=1000)()
    assert (p_bleu, p_chrf) == (scores["BLEU"][1].p_value, scores["chrF2"][1].p_value)
    assert results.paired_p_values(tmp_path / "base", tmp_path / "same", refs) == (1.0, 1.0)
    rows = [{"data": "d", "method": m, "seed": "1", "run_dir": str(tmp_path / d), "p_bleu": "", "p_chrf": ""}
            for m, d in (("baseline", "base"), ("run", "run"))]
    results.add_p_values(rows, {"d": refs})
    assert rows[0]["p_bleu"] == "" and rows[1]["p_bleu"] == f"{p_bleu:.4f}" and rows[1]["p_chrf"] == f"{p_chrf:.4f}"


def _row(method, seed, bleu, p="0.001", ci="0.80"):
    return {"data": "noisy", "method": method, "seed": str(seed), "sacrebleu": str(bleu), "sacrebleu_ci95": ci,
            "chrf": "30", "chrf_ci95": "0.5", "tokenized_bleu": str(bleu), "p_bleu": p if method != "baseline" else "",
            "p_chrf": "0.02" if method != "baseline" else "", "noise_auc": "", "sec_per_update": "0.1",
            "run_dir": f"{method}{seed}", "references": "/x/raw/test.en", "lowercased": "0"}


def _cells(lines, method):
    return [c.strip() for c in next(line for line in lines if line.startswith(f"| {method} |")).split("|")][1:-1]


def test_a_pilot_is_compared_with_the_runs_of_its_own_seeds():
    bleu = {"baseline": [10, 12, 14], "oracle": [11, 13, 16], "pilot": [None, None, 15]}
    rows = [_row(m, seed, v) for m, values in bleu.items() for seed, v in enumerate(values, 1) if v is not None]
    lines = results.condition_table(rows, "noisy", list(bleu))
    assert lines[2].startswith("| method | seeds | sacreBLEU | chrF | BLEU (tok.) | Δ sacreBLEU | p (BLEU) | p (chrF) |")
    pilot = _cells(lines, "pilot")
    # seed 3's baseline 14 and oracle 16, not the means 12 / 13.33; one seed: the score (± its CI)
    assert pilot[2] == "15.00 (± 0.80)" and pilot[5:9] == ["+1.00", "0.001", "0.020", "50%"]
    oracle = _cells(lines, "oracle")
    assert oracle[2] == "13.33 ± 2.52" and oracle[6:8] == ["0.001 0.001 0.001", "0.020 0.020 0.020"]


def test_the_oracle_gap_needs_a_significant_oracle_gain_on_every_seed(tmp_path):
    rows = [_row("baseline", 1, 10), _row("baseline", 2, 12), _row("oracle", 1, 11), _row("oracle", 2, 13, p="0.2"),
            _row("deep", 1, 10.5), _row("deep", 2, 12.5)]
    notes = []
    assert _cells(results.condition_table(rows, "noisy", ["baseline", "oracle", "deep"], notes), "deep")[8] == "–"
    assert notes == ["noisy: oracle gap closed not shown for deep: the oracle's gain over the baseline is not "
                     "significant (seed 2: oracle − baseline +1.00 sacreBLEU, p = 0.200)."]
    rows[3]["p_bleu"] = "0.01"
    assert _cells(results.condition_table(rows, "noisy", ["baseline", "oracle", "deep"]), "deep")[8] == "50%"
    text = results.write_tables(rows, tmp_path, ["noisy"], ["baseline", "oracle", "deep"], "note")
    assert "noisy: references /x/raw/test.en (raw: untokenized, original case)." in text
    assert "p (BLEU), p (chrF): sacrebleu's paired bootstrap (1000 resamples)" in text


def test_comet_is_skipped_with_one_line_when_its_model_cannot_load(monkeypatch, capsys):
    import types

    fake = types.ModuleType("comet")

    def no_model(name):
        raise OSError(f"cannot download {name}")

    fake.download_model, fake.load_from_checkpoint = no_model, None
    monkeypatch.setitem(sys.modules, "comet", fake)
    monkeypatch.setattr(results, "comet_available", lambda: True)
    monkeypatch.setattr(results, "_comet", {})
    fields = results.score_run(HYPS, TOK_REFS, results.References(None), sources=["Quelle"] * len(HYPS))
    fields = results.score_run(HYPS, TOK_REFS, results.References(None), sources=["Quelle"] * len(HYPS))
    assert "comet" not in fields
    assert capsys.readouterr().err.count("COMET skipped: could not load") == 1


def test_prepare_iwslt14_keeps_the_raw_valid_and_test_text(tmp_path):
    """raw/{valid,test} are the extracted pairs behind tok/{valid,test}: tokenized and lowercased, they are
    those files line for line."""
    from sacremoses import MosesTokenizer

    prep = os.path.join(REPO, "data_prep")
    env = dict(os.environ, PYTHON=sys.executable)
    for cmd in (["make_synthetic_corpus.py", tmp_path / "corpus", "--train", 300, "--valid", 5, "--test", 20],
                ["make_iwslt_like_archive.py", tmp_path / "corpus", tmp_path / "de-en.tgz", "--talk-size", 30,
                 "--bad-pairs", 2]):
        subprocess.run([sys.executable, os.path.join(prep, cmd[0])] + [str(a) for a in cmd[1:]], check=True,
                       capture_output=True, env=env)
    out = tmp_path / "iwslt"
    subprocess.run(["bash", os.path.join(prep, "prepare_iwslt14.sh"), "--archive", str(tmp_path / "de-en.tgz"),
                    "--bpe-merges", "50", "--workers", "1", str(out)], check=True, capture_output=True, env=env)
    assert "raw=raw/{valid,test}.{de,en}" in (out / "prep.settings").read_text()
    assert (out / "raw" / "test.en").read_text() == (tmp_path / "corpus" / "test.en").read_text()
    for lang in ("de", "en"):
        tok = MosesTokenizer(lang=lang)
        for split in ("valid", "test"):
            raw = results.read_lines(out / "raw" / f"{split}.{lang}")
            assert len(raw) > 5 and any(c.isupper() for line in raw for c in line)
            assert [tok.tokenize(line.strip(), escape=True, return_str=True).lower() for line in raw] == \
                results.read_lines(out / "tok" / f"{split}.{lang}")


def test_training_figures_leave_out_an_epoch_fairseq_could_not_time(tmp_path):
    log = tmp_path / "train.log"
    log.write_text(
        "x | INFO | train_inner | epoch 001: 1 / 1 loss=1, noise_auc=0.61, ups=0, num_updates=1\n"
        "x | INFO | train | epoch 001 | loss 7.9 | wps 0 | ups 0 | wpb 819 | num_updates 1 | lr 1e-05\n"
        "x | INFO | train | epoch 002 | loss 7.8 | noise_auc 0.75 | ups 5.0 | wpb 819 | num_updates 11 | lr 1e-05\n"
        "x | INFO | train | epoch 003 | loss 7.7 | ups 2.5 | wpb 819 | num_updates 16 | lr 1e-05\n")
    seconds, auc = results_io.training_figures(log)
    assert seconds == pytest.approx((10 / 5.0 + 5 / 2.5) / 15) and auc == 0.75
