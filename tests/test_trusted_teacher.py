"""The ``trusted`` preset end to end: a teacher on the target token and the pair's excess loss over a
reference's (``--reweight-reference-losses`` from ``fairseq-reweight-score``), and the trained teacher
as a filter (``fairseq-reweight-score --teacher``)."""
import csv
import re
import sys

import numpy as np
import pytest
import torch

from conftest import REPO
from fairseq_helpers import PLAIN_PRETRAIN, REWEIGHT, TINY_TRANSFORMER, run_script, run_train
from fairseq_reweight.cli import score_pairs
from fairseq_reweight.cli.inspect_teacher import load_teacher_checkpoint
from fairseq_reweight.core.errors import ReweightConfigError

N_TRAIN = 300  # conftest's tiny corpus
FINETUNE = TINY_TRANSFORMER + REWEIGHT + ["--lr", "0.05", "--momentum", "0.9", "--label-smoothing", "0.1",
                                          "--max-update", "6", "--no-epoch-checkpoints", "--reweight-interval", "2"]


@pytest.fixture(scope="module")
def trained(tiny_data_bin, tmp_path_factory):
    """A pretrained student, a reference (the student fine-tuned on the valid split), the reference's
    losses of the training pairs, and the student fine-tuned with --reweight-preset trusted."""
    root = tmp_path_factory.mktemp("trusted")
    run_train(tiny_data_bin, str(root / "student"), TINY_TRANSFORMER + PLAIN_PRETRAIN)
    student = str(root / "student" / "checkpoint_last.pt")
    run_train(tiny_data_bin, str(root / "reference"), TINY_TRANSFORMER + PLAIN_PRETRAIN + [
        "--restore-file", student, "--reset-optimizer", "--reset-dataloader", "--reset-meters",
        "--train-subset", "valid", "--disable-validation", "--max-update", "8"])
    losses = root / "reference.txt"
    score_pairs.main([tiny_data_bin, "--path", str(root / "reference" / "checkpoint_last.pt"), "--output",
                      str(losses), "--cpu", "--max-tokens", "300"])
    stats = run_train(tiny_data_bin, str(root / "trusted"), FINETUNE + [
        "--restore-file", student, "--reset-optimizer", "--reset-dataloader", "--reset-meters",
        "--reweight-preset", "trusted", "--reweight-reference-losses", str(losses)])
    return {"losses": losses, "checkpoint": str(root / "trusted" / "checkpoint_last.pt"), "stats": stats}


def test_the_teacher_learns_from_the_excess_loss(trained):
    state = torch.load(trained["checkpoint"], map_location="cpu", weights_only=False)
    assert state["cfg"]["task"]["reweight_preset"] == "trusted"  # the preset is applied again when it is loaded
    # a linear teacher on one input, the excess loss, without a label embedding: its coefficient started at
    # --teacher-excess-init's 1 (the preset's) and the hypergradient moved it
    teacher = {k.rsplit("teacher.", 1)[1]: v for k, v in state["criterion"].items() if ".teacher." in k}
    assert sorted(teacher) == ["bias", "feature_proj.weight"]
    assert teacher["feature_proj.weight"].shape == (1, 1) and teacher["feature_proj.weight"].item() != 1.0
    assert any("teacher_gnorm" in s for s in trained["stats"])


def test_teacher_scores_are_its_mean_weight_of_each_pair(tiny_data_bin, trained, tmp_path):
    out = tmp_path / "teacher.txt"
    figures = score_pairs.main([tiny_data_bin, "--path", trained["checkpoint"], "--teacher", "--output", str(out),
                                "--cpu", "--max-tokens", "300"])
    scores = np.array([float(x) for x in out.read_text().split()])
    assert len(scores) == N_TRAIN and figures["kind"] == "teacher" and not figures["higher_is_worse"]
    # recomputed pair by pair: the teacher's raw weights of the pair alone, student in eval mode
    loaded = load_teacher_checkpoint(trained["checkpoint"], tiny_data_bin, use_cuda=False)
    dataset = score_pairs.load_split(loaded.task, "train", tiny_data_bin)
    reference = np.loadtxt(trained["losses"])
    coefficient = float(loaded.driver.weigher.teacher.feature_proj.weight)
    for i in (0, 7, 123, 299):
        sample = dataset.collater([dataset[i]])
        with torch.no_grad():
            net_output = loaded.model(**sample["net_input"])
            lprobs = loaded.model.get_normalized_probs(net_output, log_probs=True)
            target = sample["target"][0]
            nll = -lprobs[0].gather(-1, target.unsqueeze(-1)).squeeze(-1)
            excess = nll.mean().item() - reference[i]
            logits = loaded.driver.weigher.teacher.bias + coefficient * excess
        assert scores[i] == pytest.approx(torch.sigmoid(logits).item(), abs=1e-5)


