"""The noise scores of core.metrics, by hand: the ROC AUC of "low weight => noisy", its summary, the 0/1
noise sidecar and the balanced, seeded choice of the sentences to score."""
import math

import numpy as np
import pytest

from fairseq_reweight.core.errors import ReweightConfigError
from fairseq_reweight.core.metrics import noise_summary, read_noise_sidecar, roc_auc_low_weight_noisy, select_sentences


def test_auc_of_hand_made_cases():
    assert roc_auc_low_weight_noisy([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0]) == 1.0
    assert roc_auc_low_weight_noisy([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 0.0
    assert roc_auc_low_weight_noisy([0.5, 0.5, 0.5, 0.5], [1, 1, 0, 0]) == 0.5  # ties count half
    # noisy {0.1, 0.6} vs clean {0.5, 0.7}: pairs with noisy < clean: (0.1,0.5) (0.1,0.7) (0.6,0.7) = 3 of 4
    assert roc_auc_low_weight_noisy([0.1, 0.5, 0.6, 0.7], [1, 0, 1, 0]) == 0.75
    # noisy {0.5} vs clean {0.5, 0.7}: one tie (1/2) and one win (1) = 1.5 of 2
    assert roc_auc_low_weight_noisy([0.5, 0.5, 0.7], [1, 0, 0]) == 0.75
    assert math.isnan(roc_auc_low_weight_noisy([0.1, 0.2], [0, 0]))
    summary = noise_summary([0.1, 0.5, 0.6, 0.7], [1, 0, 1, 0])
    assert (summary.auc, summary.num_noisy, summary.num_clean) == (0.75, 2, 2)
    assert summary.mean_weight_noisy == pytest.approx(0.35, abs=1e-12)
    assert summary.mean_weight_clean == pytest.approx(0.6, abs=1e-12)
    assert "0.7500" in summary.table()


def test_noise_sidecar_is_checked(tmp_path):
    path = tmp_path / "train.noise"
    path.write_text("0\n1\n1\n")
    assert read_noise_sidecar(str(path), 3).tolist() == [0, 1, 1]
    with pytest.raises(ReweightConfigError, match="has 3 lines but the split has 4 sentences"):
        read_noise_sidecar(str(path), 4)
    path.write_text("0\n2\n")
    with pytest.raises(ReweightConfigError, match="line 2 is '2'"):
        read_noise_sidecar(str(path))
    with pytest.raises(ReweightConfigError, match="not found"):
        read_noise_sidecar(str(tmp_path / "missing.noise"))


def test_subset_selection_is_seeded_and_balanced():
    noisy = np.zeros(100, dtype=np.int8)
    noisy[:10] = 1
    chosen = select_sentences(100, 16, seed=4, noisy=noisy)
    assert len(set(chosen.tolist())) == 16 and noisy[chosen].sum() == 8
    assert select_sentences(100, 16, seed=4, noisy=noisy).tolist() == chosen.tolist()
    # only 10 noisy: 10 of them and 20 clean
    assert noisy[select_sentences(100, 30, seed=4, noisy=noisy)].sum() == 10
    assert select_sentences(5, None, seed=0).tolist() == [0, 1, 2, 3, 4]
