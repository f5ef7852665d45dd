"""Fixed per-pair weights: ``--reweight-teacher oracle`` and ``--reweight-teacher pairs``.

Both give every target token of training pair i the weight ``weights[i]`` (normalised as a teacher's
weights are, so a micro-batch whose pairs all weigh 0 contributes nothing). Neither learns anything
nor needs a meta-update: the same batches and updates as the baseline with the loss reweighted.

- ``oracle``: the upper bound of down-weighting the noise. The weights come from
  ``--reweight-noise-sidecar``: 0 for a noisy pair, 1 for a clean one.
- ``pairs``: the weights come from ``--reweight-pair-weights`` (one non-negative number per training
  pair, data-bin order; e.g. 0/1 from a filter, ``fairseq-reweight-score`` and
  ``examples/run_experiment.py``'s ``filter-*`` methods). The noise sidecar, if given, is only
  measured against (the noise metrics a teacher logs), never read for the weights.
"""
from typing import Optional

import numpy as np
import torch
from torch import nn

from fairseq_reweight.core.errors import ReweightConfigError
from fairseq_reweight.core.metrics import noise_summary, read_noise_sidecar, read_pair_file, select_sentences
from fairseq_reweight.core.teacher import normalize_weights
from fairseq_reweight.nmt.noise_monitor import MONITOR_MAX_SENTENCES


def read_pair_weights(path: str, num_sentences: int) -> np.ndarray:
    """The weights of a ``--reweight-pair-weights`` file: one finite number >= 0 a line (float64).

    Raises:
        ReweightConfigError: missing file, a line that is not such a number, or the wrong line count.
    """
    weights = _read_numbers(path, num_sentences, "pair weights", lambda v: np.isfinite(v) and v >= 0,
                            "a finite number >= 0 (e.g. 0 to drop the pair, 1 to keep it)")
    return np.asarray(weights, dtype=np.float64)


def read_pair_losses(path: str, num_sentences: int) -> np.ndarray:
    """The losses of a ``--reweight-reference-losses`` file (float64): one number a line, as
    ``fairseq-reweight-score`` writes them; ``inf`` (a pair too long for the reference to score, which
    training skips too) becomes the largest finite loss of the file."""
    losses = np.asarray(_read_numbers(path, num_sentences, "reference losses", lambda v: not np.isnan(v) and v > -np.inf,
                                      "a cross-entropy in nats (inf for a pair the reference could not score)"),
                        dtype=np.float64)
    finite = np.isfinite(losses)
    if not finite.any():
        raise ReweightConfigError(f"reference losses {path}: no finite loss: the reference scored no pair")
    losses[~finite] = losses[finite].max()
    return losses


def read_pair_scores(path: str, num_sentences: int) -> np.ndarray:
    """The scores of a ``--reweight-pair-scores`` file (float64), standardised over the corpus (mean 0,
    standard deviation 1): a filter's score in whatever unit and direction it comes, on the scale of
    the teacher's other inputs. ``inf``/``-inf`` (a pair the filter could not score, which training
    skips too when it is too long) become 0, the mean."""
    scores = np.asarray(_read_numbers(path, num_sentences, "pair scores", lambda v: not np.isnan(v),
                                      "a number (inf or -inf for a pair the filter could not score)"),
                        dtype=np.float64)
    finite = np.isfinite(scores)
    spread = scores[finite].std() if finite.any() else 0.0
    if not spread > 0:
        raise ReweightConfigError(f"pair scores {path}: the finite scores are all equal (or there are none): "
                                  "they cannot tell pairs apart")
    scores[finite] = (scores[finite] - scores[finite].mean()) / spread
    scores[~finite] = 0.0
    return scores


def _read_numbers(path: str, num_sentences: int, what: str, valid, expected: str) -> list:
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            return None
        return value if valid(value) else None

    return read_pair_file(path, num_sentences, what, parse, expected, "give a file with one line per training pair",
                          "give one line per training pair, in data-bin order")


class PairWeigher(nn.Module):
    """Fixed weights per training pair: ``forward(sample, ...) -> (w, raw)`` like a teacher's.

    Args:
        weights: one weight per sentence of the training split (index = fairseq's ``sample["id"]``).
        pad: the target dictionary's padding index.
        seed: picks the sentences the noise metrics are computed on.
        noisy: 0/1 noise labels of the split, if known: :attr:`noise_stats` then holds the noise
            metrics a teacher logs (``noise_auc``, ``noise_w_noisy``, ``noise_w_clean``) on the
            sentences the in-training monitor would score; exact, since the weights do not depend
            on the student. Without labels it is empty.
    """

    def __init__(self, weights: np.ndarray, pad: int, seed: int, noisy: Optional[np.ndarray] = None):
        super().__init__()
        self.register_buffer("weights", torch.from_numpy(weights).float(), persistent=False)
        self.pad = pad
        self.noise_stats = {}
        if noisy is not None:
            indices = select_sentences(len(noisy), MONITOR_MAX_SENTENCES, seed, noisy)
            summary = noise_summary(np.asarray(weights, dtype=np.float64)[indices], noisy[indices])
            self.noise_stats = {"noise_auc": summary.auc, "noise_w_noisy": summary.mean_weight_noisy,
                                "noise_w_clean": summary.mean_weight_clean}

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self.weights = self.weights.float()  # stays float32 when the criterion is cast to fp16
        return self

    def forward(self, sample, encoder_out=None, net_output=None, lprobs=None, params=None):
        target = sample["target"]  # B x T
        mask = target.ne(self.pad)
        raw = self.weights.to(target.device)[sample["id"]].unsqueeze(1).expand_as(target) * mask
        return normalize_weights(raw, mask), raw


class OracleWeigher(PairWeigher):
    """``--reweight-teacher oracle``: weight 1 - noisy from the noise sidecar."""

    def __init__(self, sidecar: str, num_sentences: int, pad: int, seed: int):
        noisy = read_noise_sidecar(sidecar, num_sentences)
        super().__init__(1.0 - noisy, pad, seed, noisy)

    @property
    def clean(self):
        """The oracle's weights (1 = clean pair)."""
        return self.weights


def pairs_weigher(weights_file: str, num_sentences: int, pad: int, seed: int,
                  sidecar: Optional[str] = None) -> PairWeigher:
    """``--reweight-teacher pairs``: the weights of ``weights_file``, measured against ``sidecar`` if given."""
    weights = read_pair_weights(weights_file, num_sentences)
    noisy = read_noise_sidecar(sidecar, num_sentences) if sidecar else None
    return PairWeigher(weights, pad, seed, noisy)
