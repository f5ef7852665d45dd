"""Momentum SGD (PyTorch's convention) as the reverse loop sees it: its step record, how to undo a
step, and the adjoint of its update.

The update, with ``g = s(||G||) G`` the (clipped) loss gradient::

    v_{t+1}     = momentum v_t + g_t + wd theta_t
    theta_{t+1} = theta_t - lr v_{t+1}

Its adjoint, given the adjoints theta_bar, v_bar of (theta_{t+1}, v_{t+1})::

    g~        = v_bar - lr theta_bar          (adjoint of v_{t+1}, both of its uses; also of g_t)
    theta_bar = theta_bar + wd g~ + d(g_t . g~)/d theta
    v_bar     = momentum g~

:data:`SGD_REVERSE` is what :func:`~fairseq_reweight.core.reverse.reverse_hypergradient` takes as its
optimizer (:class:`~.interfaces.ReversibleOptimizer`) for these steps.
"""
import math
import numbers
from dataclasses import dataclass
from typing import Any, ClassVar, List, Optional

import torch
from torch import Tensor

from .checks import check_tensor_list, validate_tensor_list
from .gradients import clip_differentiably


@dataclass
class StepRecord:
    """One student step as taken, in PyTorch's momentum-SGD convention.

    ``g_t = s(||G||) G + weight_decay theta_t`` where G is the gradient of the replayed loss (the
    sum of its chunks) and s the clip factor; ``v_{t+1} = momentum v_t + g_t``;
    ``theta_{t+1} = theta_t - lr v_{t+1}``.

    Attributes:
        lr: learning rate of this step.
        momentum: momentum of this step (> 0 for mode="reverse").
        weight_decay: L2 coefficient added to the (clipped) gradient, as torch.optim.SGD does.
        clip_norm: fairseq's ``--clip-norm`` c: ``G <- G min(1, c / (||G|| + 1e-6))``; 0 = off.
        data: opaque to the core: whatever ``loss_fn`` needs to replay the step (batches, RNG
            seed, ...).
        params: theta_t before the step (mode="checkpoint" needs it).
        momentum_buffers: v_t before the step (None entries or zeros for the first step).
    """

    TENSOR_FIELDS: ClassVar[tuple] = ("params", "momentum_buffers")

    lr: float
    momentum: float
    weight_decay: float = 0.0
    clip_norm: float = 0.0
    data: Any = None
    params: Optional[List[Tensor]] = None
    momentum_buffers: Optional[List[Tensor]] = None


