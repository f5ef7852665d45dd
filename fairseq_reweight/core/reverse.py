"""Reverse-mode hypergradient through the student's last optimizer steps.

Fan et al., "Learning to Reweight with Deep Interactions", AAAI 2021, Algorithm 1 (after Maclaurin,
Duvenaud and Adams, "Gradient-based Hyperparameter Optimization through Reversible Learning", 2015).
The equations are restated in ``docs/METHOD.md``. Plain PyTorch: this module never imports fairseq.
The loop is the algorithm; what depends on the optimizer (undoing a step, the adjoint of its update)
comes from a :class:`~.interfaces.ReversibleOptimizer` (:data:`~.sgd.SGD_REVERSE` for momentum SGD,
:data:`~.adam.ADAM_REVERSE` for Adam), the derivatives of a replayed step from :mod:`.gradients`,
the input checks from :mod:`.checks`.

The loop, newest step first::

    theta_bar = val_grad, state_bar = 0, omega_bar = 0
    for each step:
        theta_t     = undo the parameter step         (mode="checkpoint": step.params)
        g~          = adjoint of the step's gradient   (SGD: v_bar - lr theta_bar; Adam: core/adam.py)
        d(g_t . g~)/d theta, d(g_t . g~)/d omega      (gradients.gradient_vjp: one chunked
                                                       double backward, exact through clipping;
                                                       or gradient_jvp: forward-over-reverse;
                                                       the newest step, with kept=: one backward
                                                       through the graph its training step kept;
                                                       each a gradients.StepProducts)
        state_t     = undo the state step, given G_t   (mode="reverse" only)
        theta_bar, state_bar = the optimizer's adjoint of its update + d(g_t . g~)/d theta
        omega_bar  += d(g_t . g~)/d omega

Contract of the arguments of :func:`reverse_hypergradient`:

- ``loss_fn(step, params)`` evaluates the training loss of ``step`` at the given parameter
  tensors, depending on omega through the teacher's weights. It returns one scalar or an iterable
  of scalar chunks whose sum is the objective whose gradient the optimizer received (before
  clipping and weight decay); a generator keeps one chunk's graph alive at a time. It must replay
  the step's randomness (dropout): it is called once per step, twice when clipping is on, and each
  call must give the same loss. With ``teacher_grad_only`` it must also accept dual tensors
  (``torch.autograd.forward_ad``; fairseq's Transformer does).
- ``mode="reverse"`` recovers theta_t and the state by undoing the steps (SGD: momentum > 0;
  floating-point error grows by about 1/momentum per step); ``"checkpoint"`` reads
  ``step.params`` (exact; costs B copies of theta).
- ``all_reduce``, for data parallelism, sums a list of tensors in place across workers whose
  ``loss_fn`` each return their own shard of the loss. It is applied to G of every step, to the
  theta-part of every product and to omega_bar at the end; every worker calls it with the same steps.
- ``teacher_grad_only``: the oldest step needs no theta-adjoint, so its omega-part is computed by
  forward-mode AD (:func:`~.gradients.teacher_vjp`) instead of a double backward through the
  student: one forward pass with dual numbers and a backward through the teacher alone, where a
  double backward replays the step's forward and backward and differentiates that backward
  (``benchmarks/meta_breakdown.py`` times both; figures in docs/BENCHMARKS.md).
  ``param_grad``, ``momentum_grad`` and ``start_params`` then come back empty,
  ``start_momentum_buffers`` None, and ``grad_norms`` holds nan for the oldest step unless it
  was clipped.
"""
import contextlib
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from .attention import math_attention
from .checks import check_finite, validate_inputs, validate_teacher_params, validate_tensor_list
from .gradients import HVP, KeptStep, StepContext, add_into, global_norm, kept_gradient_vjp, teacher_vjp
from .interfaces import AllReduce, LossFn, OptimizerState, Record, ReversibleOptimizer
from .sgd import SGD_REVERSE

__all__ = ["AllReduce", "HypergradResult", "LossFn", "reverse_hypergradient"]


