"""Faults a user meets: all-zero weights, non-finite meta-updates, a new --teacher-lr on resume."""
import pytest
import torch

from fairseq_helpers import REWEIGHT, TINY_TRANSFORMER, inner_stats, run_train
from fairseq_reweight.core import normalize_weights
from fairseq_reweight.core.errors import ReweightConfigError
from fairseq_reweight.nmt import replay

TRAIN = TINY_TRANSFORMER + REWEIGHT + ["--lr", "0.05", "--momentum", "0.9", "--label-smoothing", "0.1",
                                       "--reweight-interval", "2", "--reweight-backprop-steps", "2",
                                       "--max-update", "7", "--no-epoch-checkpoints"]


# equal weights normalise to 1 each: 1 / N, then times N, each rounded (at most 2 float32 ulps of 1)
ONE_ULP2 = dict(rtol=2.5e-7, atol=0)


@pytest.mark.parametrize("n", [2, 4, 200, 10000])
def test_all_zero_weights_give_zero_not_nan(n):
    assert torch.equal(normalize_weights(torch.zeros(1, n)), torch.zeros(1, n))
    # the smallest normal total but one (a sum of equal weights: exact); N / total overflows for N > 8
    small = torch.full((1, n), 2.0**-125 / n)
    torch.testing.assert_close(normalize_weights(small), torch.ones(1, n), **ONE_ULP2)
    mask = torch.ones(1, n, dtype=torch.bool)
    assert torch.equal(normalize_weights(torch.full((1, n), 0.5), mask), torch.ones(1, n))  # uniform stays exact


@pytest.mark.parametrize("n", [2, 4, 200, 10000])
def test_a_subnormal_total_still_averages_one(n):
    """Equal weights whose total is subnormal (N / total overflows) normalise to 1 each, as any equal
    weights do: the documented contract (mean one over the batch) has no exception for them."""
    tiny = torch.full((1, n), 1e-45)  # the smallest subnormal: the total n * 2**-149, exact
    torch.testing.assert_close(normalize_weights(tiny), torch.ones(1, n), **ONE_ULP2)


def _nan_hypergradient(*args, **kwargs):
    result = _real(*args, **kwargs)
    result.teacher_grad = [torch.full_like(g, float("nan")) for g in result.teacher_grad]
    return result


_real = replay.teacher_hypergradient


def _teacher(path):
    state = torch.load(path)["criterion"]
    return {k: v for k, v in state.items() if k.startswith("reweight.weigher.teacher.")}


def test_non_finite_meta_updates_are_skipped_and_counted(tiny_data_bin, tmp_path, monkeypatch):
    monkeypatch.setattr(replay, "teacher_hypergradient", _nan_hypergradient)
    stats = inner_stats(run_train(tiny_data_bin, str(tmp_path), TRAIN + ["--reweight-max-skips", "0"]))
    assert [int(float(s.get("meta_skipped", 0))) for s in stats] == [0, 0, 1, 1, 2, 2, 3]  # before updates 2, 4, 6
    teacher = _teacher(tmp_path / "checkpoint_last.pt")
    assert all(torch.equal(v, torch.zeros_like(v)) for v in teacher.values())  # never stepped: still zero-initialised


def test_too_many_skips_in_a_row_stop_with_one_line(tiny_data_bin, tmp_path, monkeypatch):
    monkeypatch.setattr(replay, "teacher_hypergradient", _nan_hypergradient)
    with pytest.raises(ReweightConfigError, match="2 meta-updates in a row .* non-finite"):
        run_train(tiny_data_bin, str(tmp_path), TRAIN + ["--reweight-max-skips", "2"])


def test_a_diverged_validation_loss_skips_instead_of_crashing(tiny_data_bin, tmp_path, monkeypatch):
    real = replay.Replay.validation_gradient

    def diverged(self, sample):
        loss, grads = real(self, sample)
        return float("inf"), [torch.full_like(g, float("inf")) for g in grads]

    monkeypatch.setattr(replay.Replay, "validation_gradient", diverged)
    stats = inner_stats(run_train(tiny_data_bin, str(tmp_path), TRAIN + ["--reweight-max-skips", "0"]))
    assert len(stats) == 7 and int(float(stats[-1]["meta_skipped"])) == 3


def test_a_new_teacher_lr_is_honoured_on_resume():
    from test_nmt_units import _driver

    first = _driver()
    state = first.get_extra_state()
    second = _driver()
    second.cfg.teacher_lr = 0.5
    second.set_extra_state(state)
    assert [g["lr"] for g in second.teacher_optimizer.param_groups] == [0.5]


def test_resume_with_another_teacher_shape_history_or_a_fresh_teacher(tiny_data_bin, tmp_path):
    save = str(tmp_path / "run")
    run_train(tiny_data_bin, save, TRAIN[:-3] + ["--max-update", "4", "--no-epoch-checkpoints"])
    with pytest.raises(SystemExit, match="teacher does not fit .* --reset-teacher"):
        run_train(tiny_data_bin, save, TRAIN + ["--teacher-hidden-layers", "1"])
    stats = inner_stats(run_train(tiny_data_bin, save, TRAIN[:-3] + ["--max-update", "6", "--no-epoch-checkpoints",
                                                                      "--reweight-history", "checkpoint"]))
    assert [s["num_updates"] for s in stats][-1] == "6"
    stats = inner_stats(run_train(tiny_data_bin, save, TRAIN + ["--teacher-hidden-layers", "1", "--reset-teacher"]))
    assert [s["num_updates"] for s in stats][-1] == "7"
