"""The pair-level teacher features: ``excess`` (a pair's student cross-entropy minus a trusted
reference's) and ``pair-score`` (a filter's fixed score per pair, standardised over the corpus)."""
import numpy as np
import pytest
import torch

from fairseq_reweight.core.errors import ReweightConfigError
from fairseq_reweight.core.features import TrainingState
from fairseq_reweight.nmt.oracle import read_pair_losses, read_pair_scores
from fairseq_reweight.nmt.weigher import TokenWeigher

PAD = 1


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(4, 20, (3, 4), generator=g)
    target[0, -2:] = PAD
    lprobs = torch.randn(3, 4, 20, generator=g, dtype=torch.float64).log_softmax(-1)
    return {"target": target, "id": torch.tensor([5, 0, 2])}, lprobs


def test_excess_is_the_pairs_mean_token_nll_minus_the_reference_loss_on_every_token():
    sample, lprobs = _batch()
    reference = torch.arange(6, dtype=torch.float64) / 10
    weigher = TokenWeigher(["excess"], PAD, 20, 6, 6, reference_losses=reference)
    dense = weigher.dense_features(None, None, lprobs, sample["target"], TrainingState(), sample["id"])
    target = sample["target"]
    for row, pair in enumerate(sample["id"].tolist()):
        tokens = target[row][target[row].ne(PAD)]
        nll = -lprobs[row, : len(tokens)].gather(-1, tokens.unsqueeze(-1)).mean()
        expected = float(nll) - pair / 10
        assert dense[row, :, 0].tolist() == pytest.approx([expected] * 4, abs=1e-12)


def test_excess_teacher_reads_log_probabilities_and_weights_pairs_by_their_excess():
    sample, lprobs = _batch()
    reference = torch.zeros(6, dtype=torch.float64)
    reference[5] = 100.0  # pair 5 (row 0): the reference finds it far worse than the student does
    weigher = TokenWeigher(["excess", "label"], PAD, 20, 6, 6, reference_losses=reference)
    assert weigher.reads_lprobs
    with torch.no_grad():
        weigher.teacher.feature_proj.weight.fill_(1.0)  # weight rises with the excess loss
    w, raw = weigher(sample, None, None, lprobs, TrainingState())
    mask = sample["target"].ne(PAD)
    assert raw[0][mask[0]].max() < 1e-6 < raw[1:][mask[1:]].min()  # sigmoid(nll - 100) on row 0
    assert w[mask].mean().item() == pytest.approx(1.0)


def test_reference_losses_stay_float64_and_out_of_the_state_dict():
    reference = torch.rand(6, dtype=torch.float64)
    weigher = TokenWeigher(["excess"], PAD, 20, 6, 6, reference_losses=reference).half()
    assert weigher.reference_losses.dtype == torch.float64 and torch.equal(weigher.reference_losses, reference)
    assert "reference_losses" not in weigher.state_dict()
    with pytest.raises(ValueError, match="reference losses"):
        TokenWeigher(["excess"], PAD, 20, 6, 6)


def test_an_unscored_pair_gets_the_worst_reference_loss(tmp_path):
    path = tmp_path / "ref.txt"
    path.write_text("1.5\ninf\n0.25\n")
    assert read_pair_losses(str(path), 3).tolist() == [1.5, 1.5, 0.25]


@pytest.mark.parametrize("read, text, size, error", [
    (read_pair_losses, "1.5\ninf\n0.25\n", 4, "has 3 lines but the split has 4"),
    (read_pair_losses, "1.5\nnan\n0.25\n", 3, "line 2 is 'nan'"),
    (read_pair_losses, "inf\ninf\n", 2, "no finite loss"),
    (read_pair_losses, None, 3, "not found"),
    (read_pair_scores, "1\n2\n", 3, "has 2 lines but the split has 3"),
    (read_pair_scores, "1\nnan\n", 2, "line 2 is 'nan'"),
    (read_pair_scores, "3\n3\ninf\n", 3, "all equal"),
    (read_pair_scores, None, 2, "not found"),
])
def test_pair_file_errors_are_one_line(tmp_path, read, text, size, error):
    path = tmp_path / "pairs.txt"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ReweightConfigError, match=error):
        read(str(path), size)


def test_excess_init_starts_the_teacher_as_a_soft_excess_filter():
    sample, lprobs = _batch()
    reference = torch.tensor([0.0, 3.0, 1.0, 0.0, 0.0, 5.0], dtype=torch.float64)
    weigher = TokenWeigher(["label", "excess"], PAD, 20, 6, 6, reference_losses=reference, excess_init=1.5)
    assert weigher.teacher.feature_proj.weight.flatten().tolist() == [1.5]
    excess = weigher.dense_features(None, None, lprobs, sample["target"], TrainingState(), sample["id"])[:, 0, 0]
    _, raw = weigher(sample, None, None, lprobs, TrainingState())
    # zero label embedding and bias: each pair's raw weight is sigmoid(1.5 x its excess) on every token
    assert raw[:, 0].tolist() == pytest.approx(torch.sigmoid(1.5 * excess).tolist(), abs=1e-6)
    with pytest.raises(ValueError, match="excess feature"):
        TokenWeigher(["label"], PAD, 20, 6, 6, excess_init=1.0)


def test_scores_are_standardised_and_an_unscored_pair_gets_the_mean(tmp_path):
    path = tmp_path / "dcce.txt"
    path.write_text("2.0\ninf\n4.0\n-inf\n6.0\n")
    scores = read_pair_scores(str(path), 5)
    finite = np.array([2.0, 4.0, 6.0])
    assert scores.tolist() == pytest.approx([*((finite[:1] - 4.0) / finite.std()), 0.0, 0.0, 0.0,
                                             *((finite[2:] - 4.0) / finite.std())])
    assert scores[[0, 2, 4]].mean() == pytest.approx(0.0) and scores[[0, 2, 4]].std() == pytest.approx(1.0)


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
