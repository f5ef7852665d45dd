"""The experiment pipeline end to end at the smallest size: synthetic corpus -> data_prep (clean
and masked noise) -> examples/run_experiment.py (pretrain, three fine-tunes, generation, BLEU)."""
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
    assert "| method | noisy |" in stdout
    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["method"] for r in rows] == ["baseline", "surface", "deep"]
    for row in rows:
        assert 0.0 <= float(row["tokenized_bleu"]) <= 100.0
        assert row["signature"].startswith("nrefs:1|case:lc")
    # every generated test set is complete (no ragged last batch dropped)
    hyps = (out / "noisy-deep-seed1" / "test" / "generate-test.txt").read_text().count("\nH-")
    assert hyps == 30
    # a second run finds every step done and only rescores
    again = _run(cmd)
    assert "fine-tuned model found" in again
    assert "[experiment] $ " not in again  # no fairseq command ran