@dataclass
class HypergradResult:
    """What :func:`reverse_hypergradient` returns.

    Attributes:
        teacher_grad: ``dL_val(theta_K)/d omega`` through the given steps, one tensor per teacher
            parameter (summed over data-parallel workers when ``all_reduce`` is given).
        param_grad: adjoint of theta at the start of the window, ``dL_val/d theta_{K-B}``.
        momentum_grad: adjoint of the optimizer state at the start of the window (SGD: v_{K-B};
            Adam: the pair (m_{K-B}, v_{K-B})).
        start_params: theta_{K-B} as used (recovered in reverse mode, copied in checkpoint mode).
        start_momentum_buffers: the optimizer state at the start (SGD: v_{K-B}, recovered in
            reverse mode, in checkpoint mode the oldest record's buffers or None; Adam: (m, v)).
        grad_norms: ``||G_t||`` of each replayed step, oldest first (after ``all_reduce``).
        clip_factors: the clip factor ``s_t`` of each replayed step, oldest first (1.0 = unclipped).
        val_grad_norm: ``||val_grad||``.
    """

    teacher_grad: List[Tensor]
    param_grad: List[Tensor]
    momentum_grad: OptimizerState = field(default_factory=list)
    start_params: List[Tensor] = field(default_factory=list)
    start_momentum_buffers: Optional[OptimizerState] = None
    grad_norms: List[float] = field(default_factory=list)
    clip_factors: List[float] = field(default_factory=list)
    val_grad_norm: float = 0.0


