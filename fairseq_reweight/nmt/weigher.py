"""The teacher and its NMT inputs: a weight for every target token of a batch.

Inputs (``--teacher-features``): the student's states (encoder states mean-pooled over non-pad
source tokens, the final decoder state at each target position), the target token (``label``),
the paper's surface features, ``excess``: the pair's excess loss, the student's current per-token
cross-entropy of the pair minus that of a reference model trained on trusted data (Wang et al. 2018,
"Denoising Neural Machine Translation Training with Trusted Data and Online Data Selection"), and
``pair-score``: a fixed score per pair from any filter (e.g. dual conditional cross-entropy with a
reverse model, bicleaner), whose sign and weight the teacher learns from the trusted data; how
they are normalised is :mod:`fairseq_reweight.core.features`' rule. Everything the weights depend on
is an argument: the training state (progress, running loss, best validation loss) and, inside a
replay, the teacher parameters omega.
"""
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from fairseq_reweight.core.errors import ReweightConfigError
from fairseq_reweight.core.features import TrainingState, surface_features, teacher_inputs
from fairseq_reweight.core.teacher import Teacher, normalize_weights
from fairseq_reweight.nmt.fairseq_contract import decoder_states, encoder_states

STATE_FEATURES = ("encoder", "decoder")
# each NMT surface feature as columns of core.features.SURFACE_COLUMNS
SURFACE_FEATURES = {"progress": ("progress",), "loss": ("example_loss", "mean_train_loss"),
                    "best-valid": ("best_valid",), "prediction": ("prediction",), "margin": ("margin",)}
# A pair's excess loss, read from its id: H_student(y|x) - H_reference(y|x), per token. To first
# order it is the pair's gradient times the step from the student towards the reference, which was
# trained on the trusted data the teacher's objective is measured on: it is the one-step influence
# of the pair on that objective, the signal the hypergradient rewards, at the level of a whole pair.
# A filter's score per pair (``--reweight-pair-scores``), standardised over the corpus: what the student
# cannot see from the source side, e.g. a reverse model's judgement of a shuffled source.
PAIR_FEATURES = ("excess", "pair-score")
ALL_FEATURES = STATE_FEATURES + ("label",) + tuple(SURFACE_FEATURES) + PAIR_FEATURES
DEFAULT_FEATURES = {"deep": "encoder,label", "surface": "progress,loss,best-valid,prediction,margin"}
DEFAULT_FEATURES["l2t"] = DEFAULT_FEATURES["surface"]  # its policy's inputs, pooled per sentence (nmt/l2t.py)


def parse_features(spec: str, teacher: str) -> List[str]:
    """``--teacher-features`` as a list; empty means the default of ``--reweight-teacher``."""
    spec = spec or DEFAULT_FEATURES.get(teacher, "")
    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in ALL_FEATURES]
    if unknown:
        raise ReweightConfigError(f"unknown --teacher-features {','.join(unknown)}; valid names: {','.join(ALL_FEATURES)}")
    if not names:
        raise ReweightConfigError("--teacher-features is empty; give at least one of " + ",".join(ALL_FEATURES))
    return names


