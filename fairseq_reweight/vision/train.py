"""Image classification with a learned data-reweighting teacher (no fairseq involved).

``python -m fairseq_reweight.vision.train --data DIR --noise flip --noise-rate 0.4`` trains a
CIFAR ResNet-32 (or WRN-28-10) with momentum SGD on the noisy 45k training split, and every K
steps updates the teacher by the reverse-mode hypergradient of the loss on a clean validation
batch through the last B student steps (Fan et al., "Learning to Reweight with Deep
Interactions", AAAI 2021, Algorithm 1; equations in docs/METHOD.md). It reports the test error
and the teacher's AUC at telling noisy training labels from clean ones (low weight = noisy).

This module is the command: options, data and model setup, the training loop, logging,
evaluation and checkpoints. The teacher's inputs, the replay of recorded steps and the
meta-update live in :mod:`fairseq_reweight.vision.reweight` (the teacher kinds and the
train-mode replay are described there); ``--teacher none`` is plain training.

Design choices:
- Every source of randomness in an epoch (order, augmentation, validation batches) comes from a
  generator seeded by (seed, epoch); checkpoints are written at epoch ends, so a resumed run
  repeats the uninterrupted one. A checkpoint holds the last B recorded steps with their
  :class:`~fairseq_reweight.vision.reweight.StepData`, so the first teacher step after a resume
  differentiates through the same steps.
"""
import argparse
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fairseq_reweight.core import RecordingSGD
from fairseq_reweight.core.checks import check_reversible, check_schedule
from fairseq_reweight.core.errors import ReweightConfigError
from fairseq_reweight.core.metrics import roc_auc_low_weight_noisy
from fairseq_reweight.vision.checkpoint import load_checkpoint, save_checkpoint
from fairseq_reweight.vision.cifar import NOISE_KINDS, ImageSplits, load_cifar, random_crop_flip
from fairseq_reweight.vision.resnet import build_student
from fairseq_reweight.vision.reweight import (
    TEACHER_KINDS,
    ExampleWeigher,
    StepData,
    student_loss,
    teacher_update,
)

logger = logging.getLogger("fairseq_reweight.vision.train")

VALID_SIZE = {"cifar10": 5000, "cifar100": 5000, "digits": 100}


@torch.no_grad()
def evaluate(model: nn.Module, images: Tensor, labels: Tensor, splits: ImageSplits,
             batch_size: int = 500) -> float:
    """Accuracy (%) in eval mode."""
    model.eval()
    correct = 0
    for start in range(0, len(labels), batch_size):
        logits, _ = model(splits.normalize(images[start:start + batch_size]))
        correct += int((logits.argmax(1) == labels[start:start + batch_size]).sum())
    model.train()
    return 100.0 * correct / max(len(labels), 1)


@torch.no_grad()
def noise_auc(model: nn.Module, weigher: Optional[ExampleWeigher], splits: ImageSplits,
              indices: Tensor, context: StepData, batch_size: int = 500):
    """ROC AUC of "low teacher weight => noisy label" and of "high loss => noisy label" on
    ``indices`` of the training split (eval-mode features); None where undefined."""
    model.eval()
    weights, losses = [], []
    for start in range(0, len(indices), batch_size):
        idx = indices[start:start + batch_size]
        labels = splits.train_labels[idx]
        logits, features = model(splits.normalize(splits.train_images[idx]))
        loss = F.cross_entropy(logits, labels, reduction="none")
        losses.append(loss.cpu())
        if weigher is not None:
            weights.append(weigher(features, logits, labels, loss, context).cpu())
    model.train()
    noisy = (splits.train_labels[indices] != splits.train_clean_labels[indices]).cpu().numpy()
    if noisy.all() or not noisy.any():
        return None, None
    teacher = roc_auc_low_weight_noisy(torch.cat(weights).numpy(), noisy) if weights else None
    return teacher, roc_auc_low_weight_noisy(-torch.cat(losses).numpy(), noisy)  # high loss => noisy


