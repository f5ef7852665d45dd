"""Check the teacher's hypergradient on *your* model before a long run.

    fairseq-reweight-gradcheck DATA --user-dir fairseq_reweight --task reweight_translation \\
        --criterion reweighted_cross_entropy --optimizer reweight_sgd --momentum 0.9 --lr 0.001 \\
        --arch transformer_iwslt_de_en --max-tokens 512 --reweight-backprop-steps 2 [any fairseq option]

(or ``--optimizer reweight_adam --reweight-history checkpoint --lr-scheduler inverse_sqrt ...``).

Builds the model, criterion and teacher from ordinary fairseq arguments, converts them to float64 on
the CPU, takes B = ``--reweight-backprop-steps`` real fairseq training steps (fairseq's Trainer:
dropout, ``--update-freq``, ``--clip-norm``, weight decay, the learning-rate schedule as configured) on a few small batches, then
computes the teacher gradient of the validation loss twice: with the reverse-mode algorithm the
training run uses (``--reweight-history``), and with plain autograd through the unrolled steps.
Prints ``max relative error: <x>`` last; exits with status 1 above ``--gradcheck-tolerance``.
The teacher is given small random parameters first, so that every part of it gets a gradient.
"""
import argparse
import logging
import os
import sys
from unittest import mock

import torch
from fairseq import checkpoint_utils, options, tasks
from fairseq import utils as fairseq_utils
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.trainer import Trainer

from fairseq_reweight.core import unrolled_hypergradient
from fairseq_reweight.core.errors import ReweightConfigError
from fairseq_reweight.nmt.replay import replay_session, teacher_hypergradient

logger = logging.getLogger("fairseq_reweight.cli.gradcheck")


def relative_errors(ours, reference):
    """Per-tensor ``||a - b|| / max(||b||, tiny)``."""
    out = []
    for a, b in zip(ours, reference):
        denom = max(b.norm().item(), torch.finfo(b.dtype).tiny)
        out.append((a - b).norm().item() / denom)
    return out


def _clip_grad_norm_float64(params, max_norm, aggregate_norm_fn=None):
    """fairseq.utils.clip_grad_norm_'s formula without its float32 norm, which refuses float64."""
    grads = [p.grad.detach() for p in params if p.grad is not None]
    total = torch.norm(torch.stack([g.norm() for g in grads]))
    if aggregate_norm_fn is not None:
        total = aggregate_norm_fn(total)
    if max_norm > 0:
        coef = (max_norm / (total + 1e-6)).clamp_(max=1)
        for g in grads:
            g.mul_(coef)
    return total


def _log_softmax_in_dtype(x, dim: int, onnx_trace: bool = False):
    """fairseq.utils.log_softmax without its cast to float32, so a float64 check stays float64."""
    return torch.nn.functional.log_softmax(x, dim=dim)


def _softmax_in_dtype(x, dim: int, onnx_trace: bool = False):
    """fairseq.utils.softmax (attention weights) likewise."""
    return torch.nn.functional.softmax(x, dim=dim)


def run(args) -> float:
    """The check (see the module docstring); returns the largest relative error."""
    if args.gradcheck_dtype != "float64":
        return _run(args)
    # scoped to the check: fairseq computes (log-)softmax in float32 even for a float64 model, which
    # would cap the agreement at ~1e-8 and hide any error smaller than float32 round-off
    with mock.patch.object(fairseq_utils, "log_softmax", _log_softmax_in_dtype), \
            mock.patch.object(fairseq_utils, "softmax", _softmax_in_dtype):
        return _run(args)


def load_student(model, cfg) -> None:
    """``--restore-file PATH``: check at that checkpoint's student (its teacher is not used: the check
    draws small random teacher parameters). fairseq's default, checkpoint_last.pt, means none."""
    path = cfg.checkpoint.restore_file
    if path == "checkpoint_last.pt":
        return
    if not os.path.isfile(path):
        raise ReweightConfigError(f"--restore-file {path!r} not found: give a checkpoint written by fairseq-train")
    state = checkpoint_utils.load_checkpoint_to_cpu(path)
    if "model" not in state:
        raise ReweightConfigError(f"--restore-file {path!r} holds no model: give a checkpoint written by fairseq-train")
    try:
        model.load_state_dict(state["model"], strict=True, model_cfg=cfg.model)
    except RuntimeError as error:
        raise ReweightConfigError(f"--restore-file {path!r} does not fit the model given by the other options "
                                  f"({str(error).splitlines()[0]}): give the --arch and sizes it was trained with") from None
    logger.warning(f"student from {path}")


