"""Adam (fairseq's arithmetic: decoupled weight decay, bias correction in the step size) that
records its steps for the reverse-mode hypergradient. Plain PyTorch: never imports fairseq.

The update is fairseq's ``fairseq.optim.adam.Adam.step``, operation for operation, so that with no
teacher ``--optimizer reweight_adam`` is bit-identical to ``--optimizer adam`` on the CPU (fairseq
uses this same non-fused code there; on a GPU with apex it would pick FusedAdam unless given
``--use-old-adam``). tests/test_adam.py pins the equality.
"""
import math
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor

from .adam import ADAM_REVERSE, AdamStepRecord
from .errors import ReweightConfigError
from .recording import RecordingMixin

__all__ = ["RecordingAdam"]

_HALF = (torch.float16, torch.bfloat16)


class RecordingAdam(RecordingMixin, torch.optim.Optimizer):
    """Adam with decoupled weight decay that keeps a history of :class:`~.adam.AdamStepRecord`.

    After every :meth:`step` an ``AdamStepRecord`` (lr, betas, eps, weight decay, step count) is
    appended to :attr:`history` and :attr:`step_callback` is called with it, as for
    :class:`~.recording_sgd.RecordingSGD`. With ``store_states=True`` (the only way its steps can be
    differentiated) the record also holds copies of theta_t, m_t, v_t and the gradient g_t: four
    copies of theta per record.

    AMSGrad is refused (the running maximum has no useful derivative). Parameters that received no
    gradient step with a zero one (their moments decay, weight decay acts) where fairseq's Adam skips
    them; in a model whose parameters all get gradients the two are the same.

    Args:
        params: the student's parameters (one group).
        lr, betas, eps, weight_decay: as for ``fairseq.optim.adam.Adam``.
        amsgrad: must be False.
        history_size, store_states, step_callback: as for RecordingSGD.
    """

    reverse, record_class = ADAM_REVERSE, AdamStepRecord

    def __init__(self, params, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False, *, history_size: int = 1,
                 store_states: bool = False, step_callback: Optional[Callable] = None):
        self._check_amsgrad(amsgrad)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=False)
        super().__init__(params, defaults)
        self._init_recording(history_size, store_states, step_callback)

    @staticmethod
    def _check_amsgrad(amsgrad) -> None:
        if amsgrad:
            raise ValueError("RecordingAdam does not support amsgrad: the hypergradient differentiates Adam's "
                             "moving averages, and AMSGrad's running maximum has no useful derivative")

    @property
    def supports_flat_params(self) -> bool:  # fairseq's FP16Optimizer: one flat fp32 master tensor
        return True

    def moments(self) -> Tuple[List[Tensor], List[Tensor]]:
        """The current (m, v): the live tensors, zeros before the first step."""
        exp_avg, exp_avg_sq = [], []
        for param in self.group["params"]:
            state = self.state.get(param, {})
            if "exp_avg" in state:
                exp_avg.append(state["exp_avg"])
                exp_avg_sq.append(state["exp_avg_sq"])
            else:  # allocated only before the first step
                zeros = torch.zeros_like(param, dtype=torch.float32 if param.dtype in _HALF else param.dtype)
                exp_avg.append(zeros)
                exp_avg_sq.append(torch.zeros_like(zeros))
        return exp_avg, exp_avg_sq

    def final_state(self):
        return None  # nothing is undone from theta_K

    def check_history(self, mode: str, flag: str) -> None:
        check_adam_history(mode, flag)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        """One step of fairseq's Adam, recorded."""
        loss = self._closure_loss(closure)
        group = self.group
        self._check_amsgrad(group.get("amsgrad", False))
        self._fill_missing_grads()
        stored = None
        if self.store_states:
            exp_avg, exp_avg_sq = self.moments()
            stored = dict(params=[p.detach().clone() for p in group["params"]],
                          exp_avg=[m.detach().clone() for m in exp_avg],
                          exp_avg_sq=[v.detach().clone() for v in exp_avg_sq],
                          grads=[_fp32(p.grad).detach().clone() for p in group["params"]])
        count = 0
        for param in group["params"]:
            count = self._adam_step(param, group)
        record = AdamStepRecord(lr=float(group["lr"]), beta1=float(group["betas"][0]), beta2=float(group["betas"][1]),
                                eps=float(group["eps"]), weight_decay=float(group["weight_decay"]), step=count,
                                **(stored or {}))
        self._record(record)
        return loss

    def _adam_step(self, p: Tensor, group: dict) -> int:
        """fairseq.optim.adam.Adam.step for one parameter (the same operations in the same order)."""
        grad = _fp32(p.grad.data)
        p_data_fp32 = _fp32(p.data)
        state = self.state[p]
        if len(state) == 0:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p_data_fp32)
            state["exp_avg_sq"] = torch.zeros_like(p_data_fp32)
        else:
            state["exp_avg"] = state["exp_avg"].to(p_data_fp32)
            state["exp_avg_sq"] = state["exp_avg_sq"].to(p_data_fp32)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        beta1, beta2 = group["betas"]
        state["step"] += 1
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = exp_avg_sq.sqrt().add_(group["eps"])
        bias_correction1 = 1 - beta1 ** state["step"]
        bias_correction2 = 1 - beta2 ** state["step"]
        step_size = group["lr"] * math.sqrt(bias_correction2) / bias_correction1
        if group["weight_decay"] != 0:
            p_data_fp32.add_(p_data_fp32, alpha=-group["weight_decay"] * group["lr"])
        p_data_fp32.addcdiv_(exp_avg, denom, value=-step_size)
        if p.data.dtype in _HALF:
            p.data.copy_(p_data_fp32)
        return int(state["step"])


def _fp32(tensor: Tensor) -> Tensor:
    return tensor.float() if tensor.dtype in _HALF else tensor


def check_adam_history(mode: str, flag: str) -> None:
    """Adam's steps replay only from stored states (``flag`` names the history option)."""
    if mode != "checkpoint":
        raise ReweightConfigError(
            f"--optimizer reweight_adam needs {flag} checkpoint: an Adam step cannot be undone exactly "
            "(dividing out its square root amplifies round-off where the second moment is small)"
        )
