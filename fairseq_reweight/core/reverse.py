"""Reverse-mode hypergradient through the student's last optimizer steps.

Fan et al., "Learning to Reweight with Deep Interactions", AAAI 2021, Algorithm 1 (after Maclaurin,
Duvenaud and Adams, "Gradient-based Hyperparameter Optimization through Reversible Learning", 2015).
The equations are restated in ``docs/METHOD.md``. Plain PyTorch: this module never imports fairseq.
The loop is the algorithm; what depends on the optimizer (undoing a step, the adjoint of its update)
comes from a :class:`~.interfaces.ReversibleOptimizer` (:data:`~.sgd.SGD_REVERSE` for momentum SGD,
:data:`~.adam.ADAM_REVERSE` for Adam), the derivatives of a step from :mod:`.gradients`, the input
checks from :mod:`.checks`.

The loop, newest step first::

    theta_bar = val_grad, state_bar = 0, omega_bar = 0
    for each step:
        theta_t     = undo the parameter step         (mode="checkpoint": step.params)
        g~          = adjoint of the step's gradient   (SGD: v_bar - lr theta_bar; Adam: core/adam.py)
        G_t, d(g_t . g~)/d theta, d(g_t . g~)/d omega  (the step's products, one of three ways:
                                                       the oldest step, for omega alone, by forward
                                                       mode; the newest, from the graph its training
                                                       step kept; any other replayed by loss_fn)
        state_t     = undo the state step, given G_t   (mode="reverse" only)
        theta_bar, state_bar = the optimizer's adjoint of its update + d(g_t . g~)/d theta
        omega_bar  += d(g_t . g~)/d omega

Contract of ``loss_fn(step, params)``: it evaluates the training loss of ``step`` at the given
parameter tensors, depending on omega through the teacher's weights. It returns one scalar or an
iterable of scalar chunks whose sum is the objective whose gradient the optimizer received (before
clipping and weight decay); a generator keeps one chunk's graph alive at a time. It must replay the
step's randomness (dropout): it is called once per step, twice when clipping is on, and each call
must give the same loss. With ``teacher_grad_only`` or ``hvp="forward-over-reverse"`` it must also
accept dual tensors (``torch.autograd.forward_ad``; fairseq's Transformer does).
"""
import contextlib
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from .attention import math_attention
from .checks import check_finite, validate_inputs, validate_teacher_params, validate_tensor_list
from .gradients import (HVP, KeptStep, StepContext, StepProducts, add_into, global_norm, kept_gradient_vjp,
                        teacher_vjp)
from .interfaces import AllReduce, LossFn, OptimizerState, Record, ReversibleOptimizer
from .sgd import SGD_REVERSE

__all__ = ["AllReduce", "HypergradOptions", "HypergradResult", "LossFn", "reverse_hypergradient"]