def _row_mean(values: Tensor, keep: Tensor) -> Tensor:
    """Each row's mean of ``values`` (B x T or B x T x C) where ``keep`` is 1, over dim 1, kept as
    a size-1 dim (0 for a row with none)."""
    return (values * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp_min(1)


class TokenWeigher(nn.Module):
    """``forward(...) -> (w, raw)``: normalised weights (B x T, mean 1 over non-pad tokens, 0 on
    padding) and the teacher's raw weights (B x T, 0 on padding).

    Args:
        features: the ``--teacher-features`` names.
        pad: the target padding index.
        vocab_size, encoder_dim, decoder_dim: sizes of the label and state inputs.
        hidden_layers, hidden_dim: the teacher's shape (0: the paper's linear teacher).
        granularity: ``token`` or ``sentence`` (every token gets its sentence's mean raw weight).
        features_grad: let the weights depend on the student through its states.
        eos: the end-of-sentence index when ``</s>`` is to get the mean raw weight of its
            sentence's other tokens (``--reweight-eos sentence``); None: the teacher weighs it.
        reference_losses: with the ``excess`` feature: the reference model's per-token cross-entropy
            of every training pair, indexed by fairseq's ``sample["id"]``.
        excess_init: the linear teacher's initial coefficient of the excess feature (0: zero, as
            every other input).
        pair_scores: with the ``pair-score`` feature: every training pair's score (standardised,
            :func:`fairseq_reweight.nmt.oracle.read_pair_scores`), indexed by ``sample["id"]``.
        pair_score_init: the linear teacher's initial coefficient of the pair score (0: zero).
    """

    def __init__(self, features: List[str], pad: int, vocab_size: int, encoder_dim: int, decoder_dim: int,
                 hidden_layers: int = 0, hidden_dim: int = 64, granularity: str = "token", features_grad: bool = False,
                 eos: Optional[int] = None, reference_losses: Optional[Tensor] = None, excess_init: float = 0.0,
                 pair_scores: Optional[Tensor] = None, pair_score_init: float = 0.0):
        super().__init__()
        self.features, self.pad, self.eos = list(features), pad, eos
        self.granularity, self.features_grad = granularity, features_grad
        self.columns = [col for name in self.features for col in SURFACE_FEATURES.get(name, ())]
        self.excess = "excess" in self.features
        if self.excess and reference_losses is None:
            raise ValueError("the excess feature needs the reference losses of the training pairs")
        self.pair_score = "pair-score" in self.features
        if self.pair_score and pair_scores is None:
            raise ValueError("the pair-score feature needs the scores of the training pairs")
        # data of the corpus, not of the teacher: moves with the module, stays out of checkpoints
        self.register_buffer("reference_losses", reference_losses if self.excess else None, persistent=False)
        self.register_buffer("pair_scores", pair_scores if self.pair_score else None, persistent=False)
        dense_dim = (len(self.columns) + self.excess + self.pair_score + encoder_dim * ("encoder" in features)
                     + decoder_dim * ("decoder" in features))
        self.teacher = Teacher(dense_dim, vocab_size if "label" in features else 0, hidden_layers, hidden_dim)
        # the pair columns come last (dense_features): excess, then the pair score
        for name, init, column in (("excess", excess_init, -1 - self.pair_score), ("pair-score", pair_score_init, -1)):
            if init:
                if name not in self.features or hidden_layers:
                    raise ValueError(f"a start for the {name} coefficient needs the {name} feature and the linear teacher")
                with torch.no_grad():
                    self.teacher.feature_proj.weight[0, column] = init
        # trained by the driver's own Adam on hypergradients, never by the student's optimizer
        self.teacher.requires_grad_(False)

    @property
    def reads_lprobs(self) -> bool:
        """Whether the weights depend on the student's log-probabilities."""
        return bool(self.columns) or self.excess

    def _apply(self, fn, *args, **kwargs):
        # the trainer casts the criterion, and so this module, to fp16/bf16 with the student
        kept = {name: getattr(self, name) for name in ("reference_losses", "pair_scores")}
        super()._apply(fn, *args, **kwargs)
        for name, data in kept.items():  # float64 stays float64 (loss differences), only the device follows
            if data is not None:
                setattr(self, name, data.to(getattr(self, name).device))
        for p in self.teacher.parameters():
            if p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()
        return self

    def forward(self, sample, encoder_out, net_output, lprobs: Optional[Tensor], state: TrainingState,
                params: Optional[Dict[str, Tensor]] = None):
        target = sample["target"]  # B x T
        mask = target.ne(self.pad)
        dense = self.dense_features(encoder_out, net_output, lprobs, target, state, sample.get("id"))
        labels = target if "label" in self.features else None
        if params is None:
            raw = self.teacher(dense, labels)  # B x T
        else:  # inside a replay: the weights as a function of the leaves omega
            raw = torch.func.functional_call(self.teacher, params, (dense, labels))
        mask_f = mask.to(raw.dtype)
        if self.granularity == "sentence":
            raw = _row_mean(raw, mask_f).expand_as(raw)
        elif self.eos is not None:
            # A token teacher that down-weights a pair's words tends to down-weight its </s> too,
            # and a student that learns less where to stop writes longer hypotheses.
            is_eos = target.eq(self.eos)
            words = (mask & ~is_eos).to(raw.dtype)
            has_words = words.sum(1, keepdim=True).gt(0)
            raw = torch.where(is_eos & has_words, _row_mean(raw, words).expand_as(raw), raw)
        return normalize_weights(raw, mask), raw * mask_f

    def dense_features(self, encoder_out, net_output, lprobs, target, state: TrainingState,
                       ids: Optional[Tensor] = None) -> Optional[Tensor]:
        """B x T x d teacher input (None for a label-only teacher); ``lprobs`` (B x T x V) may be None
        when the weights do not read it (:attr:`reads_lprobs`); ``ids`` (B) are the pairs' indices in
        the training split (``sample["id"]``), read by the ``excess`` and ``pair-score`` features."""
        bsz, tgt_len = target.shape
        states = []
        if "encoder" in self.features:
            hidden, pads = encoder_states(encoder_out)
            hidden = hidden.transpose(0, 1)  # B x S x C
            keep = (~pads).to(hidden.dtype).unsqueeze(-1) if pads is not None else torch.ones_like(hidden[..., :1])
            pooled = _row_mean(hidden, keep).squeeze(1)  # B x C
            states.append(pooled.unsqueeze(1).expand(bsz, tgt_len, -1))
        if "decoder" in self.features:
            states.append(decoder_states(net_output).transpose(0, 1))  # B x T x C
        scores = net_output[0] if lprobs is None else lprobs
        dtype = torch.promote_types(scores.dtype, torch.float32)  # fp16 -> fp32; a float64 check stays float64
        surface = surface_features(lprobs.to(dtype), target, state, self.columns) if self.columns else None
        if self.excess:
            excess = self.excess_loss(lprobs.to(dtype), target, ids).view(bsz, 1, 1).expand(bsz, tgt_len, 1)
            surface = excess if surface is None else torch.cat([surface, excess], dim=-1)
        if self.pair_score:
            score = self.pair_scores[ids].to(dtype).view(bsz, 1, 1).expand(bsz, tgt_len, 1)
            surface = score if surface is None else torch.cat([surface, score], dim=-1)
        dense = teacher_inputs(states, surface, dtype)
        return dense if dense is None or self.features_grad else dense.detach()

    @torch.no_grad()
    def excess_loss(self, lprobs: Tensor, target: Tensor, ids: Tensor) -> Tensor:
        """(B,) each pair's excess loss: the student's mean cross-entropy over the target's tokens
        (its ``</s>`` included, as ``fairseq-reweight-score`` computes the reference's) minus the
        reference's."""
        keep = target.ne(self.pad).to(lprobs.dtype)
        nll = -lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        student = (nll * keep).sum(1) / keep.sum(1).clamp_min(1)
        return student - self.reference_losses[ids].to(lprobs.dtype)
