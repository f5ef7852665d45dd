"""The teacher side of image training: teacher inputs, step replay and the meta-update.

:class:`ExampleWeigher` builds the teacher's inputs from the student's outputs and scores each
example; :class:`StepData` is what a recorded student step needs to be replayed;
:func:`student_loss` is the reweighted training loss of one step, taken or replayed; and
:func:`teacher_update` steps the teacher with Adam on the reverse-mode hypergradient of the loss
on a clean validation batch through the last B student steps (Fan et al., "Learning to Reweight
with Deep Interactions", AAAI 2021, Algorithm 1; equations in docs/METHOD.md).

Design choices:
- Teachers: ``deep`` is the paper's I0 + M0 (layer-normalised penultimate features plus a label
  embedding); ``surface`` is M1 (training progress, running mean training loss, best validation
  accuracy, per-example loss, prediction == label, probability margin); ``deep+surface`` is both.
  The linear ``deep`` teacher scores ``W.I + E[y]``, a sum with no feature-label interaction, so
  it cannot express "these features disagree with this label"; ``hidden_layers=1`` (an MLP over
  [I; E[y]], ``--teacher-hidden-layers 1`` in the command) can.
- Weights are normalised within the minibatch (mean 1), so the loss ``mean(w * CE)`` is plain CE
  under uniform weights and at the teacher's zero initialisation.
- Train mode: the replayed steps and the validation loss run in train mode (BatchNorm batch
  statistics, dropout on) on copies of the running statistics, so they see exactly the function
  the student step minimised and never touch the model's running statistics. Replays restore the
  RNG state of their forward pass (same dropout masks).
"""
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from fairseq_reweight.core import HypergradOptions, RecordingSGD, StepRecord, reverse_hypergradient
from fairseq_reweight.core.errors import ReweightConfigError
from fairseq_reweight.core.features import SURFACE_COLUMNS, TrainingState, surface_features, teacher_inputs
from fairseq_reweight.core.teacher import Teacher, apply_teacher_gradient, normalize_weights

TEACHER_KINDS = ("none", "deep", "surface", "deep+surface")


@dataclass
class StepData:
    """What replaying one student step needs (stored in ``StepRecord.data``)."""

    inputs: Tensor  # N x C x H x W, normalised and augmented exactly as trained on
    labels: Tensor  # N, the (noisy) training labels
    progress: float = 0.0
    mean_train_loss: float = 0.0
    best_valid_acc: float = 0.0
    rng_state: Optional[Tensor] = None  # CPU RNG before the forward pass (dropout masks)
    cuda_rng_state: Optional[Tensor] = None

    def record_rng_state(self):
        """Stores the current RNG state (CPU, and CUDA where ``inputs`` live there), so a replay
        draws the dropout masks the step's forward pass is about to draw."""
        self.rng_state = torch.get_rng_state()
        if self.inputs.device.type == "cuda":
            self.cuda_rng_state = torch.cuda.get_rng_state(self.inputs.device)


class ExampleWeigher(nn.Module):
    """The teacher together with the construction of its inputs from the student's outputs.

    Args:
        kind: one of ``TEACHER_KINDS`` other than ``"none"``.
        feature_dim: width of the student's penultimate features.
        num_classes: number of labels (size of the ``deep`` teacher's label embedding).
        hidden_layers: 0 for the paper's linear teacher, N > 0 for an MLP with N hidden layers
            over its inputs.
    """

    def __init__(self, kind: str, feature_dim: int, num_classes: int, hidden_layers: int = 0):
        super().__init__()
        if kind not in TEACHER_KINDS[1:]:
            raise ReweightConfigError(f"unknown teacher {kind!r}: choose one of {TEACHER_KINDS}")
        self.deep = kind in ("deep", "deep+surface")
        self.surface = kind in ("surface", "deep+surface")
        dense = feature_dim * self.deep + len(SURFACE_COLUMNS) * self.surface
        self.teacher = Teacher(dense, num_classes if self.deep else 0, hidden_layers)

    def forward(self, features: Tensor, logits: Tensor, labels: Tensor, losses: Tensor,
                context: StepData) -> Tensor:
        """Weights in (0, 1) before normalisation, one per example (inputs should be detached)."""
        surface = None
        if self.surface:  # M1
            state = TrainingState(context.progress, context.mean_train_loss, context.best_valid_acc)
            surface = surface_features(logits.log_softmax(-1), labels, state, SURFACE_COLUMNS, losses)
        dense = teacher_inputs([features] if self.deep else [], surface, features.dtype)  # I0 (+ M1)
        return self.teacher(dense, labels if self.deep else None)