def test_trusted_without_its_pair_files_is_a_one_line_error(tiny_data_bin, tmp_path):
    with pytest.raises(ReweightConfigError, match="--teacher-features excess needs --reweight-reference-losses"):
        run_train(tiny_data_bin, str(tmp_path / "x"), FINETUNE + ["--reweight-preset", "trusted"])
    with pytest.raises(ReweightConfigError, match="--teacher-excess-init .* needs --teacher-features with excess"):
        run_train(tiny_data_bin, str(tmp_path / "y"), FINETUNE + ["--reweight-preset", "robust",
                                                                  "--teacher-excess-init", "1"])
    with pytest.raises(ReweightConfigError, match="--teacher-features pair-score needs --reweight-pair-scores"):
        run_train(tiny_data_bin, str(tmp_path / "z"), FINETUNE + ["--teacher-features", "label,pair-score"])
    with pytest.raises(ReweightConfigError, match="--teacher-pair-score-init .* needs --teacher-features with pair-score"):
        run_train(tiny_data_bin, str(tmp_path / "w"), FINETUNE + ["--reweight-preset", "robust",
                                                                  "--teacher-pair-score-init", "-1"])
    with pytest.raises(ReweightConfigError, match="not several"):
        score_pairs.main([tiny_data_bin, "--path", "x.pt", "--teacher", "--reference-path", "y.pt"])


def test_trusted_and_teacher_filter_methods_end_to_end(noisy_data_bin, tmp_path, capsys):
    out = tmp_path / "experiment"
    stdout = run_script([sys.executable, f"{REPO}/examples/run_experiment.py", "--preset", "micro", "--out", str(out),
                         "--data", f"noisy={noisy_data_bin}", "--methods", "trusted", "teacher-filter"])
    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["method"] for r in rows] == ["trusted", "teacher-filter"]
    scores_dir = out / "noisy-filter-scores-seed1"
    # the reference losses are the reference's cross-entropy of every training pair, as the score command gives
    direct = tmp_path / "direct.txt"
    score_pairs.main([noisy_data_bin, "--path", str(out / "noisy-reference-seed1" / "checkpoint_last.pt"), "--output",
                      str(direct), "--cpu", "--max-tokens", "1024"])
    assert (scores_dir / "reference.txt").read_text() == direct.read_text()
    assert f"--reweight-preset trusted --reweight-reference-losses {scores_dir / 'reference.txt'}" in rows[0]["command"]
    # teacher-filter: the trusted run's teacher (trained once, reused) scores the pairs; the worst 20 % dropped
    assert stdout.count("noisy-trusted-seed1: fine-tuning") == 1
    teacher = np.loadtxt(scores_dir / "teacher-noisy-trusted-seed1.txt")
    weights = np.loadtxt(scores_dir / "teacher-filter-noisy-trusted-seed1.weights")
    noisy = np.loadtxt(f"{noisy_data_bin}/train.noise")
    assert len(teacher) == len(weights) == len(noisy) and weights.sum() == len(noisy) - round(0.2 * len(noisy))
    assert teacher[weights == 0].max() <= teacher[weights == 1].min()
    assert float(rows[1]["noise_auc"]) == pytest.approx(score_pairs.noise_auc(teacher, noisy, False), abs=1e-4)
    # the trusted row's noise AUC is its final teacher's, from the same scores
    assert float(rows[0]["noise_auc"]) == round(score_pairs.noise_auc(teacher, noisy, False), 4)
    # compare_methods: trusted against teacher-filter, the Δ of their sacreBLEU and the p of the paired test
    import compare_methods
    import results

    compare_methods.main(["--out", str(out), "--data", f"noisy={noisy_data_bin}", "--method", "trusted"])
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("| noisy | teacher-filter |")]
    p_bleu, p_chrf = results.paired_p_values(rows[1]["run_dir"], rows[0]["run_dir"], results.find_references(noisy_data_bin))
    delta = float(rows[0]["sacrebleu"]) - float(rows[1]["sacrebleu"])
    assert line == [f"| noisy | teacher-filter | 1 | {delta:+.2f} | {delta:+.2f} | {p_bleu:.3f} | {p_chrf:.3f} | "
                    f"{int(delta > 0 and p_bleu < 0.05)} / {int(delta < 0 and p_bleu < 0.05)} of 1 |"]


def test_adam_finetune_runs_every_fine_tune_and_the_reference_with_adam(noisy_data_bin, tmp_path):
    out = tmp_path / "experiment"
    run_script([sys.executable, f"{REPO}/examples/run_experiment.py", "--preset", "micro", "--out", str(out),
                "--data", f"noisy={noisy_data_bin}", "--finetune-optimizer", "adam", "--finetune-args=--lr=1e-3",
                "--methods", "baseline", "trusted"])
    with open(out / "results.csv") as fh:
        rows = {r["method"]: r for r in csv.DictReader(fh)}
    assert sorted(rows) == ["baseline", "trusted"]
    for method in ("baseline", "trusted"):
        assert "--optimizer reweight_adam --reweight-history checkpoint" in rows[method]["command"]
        assert rows[method]["command"].endswith("--lr=1e-3")
    # the reference the teacher reads was fine-tuned with the same Adam, and the teacher met Adam's replay:
    # its meta-updates ran and moved the excess coefficient from the preset's start
    for run in ("reference", "trusted"):
        log = (out / "logs" / f"noisy-{run}-seed1.log").read_text()
        assert "'optimizer': {'_name': 'reweight_adam'" in log and "'lr': [0.001]" in log
    assert re.search(r"teacher_gnorm[ =]", (out / "logs" / "noisy-trusted-seed1.log").read_text())
    state = torch.load(out / "noisy-trusted-seed1" / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert state["criterion"]["reweight.weigher.teacher.feature_proj.weight"].item() != 1.0
