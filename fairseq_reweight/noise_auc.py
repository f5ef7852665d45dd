"""What the teacher learned, measured against known noise: shared by ``python -m
fairseq_reweight.inspect`` and the in-training ``--reweight-noise-sidecar`` metric.

A noise sidecar (``data-bin/train.noise``, written by ``data_prep/make_noisy_iwslt.sh``) has one
0/1 line per training pair in data-bin order, 1 = noised. fairseq's ``sample["id"]`` is the data-bin
line index, so sidecar line i labels sentence i.

:func:`score_sentences` runs the teacher over sentences of a split exactly as training computes its
inputs (``ReweightDriver.token_weights`` on the student's encoder output, decoder output and
log-probabilities), but with the student in eval mode (no dropout), without gradients, and with
torch's RNG restored afterwards. It returns, per target token, the teacher's raw weight (the sigmoid
output, before the within-batch normalisation) and the training loss. A sentence's weight is the mean
of its tokens' raw weights. :func:`noise_summary` gives the ROC AUC of "low weight => noisy" and the
mean weight of noisy and of clean sentences.
"""
import contextlib
import logging
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from fairseq import utils
from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss

from fairseq_reweight.criterions.reweighted_cross_entropy import capture_encoder_out, unwrap_model
from fairseq_reweight.errors import ReweightConfigError

logger = logging.getLogger(__name__)

# The in-training metric scores at most this many training sentences (half noisy, half clean where
# the split has enough of each), the same ones at every evaluation, so that the curve is comparable
# over time and costs a bounded number of forward passes (AUC standard error about 0.01-0.02).
MONITOR_MAX_SENTENCES = 2000


# -- the noise sidecar and the scores ---------------------------------------------------------------
def read_noise_sidecar(path: str, num_sentences: Optional[int] = None) -> np.ndarray:
    """The 0/1 noise labels of a sidecar file, one per line.

    Args:
        path: the sidecar, e.g. ``data-bin/train.noise``.
        num_sentences: the size of the split it labels; a different line count is an error.

    Returns:
        int8 array of shape ``(lines,)``.

    Raises:
        ReweightConfigError: missing file, a line other than 0 or 1, or the wrong line count.
    """
    if not os.path.isfile(path):
        raise ReweightConfigError(f"noise sidecar {path!r} not found: give the train.noise file written by data_prep/make_noisy_iwslt.sh")
    labels = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            value = line.strip()
            if value not in ("0", "1"):
                raise ReweightConfigError(
                    f"noise sidecar {path}: line {line_number} is {value!r}, expected 0 (clean) or 1 (noised)"
                )
            labels.append(value == "1")
    if num_sentences is not None and len(labels) != num_sentences:
        raise ReweightConfigError(
            f"noise sidecar {path} has {len(labels)} lines but the split has {num_sentences} sentences: "
            "give the sidecar written for this data-bin (one line per training pair, data-bin order)"
        )
    return np.asarray(labels, dtype=np.int8)


def roc_auc_low_weight_noisy(weights: Sequence[float], noisy: Sequence[int]) -> float:
    """ROC AUC of the score ``-weight`` for the label "noisy".

    The probability that a random noisy sentence has a lower weight than a random clean one (ties
    count half): 1.0 when every noisy sentence weighs less than every clean one, 0.5 for a teacher
    that cannot tell them apart, NaN when only one class is present.
    """
    from sklearn.metrics import roc_auc_score

    weights = np.asarray(weights, dtype=np.float64)
    noisy = np.asarray(noisy).astype(bool)
    if weights.shape != noisy.shape:
        raise ValueError(f"weights and noisy labels differ in shape: {weights.shape} vs {noisy.shape}")
    if noisy.all() or not noisy.any():
        return float("nan")
    return float(roc_auc_score(noisy, -weights))


@dataclass
class NoiseSummary:
    """How the teacher's sentence weights separate noisy from clean sentences."""

    auc: float  # ROC AUC of "low weight => noisy" (NaN with only one class)
    mean_weight_noisy: float
    mean_weight_clean: float
    num_noisy: int
    num_clean: int

    def table(self) -> str:
        """A short text table."""
        auc = "n/a (needs noisy and clean sentences)" if math.isnan(self.auc) else f"{self.auc:.4f}"
        return "\n".join([
            f"{'':<8}{'sentences':>10}{'mean weight':>14}",
            f"{'noisy':<8}{self.num_noisy:>10}{_fmt(self.mean_weight_noisy):>14}",
            f"{'clean':<8}{self.num_clean:>10}{_fmt(self.mean_weight_clean):>14}",
            f"ROC AUC of 'low weight => noisy': {auc}",
        ])


def _fmt(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.4f}"