@dataclass(frozen=True)
class HypergradOptions:
    """How :func:`reverse_hypergradient` runs; checked when made (ValueError).

    Attributes:
        mode: ``"reverse"`` recovers theta_t and the state by undoing the steps (SGD: momentum > 0;
            floating-point error grows by about 1/momentum per step); ``"checkpoint"`` reads
            ``step.params`` (exact; costs B copies of theta). One of ``optimizer.modes``.
        optimizer: how the steps were taken (:data:`~.sgd.SGD_REVERSE`, :data:`~.adam.ADAM_REVERSE`).
        hvp: how a replayed step's products are computed: ``"double-backward"`` (reverse-over-reverse,
            :func:`~.gradients.gradient_vjp`) or ``"forward-over-reverse"``
            (:func:`~.gradients.gradient_jvp`). Same values up to round-off; which is faster depends
            on the model and the hardware (``benchmarks/meta_breakdown.py``).
        teacher_grad_only: only ``teacher_grad`` is wanted. The oldest step then needs no
            theta-adjoint, so its omega-part is computed by forward-mode AD
            (:func:`~.gradients.teacher_vjp`): one forward pass with dual numbers and a backward
            through the teacher alone, where a double backward replays the step's forward and
            backward and differentiates that backward (``benchmarks/meta_breakdown.py`` times both;
            figures in docs/BENCHMARKS.md). ``param_grad``, ``momentum_grad`` and ``start_params``
            then come back empty, ``start_momentum_buffers`` None, and ``grad_norms`` holds nan for
            the oldest step unless it was clipped.
        all_reduce: for data parallelism, sums a list of tensors in place across workers whose
            ``loss_fn`` each return their own shard of the loss. It is applied to G of every step,
            to the theta-part of every product and to omega_bar at the end; every worker calls the
            loop with the same steps. None: one process.
        math_sdpa: run under :func:`~.attention.math_attention` (the fused attention kernels have
            no double backward).
        overwrite_val_grad: ``val_grad``'s tensors may serve as theta's adjoint and be overwritten
            (one buffer of theta's size less); the caller must not read them afterwards.
    """

    mode: str = "reverse"
    optimizer: ReversibleOptimizer = SGD_REVERSE
    hvp: str = "double-backward"
    teacher_grad_only: bool = False
    all_reduce: Optional[AllReduce] = None
    math_sdpa: bool = True
    overwrite_val_grad: bool = False

    def __post_init__(self):
        if self.hvp not in HVP:
            raise ValueError(f"hvp must be one of {', '.join(map(repr, HVP))}, got {self.hvp!r}")
        if self.mode not in self.optimizer.modes:
            raise ValueError(f"mode must be one of {', '.join(map(repr, self.optimizer.modes))}, got {self.mode!r}")


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
    options: HypergradOptions = HypergradOptions(),
    *,
    kept: Optional[KeptStep] = None,
) -> HypergradResult:
    """Gradient of a validation loss at theta_K with respect to the teacher, through the last steps.

    Runs Algorithm 1 backwards from t = K-1 to K-B (B = ``len(steps)``); the module docstring has
    the loop in equations and the contract of ``loss_fn``.

    Args:
        params: theta_K (values only; not modified).
        momentum_buffers: the optimizer state at theta_K (SGD: v_K); read in mode="reverse" only
            (None for Adam).
        teacher_params: omega, leaf tensors with ``requires_grad=True`` (``.grad`` untouched).
        steps: the last B step records, oldest first (:func:`~.checks.select_window`).
        loss_fn: ``loss_fn(step, params)``: the step's training loss (a scalar or scalar chunks).
        val_grad: ``d L_val(theta_K) / d theta`` (None entries are zeros).
        options: the mode, optimizer and how the products are computed (:class:`HypergradOptions`).
        kept: the newest step's gradient graph from training (:class:`~.gradients.KeptStep`): that
            step's products come from it (one backward) instead of ``loss_fn``; not with
            ``all_reduce``, and unused when the newest step is the forward-mode oldest one (B = 1).

    Returns a :class:`HypergradResult`; raises ValueError on inconsistent inputs, non-finite
    ``val_grad``, or a step the mode cannot undo.
    """
    if kept is not None and options.all_reduce is not None:
        raise ValueError("a kept step is one worker's gradient graph: it cannot be used with all_reduce")
    optimizer, mode = options.optimizer, options.mode
    params, teacher_params, steps = list(params), list(teacher_params), list(steps)
    theta_bar, state = _checked_inputs(params, momentum_buffers, teacher_params, steps, val_grad, options)
    val_grad_norm = global_norm(theta_bar)
    theta = [p.detach().clone().requires_grad_(True) for p in params]  # theta_t, the loop's own copy
    state_bar = optimizer.zero_adjoint(theta_bar)
    omega_bar = [torch.zeros_like(w) for w in teacher_params]
    grad_norms, clip_factors = [], []
    attention = math_attention() if options.math_sdpa else contextlib.nullcontext()
    with attention, torch.enable_grad():
        for index in reversed(range(len(steps))):  # t = K-1 down to K-B
            step = steps[index]
            context = StepContext(step, index, theta, loss_fn, teacher_params, options.all_reduce)
            oldest_by_forward_mode = options.teacher_grad_only and index == 0
            with torch.no_grad():
                optimizer.rewind_params(step, theta, state, mode)  # theta_{t+1} -> theta_t in place: our own copy
                # g~ may overwrite state_bar's buffers (SGD): v_{t+1}'s adjoint is needed only to form g~
                g_bar = optimizer.gradient_adjoint(step, theta_bar, state_bar)
            if oldest_by_forward_mode:
                products = _oldest_step_by_forward_mode(context, g_bar)
            elif kept is not None and index == len(steps) - 1:
                products = _newest_step_from_kept_graph(context, g_bar, kept)
            else:
                products = _replayed_step(context, g_bar, options.hvp)
            if not oldest_by_forward_mode:
                with torch.no_grad():
                    if mode == "reverse":
                        _undo_state_step(optimizer, step, state, products, theta)
                    # in place: the adjoints at t + 1, and g~, are not read after this
                    theta_bar, state_bar = optimizer.propagate(step, theta_bar, state_bar, g_bar, products.hvp_theta)
            grad_norms.insert(0, products.norm)
            clip_factors.insert(0, products.clip_scale)
            with torch.no_grad():
                add_into(omega_bar, products.hvp_omega)
            del products, g_bar
    if options.all_reduce is not None:
        options.all_reduce(omega_bar)
    if options.teacher_grad_only:
        return HypergradResult(teacher_grad=omega_bar, param_grad=[], grad_norms=grad_norms,
                               clip_factors=clip_factors, val_grad_norm=val_grad_norm)
    return HypergradResult(omega_bar, theta_bar, state_bar, [t.detach() for t in theta],
                           optimizer.start_state(steps, state, params, mode), grad_norms, clip_factors, val_grad_norm)