class _ReplayRNG:
    """Restores the RNG state a forward pass started from (same dropout masks), then undoes it."""

    def __init__(self, data: StepData):
        self.data, self.saved = data, None

    def __enter__(self):
        if self.data.rng_state is not None:
            device = self.data.inputs.device
            cuda = self.data.cuda_rng_state is not None
            self.saved = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if cuda else None)
            torch.set_rng_state(self.data.rng_state)
            if cuda:
                torch.cuda.set_rng_state(self.data.cuda_rng_state, device)

    def __exit__(self, *exc):
        if self.saved is not None:
            torch.set_rng_state(self.saved[0])
            if self.saved[1] is not None:
                torch.cuda.set_rng_state(self.saved[1], self.data.inputs.device)


def student_loss(model: nn.Module, weigher: Optional[ExampleWeigher], data: StepData,
                 params: Optional[Dict[str, Tensor]] = None, teacher_grad: bool = False):
    """The reweighted training loss ``mean_i(w_i * CE_i)`` of one step.

    With ``params`` the model is evaluated functionally at those parameters, on copies of its
    buffers (the step is replayed without touching BatchNorm running statistics).

    Returns:
        (loss, per-example cross-entropy, raw teacher weights or None), the last two detached.
    """
    if params is None:  # the step itself: draws fresh dropout masks, updates BatchNorm stats
        logits, features = model(data.inputs)
    else:
        with _ReplayRNG(data):
            buffers = {name: b.clone() for name, b in model.named_buffers()}
            logits, features = functional_call(model, (params, buffers), (data.inputs,))
    losses = F.cross_entropy(logits, data.labels, reduction="none")  # N
    if weigher is None:
        return losses.mean(), losses.detach(), None
    with torch.set_grad_enabled(teacher_grad):
        raw = weigher(features.detach(), logits.detach(), data.labels, losses.detach(), data)
    return (normalize_weights(raw) * losses).mean(), losses.detach(), raw.detach()


def teacher_hypergradient(model: nn.Module, optimizer: RecordingSGD, weigher: ExampleWeigher,
                          val_inputs: Tensor, val_labels: Tensor, backprop_steps: int,
                          mode: str = "reverse"):
    """Algorithm 1: ``d L_val(theta_K) / d omega`` through the last ``backprop_steps`` steps.

    Returns:
        (validation loss at theta_K, list of gradients like ``weigher.parameters()``).
    """
    names = [name for name, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    logits, _ = functional_call(model, (dict(zip(names, params)), buffers), (val_inputs,))
    val_loss = F.cross_entropy(logits, val_labels)
    val_grad = torch.autograd.grad(val_loss, params)

    def loss_fn(step: StepRecord, step_params: List[Tensor]) -> Tensor:
        return student_loss(model, weigher, step.data, dict(zip(names, step_params)), True)[0]

    steps = optimizer.window(backprop_steps)  # oldest first
    result = reverse_hypergradient([p.detach() for p in params], optimizer.momentum_buffers(),
                                   list(weigher.parameters()), steps, loss_fn, val_grad,
                                   HypergradOptions(mode=mode, teacher_grad_only=True))
    return float(val_loss.detach()), result.teacher_grad


def teacher_update(model: nn.Module, optimizer: RecordingSGD, weigher: ExampleWeigher,
                   teacher_optimizer: torch.optim.Optimizer, val_inputs: Tensor, val_labels: Tensor,
                   backprop_steps: int, mode: str = "reverse") -> float:
    """One teacher step on the hypergradient; returns the validation loss at theta_K."""
    val_loss, grads = teacher_hypergradient(model, optimizer, weigher, val_inputs, val_labels,
                                            backprop_steps, mode)
    apply_teacher_gradient(weigher, teacher_optimizer, grads)
    return val_loss
