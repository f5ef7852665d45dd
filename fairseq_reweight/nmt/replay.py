"""Replaying fairseq's student updates for the hypergradient.

:class:`StudentView` is the student's parameters as the optimizer holds them, in the model's shapes
(fp32 master weights under ``--fp16``); :class:`Replay` the losses of the recorded updates and of a
validation batch as functions of those parameters, normalised exactly as fairseq's trainer
normalises gradients; :func:`replay_session` builds both and leaves training as it was;
:func:`teacher_hypergradient` is the one place that calls the core's reverse loop for NMT (the
driver's meta-update and the gradcheck command). What data parallelism adds (a rank's share, the
all-reduces) is in :mod:`.data_parallel`.
"""
import contextlib
import copy
import dataclasses
import math
import re
from dataclasses import dataclass
from typing import List, Optional

import torch
from fairseq import utils

from fairseq_reweight.core import HypergradOptions, HypergradResult, reverse_hypergradient
from fairseq_reweight.core.checks import all_finite
from fairseq_reweight.core.errors import ReweightConfigError
from fairseq_reweight.core.records import map_record_tensors
from fairseq_reweight.core.reparam import substitute_parameters
from fairseq_reweight.nmt import fairseq_contract as contract
from fairseq_reweight.nmt.data_parallel import all_reduce_fn, rank_share, summed_over_ranks


def sample_size(sample, criterion) -> int:
    """The criterion's sample size of ``sample`` (sentences with --sentence-avg, else tokens)."""
    return sample["target"].size(0) if criterion.sentence_avg else sample["ntokens"]


@dataclass
class Fp32ReplayModel:
    """The fp32 copy of the student that the replay runs on where the optimizer steps fp32 master
    copies (``--fp16``, ``--bf16``), so that the double backward is computed in fp32 (docs/METHOD.md,
    "Precision"): made at the first meta-update, kept by the driver for the later ones (the replay
    puts the master weights into it each time)."""

    model: Optional[torch.nn.Module] = None

    def of(self, model: torch.nn.Module) -> torch.nn.Module:
        """The copy, made from ``model`` the first time."""
        if self.model is None:
            self.model = copy.deepcopy(model).float().requires_grad_(False)
        return self.model


class StudentView:
    """The student's parameters as the optimizer holds them, seen in the model's shapes.

    Without ``--fp16`` the optimizer steps the model's own parameters. With ``--fp16`` it steps fp32
    master copies; the replay then runs on ``shadow``'s fp32 copy of the model (a new one if None).
    """

    def __init__(self, model, recorder, shadow: Optional[Fp32ReplayModel] = None):
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        model_params = [p for p in model.parameters() if p.requires_grad]
        self.shapes = [p.shape for p in model_params]
        self.recorder = recorder
        self.opt_params = list(recorder.group["params"])
        self.device = self.opt_params[0].device
        if len(self.opt_params) == len(model_params) and all(a is b for a, b in zip(self.opt_params, model_params)):
            self.replay_model = model
        else:
            self.replay_model = (Fp32ReplayModel() if shadow is None else shadow).of(model)

    def to_model_shapes(self, tensors):
        return contract.master_params_in_model_shapes(tensors, self.shapes)

    def theta(self):
        return self.to_model_shapes([p.detach() for p in self.opt_params])

    def final_state(self):
        """The optimizer state the reverse loop undoes (SGD's v_K), or None (Adam)."""
        state = self.recorder.final_state()
        return None if state is None else self.to_model_shapes(state)

    def param_dict(self, params):
        return dict(zip(self.names, params))

    def convert_record(self, record):
        """The record's stored tensors in the model's shapes (flat fp32 masters under --fp16)."""
        if getattr(record, "momentum_buffers", None) is not None:
            buffers = [torch.zeros_like(p) if b is None else b for p, b in zip(record.params, record.momentum_buffers)]
            record = dataclasses.replace(record, momentum_buffers=buffers)
        return map_record_tensors(record, self.to_model_shapes)


