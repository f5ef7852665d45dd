"""The filtering baselines: ``fairseq-reweight-score`` (cross-entropy, dual conditional cross-entropy,
excess loss), ``--reweight-teacher pairs`` (fixed per-pair weights) and run_experiment's ``filter-ce``,
``filter-dcce`` and ``excess-loss`` methods end to end."""
import csv
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO
from fairseq_helpers import PLAIN_PRETRAIN, REWEIGHT, TINY_TRANSFORMER, inner_stats, run_script, run_train
from fairseq_reweight.cli import score_pairs
from fairseq_reweight.core.errors import ReweightConfigError
from fairseq_reweight.nmt.oracle import PairWeigher, read_pair_weights

N_TRAIN = 300  # conftest's tiny corpus
COMMON = TINY_TRANSFORMER + REWEIGHT + ["--lr", "0.05", "--momentum", "0.9", "--label-smoothing", "0.1",
                                        "--update-freq", "2", "--max-update", "6", "--no-epoch-checkpoints"]


@pytest.fixture(scope="module")
def models(tiny_data_bin, tmp_path_factory):
    """Three small de->en / en->de checkpoints on the tiny corpus: forward, another forward (seed 4), reverse."""
    root = tmp_path_factory.mktemp("filter_models")
    paths = {}
    for name, extra in (("forward", []), ("other", ["--seed", "4"]), ("reverse", ["--source-lang", "en",
                                                                              "--target-lang", "de"])):
        run_train(tiny_data_bin, str(root / name), TINY_TRANSFORMER + PLAIN_PRETRAIN + extra)
        paths[name] = str(root / name / "checkpoint_last.pt")
    return paths


def _score(data, out, *flags):
    figures = score_pairs.main([data, "--output", str(out), "--cpu", "--max-tokens", "300", *flags])
    lines = out.read_text().splitlines()
    assert len(lines) == N_TRAIN
    return np.array([float(x) for x in lines]), figures


def _direct_cross_entropy(data, path, ids):
    """Each pair alone through fairseq's own criterion (label smoothing 0): its summed NLL over its tokens."""
    from fairseq.criterions.label_smoothed_cross_entropy import LabelSmoothedCrossEntropyCriterion

    task, model = score_pairs.load_model(path, data, use_cuda=False, what="--path")
    dataset = score_pairs.load_split(task, "train", data)
    criterion = LabelSmoothedCrossEntropyCriterion(task, sentence_avg=False, label_smoothing=0.0)
    values = []
    with torch.no_grad():
        for i in ids:
            sample = dataset.collater([dataset[i]])
            _, _, logging_output = criterion(model, sample)
            values.append(float(logging_output["nll_loss"]) / sample["ntokens"])  # nats per token, eos included
    return np.array(values)


def test_cross_entropy_is_fairseqs_token_nll_in_corpus_order(tiny_data_bin, models, tmp_path):
    scores, _ = _score(tiny_data_bin, tmp_path / "ce.txt", "--path", models["forward"])
    ids = [0, 1, 57, 150, 299]
    # batched with padding vs one pair alone, float32: equal to round-off (and the file's 6 decimals)
    np.testing.assert_allclose(scores[ids], _direct_cross_entropy(tiny_data_bin, models["forward"], ids),
                               rtol=0, atol=2e-5)
    assert np.isfinite(scores).all() and scores.std() > 0


def test_dual_conditional_cross_entropy_and_excess_loss(tiny_data_bin, models, tmp_path):
    assert score_pairs.dual_conditional_cross_entropy([1.0, 2.0], [3.0, 2.0]).tolist() == [4.0, 2.0]
    h_f, _ = _score(tiny_data_bin, tmp_path / "f.txt", "--path", models["forward"])
    h_r, _ = _score(tiny_data_bin, tmp_path / "r.txt", "--path", models["reverse"])  # en->de on the same bin
    h_o, _ = _score(tiny_data_bin, tmp_path / "o.txt", "--path", models["other"])
    dcce, figures = _score(tiny_data_bin, tmp_path / "d.txt", "--path", models["forward"],
                           "--reverse-path", models["reverse"])
    assert figures["higher_is_worse"] and figures["kind"] == "dcce"
    np.testing.assert_allclose(dcce, np.abs(h_f - h_r) + 0.5 * (h_f + h_r), atol=2e-6)
    excess, figures = _score(tiny_data_bin, tmp_path / "e.txt", "--path", models["forward"],
                             "--reference-path", models["other"])
    assert not figures["higher_is_worse"]
    np.testing.assert_allclose(excess, h_f - h_o, atol=2e-6)


