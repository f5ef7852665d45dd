"""Replaying fairseq's student updates for the hypergradient.

What a meta-update needs besides the teacher: the record of each update (:class:`ReplayData`, kept in
``StepRecord.data`` by the driver), the student's parameters as the optimizer holds them seen in the
model's shapes (:class:`StudentView`; fp32 master weights under ``--fp16``), and the losses of the
recorded updates and of a validation batch as functions of those parameters (:class:`Replay`),
normalised exactly as fairseq's trainer normalises gradients.
"""
import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, List

import torch
import torch.distributed as dist
from fairseq import utils

from fairseq_reweight.criterions.reweighted_cross_entropy import unwrap_model
from fairseq_reweight.hypergrad import StepRecord, substitute_parameters


@dataclass
class ReplayData:
    """What the replay of one student update needs (stored in ``StepRecord.data``)."""

    update_num: int
    micro_batches: List[Any] = field(default_factory=list)  # (sample, ignore_grad) in trainer order


class Replay:
    """The student's losses as functions of its parameters, for one meta-update
    (``ReweightDriver.replaying`` builds it)."""

    def __init__(self, student, criterion, omega, seed, valid_loss="criterion"):
        self.student, self.criterion, self.omega, self.seed = student, criterion, omega, seed
        self.valid_loss = valid_loss  # "criterion" (e.g. label-smoothed) or "nll"

    def _loss(self, sample, params):
        """``criterion(model, sample)``'s loss with the student's parameters set to ``params``."""
        model = self.student.replay_model
        with substitute_parameters(model, self.student.param_dict(params)):
            return self.criterion(model, sample)[0]

    def validation_loss(self, sample, params):
        """Token-averaged validation loss at ``params`` (model in eval mode: no dropout): the
        criterion's loss (label-smoothed with --label-smoothing) or, with ``valid_loss="nll"``, the
        plain negative log-likelihood."""
        if self.student.device.type == "cuda":
            sample = utils.move_to_cuda(sample, device=self.student.device)
        model = self.student.replay_model
        model.eval()
        if self.valid_loss == "criterion":
            loss = self._loss(sample, params)
        else:  # the plain token NLL, without label smoothing
            with substitute_parameters(model, self.student.param_dict(params)):
                net_output = model(**sample["net_input"])
                loss = unwrap_model(self.criterion).compute_loss(model, net_output, sample, reduce=True)[1]
        return loss / float(sample_size(sample, self.criterion))

    def validation_gradient(self, sample):
        """(validation loss, its gradient) at the student's current parameters theta_K."""
        leaves = [t.detach().requires_grad_() for t in self.student.theta()]
        loss = self.validation_loss(sample, leaves)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        return loss.item(), [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]

    def loss_fn(self, step, params):
        """The step's micro-batch losses at ``params``, normalised as the trainer normalises."""
        data: ReplayData = step.data
        total = sum(float(sample_size(s, self.criterion)) for s, _ in data.micro_batches)
        if data.micro_batches and data.micro_batches[-1][1]:
            total = 0.0  # the trainer zeroes the sample size when the last micro-batch is a dummy
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            size = torch.tensor([total], dtype=torch.float64, device=self.student.device)
            dist.all_reduce(size)
            total = size.item()
        total = total or 1.0
        utils.set_torch_seed(self.seed + data.update_num)  # as Trainer._set_seed
        model = self.student.replay_model
        model.train()
        model.set_num_updates(data.update_num)
        for sample, ignore_grad in data.micro_batches:
            loss = self._loss(sample, params)
            yield loss * 0.0 if ignore_grad else loss / total


def record_to_state(record):
    """A StepRecord as plain data (tensors on CPU), loadable by torch's safe loader."""
    def cpu(tensors):
        return None if tensors is None else [None if t is None else t.detach().cpu() for t in tensors]

    return {
        "lr": record.lr, "momentum": record.momentum, "weight_decay": record.weight_decay,
        "clip_norm": record.clip_norm, "update_num": record.data.update_num,
        "micro_batches": [(utils.move_to_cpu(sample), ignore) for sample, ignore in record.data.micro_batches],
        "params": cpu(record.params), "momentum_buffers": cpu(record.momentum_buffers),
    }


def record_from_state(state):
    return StepRecord(
        lr=state["lr"], momentum=state["momentum"], weight_decay=state["weight_decay"],
        clip_norm=state["clip_norm"], data=ReplayData(state["update_num"], list(state["micro_batches"])),
        params=state["params"], momentum_buffers=state["momentum_buffers"],
    )


def sample_size(sample, criterion):
    """The criterion's sample size of ``sample`` (sentences with --sentence-avg, else tokens)."""
    return sample["target"].size(0) if criterion.sentence_avg else sample["ntokens"]


def find_recorder(optimizer):
    """The RecordingSGD inside fairseq's optimizer wrappers, or None."""
    from fairseq_reweight.optim.reweight_sgd import ReweightSGD

    inner = getattr(optimizer, "fp32_optimizer", None) or getattr(optimizer, "wrapped_optimizer", None) or optimizer
    return inner.recorder if isinstance(inner, ReweightSGD) else None


def all_reduce_fn():
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None

    def all_reduce(tensors):
        for tensor in tensors:
            dist.all_reduce(tensor)

    return all_reduce


class StudentView:
    """The student's parameters as the optimizer holds them, seen in the model's shapes.

    Without ``--fp16`` the optimizer steps the model's own parameters. With ``--fp16`` it steps fp32
    master copies (one flat tensor by default); the replay then runs on an fp32 copy of the model so
    that the double backward is computed in fp32 (see README, "Precision").
    """

    def __init__(self, model, recorder):
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        model_params = [p for p in model.parameters() if p.requires_grad]
        self.shapes = [p.shape for p in model_params]
        self.recorder = recorder
        self.opt_params = list(recorder.param_groups[0]["params"])
        if len(self.opt_params) == len(model_params) and all(a is b for a, b in zip(self.opt_params, model_params)):
            self.replay_model = model
        else:
            self.replay_model = _fp32_shadow(model)
        self.device = self.opt_params[0].device

    def to_model_shapes(self, tensors):
        tensors = [t for t in tensors]
        if len(tensors) == len(self.shapes):
            return [t.view(shape) for t, shape in zip(tensors, self.shapes)]
        flat = torch.cat([t.reshape(-1) for t in tensors])
        sizes = [int(torch.Size(s).numel()) for s in self.shapes]
        if flat.numel() != sum(sizes):
            raise RuntimeError("optimizer parameters do not match the model's trainable parameters")
        return [chunk.view(shape) for chunk, shape in zip(flat.split(sizes), self.shapes)]

    def theta(self):
        return self.to_model_shapes([p.detach() for p in self.opt_params])

    def momentum(self):
        return self.to_model_shapes(self.recorder.momentum_buffers())

    def param_dict(self, params):
        return dict(zip(self.names, params))

    def convert_record(self, record):
        if record.params is None:
            return record
        return dataclasses.replace(
            record,
            params=self.to_model_shapes(record.params),
            momentum_buffers=self.to_model_shapes(
                [torch.zeros_like(p) if b is None else b for p, b in zip(record.params, record.momentum_buffers)]
            ),
        )


_SHADOWS = {}


def _fp32_shadow(model):
    """A cached fp32 copy of ``model`` for replaying fp16/bf16 steps in fp32."""
    shadow = _SHADOWS.get(id(model))
    if shadow is None:
        shadow = copy.deepcopy(model).float()
        shadow.requires_grad_(False)
        _SHADOWS.clear()
        _SHADOWS[id(model)] = shadow
    return shadow