def load_data(args) -> ImageSplits:
    """The dataset named by ``args.dataset`` as :class:`ImageSplits`."""
    if args.dataset == "digits":
        from fairseq_reweight.vision.digits import load_digits_splits

        return load_digits_splits(args.noise, args.noise_rate, args.valid_size, args.seed)
    if not args.data:
        raise ReweightConfigError(f"--data DIR is required for {args.dataset} (the folder holding "
                                  "the official python-pickle archive)")
    try:
        return load_cifar(args.data, args.dataset, args.noise, args.noise_rate, args.valid_size,
                          args.seed, args.download)
    except FileNotFoundError as error:
        raise ReweightConfigError(str(error)) from error


@dataclass
class Run:
    """Everything one training run carries from step to step."""

    args: argparse.Namespace
    splits: ImageSplits
    model: nn.Module
    optimizer: RecordingSGD
    weigher: Optional[ExampleWeigher]
    teacher_optimizer: Optional[torch.optim.Optimizer]
    progress: dict
    total_steps: int = 0

    def context(self) -> StepData:
        """The training-state part of the surface features (no batch yet)."""
        p = self.progress
        return StepData(None, None, p["step"] / max(self.total_steps, 1),
                        p["loss_sum"] / max(p["loss_count"], 1), p["best_valid_acc"] / 100.0)


