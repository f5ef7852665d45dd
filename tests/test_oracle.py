"""--reweight-teacher oracle: noisy pairs out of the loss, the same batches as the baseline."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from fairseq_helpers import REWEIGHT, TINY_TRANSFORMER, inner_stats, run_train
from fairseq_reweight.nmt.oracle import OracleWeigher
from fairseq_reweight.nmt.task import ReweightTranslationTask

N_TRAIN = 300  # conftest's tiny corpus
COMMON = TINY_TRANSFORMER + REWEIGHT + ["--lr", "0.05", "--momentum", "0.9", "--label-smoothing", "0.1",
                                        "--update-freq", "2", "--max-update", "6", "--no-epoch-checkpoints"]


def _sidecar(path, noisy):
    path.write_text("".join(f"{int(i in noisy)}\n" for i in range(N_TRAIN)))
    return str(path)


def _losses(stats):
    return [s["loss"] for s in inner_stats(stats)]


def _model(directory):
    return torch.load(directory / "checkpoint_last.pt")["model"]


def test_oracle_without_noise_is_the_baseline_bit_for_bit(tiny_data_bin, tmp_path):
    base = run_train(tiny_data_bin, str(tmp_path / "base"), COMMON + ["--reweight-teacher", "none"])
    oracle = run_train(tiny_data_bin, str(tmp_path / "oracle"), COMMON + [
        "--reweight-teacher", "oracle", "--reweight-noise-sidecar", _sidecar(tmp_path / "none.noise", set())])
    # the updates are bit for bit (the weights' gradient is exactly 1), the logged loss is not: fairseq's
    # criterion sums the NLL and the smoothing term apart before combining them, the weighted one
    # combines per token and sums; float32 round-off can move a loss logged to 3 decimals by one unit
    # of the last (1.5: parsing the decimal strings adds binary noise)
    assert [float(loss) for loss in _losses(oracle)] == pytest.approx([float(loss) for loss in _losses(base)],
                                                                       rel=0, abs=1.5e-3)
    assert len(_losses(base)) == 6
    a, b = _model(tmp_path / "base"), _model(tmp_path / "oracle")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_oracle_drops_noisy_pairs_and_logs_what_a_teacher_logs(tiny_data_bin, tmp_path, monkeypatch):
    noisy = set(range(0, N_TRAIN, 3))
    batches, train_step = [], ReweightTranslationTask.train_step

    def spy(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        # each micro-batch's update, sentences and their target tokens (no padding)
        batches.append((update_num, sample["id"].tolist(), sample["target"].ne(1).sum(1).tolist()))
        return train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad)

    monkeypatch.setattr(ReweightTranslationTask, "train_step", spy)
    stats = inner_stats(run_train(tiny_data_bin, str(tmp_path / "o"), COMMON + [
        "--reweight-teacher", "oracle", "--reweight-noise-sidecar", _sidecar(tmp_path / "t.noise", noisy)]))
    last = stats[-1]
    assert (float(last["noise_auc"]), float(last["noise_w_noisy"]), float(last["noise_w_clean"])) == (1.0, 0.0, 1.0)
    # w_mean: each update's fraction of clean target tokens (raw weight 1 clean, 0 noisy), to 4 decimals
    tokens, clean = [0] * len(stats), [0] * len(stats)
    for update, ids, lengths in batches:
        tokens[update] += sum(lengths)
        clean[update] += sum(n for i, n in zip(ids, lengths) if i not in noisy)
    assert [float(s["wpb"]) for s in stats] == tokens  # the spy saw every micro-batch
    assert [float(s["w_mean"]) for s in stats] == pytest.approx([c / t for c, t in zip(clean, tokens)],
                                                                 rel=0, abs=5e-5 + 1e-12)
    base = inner_stats(run_train(tiny_data_bin, str(tmp_path / "b"), COMMON + ["--reweight-teacher", "none"]))
    assert stats[0]["loss"] != base[0]["loss"]


def test_all_noisy_batches_contribute_nothing(tiny_data_bin, tmp_path):
    run_train(tiny_data_bin, str(tmp_path / "init"), COMMON + ["--reweight-teacher", "none", "--lr", "0"])  # stays put
    stats = inner_stats(run_train(tiny_data_bin, str(tmp_path / "o"), COMMON + [
        "--reweight-teacher", "oracle", "--reweight-noise-sidecar", _sidecar(tmp_path / "all.noise", set(range(N_TRAIN)))]))
    assert len(stats) == 6 and all(float(s["loss"]) == 0.0 for s in stats)
    before, after = _model(tmp_path / "init"), _model(tmp_path / "o")
    assert all(torch.equal(before[k], after[k]) for k in before)  # zero gradients, no weight decay: no move


def test_weigher_gives_zero_to_every_token_of_a_noisy_pair(tmp_path):
    weigher = OracleWeigher(_sidecar(tmp_path / "s.noise", {1}), N_TRAIN, pad=1, seed=1)
    target = torch.tensor([[5, 6, 2], [7, 2, 1], [8, 9, 1]])
    w, raw = weigher({"id": torch.tensor([0, 1, 2]), "target": target})
    assert raw.tolist() == [[1, 1, 1], [0, 0, 0], [1, 1, 0]]
    # normalised as a teacher's weights: mean 1 over the 7 non-pad tokens, so each clean one weighs 7/5
    assert w.sum().item() == pytest.approx(7.0) and w[0, 0].item() == pytest.approx(1.4) and (w[1] == 0).all()


@pytest.mark.parametrize("sidecar, message", [
    (None, "--reweight-teacher oracle needs --reweight-noise-sidecar"),
    ("missing.noise", "noise sidecar 'missing.noise' not found"),
    ("short.noise", "has 10 lines but the split has 300 sentences"),
])
def test_bad_sidecar_is_one_line_at_start_up(tiny_data_bin, tmp_path, sidecar, message):
    (tmp_path / "short.noise").write_text("0\n" * 10)
    args = [tiny_data_bin] + COMMON + ["--reweight-teacher", "oracle", "--no-save"]
    if sidecar:
        args += ["--reweight-noise-sidecar", str(tmp_path / sidecar) if sidecar == "short.noise" else sidecar]
    result = subprocess.run([sys.executable, "-m", "fairseq_cli.train"] + args, cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, env=dict(os.environ, PYTHONPATH=REPO))
    assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_oracle_trains_with_any_fairseq_optimizer(tiny_data_bin, tmp_path):
    flags = [f for f in COMMON if f not in ("--momentum", "0.9")]
    flags[flags.index("reweight_sgd")] = "adam"
    stats = inner_stats(run_train(tiny_data_bin, str(tmp_path / "adam"), flags + [
        "--reweight-teacher", "oracle", "--reweight-noise-sidecar", _sidecar(tmp_path / "a.noise", {0, 5})]))
    assert len(stats) == 6 and float(stats[-1]["noise_auc"]) == 1.0
