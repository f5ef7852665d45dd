"""Adam with decoupled weight decay (fairseq's ``--optimizer adam``) as the reverse loop sees it: its
step record, and the adjoint of its update.

The update (step count n, ``g`` the clipped gradient; fairseq's ``Adam.step`` in this order)::

    m_{t+1}     = beta1 m_t + (1 - beta1) g_t
    v_{t+1}     = beta2 v_t + (1 - beta2) g_t^2
    d           = sqrt(v_{t+1}) + eps
    alpha       = lr sqrt(1 - beta2^n) / (1 - beta1^n)
    theta_{t+1} = theta_t - lr wd theta_t - alpha m_{t+1} / d

Its adjoint, given theta_bar, m_bar, v_bar of (theta_{t+1}, m_{t+1}, v_{t+1})::

    m~        = m_bar - alpha theta_bar / d
    v~        = v_bar + alpha theta_bar m_{t+1} / (2 d^2 sqrt(v_{t+1}))   (0 where v_{t+1} = 0)
    g~        = (1 - beta1) m~ + 2 (1 - beta2) g_t v~                     (adjoint of g_t)
    theta_bar = (1 - lr wd) theta_bar + d(g_t . g~)/d theta
    m_bar     = beta1 m~,   v_bar = beta2 v~

g~ depends on g_t itself, so a record keeps the gradient the step received (besides theta_t, m_t,
v_t): the replay then needs one pass per step, as for SGD. An Adam step is not undone from theta_K
(dividing out the square root amplifies round-off without bound where v is small): the only history
mode is ``checkpoint``.
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
class AdamStepRecord:
    """One Adam step as taken (see the module docstring for the update).

    Attributes:
        lr, beta1, beta2, eps, weight_decay: the step's hyperparameters (``weight_decay`` decoupled:
            ``theta <- theta - lr wd theta``, fairseq's and AdamW's convention).
        step: the step count n after this step (1 for the first), for the bias corrections.
        clip_norm: fairseq's ``--clip-norm`` c (0 = off), as for :class:`~.sgd.StepRecord`.
        data: opaque to the core: whatever ``loss_fn`` needs to replay the step.
        params, exp_avg, exp_avg_sq: theta_t, m_t, v_t before the step.
        grads: the (clipped) gradient g_t the step used.
    """

    TENSOR_FIELDS: ClassVar[tuple] = ("params", "exp_avg", "exp_avg_sq", "grads")

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    step: int
    clip_norm: float = 0.0
    data: Any = None
    params: Optional[List[Tensor]] = None
    exp_avg: Optional[List[Tensor]] = None
    exp_avg_sq: Optional[List[Tensor]] = None
    grads: Optional[List[Tensor]] = None

    @property
    def step_size(self) -> float:
        """alpha = lr sqrt(1 - beta2^n) / (1 - beta1^n), computed as fairseq computes it."""
        return self.lr * math.sqrt(1 - self.beta2 ** self.step) / (1 - self.beta1 ** self.step)


class AdamReverse:
    """Differentiate Adam steps (:class:`AdamStepRecord`) from their stored states: a
    :class:`~.interfaces.ReversibleOptimizer`. The state is the pair (m, v) of lists of tensors."""

    modes = ("checkpoint",)

    @staticmethod
    def check_step(index: int, step, params: List[Tensor], mode: str) -> None:
        if not isinstance(step, AdamStepRecord):
            raise ValueError(f"steps[{index}] is a {type(step).__name__}, not an AdamStepRecord")
        for name in ("lr", "beta1", "beta2", "eps", "weight_decay", "clip_norm"):
            value = getattr(step, name)
            if not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"steps[{index}].{name} must be a finite number, got {value!r}")
        if not (0 <= step.beta1 < 1 and 0 <= step.beta2 < 1) or step.eps < 0 or step.clip_norm < 0:
            raise ValueError(f"steps[{index}] has betas ({step.beta1}, {step.beta2}), eps {step.eps}, clip_norm "
                             f"{step.clip_norm}: need 0 <= beta < 1, eps >= 0, clip_norm >= 0")
        if not isinstance(step.step, int) or step.step < 1:
            raise ValueError(f"steps[{index}].step must be the step count (an integer >= 1), got {step.step!r}")
        if mode == "unrolled":
            return
        for name in AdamStepRecord.TENSOR_FIELDS:
            if getattr(step, name) is None:
                raise ValueError(f"steps[{index}] has no stored {name}: the Adam hypergradient needs theta_t, m_t, "
                                 "v_t and g_t of every step; record with RecordingAdam(store_states=True)")
            check_tensor_list(getattr(step, name), params, f"steps[{index}].{name}", allow_none=False)

    @staticmethod
    def final_state(params: List[Tensor], state, mode: str):
        return None  # nothing is undone: every step's state is stored

    @staticmethod
    def initial_state(state, params: List[Tensor]):
        """(m, v) at the start of an unrolled window: None (or None entries) for zeros."""
        exp_avg, exp_avg_sq = (None, None) if state is None else state
        exp_avg = [None] * len(params) if exp_avg is None else exp_avg
        exp_avg_sq = [None] * len(params) if exp_avg_sq is None else exp_avg_sq
        return (validate_tensor_list(exp_avg, params, "start exp_avg", none_is_zero=True),
                validate_tensor_list(exp_avg_sq, params, "start exp_avg_sq", none_is_zero=True))

    @staticmethod
    def zero_adjoint(theta_bar: List[Tensor]):
        return [torch.zeros_like(p) for p in theta_bar], [torch.zeros_like(p) for p in theta_bar]

    @staticmethod
    def rewind_params(step: AdamStepRecord, theta: List[Tensor], state, mode: str) -> None:
        # in place: ``theta`` is the loop's own copy of theta_K, and theta_{t+1} is not read again
        for theta_i, stored in zip(theta, step.params):
            theta_i.copy_(stored)

    @staticmethod
    def gradient_adjoint(step: AdamStepRecord, theta_bar, state_bar) -> List[Tensor]:
        """g~: the adjoint of the step's gradient. Turns ``state_bar`` = (m_bar, v_bar) into (m~, v~)
        in place for :meth:`propagate`, which the reverse loop calls next with the same theta_bar:
        the step's moments are then rebuilt once per step, not twice."""
        m_bar, v_bar = state_bar
        alpha = step.step_size
        g_tilde = []
        # m_bar, v_bar in place: the adjoints at t + 1 are not read again, (m~, v~) take their place
        for tb, mb, vb, m, v, g in zip(theta_bar, m_bar, v_bar, step.exp_avg, step.exp_avg_sq, step.grads):
            m_new = m * step.beta1 + g * (1 - step.beta1)
            v_new = v * step.beta2 + g * g * (1 - step.beta2)
            root = v_new.sqrt()
            denom = root + step.eps
            mb.sub_(alpha * tb / denom)
            vb.add_(torch.where(root > 0, alpha * tb * m_new / (2 * denom * denom * root), torch.zeros_like(root)))
            g_tilde.append((1 - step.beta1) * mb + 2 * (1 - step.beta2) * g * vb)
        return g_tilde

    @staticmethod
    def rewind_state(step, state, grad, scale, theta) -> None:
        raise ValueError("Adam steps are not undone: use mode='checkpoint'")

    @staticmethod
    def propagate(step: AdamStepRecord, theta_bar, state_bar, g_bar, hvp_theta):
        """The adjoints of (theta_t, (m_t, v_t)) from those of step t + 1; ``state_bar`` holds (m~, v~),
        left there by :meth:`gradient_adjoint`."""
        decay = 1 - step.lr * step.weight_decay
        # in place: theta_bar at t + 1 is not read again, nor (m~, v~) once scaled to m_t's, v_t's adjoints
        for tb, h in zip(theta_bar, hvp_theta):
            if step.weight_decay:
                tb.mul_(decay)
            tb.add_(h)
        m_tilde, v_tilde = state_bar
        for m, v in zip(m_tilde, v_tilde):
            m.mul_(step.beta1)
            v.mul_(step.beta2)
        return theta_bar, state_bar

    @staticmethod
    def start_state(steps, state, params, mode: str):
        """(m, v) at the start of the window: the oldest record's."""
        return list(steps[0].exp_avg), list(steps[0].exp_avg_sq)

    @staticmethod
    def apply(step: AdamStepRecord, params, state, grads):
        """One step, out of place (differentiable when the inputs carry a graph)."""
        grads = clip_differentiably(grads, step.clip_norm)
        exp_avg, exp_avg_sq = state
        exp_avg = [m * step.beta1 + g * (1 - step.beta1) for m, g in zip(exp_avg, grads)]
        exp_avg_sq = [v * step.beta2 + g * g * (1 - step.beta2) for v, g in zip(exp_avg_sq, grads)]
        alpha = step.step_size
        new_params = []
        for p, m, v in zip(params, exp_avg, exp_avg_sq):
            if step.weight_decay:
                p = p - step.lr * step.weight_decay * p
            new_params.append(p - alpha * m / (_sqrt(v) + step.eps))
        return new_params, (exp_avg, exp_avg_sq)


def _sqrt(v: Tensor) -> Tensor:
    """sqrt with slope 0 where v = 0 (torch's is inf there, and 0 * inf = nan in the unrolled graph of
    a parameter that never gets a gradient, e.g. the padding embedding), as in the adjoint above."""
    positive = v > 0
    return torch.where(positive, torch.where(positive, v, torch.ones_like(v)).sqrt(), torch.zeros_like(v))


ADAM_REVERSE = AdamReverse()
"""Adam (fairseq's, decoupled weight decay) as the reverse loop takes it."""
