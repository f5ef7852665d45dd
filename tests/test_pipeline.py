"""The experiment pipeline end to end at the smallest size: synthetic corpus -> data_prep (clean,
keeping the raw references, and masked noise) -> examples/run_experiment.py (pretrain, baseline /
oracle / teacher fine-tunes, generation, scores against the raw references, CIs, significance,
progress lines). The scores are checked against sacrebleu run here on the same files."""
import csv
import os
import re
import shutil
import subprocess
import sys

import pytest
import sacrebleu
from sacrebleu.metrics import BLEU, CHRF
from sacrebleu.significance import PairedTest

from conftest import REPO

PROGRESS = re.compile(r"^\[experiment\] \[(\d+)/(\d+)\] (\S+): (.+) \(elapsed (?:\d+h\d\dm|\d+m\d\ds|\d+s), (\d+) runs? left\)$")


def _run(cmd, **kwargs):
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=REPO,
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, **kwargs)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout


def _lines(path):
    return path.read_text(encoding="utf-8").splitlines()


def _detokenized_hypotheses(run_dir):
    """The H- lines of fairseq-generate's output, in corpus order, Moses-detokenized."""
    from sacremoses import MosesDetokenizer

    hyps = {}
    for line in _lines(run_dir / "test" / "generate-test.txt"):
        if line.startswith("H-"):
            index, _, text = line[2:].split("\t")
            hyps[int(index)] = text
    detok = MosesDetokenizer(lang="en")
    return [detok.detokenize(hyps[i].split()) for i in sorted(hyps)]


def _seconds_per_update(log_file):
    """A fairseq-train log's training time per update: each epoch summary's new updates over its ups."""
    seconds = updates = 0
    for line in _lines(log_file):
        if "| train | epoch" in line:
            total = int(re.search(r"\| num_updates (\d+)", line).group(1))
            seconds += (total - updates) / float(re.search(r"\| ups ([0-9.]+)", line).group(1))
            updates = total
    return seconds / updates


