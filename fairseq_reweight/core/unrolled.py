"""The naive hypergradient: unroll the student's steps in one autograd graph and backpropagate.

Memory grows with the number of steps (every step's double-backward graph is kept), so this is a
reference for tests and for the ``gradcheck`` command, not for training. It applies the same step
as the optimizer's ``apply`` takes it (:class:`~.interfaces.ReversibleOptimizer`:
:data:`~.sgd.SGD_REVERSE`, :data:`~.adam.ADAM_REVERSE`): clipping inside the graph
(``s = min(1, c / (||G|| + 1e-6))``), weight decay, momentum or Adam's moments.
"""
import contextlib
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .attention import math_attention
from .checks import validate_inputs, validate_teacher_params, validate_tensor_list
from .gradients import StepContext, step_gradient
from .interfaces import LossFn, OptimizerState, Record, ReversibleOptimizer
from .sgd import SGD_REVERSE

__all__ = ["unroll_steps", "unrolled_hypergradient"]


def unroll_steps(
    start_params: Sequence[Tensor],
    start_momentum_buffers: Optional[OptimizerState],
    steps: Sequence[Record],
    loss_fn: LossFn,
    *,
    create_graph: bool = False,
    math_sdpa: bool = True,
    optimizer: ReversibleOptimizer = SGD_REVERSE,
) -> Tuple[List[Tensor], OptimizerState]:
    """Replay ``steps`` from theta_{K-B}, v_{K-B}; return (theta_K, v_K).

    Args:
        start_params: theta at the start of the window (treated as constants).
        start_momentum_buffers: the optimizer state at the start: SGD's v, Adam's (m, v) (None, or
            None entries, for zeros).
        steps: the step records, oldest first.
        loss_fn: as for :func:`~fairseq_reweight.core.reverse.reverse_hypergradient`.
        create_graph: keep the whole unrolled graph (differentiable with respect to the teacher);
            otherwise the result is detached and memory stays at one step.
        math_sdpa: run under :func:`~fairseq_reweight.core.attention.math_attention`.
        optimizer: how the steps are taken (:data:`~.sgd.SGD_REVERSE`, :data:`~.adam.ADAM_REVERSE`).

    Returns:
        (theta_K, the optimizer state at theta_K).
    """
    steps = list(steps)
    start_params = list(start_params)
    validate_inputs(start_params, steps, optimizer.check_step, mode="unrolled")
    params = validate_tensor_list(start_params, start_params, "start_params", none_is_zero=False)
    buffers = optimizer.initial_state(start_momentum_buffers, params)
    params = [p.requires_grad_(True) for p in params]
    attention = math_attention() if math_sdpa else contextlib.nullcontext()
    with attention, torch.enable_grad():
        for index, step in enumerate(steps):
            grads = step_gradient(StepContext(step, index, params, loss_fn), create_graph)
            if create_graph:
                params, buffers = optimizer.apply(step, params, buffers, grads)
            else:
                with torch.no_grad():
                    params, buffers = optimizer.apply(step, params, buffers, grads)
                params = [p.requires_grad_(True) for p in params]
    if not create_graph:
        params = [p.detach() for p in params]
    return params, buffers


def unrolled_hypergradient(
    start_params: Sequence[Tensor],
    start_momentum_buffers: Optional[OptimizerState],
    teacher_params: Sequence[Tensor],
    steps: Sequence[Record],
    loss_fn: LossFn,
    val_loss_fn: Callable[[List[Tensor]], Tensor],
    *,
    math_sdpa: bool = True,
    optimizer: ReversibleOptimizer = SGD_REVERSE,
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
        optimizer: as for :func:`unroll_steps`.

    Returns:
        one gradient tensor per teacher parameter (zeros where it has no influence).
    """
    teacher_params = list(teacher_params)
    validate_teacher_params(teacher_params)
    attention = math_attention() if math_sdpa else contextlib.nullcontext()
    with attention, torch.enable_grad():
        final_params, _ = unroll_steps(
            start_params, start_momentum_buffers, steps, loss_fn, create_graph=True, math_sdpa=False,
            optimizer=optimizer,
        )
        val_loss = val_loss_fn(final_params)
        if not isinstance(val_loss, Tensor) or val_loss.numel() != 1:
            raise ValueError("val_loss_fn must return a scalar tensor")
        if not val_loss.requires_grad:
            return [torch.zeros_like(w) for w in teacher_params]
        grads = torch.autograd.grad(val_loss.reshape(()), teacher_params, allow_unused=True)
    return [torch.zeros_like(w) if g is None else g for g, w in zip(grads, teacher_params)]
