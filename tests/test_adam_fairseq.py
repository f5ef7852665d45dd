"""--optimizer reweight_adam inside fairseq: bit for bit fairseq's Adam without a teacher, the teacher
trained through Adam steps, resume, --fp16 masters, and the options it refuses."""
from unittest import mock

import pytest
import torch
from fairseq import options, tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.optim.fp16_optimizer import FP16Optimizer

from driver_checks import assert_equal, check_resume_is_bit_identical, run_fairseq_train
from fairseq_helpers import REWEIGHT, TINY_TRANSFORMER, inner_stats, run_train
from fairseq_reweight.nmt import fairseq_contract as contract
from fairseq_reweight.nmt.optimizer import ReweightAdam
from fairseq_reweight.nmt.recorder import find_recorder
from fairseq_reweight.nmt.replay import StudentView

ADAM = ["--adam-betas", "(0.9, 0.98)", "--adam-eps", "1e-8", "--weight-decay", "0.01", "--lr", "0.005",
        "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "3", "--warmup-init-lr", "1e-4"]
COMMON = TINY_TRANSFORMER + ADAM + ["--label-smoothing", "0.1", "--clip-norm", "1.0", "--update-freq", "2",
                                    "--no-epoch-checkpoints"]
OURS = [a if a != "reweight_sgd" else "reweight_adam" for a in REWEIGHT]
TEACHER = OURS + ["--reweight-history", "checkpoint", "--reweight-interval", "3", "--reweight-backprop-steps", "2",
                  "--teacher-lr", "0.01", "--meta-valid-max-tokens", "300"]


def test_without_a_teacher_it_is_fairseq_adam_bit_for_bit(tiny_data_bin, tmp_path):
    plain = run_train(tiny_data_bin, str(tmp_path / "plain"), COMMON + [
        "--task", "translation", "--criterion", "label_smoothed_cross_entropy", "--optimizer", "adam",
        "--max-update", "6"])
    ours = run_train(tiny_data_bin, str(tmp_path / "ours"), COMMON + OURS + ["--reweight-teacher", "none",
                                                                            "--max-update", "6"])
    assert len(inner_stats(plain)) == 6
    assert [s["loss"] for s in inner_stats(plain)] == [s["loss"] for s in inner_stats(ours)]
    a = torch.load(tmp_path / "plain" / "checkpoint_last.pt")
    b = torch.load(tmp_path / "ours" / "checkpoint_last.pt")
    assert_equal(a["model"], b["model"])
    state_a, state_b = a["last_optimizer_state"]["state"], b["last_optimizer_state"]["state"]
    for key in state_a:
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state_a[key][name], state_b[key][name])


def test_the_teacher_learns_through_adam_steps_and_a_resumed_run_continues_exactly(tiny_data_bin, tmp_path):
    # --update-freq 1: with 2, update 4 falls mid-epoch on this data, and fairseq 0.12 does not resume
    # mid-epoch bit for bit even for plain --optimizer adam
    flags = COMMON[:COMMON.index("--update-freq")] + COMMON[COMMON.index("--update-freq") + 2:] + TEACHER
    full = check_resume_is_bit_identical(tiny_data_bin, tmp_path, flags)
    assert sum(1 for s in inner_stats(full) if s.get("teacher_gnorm")) >= 6  # meta-updates at 3, 6, 9


@pytest.mark.parametrize("extra, message", [
    (["--reweight-history", "reverse"], "reweight_adam needs --reweight-history checkpoint"),
    (["--reweight-history", "checkpoint", "--fp16-adam-stats"], "--fp16-adam-stats is not supported"),
    (["--reweight-history", "checkpoint", "--memory-efficient-fp16"], "--memory-efficient-fp16 keeps no fp32"),
])
def test_what_it_cannot_replay_is_refused_in_one_line(tiny_data_bin, tmp_path, extra, message):
    args = [tiny_data_bin] + OURS + TINY_TRANSFORMER + ["--lr", "0.001", "--max-update", "2", "--no-save"] + extra
    result = run_fairseq_train(args, cwd=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_fp16_wraps_it_around_flat_fp32_masters_whose_records_replay_in_model_shapes(tiny_data_bin):
    """(fairseq's FP16Optimizer does not step on the CPU; the step itself is taken here on the masters.)"""
    torch.manual_seed(0)  # the model's initialisation and the masters' gradient below
    args = options.parse_args_and_arch(options.get_training_parser(), [tiny_data_bin] + TINY_TRANSFORMER + TEACHER
                                       + ["--lr", "0.001", "--fp16"])
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model).half()
    params = [p for p in model.parameters() if p.requires_grad]
    with mock.patch("torch.cuda.current_device", return_value=0):  # only a dict key on the CPU
        optimizer = FP16Optimizer.build_optimizer(cfg, params)
    assert isinstance(contract.inner_optimizer(optimizer), ReweightAdam)
    recorder = find_recorder(optimizer)
    recorder.store_states = True
    (master,) = recorder.group["params"]
    assert master.dtype == torch.float32
    master.grad = torch.randn_like(master)
    recorder.step()
    (record,) = recorder.history
    assert record.step == 1 and len(record.grads) == 1 and record.exp_avg_sq[0].dtype == torch.float32
    converted = StudentView(model, recorder).convert_record(record)
    views = contract.master_params_in_model_shapes([master.grad], [p.shape for p in params])
    for name in ("params", "exp_avg", "exp_avg_sq", "grads"):
        assert [t.shape for t in getattr(converted, name)] == [p.shape for p in params]
    for grad, view, start, param in zip(converted.grads, views, converted.params, params):
        assert torch.equal(grad, view) and torch.equal(start, param.float())
