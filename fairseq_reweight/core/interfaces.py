"""The typed interfaces of the reverse loop (:func:`~.reverse.reverse_hypergradient`) with what plugs
into it: the optimizer whose steps it differentiates, the training loss it replays and the
all-reduce of data parallelism. Types only: nothing here computes.
"""
from typing import Any, Callable, Iterable, List, Optional, Protocol, Sequence, Tuple, Union, runtime_checkable

from torch import Tensor

TensorList = List[Tensor]

Record = Any
"""A step record of the optimizer's own kind (:class:`~.sgd.StepRecord`, :class:`~.adam.AdamStepRecord`).
The loop reads only its ``clip_norm`` (fairseq's ``--clip-norm``, 0 = off); ``loss_fn`` reads its
``data``; the optimizer reads the rest."""

OptimizerState = Any
"""An optimizer's state, or its adjoint: SGD's momentum buffers (a :data:`TensorList`), Adam's pair
(m, v) of them."""

LossFn = Callable[[Record, TensorList], Union[Tensor, Iterable[Tensor]]]
"""``loss_fn(step, params)``: the step's training loss at ``params``, one scalar or scalar chunks."""

AllReduce = Callable[[TensorList], None]
"""Sums a list of tensors in place across data-parallel workers."""


@runtime_checkable
class ReversibleOptimizer(Protocol):
    """What the reverse loop and the unrolled reference need of an optimizer to differentiate its
    steps; :class:`~.sgd.SGDReverse` (momentum SGD) and :class:`~.adam.AdamReverse` implement it.

    Per step, newest first, the loop calls :meth:`rewind_params` and :meth:`gradient_adjoint`, then
    (for every step but a forward-mode oldest one) :meth:`rewind_state` in mode "reverse" and
    :meth:`propagate`: :meth:`gradient_adjoint` may leave in the state's adjoint what
    :meth:`propagate` needs. The tensor lists it is given are the loop's own, updated in place.

    Attributes:
        modes: the history modes it supports ("reverse": undo the steps from theta_K;
            "checkpoint": read each record's stored states).
    """

    modes: Tuple[str, ...]

    def check_step(self, index: int, step: Record, params: TensorList, mode: str) -> None:
        """Raise a one-line ValueError if ``steps[index]`` cannot be differentiated in ``mode``
        (``"unrolled"``: replayed by :meth:`apply`)."""

    def final_state(self, params: TensorList, state: Optional[OptimizerState], mode: str) -> Optional[OptimizerState]:
        """The state at theta_K that mode "reverse" undoes step by step (a copy), or None."""

    def initial_state(self, state: Optional[OptimizerState], params: TensorList) -> OptimizerState:
        """The state at the start of an unrolled window (None, or None entries, for zeros)."""

    def zero_adjoint(self, theta_bar: TensorList) -> OptimizerState:
        """The adjoint of the final state: zeros."""

    def rewind_params(self, step: Record, theta: TensorList, state: Optional[OptimizerState], mode: str) -> None:
        """theta_{t+1} -> theta_t, in place."""

    def gradient_adjoint(self, step: Record, theta_bar: TensorList, state_bar: OptimizerState) -> TensorList:
        """g~, the adjoint of the step's gradient: the vector its Hessian-vector products are taken
        with. May update ``state_bar`` in place and return its buffers."""

    def rewind_state(self, step: Record, state: OptimizerState, grad: TensorList, scale: float,
                     theta: TensorList) -> None:
        """The state at t + 1 -> the state at t, in place, given G_t, its clip factor and theta_t."""

    def propagate(self, step: Record, theta_bar: TensorList, state_bar: OptimizerState, g_bar: TensorList,
                  hvp_theta: TensorList) -> Tuple[TensorList, OptimizerState]:
        """The adjoints of (theta_t, state_t) from those at t + 1 and ``d(g_t . g~)/d theta``
        (updated in place and returned)."""

    def start_state(self, steps: Sequence[Record], state: Optional[OptimizerState], params: TensorList,
                    mode: str) -> Optional[OptimizerState]:
        """The state at the start of the window, as the loop recovered or read it."""

    def apply(self, step: Record, params: TensorList, state: OptimizerState,
              grads: TensorList) -> Tuple[TensorList, OptimizerState]:
        """One step, out of place (differentiable when the inputs carry a graph)."""
