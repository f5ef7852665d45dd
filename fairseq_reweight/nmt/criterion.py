"""``--criterion reweighted_cross_entropy``: label-smoothed token cross-entropy times per-token
weights.

With no weights (``--reweight-teacher none``, or a validation step) it *is* fairseq's
``label_smoothed_cross_entropy``: same code path, same numbers, same logged metrics. With a teacher
(owned by the ``reweight_translation`` task, which attaches it here so that fairseq checkpoints it),
each non-pad target token k gets a weight w_k normalised over the batch's non-pad tokens so that
uniform weights give back the summed loss, and the loss is ``sum_k w_k l_k``.
"""
import contextlib
import logging
from dataclasses import dataclass
from typing import Callable

from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
    label_smoothed_nll_loss,
)
from fairseq.logging import metrics
from torch import nn

from fairseq_reweight.core.losses import smoothed_nll_from_logits
from fairseq_reweight.nmt.fairseq_contract import logits_are_log_softmax_input, unwrap_model

logger = logging.getLogger(__name__)


@dataclass
class ReweightedCrossEntropyCriterionConfig(LabelSmoothedCrossEntropyCriterionConfig):
    pass


@contextlib.contextmanager
def capture_encoder_out(model):
    """Record the encoder's output during ``model(**net_input)`` (a forward hook, so the forward
    pass itself is exactly the model's own)."""
    inner = unwrap_model(model)
    captured = {}

    def hook(_module, _inputs, output):
        captured["encoder_out"] = output

    handle = inner.encoder.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