def test_noise_auc_is_reported_against_the_sidecar_only(tiny_data_bin, models, tmp_path):
    from sklearn.metrics import roc_auc_score

    noisy = np.zeros(N_TRAIN, dtype=int)
    noisy[::4] = 1
    (tmp_path / "t.noise").write_text("".join(f"{v}\n" for v in noisy))
    with_sidecar, figures = _score(tiny_data_bin, tmp_path / "a.txt", "--path", models["forward"],
                                   "--noise-sidecar", str(tmp_path / "t.noise"))
    without, _ = _score(tiny_data_bin, tmp_path / "b.txt", "--path", models["forward"])
    assert (with_sidecar == without).all()
    assert figures["noise_auc"] == pytest.approx(roc_auc_score(noisy, with_sidecar))
    # the excess loss is better when higher: its AUC counts low scores as the noisy side
    assert score_pairs.noise_auc([3.0, 1.0], [0, 1], higher_is_worse=False) == 1.0
    assert score_pairs.noise_auc([np.inf, 1.0], [1, 0]) == 1.0


def test_errors_are_one_line(tiny_data_bin, models, tmp_path):
    with pytest.raises(ReweightConfigError, match="--path checkpoint 'missing.pt' not found"):
        score_pairs.main([tiny_data_bin, "--path", "missing.pt"])
    with pytest.raises(ReweightConfigError, match="split 'nosuch' not found"):
        score_pairs.main([tiny_data_bin, "--path", models["forward"], "--subset", "nosuch", "--cpu"])
    with pytest.raises(ReweightConfigError, match="--reverse-path .* translates de->en, expected en->de"):
        score_pairs.main([tiny_data_bin, "--path", models["forward"], "--reverse-path", models["other"], "--cpu"])
    other_bin = tmp_path / "bin"
    shutil.copytree(tiny_data_bin, other_bin)
    for lang in ("de", "en"):
        with open(other_bin / f"dict.{lang}.txt", "a") as f:
            f.write("extra1 1\nextra2 1\n")
    with pytest.raises(ReweightConfigError, match="dictionary mismatch"):
        score_pairs.main([str(other_bin), "--path", models["forward"], "--cpu"])
    result = subprocess.run([sys.executable, "-m", "fairseq_reweight.cli.score_pairs", tiny_data_bin, "--path",
                             "missing.pt"], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, PYTHONPATH=REPO))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("fairseq-reweight: error: --path checkpoint")


# -- --reweight-teacher pairs -------------------------------------------------------------------------
def _lines(path, values):
    path.write_text("".join(f"{v}\n" for v in values))
    return str(path)


def _model(directory):
    return torch.load(directory / "checkpoint_last.pt")["model"]


def test_pairs_with_all_ones_is_the_baseline_bit_for_bit(tiny_data_bin, tmp_path):
    base = run_train(tiny_data_bin, str(tmp_path / "base"), COMMON + ["--reweight-teacher", "none"])
    pairs = run_train(tiny_data_bin, str(tmp_path / "pairs"), COMMON + [
        "--reweight-teacher", "pairs", "--reweight-pair-weights", _lines(tmp_path / "w", [1] * N_TRAIN)])
    # the updates are bit for bit; the logged loss may differ by float32 round-off in its last decimal, as
    # the weighted criterion sums per token what fairseq's sums per term (tests/test_oracle.py)
    assert [float(s["loss"]) for s in inner_stats(pairs)] == pytest.approx(
        [float(s["loss"]) for s in inner_stats(base)], rel=0, abs=1.5e-3)
    a, b = _model(tmp_path / "base"), _model(tmp_path / "pairs")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pairs_drop_exactly_the_listed_pairs(tiny_data_bin, tmp_path):
    """0/1 pair weights train exactly as the oracle whose sidecar marks the 0-weighted pairs noisy;
    a sidecar given with them is measured against (the metrics a teacher logs), not read for weights."""
    dropped = set(range(0, N_TRAIN, 3)) | {1, 2}
    sidecar = _lines(tmp_path / "t.noise", [int(i in dropped) for i in range(N_TRAIN)])
    oracle = run_train(tiny_data_bin, str(tmp_path / "oracle"), COMMON + [
        "--reweight-teacher", "oracle", "--reweight-noise-sidecar", sidecar])
    weights = _lines(tmp_path / "w", [int(i not in dropped) for i in range(N_TRAIN)])
    pairs = run_train(tiny_data_bin, str(tmp_path / "pairs"), COMMON + [
        "--reweight-teacher", "pairs", "--reweight-pair-weights", weights])
    assert [s["loss"] for s in inner_stats(oracle)] == [s["loss"] for s in inner_stats(pairs)]
    a, b = _model(tmp_path / "oracle"), _model(tmp_path / "pairs")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "noise_auc" not in inner_stats(pairs)[-1]  # no sidecar, no noise metrics
    # the same weights measured against a sidecar that marks only pairs 0 and 3 noisy (both dropped): of
    # the 298 clean pairs 100 are dropped too, ties that count half in the AUC
    measured = inner_stats(run_train(tiny_data_bin, str(tmp_path / "m"), COMMON + [
        "--reweight-teacher", "pairs", "--reweight-pair-weights", weights, "--no-save",
        "--reweight-noise-sidecar", _lines(tmp_path / "m.noise", [int(i in (0, 3)) for i in range(N_TRAIN)])]))
    assert [s["loss"] for s in measured] == [s["loss"] for s in inner_stats(pairs)]
    assert float(measured[-1]["noise_auc"]) == pytest.approx((198 + 100 / 2) / 298, abs=1e-4)
    assert float(measured[-1]["noise_w_noisy"]) == 0.0