def meta_valid_loss(model, criterion, sample, valid_loss: str, size: float):
    """``--meta-valid-loss`` of ``sample`` under ``model`` as it stands (the caller sets eval mode and
    the parameters), divided by ``size``: the criterion's token loss (label-smoothed with
    --label-smoothing) or the plain NLL, summed over tokens; or ``sentence-nll``, each sentence's mean
    token NLL summed over sentences. Half-precision losses are summed in float32."""
    criterion = contract.unwrap_model(criterion)
    epsilon = criterion.eps if valid_loss == "criterion" else 0.0  # 0: the loss is the NLL
    token_loss = criterion.token_losses(model, model(**sample["net_input"]), sample, epsilon)[0]  # 0 on padding
    token_loss = token_loss.to(torch.promote_types(token_loss.dtype, torch.float32))
    if valid_loss != "sentence-nll":
        return token_loss.sum() / size
    target = sample["target"][:, criterion.ignore_prefix_size:]
    per_sentence = token_loss.view(target.shape).sum(1) / target.ne(criterion.padding_idx).sum(1).clamp_min(1)
    return per_sentence.sum() / size


class Replay:
    """The student's losses as functions of its parameters, for one meta-update."""

    def __init__(self, student: StudentView, criterion, omega: dict, seed: int, valid_loss: str = "criterion",
                 chunks: int = 1):
        self.student, self.criterion, self.seed = student, criterion, seed
        self.chunks = chunks  # --reweight-chunks: the validation gradient in this many row chunks
        self.omega_by_name = omega
        self.omega = list(omega.values())
        self.valid_loss = valid_loss  # --meta-valid-loss: "criterion" (e.g. label-smoothed), "nll", "sentence-nll"

    def _loss(self, sample, params):
        """``criterion(model, sample)``'s loss with the student at ``params``, the teacher at omega."""
        model = self.student.replay_model
        with substitute_parameters(model, self.student.param_dict(params)):
            return self.criterion(model, sample, teacher_params=self.omega_by_name)[0]

    def validation_loss(self, sample, params, size: Optional[float] = None):
        """The validation loss at ``params`` (eval mode: no dropout), by ``valid_loss``: the
        criterion's (label-smoothed with --label-smoothing) or the plain NLL, averaged over tokens;
        or ``sentence-nll``, each sentence's mean token NLL averaged over sentences. Divided by
        ``size`` if given (a share of a batch), else by the sample's tokens or sentences."""
        if self.student.device.type == "cuda":
            sample = utils.move_to_cuda(sample, device=self.student.device)
        model = self.student.replay_model
        model.eval()
        size = self.validation_size(sample) if size is None else size
        with substitute_parameters(model, self.student.param_dict(params)):
            return meta_valid_loss(model, self.criterion, sample, self.valid_loss, size)

    def validation_size(self, sample) -> float:
        """What the validation loss is averaged over: sentences (``sentence-nll``), else the
        criterion's sample size."""
        if self.valid_loss == "sentence-nll":
            return float(sample["target"].size(0))
        return float(sample_size(sample, self.criterion))

    def validation_gradient(self, sample):
        """(validation loss, its gradient) at the student's current parameters theta_K.

        Under data parallelism every rank holds the same batch; each computes the loss of its share
        of the sentences (rows rank, rank + N, ...) divided by the whole batch's size, and the
        all-reduced sums are the whole batch's loss and gradient, at 1/N of the work per rank. With
        ``chunks`` > 1 the rows are taken in that many chunks, one graph at a time."""
        leaves = [t.detach().requires_grad_() for t in self.student.theta()]
        size = self.validation_size(sample)
        rows = rank_share(torch.arange(sample["target"].size(0)))
        pad = contract.unwrap_model(self.criterion).padding_idx
        whole = rows.numel() == sample["target"].size(0) and self.chunks <= 1
        # eval mode (no dropout): chunks of the batch give the same loss and gradient, summed
        parts = [sample] if whole else [contract.batch_rows(sample, part, pad)
                                        for part in rows.tensor_split(max(1, min(self.chunks, rows.numel())))
                                        if part.numel() > 0]
        loss, grads = leaves[0].new_zeros(1), [None] * len(leaves)  # no rows: fewer sentences than ranks
        for part in parts:
            value = self.validation_loss(part, leaves, size)
            part_grads = torch.autograd.grad(value, leaves, allow_unused=True)
            loss = loss + value.detach().reshape(1)
            grads = [g if a is None else (a if g is None else a + g) for a, g in zip(grads, part_grads)]
        grads = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]
        all_reduce = all_reduce_fn()
        if all_reduce is not None:
            all_reduce([loss] + grads)
        return loss.item(), grads

    def loss_fn(self, step, params):
        """The step's micro-batch losses at ``params``, normalised as the trainer normalises."""
        data = step.data
        sizes = [float(sample_size(s, self.criterion)) for s, _ in data.micro_batches]
        total = contract.update_sample_size(sizes, bool(data.micro_batches) and data.micro_batches[-1][1])
        total = summed_over_ranks(total, self.student.device) or 1.0  # the whole update's, on every rank
        contract.seed_for_update(self.seed, data.update_num)
        model = self.student.replay_model
        model.train()
        model.set_num_updates(data.update_num)
        for sample, ignore_grad in data.micro_batches:
            loss = self._loss(sample, params)
            yield loss * 0.0 if ignore_grad else loss / total


