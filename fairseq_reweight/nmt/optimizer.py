"""``--optimizer reweight_sgd`` and ``--optimizer reweight_adam``: fairseq's optimizers that keep
what the teacher's hypergradient needs.

``reweight_sgd`` is ``torch.optim.SGD``'s own arithmetic (PyTorch convention ``v <- mu v + g``,
``theta <- theta - lr v``, weight decay added to ``g``): with no teacher a run is bit-identical to
``--optimizer sgd --momentum mu``. ``reweight_adam`` is fairseq's Adam (``--adam-betas``,
``--adam-eps``, bias correction, decoupled ``--weight-decay``, any ``--lr-scheduler``): with no
teacher a run is bit-identical to ``--optimizer adam`` on the CPU (``--use-old-adam`` on a GPU).
On top, the wrapped :class:`~fairseq_reweight.core.RecordingSGD` / ``RecordingAdam`` records the last
B steps for :func:`~fairseq_reweight.core.reverse_hypergradient`. Under ``--fp16`` fairseq wraps
these optimizers around fp32 master parameters, which are then what is recorded.
"""
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, List

from fairseq.dataclass import FairseqDataclass
from fairseq.optim import FairseqOptimizer, register_optimizer
from omegaconf import II, OmegaConf

from fairseq_reweight.core import RecordingAdam, RecordingSGD
from fairseq_reweight.core.checks import check_reversible
from fairseq_reweight.core.errors import ReweightConfigError
from fairseq_reweight.core.recording_adam import check_adam_history

RECORDING_OPTIMIZERS = ("reweight_sgd", "reweight_adam")


def optimizer_error(what: str, name: str) -> ReweightConfigError:
    return ReweightConfigError(f"{what} needs --optimizer reweight_sgd or reweight_adam (got {name}); "
                               "or use --reweight-teacher none")


def check_teacher_optimizer(optimizer_cfg, history: str, what: str) -> None:
    """What the first update's recorder would refuse, from the run's ``--optimizer`` config, so that
    fairseq-train stops before it loads data or builds the model. ``history`` is
    ``--reweight-history``; ``what`` names the option that needs a recording optimizer."""
    name = optimizer_cfg.get("_name") if optimizer_cfg is not None else None
    if name is None:  # not a training run (fairseq-generate, a config built by hand)
        return
    if name not in RECORDING_OPTIMIZERS:
        raise optimizer_error(what, name)
    if name == "reweight_sgd":
        check_reversible(history, optimizer_cfg.get("momentum", 0.0), "--reweight-history")
    else:
        check_adam_history(history, "--reweight-history")


@dataclass
class ReweightSGDConfig(FairseqDataclass):
    momentum: float = field(
        default=0.0, metadata={"help": "momentum factor mu (PyTorch convention: v <- mu v + g)"}
    )
    weight_decay: float = field(
        default=0.0, metadata={"help": "L2 weight decay lambda, added to the gradient as lambda*theta"}
    )
    lr: List[float] = II("optimization.lr")


class _RecordingOptimizer(FairseqOptimizer):
    @property
    def supports_flat_params(self):
        return True

    @property
    def recorder(self):
        """The wrapped recording optimizer (history, state, step callback)."""
        return self._optimizer


@register_optimizer("reweight_sgd", dataclass=ReweightSGDConfig)
class ReweightSGD(_RecordingOptimizer):
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


@dataclass
class ReweightAdamConfig(FairseqDataclass):
    # the options of fairseq's FairseqAdamConfig, with its defaults
    adam_betas: Any = field(default=(0.9, 0.999), metadata={"help": "betas for Adam optimizer"})
    adam_eps: float = field(default=1e-8, metadata={"help": "epsilon for Adam optimizer"})
    weight_decay: float = field(
        default=0.0, metadata={"help": "decoupled weight decay (fairseq's and AdamW's: theta <- theta - lr wd theta)"}
    )
    fp16_adam_stats: bool = field(
        default=False, metadata={"help": "not supported: the replay needs the moments in fp32"}
    )
    lr: List[float] = II("optimization.lr")


@register_optimizer("reweight_adam", dataclass=ReweightAdamConfig)
class ReweightAdam(_RecordingOptimizer):
    """fairseq's Adam recording its recent steps (and, for the teacher, their states)."""

    def __init__(self, cfg: ReweightAdamConfig, params):
        super().__init__(cfg)
        if cfg.fp16_adam_stats:
            raise ReweightConfigError("--fp16-adam-stats is not supported by --optimizer reweight_adam: the teacher's "
                                      "replay differentiates Adam's moments, which it keeps in fp32")
        self._optimizer = RecordingAdam(params, **self.optimizer_config)

    @property
    def optimizer_config(self):
        """As fairseq's FairseqAdam.optimizer_config: these override what a checkpoint stored."""
        betas = self.cfg.adam_betas
        return {
            "lr": self.cfg.lr[0] if isinstance(self.cfg.lr, Collection) else self.cfg.lr,
            "betas": tuple(eval(betas) if isinstance(betas, str) else OmegaConf.to_container(betas)),
            "eps": self.cfg.adam_eps,
            "weight_decay": self.cfg.weight_decay,
        }