def _run(args) -> float:
    parser = options.get_training_parser()
    fairseq_args = options.parse_args_and_arch(parser, args.fairseq_args + ["--cpu"])
    cfg = convert_namespace_to_omegaconf(fairseq_args)
    if cfg.task._name != "reweight_translation" or cfg.task.reweight_teacher in ("none", "oracle", "pairs", "l2t"):
        raise ReweightConfigError("gradcheck needs --task reweight_translation with a learned teacher "
                                  "(not --reweight-teacher none, oracle or pairs) whose gradient is a hypergradient "
                                  "(not l2t, which learns by REINFORCE)")
    # the check compares the teacher gradient at these B steps: no teacher step in between (K = B),
    # and the B steps are trained as the updates before a meta-update are (--reweight-chunks)
    cfg.task.reweight_interval = cfg.task.reweight_backprop_steps
    torch.manual_seed(cfg.common.seed)
    task = tasks.setup_task(cfg.task)
    task.load_dataset(cfg.dataset.train_subset, combine=False, epoch=1)
    dtype = {"float64": torch.float64, "float32": torch.float32}[args.gradcheck_dtype]
    model = task.build_model(cfg.model)
    load_student(model, cfg)
    model = model.to(dtype)
    criterion = task.build_criterion(cfg.criterion).to(dtype)
    driver = task.driver
    with torch.no_grad():
        for p in driver.teacher.parameters():
            p.normal_(0.0, 0.1)
    trainer = Trainer(cfg, task, model, criterion)
    start = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    epoch_itr = trainer.get_train_iterator(epoch=1, load_dataset=False)
    batches = epoch_itr.next_epoch_itr(shuffle=True, fix_batches_to_gpus=False)
    update_freq = cfg.optimization.update_freq[0]
    num_steps = cfg.task.reweight_backprop_steps
    with mock.patch.object(fairseq_utils, "clip_grad_norm_", _clip_grad_norm_float64), \
            mock.patch.object(driver, "meta_update", lambda *args, **kwargs: None):
        for _ in range(num_steps):
            trainer.train_step([next(batches) for _ in range(update_freq)])
    val_sample = next(task.meta_valid_batches())
    steps = driver.recorder.window()
    if steps is None:
        raise RuntimeError(f"expected {num_steps} recorded steps")
    mode = cfg.task.reweight_history
    with replay_session(trainer.model, criterion, driver.teacher, driver.recorder.optimizer, cfg.common.seed,
                        cfg.task.meta_valid_loss, trainer.get_num_updates(), chunks=cfg.task.reweight_chunks) as replay:
        _, val_grad = replay.validation_gradient(val_sample)
        # as training computes it (the oldest step by forward-mode AD), and every step by --reweight-hvp
        reverse, full = (teacher_hypergradient(replay, steps, val_grad, mode, fast, hvp=cfg.task.reweight_hvp).teacher_grad
                         for fast in (True, False))
        reference = unrolled_hypergradient(
            start, None, replay.omega, steps, replay.loss_fn,
            lambda params: replay.validation_loss(val_sample, params), optimizer=replay.student.recorder.reverse,
        )
    names = [name for name, _ in driver.teacher.named_parameters()]
    errors = relative_errors(reverse, reference)
    full_errors = relative_errors(full, reference)
    for name, err, full_err, g in zip(names, errors, full_errors, reference):
        print(f"teacher.{name:<28} |grad| {g.norm().item():.3e}  relative error {err:.3e} "
              f"(every step by {cfg.task.reweight_hvp}: {full_err:.3e})")
    return max(errors + full_errors)


def cli_main(argv=None):
    parser = argparse.ArgumentParser(
        prog="fairseq-reweight-gradcheck",
        description="Compare the reverse-mode teacher gradient with unrolled autograd (float64, CPU) "
        "on your fairseq model; the remaining arguments are ordinary fairseq-train arguments.",
    )
    parser.add_argument("--gradcheck-tolerance", type=float, default=1e-6,
                        help="largest acceptable relative error (default 1e-6)")
    parser.add_argument("--gradcheck-dtype", choices=["float64", "float32"], default="float64",
                        help="float64 (default) checks the algorithm; float32 shows the round-off "
                        "of a real run")
    args, rest = parser.parse_known_args(argv)
    args.fairseq_args = rest
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s | %(name)s | %(message)s")
    error = run(args)
    print(f"max relative error: {error:.3e}")
    if not error <= args.gradcheck_tolerance:
        print(f"gradcheck FAILED: above the tolerance {args.gradcheck_tolerance:g}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    cli_main()