@contextlib.contextmanager
def replay_session(model, criterion, teacher, recorder, seed: int, valid_loss: str, update_num: int,
                   shadow: Optional[Fp32ReplayModel] = None, chunks: int = 1):
    """A :class:`Replay` of the student with fresh teacher leaves omega; restores torch's RNG, the
    model's mode and update counter afterwards, so that training continues exactly as without it."""
    inner = contract.unwrap_model(model)
    rng_state = utils.get_rng_state()
    omega = {name: p.detach().clone().requires_grad_() for name, p in teacher.named_parameters()}
    try:
        yield Replay(StudentView(inner, recorder, shadow), criterion, omega, seed, valid_loss, chunks)
    finally:
        utils.set_rng_state(rng_state)
        inner.set_num_updates(update_num)
        inner.train()


def teacher_hypergradient(replay: Replay, steps: List, val_grad, mode: str, teacher_grad_only: bool = True,
                          all_reduce=None, hvp: str = "double-backward", kept=None,
                          overwrite_val_grad: bool = False) -> HypergradResult:
    """``d L_val / d omega`` through the recorded ``steps`` (oldest first) at the student's state
    (``hvp``: ``--reweight-hvp``; ``kept``: the newest step's graph from training, or None;
    ``overwrite_val_grad``: ``val_grad`` may be overwritten, see the core's ``reverse_hypergradient``)."""
    student = replay.student
    return reverse_hypergradient(
        student.theta(), student.final_state(), replay.omega, [student.convert_record(s) for s in steps],
        replay.loss_fn, val_grad, kept=kept, options=HypergradOptions(
            mode=mode, optimizer=student.recorder.reverse, hvp=hvp, teacher_grad_only=teacher_grad_only,
            all_reduce=all_reduce, overwrite_val_grad=overwrite_val_grad),
    )


def meta_gradient(replay: Replay, steps: List, sample, mode: str, hvp: str = "double-backward",
                  valid_params: Optional[str] = None, kept=None):
    """(validation loss, teacher gradient) of one meta-update, the gradient None where the validation
    gradient or the hypergradient has non-finite entries (a diverged student: skip the update).
    ``valid_params`` (``--meta-valid-params``): keep the validation gradient of the parameters whose
    names match this regular expression only. ``kept``: the newest step's graph from training
    (:class:`~fairseq_reweight.core.gradients.KeptStep`), or None."""
    val_loss, val_grad = replay.validation_gradient(sample)
    if not (math.isfinite(val_loss) and all_finite(val_grad)):
        return val_loss, None
    if valid_params:
        keep = re.compile(valid_params)
        val_grad = [g if keep.search(name) else torch.zeros_like(g) for name, g in zip(replay.student.names, val_grad)]
    # overwrite_val_grad: val_grad is not read after this call, so its tensors may serve as theta's adjoint
    grads = teacher_hypergradient(replay, steps, val_grad, mode, all_reduce=all_reduce_fn(), hvp=hvp,
                                  kept=kept, overwrite_val_grad=True).teacher_grad
    return val_loss, grads if all_finite(grads) else None


def check_skips(consecutive: int, max_skips: int, update_num: int, val_loss: float) -> None:
    """Stop with one line after ``--reweight-max-skips`` skipped meta-updates in a row."""
    if consecutive >= max_skips > 0:
        raise ReweightConfigError(
            f"{consecutive} meta-updates in a row (the last before update {update_num}) had a non-finite "
            f"validation gradient or teacher gradient (validation loss {val_loss:.4g}): the student diverged; "
            "lower --lr (or --teacher-lr), or raise --reweight-max-skips"
        )
