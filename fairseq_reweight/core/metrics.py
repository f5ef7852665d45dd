"""Measuring a teacher against known noise: the noise sidecar, ROC AUC, Spearman, balanced draws.

A noise sidecar (``data-bin/train.noise``, written by ``data_prep/make_noisy_iwslt.sh``) has one
0/1 line per training pair in data-bin order, 1 = noised. Plain numpy / scikit-learn / scipy: used
by the translation path (:mod:`fairseq_reweight.nmt.noise_monitor`, the commands) and the image path.
"""
import math
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from .errors import ReweightConfigError

def read_pair_file(path: str, num_sentences: Optional[int], what: str, parse: Callable[[str], Optional[float]],
                   expected: str, missing: str, count_hint: str) -> list:
    """The values of a file with one line per training pair (data-bin order), ``parse`` giving each
    line's value (None: not a valid line). Every problem is one ReweightConfigError: ``missing`` says
    what to give when the file is not there, ``expected`` what a line should be, ``count_hint`` what to
    do when the line count is not ``num_sentences`` (None: any count)."""
    if not os.path.isfile(path):
        raise ReweightConfigError(f"{what} {path!r} not found: {missing}")
    values = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            value = parse(line.strip())
            if value is None:
                raise ReweightConfigError(f"{what} {path}: line {line_number} is {line.strip()!r}, expected {expected}")
            values.append(value)
    if num_sentences is not None and len(values) != num_sentences:
        raise ReweightConfigError(f"{what} {path} has {len(values)} lines but the split has {num_sentences} "
                                  f"sentences: {count_hint}")
    return values


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
    labels = read_pair_file(path, num_sentences, "noise sidecar", {"0": 0, "1": 1}.get,
                            "0 (clean) or 1 (noised)",
                            "give the train.noise file written by data_prep/make_noisy_iwslt.sh",
                            "give the sidecar written for this data-bin (one line per training pair, data-bin order)")
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