class SGDReverse:
    """Undo and differentiate momentum-SGD steps (:class:`StepRecord`): a
    :class:`~.interfaces.ReversibleOptimizer`. The state is v, a list of tensors."""

    modes = ("reverse", "checkpoint")

    @staticmethod
    def check_step(index: int, step, params: List[Tensor], mode: str) -> None:
        """One record's check; ``mode`` "reverse" needs momentum > 0, "checkpoint" stored params."""
        if not isinstance(step, StepRecord):
            raise ValueError(f"steps[{index}] is a {type(step).__name__}, not a StepRecord")
        for name in ("lr", "momentum", "weight_decay", "clip_norm"):
            value = getattr(step, name)
            if not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"steps[{index}].{name} must be a finite number, got {value!r}")
        if step.momentum < 0 or step.clip_norm < 0:
            raise ValueError(
                f"steps[{index}] has momentum {step.momentum} and clip_norm {step.clip_norm}: both must be >= 0"
            )
        if mode == "reverse" and step.momentum <= 0:
            raise ValueError(
                f"steps[{index}] has momentum {step.momentum}: mode='reverse' undoes a step by "
                "dividing by the momentum; use mode='checkpoint' (RecordingSGD(store_states=True))"
            )
        if mode == "checkpoint":
            if step.params is None:
                raise ValueError(
                    f"steps[{index}] has no stored params: mode='checkpoint' needs theta_t of every "
                    "step; record with RecordingSGD(store_states=True) or use mode='reverse'"
                )
            check_tensor_list(step.params, params, f"steps[{index}].params", allow_none=False)

    @staticmethod
    def final_state(params: List[Tensor], momentum_buffers, mode: str):
        """The optimizer state at theta_K that mode="reverse" undoes (v_K); None otherwise."""
        if mode != "reverse":
            return None
        if momentum_buffers is None:
            raise ValueError("mode='reverse' needs momentum_buffers (v_K); got None")
        return validate_tensor_list(momentum_buffers, params, "momentum_buffers", True)

    @staticmethod
    def initial_state(momentum_buffers, params: List[Tensor]) -> List[Tensor]:
        """v at the start of an unrolled window: None (or None entries) for zeros."""
        momentum_buffers = [None] * len(params) if momentum_buffers is None else momentum_buffers
        return validate_tensor_list(momentum_buffers, params, "start_momentum_buffers", none_is_zero=True)

    @staticmethod
    def zero_adjoint(theta_bar: List[Tensor]) -> List[Tensor]:
        return [torch.zeros_like(p) for p in theta_bar]

    @staticmethod
    def rewind_params(step: StepRecord, theta: List[Tensor], velocity, mode: str) -> None:
        """theta_{t+1} -> theta_t in place: ``theta + lr v_{t+1}``, or the stored copy."""
        # in place: ``theta`` is the loop's own copy of theta_K, and theta_{t+1} is not read again
        if mode == "reverse":
            for theta_i, v_i in zip(theta, velocity):
                theta_i.add_(v_i, alpha=step.lr)
        else:
            for theta_i, stored in zip(theta, step.params):
                theta_i.copy_(stored)

    @staticmethod
    def gradient_adjoint(step: StepRecord, theta_bar, v_bar) -> List[Tensor]:
        """g~ = v_bar - lr theta_bar: the adjoint of the step's gradient, computed in place in
        ``v_bar`` (which :meth:`propagate`, called next, scales to v_t's adjoint): one buffer of
        theta's size less while the step's products are computed."""
        for vb, tb in zip(v_bar, theta_bar):
            vb.add_(tb, alpha=-step.lr)
        return v_bar

    @staticmethod
    def rewind_state(step: StepRecord, velocity, grad, scale: float, theta) -> None:
        """v_{t+1} -> v_t in place: ``(v_{t+1} - s G - wd theta_t) / momentum``."""
        # in place: ``velocity`` is the loop's copy of v_K (final_state), v_{t+1} is not read again
        for v_i, g_i, theta_i in zip(velocity, grad, theta):
            v_i.sub_(g_i, alpha=scale)
            if step.weight_decay:
                v_i.sub_(theta_i, alpha=step.weight_decay)
            v_i.div_(step.momentum)

    @staticmethod
    def propagate(step: StepRecord, theta_bar, v_bar, g_bar, hvp_theta):
        """The adjoints of (theta_t, v_t) from those of (theta_{t+1}, v_{t+1}); ``v_bar`` holds g~,
        left there by :meth:`gradient_adjoint`, and becomes ``momentum g~`` in place."""
        # in place: the adjoints at t + 1 are not read again; g~ (= v_bar's buffers) last
        # served the step's products, computed before this call
        for tb, h, gb in zip(theta_bar, hvp_theta, g_bar):
            tb.add_(h)
            if step.weight_decay:
                tb.add_(gb, alpha=step.weight_decay)
        for gb in g_bar:
            gb.mul_(step.momentum)
        return theta_bar, g_bar

    @staticmethod
    def start_state(steps, velocity, params, mode: str):
        """v_{K-B}: recovered in reverse mode, else the oldest record's buffers (or None)."""
        if mode == "reverse":
            return velocity
        if steps[0].momentum_buffers is None:
            return None
        return validate_tensor_list(steps[0].momentum_buffers, params, "steps[0].momentum_buffers", none_is_zero=True)

    @staticmethod
    def apply(step: StepRecord, params, buffers, grads):
        """One step, out of place (differentiable when the inputs carry a graph)."""
        grads = clip_differentiably(grads, step.clip_norm)
        if step.weight_decay:
            grads = [g + step.weight_decay * p for g, p in zip(grads, params)]
        buffers = [step.momentum * v + g for v, g in zip(buffers, grads)]
        params = [p - step.lr * v for p, v in zip(params, buffers)]
        return params, buffers


SGD_REVERSE = SGDReverse()
"""Momentum SGD as the reverse loop takes it (the default ``optimizer`` of the loop and the reference)."""