def _oldest_step_by_forward_mode(context: StepContext, g_bar: List[Tensor]) -> StepProducts:
    """The oldest step when theta's adjoint is not wanted: ``d(g . g~)/d omega`` alone, by forward mode."""
    return teacher_vjp(context, g_bar)


def _newest_step_from_kept_graph(context: StepContext, g_bar: List[Tensor], kept: KeptStep) -> StepProducts:
    """The newest step's products from the gradient graph its training step kept (no replay)."""
    return kept_gradient_vjp(context, g_bar, kept)


def _replayed_step(context: StepContext, g_bar: List[Tensor], hvp: str) -> StepProducts:
    """A step's products from its replay by ``loss_fn``, by double backward or forward-over-reverse."""
    return HVP[hvp](context, g_bar)


def _undo_state_step(optimizer: ReversibleOptimizer, step: Record, state: OptimizerState,
                     products: StepProducts, theta: List[Tensor]) -> None:
    """state_{t+1} -> state_t in place (mode "reverse"; SGD: ``v_t = (v_{t+1} - s G_t - wd theta_t) / mu``):
    ``state`` is the loop's copy of the final state, and state_{t+1} is not read again."""
    optimizer.rewind_state(step, state, products.grad, products.clip_scale, theta)


def _checked_inputs(params, momentum_buffers, teacher_params, steps, val_grad, options: HypergradOptions):
    """theta_bar = val_grad and the final state, the inputs checked (ValueError)."""
    validate_inputs(params, steps, options.optimizer.check_step, options.mode)
    validate_teacher_params(teacher_params)
    # without a copy with overwrite_val_grad: the caller gave val_grad's tensors up to serve as theta_bar
    theta_bar = validate_tensor_list(val_grad, params, "val_grad", none_is_zero=True,
                                     copy=not options.overwrite_val_grad)
    check_finite(theta_bar, "val_grad has non-finite entries: the validation loss diverged at theta_K")
    state = options.optimizer.final_state(params, momentum_buffers, options.mode)
    return theta_bar, state