def _csv(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_pipeline_micro(tmp_path):
    corpus, clean, noisy, out = (tmp_path / n for n in ("corpus", "clean", "noisy", "experiment"))
    _run([sys.executable, f"{REPO}/data_prep/make_synthetic_corpus.py", str(corpus),
          "--train", "400", "--valid", "40", "--test", "30"])
    _run(["bash", f"{REPO}/data_prep/prepare_parallel.sh", "--bpe-merges", "300", str(corpus), str(clean)])
    for split in ("valid", "test"):  # the raw references: the input text, original case
        assert (clean / "raw" / f"{split}.en").read_bytes() == (corpus / f"{split}.en").read_bytes()
    raw = _lines(clean / "raw" / "test.en")
    assert any(c.isupper() for line in raw for c in line)
    _run(["bash", f"{REPO}/data_prep/make_noisy_iwslt.sh", "-p", "0.3", str(clean), str(noisy)])
    cmd = [sys.executable, f"{REPO}/examples/run_experiment.py", "--preset", "micro", "--out", str(out),
           "--data", f"noisy={noisy}/data-bin"]
    stdout = _run(cmd + ["--methods", "baseline", "oracle", "deep"])

    # progress: the runs ahead first, then one line per stage with the runs left
    runs = ["noisy-pretrain-seed1", "noisy-baseline-seed1", "noisy-oracle-seed1", "noisy-deep-seed1"]
    assert f"[experiment] 4 runs: {', '.join(runs)}" in stdout
    stages = [PROGRESS.match(line).groups() for line in stdout.splitlines() if PROGRESS.match(line)]
    assert [(name, what) for _, _, name, what, _ in stages] == [("noisy-pretrain-seed1", "pretraining …")] + [
        (run, what) for run in runs[1:]
        for what in ("fine-tuning …", "translating the test set …", "scoring …")] + [
        ("noisy-deep-seed1", "scoring the training pairs (teacher) …")]  # its final teacher's noise AUC
    assert all(total == "4" and int(left) == 4 - int(i) and runs[int(i) - 1] == name
               for i, total, name, _, left in stages)
    assert stdout.index("[1/4] noisy-pretrain-seed1: pretraining") < stdout.index("$ ") < stdout.index(
        "[2/4] noisy-baseline-seed1: fine-tuning")
    assert "| train | epoch" not in stdout and "| train | epoch" in (out / "logs" / "noisy-deep-seed1.log").read_text()

    rows = _csv(out / "results.csv")
    assert [r["method"] for r in rows] == ["baseline", "oracle", "deep"]
    hyps = {}
    for row in rows:
        hyps[row["method"]] = h = _detokenized_hypotheses(out / f"noisy-{row['method']}-seed1")
        assert len(h) == 30  # complete (no ragged last batch dropped)
        # sacrebleu's defaults on the detokenized hypotheses against the raw references file
        bleu = BLEU().corpus_score(h, [raw], n_bootstrap=1000)
        chrf = CHRF().corpus_score(h, [raw], n_bootstrap=1000)
        assert float(row["sacrebleu"]) == round(sacrebleu.corpus_bleu(h, [raw]).score, 2) == round(bleu.score, 2)
        assert float(row["chrf"]) == round(chrf.score, 2)
        assert float(row["sacrebleu_ci95"]) == round(bleu._ci, 2) and float(row["chrf_ci95"]) == round(chrf._ci, 2)
        assert row["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp")
        assert row["chrf_signature"].startswith("nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no")
        # the data is lowercased (prep.settings of the clean directory): the case-insensitive score too
        assert row["lowercased"] == "1" and row["bleu_lc_signature"].startswith("nrefs:1|case:lc|")
        assert float(row["sacrebleu_lc"]) == round(sacrebleu.corpus_bleu(h, [raw], lowercase=True).score, 2)
        assert row["references"] == str((clean / "raw" / "test.en").resolve())
        # the time per update of the method's own fine-tune, from its log (4 decimals)
        sec = _seconds_per_update(out / "logs" / f"noisy-{row['method']}-seed1.log")
        assert float(row["sec_per_update"]) == pytest.approx(sec, rel=0, abs=5e-5) and "fairseq-train" in row["command"]
    assert rows[0]["p_bleu"] == rows[0]["p_chrf"] == ""
    for row in rows[1:]:  # sacrebleu's paired bootstrap against the baseline of the same seed
        if hyps[row["method"]] == hyps["baseline"]:
            assert row["p_bleu"] == row["p_chrf"] == "1.0000"
            continue
        _, scores = PairedTest([("baseline", hyps["baseline"]), (row["method"], hyps[row["method"]])],
                               {"BLEU": BLEU(), "chrF": CHRF()}, references=[raw], test_type="bs", n_samples=1000)()
        assert row["p_bleu"] == f"{scores['BLEU'][1].p_value:.4f}" and row["p_chrf"] == f"{scores['chrF2'][1].p_value:.4f}"
    oracle = rows[1]
    assert float(oracle["noise_auc"]) == 1.0 and "--reweight-teacher oracle" in oracle["command"]
    # a learned teacher's noise AUC is its final weights' over the whole training split (score --teacher)
    from fairseq_reweight.cli.score_pairs import noise_auc

    teacher = [float(x) for x in _lines(out / "noisy-filter-scores-seed1" / "teacher-noisy-deep-seed1.txt")]
    sidecar = [int(x) for x in _lines(noisy / "data-bin" / "train.noise")]
    assert len(teacher) == len(sidecar) == 400
    assert float(rows[2]["noise_auc"]) == round(noise_auc(teacher, sidecar, higher_is_worse=False), 4)

    header = "| method | seeds | sacreBLEU | chrF | BLEU (tok.) | sacreBLEU (lc) | Δ sacreBLEU | p (BLEU) | p (chrF) |"
    assert header in stdout
    deep = [c.strip() for c in next(line for line in stdout.splitlines() if line.startswith("| deep |")).split("|")]
    assert deep[3] == f"{float(rows[2]['sacrebleu']):.2f} (± {float(rows[2]['sacrebleu_ci95']):.2f})"
    assert deep[9] == f"{float(rows[2]['p_chrf']):.3f}"
    significant = float(oracle["p_bleu"]) < 0.05 and float(oracle["sacrebleu"]) > float(rows[0]["sacrebleu"])
    assert (deep[10] == "–") == (not significant)  # the oracle gap closed
    assert (deep[10] == "–") == ("oracle gap closed not shown for deep" in stdout)
    assert deep[11] == f"{float(rows[2]['noise_auc']):.3f}"  # the noise AUC
    assert deep[13] == f"{float(rows[2]['len_ratio']):.3f}" and 0 < float(rows[2]["len_ratio"])  # length ratio
    assert f"noisy: references {(clean / 'raw' / 'test.en').resolve()} (raw" in stdout
    assert "noisy: the data was lowercased by data_prep" in stdout and "not comparable" not in stdout
    assert (out / "results.md").read_text() in stdout

    first = [r["sacrebleu"] for r in rows]
    # a second run finds every step done and only rescores, here against references given by hand;
    # results.csv keeps the first run's rows
    again = _run(cmd + ["--methods", "baseline", "--raw-references", f"noisy={corpus}/test.en"])
    assert "[experiment]   [2/2] noisy-baseline-seed1 (baseline fine-tune, done: rescored only)" in again
    assert "fine-tuned model found" in again and "[experiment] $ " not in again  # no fairseq command ran
    rows = _csv(out / "results.csv")
    assert [r["method"] for r in rows] == ["baseline", "oracle", "deep"]
    assert rows[0]["references"] == str(corpus / "test.en")
    assert [r["sacrebleu"] for r in rows] == first  # the same text as the clean directory's raw/test.en

    # the pretrained student without a fine-tune: one translation of the pretraining's checkpoint
    stdout = _run(cmd + ["--methods", "pretrained"])
    assert "[1/2] noisy-pretrain-seed1 (pretraining, done)" in stdout
    assert "[2/2] noisy-pretrained-seed1 (the pretrained student's translation)" in stdout
    generate = (out / "noisy-pretrained-seed1" / "test" / "generate.log").read_text()
    assert "noisy-pretrain-seed1/checkpoint_best.pt" in generate
    row = next(r for r in _csv(out / "results.csv") if r["method"] == "pretrained")
    h = _detokenized_hypotheses(out / "noisy-pretrained-seed1")
    assert float(row["sacrebleu"]) == round(sacrebleu.corpus_bleu(h, [raw]).score, 2)
    assert row["sec_per_update"] == "nan" and "no fine-tune" in row["command"]

    # the methods during Adam pretraining (--optimizer reweight_adam), on a copy of the data-bin that has
    # no raw references beside it: the scores fall back to the detokenized references, and say so
    shutil.copytree(noisy / "data-bin", tmp_path / "bare" / "data-bin")
    stdout = _run(cmd[:-4] + ["--out", str(tmp_path / "pretrain"), "--data", f"bare={tmp_path}/bare/data-bin",
                              "--reweight-phase", "pretrain", "--methods", "oracle"])
    assert "Adam pretraining from scratch" in stdout
    assert stdout.count("bare: no raw test references") == 1 and "bare: **not comparable with published" in stdout
    rows = _csv(tmp_path / "pretrain" / "results.csv")
    assert [r["method"] for r in rows] == ["oracle"] and rows[0]["references"] == "detokenized"
    assert "--optimizer reweight_adam" in rows[0]["command"] and "--restore-file" not in rows[0]["command"]
    assert float(rows[0]["noise_auc"]) == 1.0
