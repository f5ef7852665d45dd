"""What every recording optimizer shares: one parameter group, a bounded history of step records,
and a callback per step (where callers attach the replay data)."""
from collections import deque
from typing import Callable, Deque, List, Optional

import torch
from torch import Tensor

from .checks import select_window
from .interfaces import ReversibleOptimizer


class RecordingMixin:
    """Mixed into a ``torch.optim.Optimizer`` subclass whose ``step`` calls :meth:`_record`.

    Attributes:
        history: a deque of the last ``history_size`` records, oldest first.
        store_states: whether records carry copies of the pre-step states (``mode="checkpoint"``).
        step_callback: called with each new record after it is appended.
    """

    history: Deque
    reverse: Optional[ReversibleOptimizer] = None  # how the reverse loop takes its steps (SGD_REVERSE, ADAM_REVERSE)
    record_class = None  # the records it appends (core.sgd.StepRecord, core.adam.AdamStepRecord)

    def _init_recording(self, history_size: int, store_states: bool, step_callback: Optional[Callable]) -> None:
        self.history = deque(maxlen=self._checked_size(history_size))
        self.store_states = store_states
        self.step_callback = step_callback

    @staticmethod
    def _checked_size(history_size: int) -> int:
        if int(history_size) != history_size or history_size < 1:
            raise ValueError(f"history_size must be an integer >= 1, got {history_size!r}")
        return int(history_size)

    def add_param_group(self, param_group: dict) -> None:
        if len(getattr(self, "param_groups", [])) >= 1:
            raise ValueError(
                f"{type(self).__name__} supports one parameter group: put all student parameters in one "
                "group (per-group learning rates are not recorded)"
            )
        super().add_param_group(param_group)

    def set_history_size(self, history_size: int) -> None:
        """Keep the last ``history_size`` records from now on (the most recent ones are kept)."""
        self.history = deque(self.history, maxlen=self._checked_size(history_size))

    @property
    def history_size(self) -> int:
        return self.history.maxlen

    @property
    def group(self) -> dict:
        """The (single) parameter group."""
        return self.param_groups[0]

    def student_params(self) -> List[Tensor]:
        """The student's parameters, in the optimizer's order (theta's order everywhere)."""
        return list(self.group["params"])

    def window(self, num_steps: int) -> List:
        """The last ``num_steps`` records, oldest first (ValueError if fewer were recorded)."""
        return select_window(self.history, num_steps)

    @staticmethod
    def _closure_loss(closure: Optional[Callable[[], float]]):
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def _fill_missing_grads(self) -> None:
        """Parameters that require grad but received none step with a zero gradient (momentum and
        weight decay keep acting on them, as the hypergradient assumes) instead of being skipped."""
        for param in self.group["params"]:
            if param.grad is None and param.requires_grad:
                param.grad = torch.zeros_like(param)

    def _record(self, record) -> None:
        self.history.append(record)
        if self.step_callback is not None:
            self.step_callback(record)