@register_criterion("reweighted_cross_entropy", dataclass=ReweightedCrossEntropyCriterionConfig)
class ReweightedCrossEntropyCriterion(LabelSmoothedCrossEntropyCriterion):
    """Token-level (label-smoothed) cross-entropy with per-token weights from a teacher.

    The task attaches the teacher (:meth:`attach`) and its :attr:`weight_fn`: ``weight_fn(sample,
    encoder_out, net_output, lprobs, params) -> (w, raw)`` with ``w`` (B x T) normalised weights and
    ``raw`` (B x T) the teacher's unnormalised weights, both 0 on padding (``raw`` is for logging);
    ``params`` (the ``teacher_params`` of :meth:`forward`) are the teacher parameters to weigh with,
    None for the teacher's own (a replay passes fresh leaves); ``lprobs`` is None where the loss is
    taken from the logits (:attr:`loss_from_logits`) and :attr:`weight_fn_reads_lprobs` is False.
    While :attr:`weight_fn` is ``None`` the criterion is plain ``label_smoothed_cross_entropy``. Nothing
    here synchronises with the GPU (no ``.item()``, no boolean indexing): fairseq reduces the logged
    tensors once per log interval.
    """

    def __init__(self, task, sentence_avg, label_smoothing, ignore_prefix_size=0, report_accuracy=False):
        super().__init__(task, sentence_avg, label_smoothing, ignore_prefix_size, report_accuracy)
        # all three set by attach(), which says what they are
        self.weight_fn = None
        self.weight_fn_reads_lprobs = True
        self.loss_from_logits = False

    def attach(self, teacher: nn.Module, weight_fn: Callable, *, name: str = "reweight", reads_lprobs: bool = True,
               loss_from_logits: bool = False) -> None:
        """Weigh the training loss by ``weight_fn`` from now on. ``teacher`` (what owns the weights:
        a driver, or fixed per-pair weights) becomes the submodule ``name``, so that fairseq checkpoints
        it with the criterion and moves it to the device; ``reads_lprobs``: False where ``weight_fn``
        takes ``lprobs=None``; ``loss_from_logits``: the loss from the logits where it is fairseq's (a
        kept or replayed step's lean graph; off: fairseq's own formulation, e.g. for the oracle, which
        is then the baseline bit for bit)."""
        setattr(self, name, teacher)
        self.weight_fn = weight_fn
        self.weight_fn_reads_lprobs = reads_lprobs
        self.loss_from_logits = loss_from_logits

    def forward(self, model, sample, reduce=True, teacher_params=None):
        if self.weight_fn is None or not model.training:
            return super().forward(model, sample, reduce=reduce)
        with capture_encoder_out(model) as captured:
            net_output = model(**sample["net_input"])
        target = model.get_targets(sample, net_output)  # B x T
        # B x T x V, only where something reads it: the loss is taken from the logits where it can be
        lprobs = None
        if not self._from_logits(model) or self.weight_fn_reads_lprobs or self.report_accuracy:
            lprobs = model.get_normalized_probs(net_output, log_probs=True)
        weights, raw = self.weight_fn(sample, captured["encoder_out"], net_output, lprobs, teacher_params)
        token_loss, token_nll = self.token_losses(model, net_output, sample, self.eps, lprobs)
        if self.ignore_prefix_size > 0:
            lprobs = None if lprobs is None else lprobs[:, self.ignore_prefix_size :, :]
            target = target[:, self.ignore_prefix_size :]
            weights = weights[:, self.ignore_prefix_size :]
        loss = (token_loss.view(-1) * weights.reshape(-1).to(token_loss.dtype)).sum()
        nll_loss = token_nll.sum()
        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        raw = raw.detach().float()
        logging_output = {
            "loss": loss.data,
            "nll_loss": nll_loss.data,
            "ntokens": sample["ntokens"],
            "nsentences": sample["target"].size(0),
            "sample_size": sample_size,
            "teacher_w_sum": raw.sum(),
            "teacher_w_sq_sum": raw.pow(2).sum(),
            "teacher_w_count": sample["ntokens"],
        }
        if self.report_accuracy:
            mask = target.ne(self.padding_idx)
            logging_output["n_correct"] = lprobs.argmax(-1).masked_select(mask).eq(
                target.masked_select(mask)
            ).sum().item()
            logging_output["total"] = mask.sum().item()
        return loss, sample_size, logging_output

    def token_losses(self, model, net_output, sample, epsilon: float, lprobs=None):
        """Flat per-token ``(loss, nll)`` of fairseq's ``label_smoothed_nll_loss(..., reduce=False)``
        with ``epsilon`` (0: the loss is the NLL), 0 on padding, past ``--ignore-prefix-size``; only
        the loss is differentiable. From the logits (:func:`smoothed_nll_from_logits`: the same values
        with a leaner graph, which is what a kept or replayed step's memory is mostly made of) where
        fairseq's log-probabilities are their log-softmax and :attr:`loss_from_logits` is set, else from
        ``lprobs`` (computed if None)."""
        target = model.get_targets(sample, net_output)[:, self.ignore_prefix_size :].reshape(-1)
        if self._from_logits(model):
            logits = net_output[0][:, self.ignore_prefix_size :, :]
            return smoothed_nll_from_logits(logits.reshape(-1, logits.size(-1)), target, epsilon, self.padding_idx)
        if lprobs is None:
            lprobs = model.get_normalized_probs(net_output, log_probs=True)
        lprobs = lprobs[:, self.ignore_prefix_size :, :]
        loss, nll = label_smoothed_nll_loss(lprobs.reshape(-1, lprobs.size(-1)), target, epsilon,
                                            ignore_index=self.padding_idx, reduce=False)
        return loss.view(-1), nll.view(-1).detach()

    def _from_logits(self, model) -> bool:
        return self.loss_from_logits and logits_are_log_softmax_input(model)

    def load_state_dict(self, state_dict, strict=True, **kwargs):
        """A checkpoint without a teacher (e.g. pretrained with plain fairseq, or fine-tuned with
        ``--reweight-teacher none``), or ``--reset-teacher``, leaves the fresh teacher as it is."""
        if getattr(self.task.cfg, "reset_teacher", False):
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith("reweight.")}
        if not state_dict:
            logger.info("no teacher state loaded (none in the checkpoint, or --reset-teacher): a fresh teacher")
            return
        try:
            return super().load_state_dict(state_dict, strict=strict, **kwargs)
        except (RuntimeError, ValueError) as error:  # parameter shapes, or the teacher's Adam state
            # fairseq's trainer turns any Exception here into "please ensure that the architectures
            # match"; SystemExit passes through it with the reason and the fix
            raise SystemExit(
                "fairseq-reweight: error: the checkpoint's teacher does not fit this one (other --teacher-features, "
                "--teacher-hidden-layers or --teacher-hidden-dim?): use the options it was trained with, or "
                f"--reset-teacher to start the teacher fresh ({str(error).splitlines()[0]})"
            ) from None

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        count = sum(log.get("teacher_w_count", 0) for log in logging_outputs)
        if count > 0:
            total = sum(log.get("teacher_w_sum", 0) for log in logging_outputs)
            sq_total = sum(log.get("teacher_w_sq_sum", 0) for log in logging_outputs)
            mean = float(total) / count
            variance = max(float(sq_total) / count - mean * mean, 0.0)
            metrics.log_scalar("w_mean", mean, count, round=4)
            metrics.log_scalar("w_std", variance**0.5, count, round=4)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
