"""The ``pair-score`` teacher feature: a filter's fixed score per pair, standardised over the corpus."""
import numpy as np
import pytest
import torch

from fairseq_reweight.core.errors import ReweightConfigError
from fairseq_reweight.core.features import TrainingState
from fairseq_reweight.nmt.oracle import read_pair_scores
from fairseq_reweight.nmt.weigher import TokenWeigher

PAD = 1


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(4, 20, (3, 4), generator=g)
    target[0, -2:] = PAD
    lprobs = torch.randn(3, 4, 20, generator=g, dtype=torch.float64).log_softmax(-1)
    return {"target": target, "id": torch.tensor([5, 0, 2])}, lprobs


def test_scores_are_standardised_and_an_unscored_pair_gets_the_mean(tmp_path):
    path = tmp_path / "dcce.txt"
    path.write_text("2.0\ninf\n4.0\n-inf\n6.0\n")
    scores = read_pair_scores(str(path), 5)
    finite = np.array([2.0, 4.0, 6.0])
    assert scores.tolist() == pytest.approx([*((finite[:1] - 4.0) / finite.std()), 0.0, 0.0, 0.0,
                                             *((finite[2:] - 4.0) / finite.std())])
    assert scores[[0, 2, 4]].mean() == pytest.approx(0.0) and scores[[0, 2, 4]].std() == pytest.approx(1.0)


@pytest.mark.parametrize("text, size, error", [
    ("1\n2\n", 3, "has 2 lines but the split has 3"),
    ("1\nnan\n", 2, "line 2 is 'nan'"),
    ("3\n3\ninf\n", 3, "all equal"),
    (None, 2, "not found"),
])
def test_pair_score_file_errors_are_one_line(tmp_path, text, size, error):
    path = tmp_path / "scores.txt"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ReweightConfigError, match=error):
        read_pair_scores(str(path), size)


def test_the_score_is_the_last_column_after_the_excess_loss_and_each_init_sets_its_own_coefficient():
    sample, lprobs = _batch()
    reference = torch.zeros(6, dtype=torch.float64)
    scores = torch.tensor([0.5, -1.0, 2.0, 0.0, 0.0, -0.25], dtype=torch.float64)
    weigher = TokenWeigher(["label", "excess", "pair-score"], PAD, 20, 6, 6, reference_losses=reference,
                           excess_init=1.0, pair_scores=scores, pair_score_init=-2.0)
    assert weigher.teacher.feature_proj.weight.flatten().tolist() == [1.0, -2.0]
    assert not TokenWeigher(["pair-score"], PAD, 20, 6, 6, pair_scores=scores).reads_lprobs
    dense = weigher.dense_features(None, None, lprobs, sample["target"], TrainingState(), sample["id"])
    assert dense[:, :, 1].tolist() == [[-0.25] * 4, [0.5] * 4, [2.0] * 4]  # pairs 5, 0, 2 on every token
    _, raw = weigher(sample, None, None, lprobs, TrainingState())
    # zero label embedding and bias: sigmoid(excess - 2 x score) on every token of a pair
    expected = torch.sigmoid(dense[:, 0, 0] - 2.0 * dense[:, 0, 1])
    assert raw[:, 0].tolist() == pytest.approx(expected.tolist(), abs=1e-6)
    with pytest.raises(ValueError, match="scores of the training pairs"):
        TokenWeigher(["pair-score"], PAD, 20, 6, 6)
    with pytest.raises(ValueError, match="pair-score feature"):
        TokenWeigher(["excess"], PAD, 20, 6, 6, reference_losses=reference, pair_score_init=1.0)


def test_pair_scores_stay_float64_and_out_of_the_state_dict():
    scores = torch.randn(6, dtype=torch.float64)
    weigher = TokenWeigher(["pair-score", "label"], PAD, 20, 6, 6, pair_scores=scores).half()
    assert weigher.pair_scores.dtype == torch.float64 and torch.equal(weigher.pair_scores, scores)
    assert "pair_scores" not in weigher.state_dict()