def build_run(args) -> Run:
    """Data, student, teacher and optimizers from the options (restored with ``--resume``)."""
    torch.manual_seed(args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    splits = load_data(args).to(device)
    model = build_student(args.arch, splits.num_classes, splits.train_images.shape[1], args.depth,
                          args.width, args.widen, args.dropout).to(device)
    weigher = teacher_optimizer = None
    if args.teacher != "none":
        weigher = ExampleWeigher(args.teacher, model.feature_dim, splits.num_classes,
                                 args.teacher_hidden_layers).to(device)
        teacher_optimizer = torch.optim.Adam(weigher.parameters(), lr=args.teacher_lr)
    optimizer = RecordingSGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                             weight_decay=args.weight_decay,
                             history_size=args.reweight_backprop_steps,
                             store_states=args.history_mode == "checkpoint")
    progress = {"epoch": 0, "step": 0, "loss_sum": 0.0, "loss_count": 0, "best_valid_acc": 0.0,
                "meta_val_loss": float("nan")}
    run = Run(args, splits, model, optimizer, weigher, teacher_optimizer, progress)
    run.total_steps = args.epochs * (len(splits.train_labels) // run_batch_size(run))
    if args.save_dir:
        os.makedirs(args.save_dir, exist_ok=True)
        path = os.path.join(args.save_dir, "checkpoint_last.pt")
        if args.resume and os.path.isfile(path):
            run.progress = load_checkpoint(path, model, optimizer, weigher, teacher_optimizer, args)
            logger.info("resumed from %s at epoch %d, step %d", path, run.progress["epoch"],
                        run.progress["step"])
    return run


def run_batch_size(run: Run) -> int:
    return min(run.args.batch_size, len(run.splits.train_labels))


def train_epoch(run: Run, epoch: int):
    """One pass over the training split; a teacher step after every K-th student step."""
    args, splits, progress = run.args, run.splits, run.progress
    device = splits.train_images.device
    milestones = [int(m) for m in args.lr_steps.split(",") if m.strip()]
    lr = args.lr * args.lr_decay ** sum(epoch >= m for m in milestones)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    batch_size = run_batch_size(run)
    augment = args.dataset.startswith("cifar") and not args.no_augment
    generator = torch.Generator().manual_seed(args.seed * 100003 + epoch)  # order, crops, valid
    order = torch.randperm(len(splits.train_labels), generator=generator).to(device)
    window = {"loss": 0.0, "w_sum": 0.0, "w_sq": 0.0, "w_count": 0, "steps": 0}
    for batch in range(len(splits.train_labels) // batch_size):
        idx = order[batch * batch_size:(batch + 1) * batch_size]
        images = splits.train_images[idx].float()
        if augment:
            images = random_crop_flip(images, 4, generator)
        data = run.context()
        data.inputs, data.labels = splits.normalize(images), splits.train_labels[idx]
        data.record_rng_state()
        loss, losses, raw = student_loss(run.model, run.weigher, data)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        run.optimizer.history[-1].data = data
        progress["step"] += 1
        progress["loss_sum"] += float(losses.mean())
        progress["loss_count"] += 1
        window["loss"] += float(loss.detach())
        window["steps"] += 1
        if raw is not None:
            window["w_sum"] += float(raw.sum())
            window["w_sq"] += float((raw * raw).sum())
            window["w_count"] += len(raw)
        if run.weigher is not None and progress["step"] % args.reweight_interval == 0:
            valid = torch.randperm(len(splits.valid_labels), generator=generator)
            valid = valid[:args.meta_batch_size or batch_size].to(device)
            progress["meta_val_loss"] = teacher_update(
                run.model, run.optimizer, run.weigher, run.teacher_optimizer,
                splits.normalize(splits.valid_images[valid]), splits.valid_labels[valid],
                args.reweight_backprop_steps, args.history_mode)
        if progress["step"] % args.log_interval == 0:
            count = max(window["w_count"], 1)
            mean_w = window["w_sum"] / count
            std_w = math.sqrt(max(window["w_sq"] / count - mean_w**2, 0.0))
            logger.info("epoch %d | step %d/%d | lr %.4g | loss %.4f | weight %.4f +- %.4f | "
                        "meta-val loss %.4f", epoch + 1, progress["step"], run.total_steps, lr,
                        window["loss"] / window["steps"], mean_w, std_w, progress["meta_val_loss"])
            window = dict.fromkeys(window, 0)


def train(args) -> dict:
    """Runs the whole command; returns the final results (also logged, and saved to
    ``--save-dir/results.json``)."""
    check_args(args)
    started = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    run = build_run(args)
    splits, model, progress = run.splits, run.model, run.progress
    n_train = len(splits.train_labels)
    auc_indices = torch.randperm(n_train, generator=torch.Generator().manual_seed(args.seed))
    auc_indices = auc_indices[:args.auc_examples].sort().values.to(splits.train_labels.device)
    logger.info("%s: %d train (%.1f%% noisy labels), %d valid, %d test; %s, %d params; teacher %s",
                args.dataset, n_train,
                100.0 * float((splits.train_labels != splits.train_clean_labels).float().mean()),
                len(splits.valid_labels), len(splits.test_labels), type(model).__name__,
                sum(p.numel() for p in model.parameters()), args.teacher)
    model.train()
    for epoch in range(progress["epoch"], args.epochs):
        train_epoch(run, epoch)
        progress["epoch"] = epoch + 1
        valid_acc = evaluate(model, splits.valid_images, splits.valid_labels, splits)
        progress["best_valid_acc"] = max(progress["best_valid_acc"], valid_acc)
        teacher_auc, loss_auc = noise_auc(model, run.weigher, splits, auc_indices, run.context())
        logger.info("epoch %d done | valid acc %.2f | teacher AUC %s | loss AUC %s | %.0fs",
                    epoch + 1, valid_acc, _fmt(teacher_auc), _fmt(loss_auc), time.time() - started)
        if args.save_dir:
            save_checkpoint(os.path.join(args.save_dir, "checkpoint_last.pt"), model,
                            run.optimizer, run.weigher, run.teacher_optimizer, progress, args)

    teacher_auc, loss_auc = noise_auc(model, run.weigher, splits, auc_indices, run.context())
    results = {
        "test_error": 100.0 - evaluate(model, splits.test_images, splits.test_labels, splits),
        "valid_acc": evaluate(model, splits.valid_images, splits.valid_labels, splits),
        "teacher_auc": teacher_auc, "loss_auc": loss_auc, "steps": progress["step"],
        "teacher": args.teacher, "noise": args.noise, "noise_rate": args.noise_rate,
        "seed": args.seed, "seconds": round(time.time() - started, 1),
    }
    logger.info("results | %s", json.dumps(results))
    if args.save_dir:
        with open(os.path.join(args.save_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
    return results


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fairseq_reweight.vision.train",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="folder with cifar-10-python.tar.gz / cifar-100-python.tar.gz "
                   "(or their unpacked folders); unused for digits")
    p.add_argument("--dataset", default="cifar10", choices=("cifar10", "cifar100", "digits"))
    p.add_argument("--download", action="store_true", help="fetch the archive if --data lacks it")
    p.add_argument("--noise", default="none", choices=NOISE_KINDS)
    p.add_argument("--noise-rate", type=float, default=0.0)
    p.add_argument("--valid-size", type=int, default=0, help="clean validation examples split "
                   "from the training set (0: 5000 for CIFAR, 100 for digits)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--arch", default="resnet", choices=("resnet", "wrn"))
    p.add_argument("--depth", type=int, default=0, help="0: 32 for resnet, 28 for wrn")
    p.add_argument("--width", type=int, default=16, help="channels of the first stage")
    p.add_argument("--widen", type=int, default=10, help="WRN widening factor")
    p.add_argument("--dropout", type=float, default=0.0, help="WRN dropout between convs")
    p.add_argument("--epochs", type=int, default=160)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--lr-steps", default="80,120", help="epochs at which lr is multiplied by "
                   "--lr-decay, comma-separated")
    p.add_argument("--lr-decay", type=float, default=0.1)
    p.add_argument("--no-augment", action="store_true", help="no random crop/flip on CIFAR")
    p.add_argument("--teacher", default="deep", choices=TEACHER_KINDS)
    p.add_argument("--teacher-hidden-layers", type=int, default=0)
    p.add_argument("--teacher-lr", type=float, default=1e-3)
    p.add_argument("--reweight-interval", type=int, default=20, help="K: student steps per "
                   "teacher step")
    p.add_argument("--reweight-backprop-steps", type=int, default=2, help="B: steps the "
                   "hypergradient goes back through (B <= K)")
    p.add_argument("--history-mode", default="reverse", choices=("reverse", "checkpoint"))
    p.add_argument("--meta-batch-size", type=int, default=0, help="0: --batch-size")
    p.add_argument("--auc-examples", type=int, default=5000, help="training examples scored "
                   "for the noisy-label AUC")
    p.add_argument("--save-dir", default="")
    p.add_argument("--resume", action="store_true",
                   help="continue from --save-dir/checkpoint_last.pt")
    p.add_argument("--log-interval", type=int, default=50)
    p.add_argument("--device", default="")
    p.add_argument("--threads", type=int, default=0)
    return p


def check_args(args):
    """Fills dataset-dependent defaults and rejects inconsistent options (one-line errors)."""
    if not args.valid_size:
        args.valid_size = VALID_SIZE[args.dataset]
    if args.noise != "none" and not 0.0 < args.noise_rate <= 1.0:
        raise ReweightConfigError(f"--noise {args.noise} needs --noise-rate in (0, 1], "
                                  f"got {args.noise_rate}")
    if args.noise == "none" and args.noise_rate:
        raise ReweightConfigError(f"--noise-rate {args.noise_rate} given with --noise none: "
                                  "pick --noise uniform or flip")
    check_schedule(args.reweight_interval, args.reweight_backprop_steps)
    if args.teacher != "none":
        check_reversible(args.history_mode, args.momentum, "--history-mode")
    if args.resume and not args.save_dir:
        raise ReweightConfigError("--resume needs --save-dir (where checkpoint_last.pt is)")
    if args.epochs < 1 or args.batch_size < 1 or args.log_interval < 1:
        raise ReweightConfigError("--epochs, --batch-size and --log-interval must be >= 1")


def main(argv: Optional[List[str]] = None) -> dict:
    return train(get_parser().parse_args(argv))


def cli_main():
    from fairseq_reweight.core.errors import install_excepthook

    install_excepthook()
    logging.basicConfig(format="%(asctime)s | %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    main()


if __name__ == "__main__":
    cli_main()
