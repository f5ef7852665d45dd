"""examples/crawl_noise/run.sh end to end on a tiny corpus: the noise kinds, one pretraining shared by
every kind, the Adam fine-tunes and the table."""
import csv
import os
import subprocess
import sys

import torch
from conftest import REPO, write_parallel_corpus


def test_one_student_serves_every_kind_and_every_fine_tune_uses_adam(tmp_path):
    corpus = write_parallel_corpus(str(tmp_path / "corpus"), n_train=120, n_valid=20, n_test=20)
    out = tmp_path / "out"
    cmd = ["bash", f"{REPO}/examples/crawl_noise/run.sh", "--corpus", corpus, "--out", str(out), "--seeds", "1",
           "--kinds", "misaligned untranslated", "--methods", "pretrained baseline oracle filter-dcce", "--pretrain-updates", "6",
           "--finetune-updates", "3"]
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(out / "table" / "results.csv") as fh:
        rows = {(r["data"], r["method"]): r for r in csv.DictReader(fh)}
    kinds = ("misaligned", "untranslated")
    assert sorted(rows) == [(k, m) for k in kinds for m in ("baseline", "filter-dcce", "oracle", "pretrained")]
    # the kinds' noisy training sets differ, their student is one file, pretrained on the mix (made for it
    # although not in --kinds): the same pretrained row
    assert (out / "data/untranslated-p03/tok/train.en").read_text() != (out / "data/misaligned-p03/tok/train.en").read_text()
    assert (out / "data/mix-p03/data-bin/train.noise").exists()
    inodes = {os.stat(out / "table" / f"{k}-pretrain-seed1" / "checkpoint_best.pt").st_ino for k in kinds}
    assert inodes == {os.stat(out / "pretrain-mix" / "checkpoint_last.pt").st_ino}
    assert rows[("untranslated", "pretrained")]["sacrebleu"] == rows[("misaligned", "pretrained")]["sacrebleu"]
    for kind in kinds:
        for method in ("baseline", "oracle"):
            command = rows[(kind, method)]["command"]
            assert "--optimizer reweight_adam" in command and "--max-update 3" in command
    assert (out / "pretrain-mix" / "done-6").exists()
    # filter-dcce's reverse model: pretrained once, en->de, and shared by the kinds like the student
    reverse = out / "pretrain-mix-reverse" / "checkpoint_last.pt"
    assert {os.stat(out / "table" / f"{k}-pretrain-reverse-seed1" / "checkpoint_best.pt").st_ino for k in kinds} == {
        os.stat(reverse).st_ino}
    assert (out / "pretrain-mix-reverse" / "done-6").exists()
    task = torch.load(reverse, map_location="cpu", weights_only=False)["cfg"]["task"]
    assert (task["source_lang"], task["target_lang"]) == ("en", "de")
    for kind in kinds:
        assert "--reweight-pair-weights" in rows[(kind, "filter-dcce")]["command"]
    assert "num_updates 6 |" in result.stdout + result.stderr  # the pretraining ran to --pretrain-updates