def test_pair_weigher_and_its_file(tmp_path):
    weigher = PairWeigher(np.array([1.0, 0.0, 0.5]), pad=1, seed=1)
    w, raw = weigher({"id": torch.tensor([0, 1, 2]), "target": torch.tensor([[5, 6, 2], [7, 2, 1], [8, 9, 1]])})
    assert raw.tolist() == [[1, 1, 1], [0, 0, 0], [0.5, 0.5, 0]]
    assert w.sum().item() == pytest.approx(7.0) and (w[1] == 0).all() and weigher.noise_stats == {}
    assert read_pair_weights(_lines(tmp_path / "ok", ["1", "0", "0.25"]), 3).tolist() == [1.0, 0.0, 0.25]
    for values, message in ((["1", "-1", "0"], "line 2 is '-1'"), (["1", "nan", "0"], "line 2 is 'nan'"),
                            (["1"], "has 1 lines but the split has 3")):
        with pytest.raises(ReweightConfigError, match=message):
            read_pair_weights(_lines(tmp_path / "bad", values), 3)
    from fairseq_reweight.nmt.task import ReweightTranslationConfig, check_options

    with pytest.raises(ReweightConfigError, match="--reweight-teacher pairs needs --reweight-pair-weights"):
        check_options(ReweightTranslationConfig(reweight_teacher="pairs"))


# -- run_experiment.py's filter methods ------------------------------------------------------------
def test_drop_worst():
    import run_experiment

    assert run_experiment.drop_worst([0.1, 5.0, 0.3, 5.0, 0.2], 0.4).tolist() == [1, 0, 1, 0, 1]
    assert run_experiment.drop_worst([0.1, 5.0, 0.3, 5.0, 0.2], 0.4, higher_is_worse=False).tolist() == [0, 1, 1, 1, 0]
    assert run_experiment.drop_worst([1.0, 1.0, 1.0], 0.0).tolist() == [1, 1, 1]


def test_filter_methods_end_to_end(noisy_data_bin, tmp_path):
    out = tmp_path / "experiment"
    cmd = [sys.executable, f"{REPO}/examples/run_experiment.py", "--preset", "micro", "--out", str(out),
           "--data", f"noisy={noisy_data_bin}", "--methods", "filter-ce", "filter-dcce", "excess-loss"]
    stdout = run_script(cmd)
    assert "| filter-ce | 1 |" in stdout and "| excess-loss | 1 |" in stdout
    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["method"] for r in rows] == ["filter-ce", "filter-dcce", "excess-loss"]
    scores_dir = out / "noisy-filter-scores-seed1"
    noisy_labels = np.loadtxt(f"{noisy_data_bin}/train.noise")
    n_pairs = len(noisy_labels)
    for row, kind in zip(rows, ("ce", "dcce", "excess")):
        scores = np.loadtxt(scores_dir / f"{kind}.txt")
        weights = np.loadtxt(scores_dir / f"{row['method']}.weights")
        assert len(scores) == len(weights) == n_pairs and weights.sum() == n_pairs - round(0.2 * n_pairs)
        worse = scores if kind != "excess" else -scores
        assert worse[weights == 0].min() >= worse[weights == 1].max()  # the worst 20 % dropped
        assert f"--reweight-pair-weights {scores_dir / row['method']}.weights" in row["command"]
        assert "train.noise" not in (out / "logs" / f"noisy-filter-scores-seed1-{kind}.log").read_text()
        assert float(row["noise_auc"]) == pytest.approx(score_pairs.noise_auc(scores, noisy_labels, kind != "excess"),
                                                        abs=1e-4)
    assert (out / "noisy-pretrain-reverse-seed1" / "checkpoint_best.pt").exists()
    assert "--source-lang en --target-lang de" in (out / "logs" / "noisy-pretrain-reverse-seed1.log").read_text() \
        or "'source_lang': 'en'" in (out / "logs" / "noisy-pretrain-reverse-seed1.log").read_text()
    reference_log = (out / "logs" / "noisy-reference-seed1.log").read_text()
    assert "'train_subset': 'valid'" in reference_log and "num_updates 6" in reference_log
    # a second run, with the true noise rate, reuses every score and model and labels its rows
    again = run_script(cmd[:-3] + ["filter-ce", "--filter-drop-oracle-rate"])
    assert "pretrained model found" in again and "ce scores found" in again
    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["method"] for r in rows] == ["filter-ce", "filter-dcce", "excess-loss", "filter-ce@true-rate"]
    weights = np.loadtxt(scores_dir / "filter-ce@true-rate.weights")
    assert n_pairs - weights.sum() == round(noisy_labels.mean() * n_pairs)
    assert "oracle-informed" in (out / "results.md").read_text()