def spearman(a, b) -> float:
    """Spearman rank correlation (ties share ranks); NaN when either side is constant."""
    from scipy.stats import spearmanr

    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def noise_summary(weights: Sequence[float], noisy: Sequence[int]) -> NoiseSummary:
    """AUC and mean weight of noisy vs clean sentences (NaN for an empty class)."""
    weights = np.asarray(weights, dtype=np.float64)
    noisy = np.asarray(noisy).astype(bool)
    auc = roc_auc_low_weight_noisy(weights, noisy)
    mean = lambda w: float(w.mean()) if w.size else float("nan")  # noqa: E731
    return NoiseSummary(auc, mean(weights[noisy]), mean(weights[~noisy]), int(noisy.sum()), int((~noisy).sum()))


def select_sentences(num_sentences: int, max_sentences: Optional[int], seed: int,
                     noisy: Optional[np.ndarray] = None) -> np.ndarray:
    """Sorted sentence indices: all of them, or ``max_sentences`` drawn without replacement.

    With ``noisy`` the draw is balanced: up to half from each class (the rest from the other class
    when one is short), which gives the AUC and the two class means their smallest variance. Uses
    its own ``numpy`` generator (seeded), never torch's or numpy's global RNG.
    """
    if max_sentences is not None and max_sentences < 1:
        raise ValueError(f"max_sentences must be >= 1 (or None for all), got {max_sentences}")
    if max_sentences is None or max_sentences >= num_sentences:
        return np.arange(num_sentences, dtype=np.int64)
    rng = np.random.RandomState(seed)
    if noisy is None:
        return np.sort(rng.choice(num_sentences, max_sentences, replace=False)).astype(np.int64)
    noisy_ids, clean_ids = np.flatnonzero(noisy), np.flatnonzero(~noisy.astype(bool))
    n_noisy = min(len(noisy_ids), max(max_sentences // 2, max_sentences - len(clean_ids)))
    n_clean = max_sentences - n_noisy
    chosen = np.concatenate([rng.choice(noisy_ids, n_noisy, replace=False), rng.choice(clean_ids, n_clean, replace=False)])
    return np.sort(chosen).astype(np.int64)


@dataclass
class SentenceScores:
    """Teacher weights and training losses, per target token (eos included), per sentence.

    Sentences are in ascending id order; ``weights[i]``, ``losses[i]``, ``nll[i]`` and ``tokens[i]``
    are arrays over the target tokens of sentence ``ids[i]``.
    """

    ids: np.ndarray
    tokens: List[np.ndarray]  # target token indices
    weights: List[np.ndarray]  # raw teacher weights (sigmoid output, before normalisation)
    losses: List[np.ndarray]  # label-smoothed token cross-entropy (nats), the training loss
    nll: List[np.ndarray]  # plain token negative log-likelihood (nats)
    skipped: int = 0  # sentences longer than the model's max positions, left out

    @property
    def n_tokens(self) -> np.ndarray:
        return np.array([len(t) for t in self.tokens], dtype=np.int64)

    @property
    def mean_weight(self) -> np.ndarray:
        return np.array([w.mean() for w in self.weights], dtype=np.float64)

    @property
    def mean_loss(self) -> np.ndarray:
        return np.array([loss.mean() for loss in self.losses], dtype=np.float64)

    @property
    def mean_nll(self) -> np.ndarray:
        return np.array([loss.mean() for loss in self.nll], dtype=np.float64)


@contextlib.contextmanager
def inspection_mode(model):
    """No gradients, the model in eval mode (no dropout), torch's RNG saved and restored: scoring
    inside training changes nothing that training computes afterwards."""
    rng_state = utils.get_rng_state()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
        utils.set_rng_state(rng_state)


def score_sentences(driver, model, criterion, dataset, indices, max_positions=None, max_tokens=4096,
                    batch_size=None) -> SentenceScores:
    """Run the teacher over ``dataset[indices]`` (see the module docstring).

    Args:
        driver: the ``ReweightDriver`` holding the teacher.
        model: the student (fairseq model, possibly wrapped).
        criterion: its criterion (for the label smoothing and the padding index).
        dataset: a ``LanguagePairDataset`` (e.g. ``task.dataset("train")``).
        indices: sentence indices into ``dataset``.
        max_positions: sentences longer than this (``utils.resolve_max_positions`` form) are skipped.
        max_tokens, batch_size: batch limits.

    Returns:
        SentenceScores, in ascending id order.
    """
    inner = unwrap_model(model)
    criterion = unwrap_model(criterion)
    device = next(inner.parameters()).device
    indices = np.asarray(indices, dtype=np.int64)
    skipped = 0
    if max_positions is not None:
        kept, ignored = dataset.filter_indices_by_size(indices, max_positions)
        indices, skipped = np.asarray(kept, dtype=np.int64), len(ignored)
    indices = indices[np.argsort(dataset.num_tokens_vec(indices), kind="mergesort")]  # less padding
    batches = dataset.batch_by_size(indices, max_tokens=max_tokens, max_sentences=batch_size)
    pad = criterion.padding_idx
    rows: Dict[int, Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
    with inspection_mode(inner):
        for batch in batches:
            sample = dataset.collater([dataset[int(i)] for i in batch])
            if device.type == "cuda":
                sample = utils.move_to_cuda(sample, device=device)
            with capture_encoder_out(inner) as captured:
                net_output = inner(**sample["net_input"])
            lprobs = inner.get_normalized_probs(net_output, log_probs=True)  # B x T x V
            target = sample["target"]  # B x T
            _, raw = driver.token_weights(sample, captured["encoder_out"], net_output, lprobs)
            token_loss, token_nll = label_smoothed_nll_loss(
                lprobs.reshape(-1, lprobs.size(-1)), target.reshape(-1), criterion.eps,
                ignore_index=pad, reduce=False,
            )
            mask = target.ne(pad)
            lengths = mask.sum(1).tolist()
            if raw.shape == target.shape:  # B x T (0 on padding) rather than the non-pad tokens
                raw = raw[mask]
            raw = raw.float().cpu().numpy()  # non-pad tokens, row-major
            token_loss = token_loss.view(target.shape)[mask].float().cpu().numpy()
            token_nll = token_nll.view(target.shape)[mask].float().cpu().numpy()
            tokens = target[mask].cpu().numpy()
            offsets = np.cumsum([0] + lengths)
            for row, sentence_id in enumerate(sample["id"].tolist()):
                part = slice(offsets[row], offsets[row + 1])
                rows[sentence_id] = (tokens[part], raw[part], token_loss[part], token_nll[part])
    ids = np.array(sorted(rows), dtype=np.int64)
    columns = list(zip(*(rows[i] for i in ids))) if len(ids) else [[], [], [], []]
    return SentenceScores(ids, list(columns[0]), list(columns[1]), list(columns[2]), list(columns[3]), skipped)


# -- the in-training metric (--reweight-noise-sidecar) -----------------------------------------------
class NoiseAucMonitor:
    """``--reweight-noise-sidecar``: the ROC AUC of "low weight => noisy" during training.

    Built at the first meta-update (so that a bad sidecar fails early): reads and checks the sidecar
    against the training split and fixes the sentences to score (:data:`MONITOR_MAX_SENTENCES`,
    balanced, drawn with ``--seed``). Every ``--reweight-noise-auc-interval`` meta-updates it scores
    them with :func:`score_sentences`, which leaves training untouched.
    """

    def __init__(self, cfg, task, model):
        if cfg.reweight_noise_auc_interval < 1:
            raise ReweightConfigError(
                f"--reweight-noise-auc-interval must be >= 1 (meta-updates), got {cfg.reweight_noise_auc_interval}"
            )
        self.interval = cfg.reweight_noise_auc_interval
        self.dataset = task.dataset(cfg.train_subset)
        self.noisy = read_noise_sidecar(cfg.reweight_noise_sidecar, len(self.dataset))
        self.indices = select_sentences(len(self.dataset), MONITOR_MAX_SENTENCES, cfg.seed, self.noisy)
        self.max_positions = utils.resolve_max_positions(task.max_positions(), unwrap_model(model).max_positions())
        self.max_tokens = task.meta_valid_max_tokens() or 4096
        self.stats: Dict[str, float] = {}  # the latest evaluation (empty before the first)

    def update(self, driver, model, criterion, num_meta_updates: int) -> Tuple[Dict[str, float], bool]:
        """Score the teacher if this meta-update is due; returns (latest stats, whether new)."""
        if num_meta_updates % self.interval != 0:
            return dict(self.stats), False
        scores = score_sentences(driver, model, criterion, self.dataset, self.indices, self.max_positions, self.max_tokens)
        summary = noise_summary(scores.mean_weight, self.noisy[scores.ids])
        self.stats = {"noise_auc": summary.auc, "noise_w_noisy": summary.mean_weight_noisy,
                      "noise_w_clean": summary.mean_weight_clean}
        logger.info(
            f"noise AUC after {num_meta_updates} meta-updates: {summary.auc:.4f} "
            f"(mean weight noisy {summary.mean_weight_noisy:.4f}, clean {summary.mean_weight_clean:.4f}; "
            f"{summary.num_noisy} noisy, {summary.num_clean} clean sentences)"
        )
        return dict(self.stats), True
