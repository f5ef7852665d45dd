"""The naive hypergradient: unroll the student's steps in one autograd graph and backpropagate.

Memory grows with the number of steps (every step's double-backward graph is kept), so this is a
reference for tests and for the ``gradcheck`` command, not for training. It applies the same step
as :class:`~fairseq_reweight.hypergrad.reverse.StepRecord` documents: clipping inside the graph
(``s = min(1, c / (||G|| + 1e-6))``), weight decay, momentum, PyTorch's SGD convention.
"""
import contextlib
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .reverse import (
    CLIP_EPS,
    LossFn,
    StepRecord,
    iter_loss_chunks,
    math_attention,
    validate_steps,
    validate_teacher_params,
    validate_tensor_list,
)

__all__ = ["unroll_steps", "unrolled_hypergradient"]


def _step_gradient(step: StepRecord, params: List[Tensor], loss_fn: LossFn, index: int, create_graph):
    """G = d loss_fn(step, params) / d params, summed chunk by chunk (zeros for unused params)."""
    total = [torch.zeros_like(p) for p in params]
    for chunk in iter_loss_chunks(loss_fn(step, params), index):
        if not chunk.requires_grad:
            continue
        grads = torch.autograd.grad(chunk, params, create_graph=create_graph, allow_unused=True)
        total = [t if g is None else t + g for t, g in zip(total, grads)]
    return total


def _apply_step(step: StepRecord, params, buffers, grads):
    """One momentum-SGD step, out of place (differentiable when the inputs carry a graph)."""
    if step.clip_norm > 0:
        norm = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads]))
        scale = (step.clip_norm / (norm + CLIP_EPS)).clamp(max=1.0)
        grads = [scale * g for g in grads]
    if step.weight_decay:
        grads = [g + step.weight_decay * p for g, p in zip(grads, params)]
    buffers = [step.momentum * v + g for v, g in zip(buffers, grads)]
    params = [p - step.lr * v for p, v in zip(params, buffers)]
    return params, buffers


def unroll_steps(
    start_params: Sequence[Tensor],
    start_momentum_buffers: Optional[Sequence[Optional[Tensor]]],
    steps: Sequence[StepRecord],
    loss_fn: LossFn,
    *,
    create_graph: bool = False,
    math_sdpa: bool = True,
) -> Tuple[List[Tensor], List[Tensor]]:
    """Replay ``steps`` from theta_{K-B}, v_{K-B}; return (theta_K, v_K).

    Args:
        start_params: theta at the start of the window (treated as constants).
        start_momentum_buffers: v at the start (None, or None entries, for zeros).
        steps: the step records, oldest first.
        loss_fn: as for :func:`~fairseq_reweight.hypergrad.reverse.reverse_hypergradient`.
        create_graph: keep the whole unrolled graph (differentiable with respect to the teacher);
            otherwise the result is detached and memory stays at one step.
        math_sdpa: run under :func:`~fairseq_reweight.hypergrad.reverse.math_attention`.

    Returns:
        (theta_K, v_K) as lists of tensors.
    """
    steps = list(steps)
    start_params = list(start_params)
    validate_steps(steps, start_params, mode="unrolled")
    params = validate_tensor_list(start_params, start_params, "start_params", none_is_zero=False)
    if start_momentum_buffers is None:
        start_momentum_buffers = [None] * len(params)
    buffers = validate_tensor_list(start_momentum_buffers, params, "start_momentum_buffers", True)
    params = [p.requires_grad_(True) for p in params]
    attention = math_attention() if math_sdpa else contextlib.nullcontext()
    with attention, torch.enable_grad():
        for index, step in enumerate(steps):
            grads = _step_gradient(step, params, loss_fn, index, create_graph)
            if create_graph:
                params, buffers = _apply_step(step, params, buffers, grads)
            else:
                with torch.no_grad():
                    params, buffers = _apply_step(step, params, buffers, grads)
                params = [p.requires_grad_(True) for p in params]
    if not create_graph:
        params = [p.detach() for p in params]
    return params, buffers


def unrolled_hypergradient(
    start_params: Sequence[Tensor],
    start_momentum_buffers: Optional[Sequence[Optional[Tensor]]],
    teacher_params: Sequence[Tensor],
    steps: Sequence[StepRecord],
    loss_fn: LossFn,
    val_loss_fn: Callable[[List[Tensor]], Tensor],
    *,
    math_sdpa: bool = True,
) -> List[Tensor]:
    """``d val_loss_fn(theta_K) / d omega`` by plain autograd through all of ``steps``.

    Args:
        start_params: theta_{K-B} (constants).
        start_momentum_buffers: v_{K-B} (None or None entries for zeros).
        teacher_params: omega, leaf tensors with ``requires_grad=True`` (``.grad`` untouched).
        steps: the B step records, oldest first.
        loss_fn: ``loss_fn(step, params)``, as for ``reverse_hypergradient``.
        val_loss_fn: ``val_loss_fn(params)``: the scalar validation loss at the given parameters.
        math_sdpa: run under ``math_attention()``.

    Returns:
        one gradient tensor per teacher parameter (zeros where it has no influence).
    """
    teacher_params = list(teacher_params)
    validate_teacher_params(teacher_params)
    attention = math_attention() if math_sdpa else contextlib.nullcontext()
    with attention, torch.enable_grad():
        final_params, _ = unroll_steps(
            start_params, start_momentum_buffers, steps, loss_fn, create_graph=True, math_sdpa=False
        )
        val_loss = val_loss_fn(final_params)
        if not isinstance(val_loss, Tensor) or val_loss.numel() != 1:
            raise ValueError("val_loss_fn must return a scalar tensor")
        if not val_loss.requires_grad:
            return [torch.zeros_like(w) for w in teacher_params]
        grads = torch.autograd.grad(val_loss.reshape(()), teacher_params, allow_unused=True)
    return [torch.zeros_like(w) if g is None else g for g, w in zip(grads, teacher_params)]
