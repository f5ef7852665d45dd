"""The experiment pipeline end to end at the smallest size: synthetic corpus -> data_prep (clean
and masked noise) -> examples/run_experiment.py (pretrain, baseline / oracle / teacher fine-tunes,
generation, BLEU, chrF, significance)."""
import csv
import os
import subprocess
import sys

from conftest import REPO


def _run(cmd, **kwargs):
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=REPO,
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, **kwargs)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout


def test_pipeline_micro(tmp_path):
    corpus, clean, noisy, out = (tmp_path / n for n in ("corpus", "clean", "noisy", "experiment"))
    _run([sys.executable, f"{REPO}/data_prep/make_synthetic_corpus.py", str(corpus),
          "--train", "400", "--valid", "40", "--test", "30"])
    _run(["bash", f"{REPO}/data_prep/prepare_parallel.sh", "--bpe-merges", "300", str(corpus), str(clean)])
    _run(["bash", f"{REPO}/data_prep/make_noisy_iwslt.sh", "-p", "0.3", str(clean), str(noisy)])
    cmd = [sys.executable, f"{REPO}/examples/run_experiment.py", "--preset", "micro", "--out", str(out),
           "--data", f"noisy={noisy}/data-bin"]
    stdout = _run(cmd)
    assert "| method | seeds | BLEU (tok.) | sacreBLEU | chrF |" in stdout
    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["method"] for r in rows] == ["baseline", "oracle", "surface", "deep", "robust"]
    for row in rows:
        assert 0.0 <= float(row["tokenized_bleu"]) <= 100.0 and 0.0 <= float(row["chrf"]) <= 100.0
        assert row["bleu_signature"].startswith("nrefs:1|case:lc") and row["chrf_signature"].startswith("nrefs:1")
        assert float(row["sec_per_update"]) > 0 and "fairseq-train" in row["command"]
    oracle = next(r for r in rows if r["method"] == "oracle")
    assert float(oracle["noise_auc"]) == 1.0 and "--reweight-teacher oracle" in oracle["command"]
    assert "--reweight-preset robust" in rows[-1]["command"]
    oracle_line = next(line for line in stdout.splitlines() if line.startswith("| oracle |"))
    assert oracle_line.count("|") == 11  # the ten columns, p-value included
    # every generated test set is complete (no ragged last batch dropped)
    hyps = (out / "noisy-deep-seed1" / "test" / "generate-test.txt").read_text().count("\nH-")
    assert hyps == 30
    # a second run finds every step done and only rescores; results.csv keeps the first run's rows
    again = _run(cmd[:-2] + ["--data", f"noisy={noisy}/data-bin", "--methods", "baseline"])
    assert "fine-tuned model found" in again
    assert "[experiment] $ " not in again  # no fairseq command ran
    with open(out / "results.csv") as fh:
        assert [r["method"] for r in csv.DictReader(fh)] == ["baseline", "oracle", "surface", "deep", "robust"]
    # the methods during Adam pretraining (--optimizer reweight_adam), same data
    stdout = _run(cmd[:-4] + ["--out", str(tmp_path / "pretrain"), "--data", f"noisy={noisy}/data-bin",
                              "--reweight-phase", "pretrain", "--methods", "baseline", "oracle", "deep"])
    assert "Adam pretraining from scratch" in stdout
    with open(tmp_path / "pretrain" / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["method"] for r in rows] == ["baseline", "oracle", "deep"]
    assert all("--optimizer reweight_adam" in r["command"] and "--restore-file" not in r["command"] for r in rows)
    assert float(rows[1]["noise_auc"]) == 1.0


def test_a_pilot_is_compared_with_the_runs_of_its_own_seeds(monkeypatch):
    sys.path.insert(0, os.path.join(REPO, "examples"))
    import results

    monkeypatch.setattr(results, "paired_p_values", lambda base, run: (0.5,))
    bleu = {"baseline": [10, 12, 14], "oracle": [11, 13, 16], "pilot": [None, None, 15]}
    rows = [{"data": "noisy", "method": m, "seed": str(seed), "tokenized_bleu": str(v), "sacrebleu": str(v),
             "chrf": "30", "noise_auc": "", "sec_per_update": "0.1", "run_dir": f"{m}{seed}"}
            for m, values in bleu.items() for seed, v in enumerate(values, 1) if v is not None]
    line = next(row for row in results.condition_table(rows, "noisy", list(bleu)) if row.startswith("| pilot |"))
    cells = [c.strip() for c in line.split("|")]
    assert cells[6:9] == ["+1.00", "0.500", "50%"]  # seed 3's baseline 14 and oracle 16, not the means 12 / 13.33
