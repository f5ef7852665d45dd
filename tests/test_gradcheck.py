"""python -m fairseq_reweight.cli.gradcheck on a tiny fairseq Transformer (float64, CPU)."""
import pytest

from conftest import USER_DIR
from fairseq_helpers import TINY_TRANSFORMER
from fairseq_reweight.cli.gradcheck import cli_main

ARGS = TINY_TRANSFORMER + [
    "--user-dir", USER_DIR, "--task", "reweight_translation", "--criterion", "reweighted_cross_entropy",
    "--label-smoothing", "0.1", "--optimizer", "reweight_sgd", "--momentum", "0.9", "--lr", "0.05",
    "--weight-decay", "0.001", "--clip-norm", "0.5", "--update-freq", "2", "--max-tokens", "200",
    "--reweight-backprop-steps", "2",
]


@pytest.mark.parametrize(
    "extra",
    [["--reweight-history", "reverse"], ["--reweight-history", "checkpoint"], ["--attention-dropout", "0.1"],
     ["--share-all-embeddings", "--reweight-chunks", "2"], ["--reweight-features-grad"],
     ["--meta-valid-loss", "nll", "--reweight-eos", "sentence"],
     ["--reweight-hvp", "forward-over-reverse", "--attention-dropout", "0.1"]],
)
def test_gradcheck_agrees_with_unrolled_autograd(tiny_data_bin, capsys, extra):
    cli_main([tiny_data_bin] + ARGS + extra)
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("max relative error: ")
    error = float(out[-1].split(": ")[1])
    # float64 throughout (gradcheck keeps fairseq's log-softmax in the model's dtype)
    assert error < 1e-12
    assert sum(line.startswith("teacher.") for line in out) == 3  # bias, feature_proj, label_embed


ADAM_ARGS = [a for a in ARGS if a not in ("reweight_sgd", "--momentum", "0.9")]
ADAM_ARGS[ADAM_ARGS.index("--optimizer") + 1:ADAM_ARGS.index("--optimizer") + 1] = ["reweight_adam"]


def test_gradcheck_through_adam_steps(tiny_data_bin, capsys):
    """fairseq's Adam with bias correction, decoupled weight decay, a warm-up schedule, clipping,
    --update-freq and dropout, through fairseq's trainer."""
    cli_main([tiny_data_bin] + ADAM_ARGS + [
        "--reweight-history", "checkpoint", "--adam-betas", "(0.9, 0.98)", "--lr", "0.01",
        "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "4", "--warmup-init-lr", "1e-3"])
    error = float(capsys.readouterr().out.strip().splitlines()[-1].split(": ")[1])
    assert error < 1e-10


def test_gradcheck_exits_non_zero_above_the_tolerance(tiny_data_bin, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main([tiny_data_bin] + ARGS + ["--gradcheck-tolerance", "1e-30"])
    assert exit_info.value.code == 1
    assert "gradcheck FAILED" in capsys.readouterr().err


def test_gradcheck_at_a_restored_student_or_one_clear_error(tiny_data_bin, tmp_path, capsys):
    from fairseq_helpers import REWEIGHT, run_train

    from fairseq_reweight.core.errors import ReweightConfigError

    run_train(tiny_data_bin, str(tmp_path / "plain"), TINY_TRANSFORMER + REWEIGHT + [
        "--reweight-teacher", "none", "--lr", "0.05", "--momentum", "0.9", "--max-update", "3"])
    cli_main([tiny_data_bin] + ARGS + ["--restore-file", str(tmp_path / "plain" / "checkpoint_last.pt")])
    assert float(capsys.readouterr().out.strip().splitlines()[-1].split(": ")[1]) < 1e-12
    with pytest.raises(ReweightConfigError, match="--restore-file .* not found"):
        cli_main([tiny_data_bin] + ARGS + ["--restore-file", str(tmp_path / "missing.pt")])
    for teacher in ("none", "oracle"):  # nothing to differentiate
        with pytest.raises(ReweightConfigError, match="with a learned teacher"):
            cli_main([tiny_data_bin] + ARGS + ["--reweight-teacher", teacher])
    with pytest.raises(ReweightConfigError, match="does not fit the model"):
        cli_main([tiny_data_bin] + ARGS + ["--encoder-embed-dim", "32", "--restore-file",
                                           str(tmp_path / "plain" / "checkpoint_last.pt")])
