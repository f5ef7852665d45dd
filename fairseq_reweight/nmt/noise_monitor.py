"""What the teacher learned, measured against known noise: shared by ``fairseq-reweight-inspect``
and the in-training ``--reweight-noise-sidecar`` metric (the sidecar and the AUC are
:mod:`fairseq_reweight.core.metrics`). fairseq's ``sample["id"]`` is the data-bin line index, so
sidecar line i labels sentence i.

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
from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np
import torch
from fairseq import utils
from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss

from fairseq_reweight.core.metrics import noise_summary, read_noise_sidecar, select_sentences
from fairseq_reweight.nmt.criterion import capture_encoder_out
from fairseq_reweight.nmt.fairseq_contract import unwrap_model

logger = logging.getLogger(__name__)

# The in-training metric scores at most this many training sentences (half noisy, half clean where
# the split has enough of each), the same ones at every evaluation, so that the curve is comparable
# over time and costs a bounded number of forward passes (AUC standard error about 0.01-0.02).
MONITOR_MAX_SENTENCES = 2000


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

    # the means in float64: float32 round-off that depends on a sentence's length would break the
    # ties of equal weights, and the noise AUC of a uniform teacher would not be 0.5

    @property
    def mean_weight(self) -> np.ndarray:
        return np.array([w.mean(dtype=np.float64) for w in self.weights], dtype=np.float64)

    @property
    def mean_loss(self) -> np.ndarray:
        return np.array([loss.mean(dtype=np.float64) for loss in self.losses], dtype=np.float64)

    @property
    def mean_nll(self) -> np.ndarray:
        return np.array([loss.mean(dtype=np.float64) for loss in self.nll], dtype=np.float64)


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

    Built when the task builds the criterion, so that a bad sidecar fails at start-up: reads and
    checks the sidecar against the training split and fixes the sentences to score
    (:data:`MONITOR_MAX_SENTENCES`, balanced, drawn with ``--seed``). Every
    ``--reweight-noise-auc-interval`` meta-updates it scores them with :func:`score_sentences`,
    which leaves training untouched.
    """

    def __init__(self, cfg, task):
        self.interval = cfg.reweight_noise_auc_interval
        if cfg.train_subset not in task.datasets:
            task.load_dataset(cfg.train_subset, combine=False, epoch=1)
        self.dataset = task.dataset(cfg.train_subset)
        self.noisy = read_noise_sidecar(cfg.reweight_noise_sidecar, len(self.dataset))
        self.indices = select_sentences(len(self.dataset), MONITOR_MAX_SENTENCES, cfg.seed, self.noisy)
        self.task = task
        self.max_tokens = task.meta_valid_max_tokens() or 4096
        self.stats: Dict[str, float] = {}  # the latest evaluation (empty before the first)

    def update(self, driver, model, criterion, num_meta_updates: int) -> Tuple[Dict[str, float], bool]:
        """Score the teacher if this meta-update is due; returns (latest stats, whether new)."""
        if num_meta_updates % self.interval != 0:
            return dict(self.stats), False
        max_positions = utils.resolve_max_positions(self.task.max_positions(), unwrap_model(model).max_positions())
        scores = score_sentences(driver, model, criterion, self.dataset, self.indices, max_positions, self.max_tokens)
        summary = noise_summary(scores.mean_weight, self.noisy[scores.ids])
        self.stats = {"noise_auc": summary.auc, "noise_w_noisy": summary.mean_weight_noisy,
                      "noise_w_clean": summary.mean_weight_clean}
        logger.info(
            f"noise AUC after {num_meta_updates} meta-updates: {summary.auc:.4f} "
            f"(mean weight noisy {summary.mean_weight_noisy:.4f}, clean {summary.mean_weight_clean:.4f}; "
            f"{summary.num_noisy} noisy, {summary.num_clean} clean sentences)"
        )
        return dict(self.stats), True