def reverse_hypergradient(
    params: Sequence[Tensor],
    momentum_buffers: Optional[OptimizerState],
    teacher_params: Sequence[Tensor],
    steps: Sequence[Record],
    loss_fn: LossFn,
    val_grad: Sequence[Optional[Tensor]],
    *,
    mode: str = "reverse",
    all_reduce: Optional[AllReduce] = None,
    math_sdpa: bool = True,
    teacher_grad_only: bool = False,
    optimizer: ReversibleOptimizer = SGD_REVERSE,
    hvp: str = "double-backward",
    kept: Optional[KeptStep] = None,
    overwrite_val_grad: bool = False,
) -> HypergradResult:
    """Gradient of a validation loss at theta_K with respect to the teacher, through the last steps.

    Runs Algorithm 1 backwards from t = K-1 to K-B (B = ``len(steps)``); the module docstring has
    the loop in equations and the contract of each argument.

    Args:
        params: theta_K (values only; not modified).
        momentum_buffers: the optimizer state at theta_K (SGD: v_K); read in mode="reverse" only
            (None for Adam).
        teacher_params: omega, leaf tensors with ``requires_grad=True`` (``.grad`` untouched).
        steps: the last B step records, oldest first (:func:`~.checks.select_window`).
        loss_fn: ``loss_fn(step, params)``: the step's training loss (a scalar or scalar chunks).
        val_grad: ``d L_val(theta_K) / d theta`` (None entries are zeros).
        mode: ``"reverse"`` (undo the steps) or ``"checkpoint"`` (read ``step.params``).
        all_reduce: sums a list of tensors in place across data-parallel workers, or None.
        math_sdpa: run under :func:`~.attention.math_attention`.
        teacher_grad_only: only ``teacher_grad`` is wanted: the oldest step by forward-mode AD.
        optimizer: how the steps were taken (:data:`~.sgd.SGD_REVERSE`, :data:`~.adam.ADAM_REVERSE`).
        hvp: how a step's Hessian-vector products are computed: ``"double-backward"``
            (reverse-over-reverse, :func:`~.gradients.gradient_vjp`) or ``"forward-over-reverse"``
            (:func:`~.gradients.gradient_jvp`; ``loss_fn`` must accept dual tensors). Same values
            up to round-off; which is faster depends on the model and the hardware
            (``benchmarks/meta_breakdown.py``).
        kept: the newest step's gradient graph from training (:class:`~.gradients.KeptStep`): that
            step's products come from it (one backward) instead of ``loss_fn``; not with
            ``all_reduce``, and unused when the newest step is the forward-mode oldest one (B = 1).
        overwrite_val_grad: ``val_grad``'s tensors may serve as theta's adjoint and be overwritten
            (one buffer of theta's size less); the caller must not read them afterwards.

    Returns a :class:`HypergradResult`; raises ValueError on inconsistent inputs, non-finite
    ``val_grad``, or a step the mode cannot undo.
    """
    if hvp not in HVP:
        raise ValueError(f"hvp must be one of {', '.join(map(repr, HVP))}, got {hvp!r}")
    if kept is not None and all_reduce is not None:
        raise ValueError("a kept step is one worker's gradient graph: it cannot be used with all_reduce")
    step_products = HVP[hvp]
    params, teacher_params, steps, theta_bar, state = _checked_inputs(
        params, momentum_buffers, teacher_params, steps, val_grad, mode, optimizer, not overwrite_val_grad
    )
    val_grad_norm = global_norm(theta_bar)
    theta = [p.detach().clone().requires_grad_(True) for p in params]  # theta_t, updated in place
    state_bar = optimizer.zero_adjoint(theta_bar)
    omega_bar = [torch.zeros_like(w) for w in teacher_params]
    grad_norms, clip_factors = [], []
    attention = math_attention() if math_sdpa else contextlib.nullcontext()
    with attention, torch.enable_grad():
        for index in reversed(range(len(steps))):
            step = steps[index]
            with torch.no_grad():
                optimizer.rewind_params(step, theta, state, mode)
                g_bar = optimizer.gradient_adjoint(step, theta_bar, state_bar)
            context = StepContext(step, index, theta, loss_fn, teacher_params, all_reduce)
            if teacher_grad_only and index == 0:
                products = teacher_vjp(context, g_bar)
            else:
                if kept is not None and index == len(steps) - 1:
                    products = kept_gradient_vjp(context, g_bar, kept)
                else:
                    products = step_products(context, g_bar)
                with torch.no_grad():
                    if mode == "reverse":
                        optimizer.rewind_state(step, state, products.grad, products.clip_scale, theta)
                    theta_bar, state_bar = optimizer.propagate(step, theta_bar, state_bar, g_bar, products.hvp_theta)
            grad_norms.insert(0, products.norm)
            clip_factors.insert(0, products.clip_scale)
            with torch.no_grad():
                add_into(omega_bar, products.hvp_omega)
            del products, g_bar
    if all_reduce is not None:
        all_reduce(omega_bar)
    if teacher_grad_only:
        return HypergradResult(teacher_grad=omega_bar, param_grad=[], grad_norms=grad_norms,
                               clip_factors=clip_factors, val_grad_norm=val_grad_norm)
    return HypergradResult(omega_bar, theta_bar, state_bar, [t.detach() for t in theta],
                           optimizer.start_state(steps, state, params, mode), grad_norms, clip_factors, val_grad_norm)


def _checked_inputs(params, momentum_buffers, teacher_params, steps, val_grad, mode, optimizer, copy_val_grad=True):
    """The inputs as lists, checked: (params, omega, steps, theta_bar = val_grad (a copy unless
    ``copy_val_grad`` is False), final state)."""
    if mode not in optimizer.modes:
        raise ValueError(f"mode must be one of {', '.join(map(repr, optimizer.modes))}, got {mode!r}")
    params, teacher_params, steps = list(params), list(teacher_params), list(steps)
    validate_inputs(params, steps, optimizer.check_step, mode)
    validate_teacher_params(teacher_params)
    theta_bar = validate_tensor_list(val_grad, params, "val_grad", none_is_zero=True, copy=copy_val_grad)
    check_finite(theta_bar, "val_grad has non-finite entries: the validation loss diverged at theta_K")
    state = optimizer.final_state(params, momentum_buffers, mode)
    return params, teacher_params, steps, theta_bar, state
