"""Momentum SGD that records its steps for the reverse-mode hypergradient.

The update itself is ``torch.optim.SGD``'s own code (so bit for bit PyTorch's arithmetic); this
subclass only remembers, per step, what :func:`~fairseq_reweight.core.reverse_hypergradient`
needs to undo and replay it. Plain PyTorch: never imports fairseq.
"""
from typing import Callable, List, Optional

import torch
from torch import Tensor

from .checks import check_reversible
from .recording import RecordingMixin
from .sgd import SGD_REVERSE, StepRecord

__all__ = ["RecordingSGD"]


class RecordingSGD(RecordingMixin, torch.optim.SGD):
    """``torch.optim.SGD`` (momentum, weight decay) that keeps a history of :class:`StepRecord`.

    After every :meth:`step` a ``StepRecord(lr, momentum, weight_decay)`` of the step just taken is
    appended to :attr:`history` (a deque of the last ``history_size`` records), then
    :attr:`step_callback` (if set) is called with it: callers attach ``record.data`` (the batch,
    RNG seed, ...) and ``record.clip_norm`` there. With ``store_states=True`` the record also holds
    copies of theta_t and v_t from before the step (for ``mode="checkpoint"``).

    Nesterov momentum, dampening and ``maximize`` are refused: the hypergradient assumes
    ``v <- momentum v + g; theta <- theta - lr v``. Only one parameter group is supported.
    Parameters that require grad but received none are stepped with a zero gradient (momentum
    and weight decay keep acting on them, as the hypergradient assumes) instead of being skipped.
    The history, its window and the one-group rule come from :class:`~.recording.RecordingMixin`.

    Args:
        params: the student's parameters (one group).
        lr, momentum, dampening, weight_decay, nesterov: as for ``torch.optim.SGD``.
        history_size: how many records to keep (>= the number of steps B to differentiate).
        store_states: copy theta_t and v_t into each record (costs two copies of theta per
            record).
        step_callback: called with each new record after it is appended.
        **kwargs: passed on to ``torch.optim.SGD`` (e.g. ``foreach``).
    """

    reverse, record_class = SGD_REVERSE, StepRecord

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        history_size: int = 1,
        store_states: bool = False,
        step_callback: Optional[Callable[[StepRecord], None]] = None,
        **kwargs,
    ):
        self._check_options(nesterov, dampening, kwargs.get("maximize", False))
        super().__init__(
            params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, **kwargs,
        )
        self._init_recording(history_size, store_states, step_callback)

    @staticmethod
    def _check_options(nesterov, dampening, maximize) -> None:
        if nesterov:
            raise ValueError(
                "RecordingSGD does not support nesterov=True: the hypergradient undoes plain "
                "momentum steps"
            )
        if dampening != 0:
            raise ValueError(
                f"RecordingSGD needs dampening=0, got {dampening}: the hypergradient assumes "
                "v <- mu v + g"
            )
        if maximize:
            raise ValueError(
                "RecordingSGD does not support maximize=True: minimise the negated objective"
            )

    def momentum_buffers(self) -> List[Tensor]:
        """The current momentum buffers v (the live tensors; zeros where there is none yet)."""
        buffers = []
        for param in self.group["params"]:
            buffer = self.state.get(param, {}).get("momentum_buffer")
            buffers.append(torch.zeros_like(param) if buffer is None else buffer)
        return buffers

    def final_state(self) -> List[Tensor]:
        """The state the reverse loop undoes from theta_K in mode "reverse": v_K."""
        return self.momentum_buffers()

    def check_history(self, mode: str, flag: str) -> None:
        """Whether ``mode`` (the option ``flag``) can replay these steps."""
        check_reversible(mode, self.group["momentum"], flag)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        """Take one SGD step (``torch.optim.SGD.step``) and record it."""
        loss = self._closure_loss(closure)
        group = self.group
        self._check_options(group["nesterov"], group["dampening"], group.get("maximize", False))
        self._fill_missing_grads()
        params = states = None
        if self.store_states:
            params = [p.detach().clone() for p in group["params"]]
            states = [b.detach().clone() for b in self.momentum_buffers()]
        super().step()
        record = StepRecord(
            lr=float(group["lr"]),
            momentum=float(group["momentum"]),
            weight_decay=float(group["weight_decay"]),
            params=params,
            momentum_buffers=states,
        )
        self._record(record)
        return loss
