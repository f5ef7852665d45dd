"""``--optimizer reweight_sgd``: momentum SGD that keeps what the teacher's hypergradient needs.

The update is ``torch.optim.SGD``'s own arithmetic (PyTorch convention ``v <- mu v + g``,
``theta <- theta - lr v``, weight decay added to ``g``), so with no teacher a run is bit-identical to
``--optimizer sgd --momentum mu``. On top of it the wrapped
:class:`~fairseq_reweight.core.RecordingSGD` exposes the momentum buffers and records the last B
steps (learning rate, momentum, weight decay, and in ``checkpoint`` mode the pre-step parameters and
buffers) for :func:`~fairseq_reweight.core_hypergradient`. Under ``--fp16`` fairseq
wraps this optimizer around fp32 master parameters, which are then what is recorded.
"""
from dataclasses import dataclass, field
from typing import List

from fairseq.dataclass import FairseqDataclass
from fairseq.optim import FairseqOptimizer, register_optimizer
from omegaconf import II

from fairseq_reweight.core import RecordingSGD


@dataclass
class ReweightSGDConfig(FairseqDataclass):
    momentum: float = field(
        default=0.0, metadata={"help": "momentum factor mu (PyTorch convention: v <- mu v + g)"}
    )
    weight_decay: float = field(
        default=0.0, metadata={"help": "L2 weight decay lambda, added to the gradient as lambda*theta"}
    )
    lr: List[float] = II("optimization.lr")


@register_optimizer("reweight_sgd", dataclass=ReweightSGDConfig)
class ReweightSGD(FairseqOptimizer):
    """Momentum SGD recording its recent steps for reverse-mode hypergradients."""

    def __init__(self, cfg: ReweightSGDConfig, params):
        super().__init__(cfg)
        self._optimizer = RecordingSGD(params, **self.optimizer_config)

    @property
    def optimizer_config(self):
        return {
            "lr": self.cfg.lr[0],
            "momentum": self.cfg.momentum,
            "weight_decay": self.cfg.weight_decay,
        }

    @property
    def supports_flat_params(self):
        return True

    @property
    def recorder(self) -> RecordingSGD:
        """The wrapped :class:`RecordingSGD` (history, momentum buffers, step callback)."""
        return self._optimizer
