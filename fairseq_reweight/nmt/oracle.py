"""``--reweight-teacher oracle``: the upper bound of down-weighting the noise.

Reads ``--reweight-noise-sidecar`` and gives every target token of a noisy pair weight 0, every
other token weight 1 (normalised as a teacher's weights are, so a micro-batch of noisy pairs only
contributes nothing). It learns nothing and needs no meta-update: the same batches and updates as
the baseline with the noise removed from the loss.
"""
import torch
from torch import nn

from fairseq_reweight.core.metrics import noise_summary, read_noise_sidecar, select_sentences
from fairseq_reweight.core.teacher import normalize_weights
from fairseq_reweight.nmt.noise_monitor import MONITOR_MAX_SENTENCES


class OracleWeigher(nn.Module):
    """Weights from the noise labels: ``forward(sample, ...) -> (w, raw)`` like a teacher's."""

    def __init__(self, sidecar: str, num_sentences: int, pad: int, seed: int):
        super().__init__()
        noisy = read_noise_sidecar(sidecar, num_sentences)
        self.register_buffer("clean", torch.from_numpy(1 - noisy).float(), persistent=False)
        self.pad = pad
        # the noise metrics a teacher logs, on the sentences the in-training monitor would score:
        # exact here, since the weights do not depend on the student
        indices = select_sentences(num_sentences, MONITOR_MAX_SENTENCES, seed, noisy)
        summary = noise_summary(1.0 - noisy[indices], noisy[indices])
        self.noise_stats = {"noise_auc": summary.auc, "noise_w_noisy": summary.mean_weight_noisy,
                            "noise_w_clean": summary.mean_weight_clean}

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self.clean = self.clean.float()  # stays float32 when the criterion is cast to fp16
        return self

    def forward(self, sample, encoder_out=None, net_output=None, lprobs=None, params=None):
        target = sample["target"]  # B x T
        mask = target.ne(self.pad)
        raw = self.clean.to(target.device)[sample["id"]].unsqueeze(1).expand_as(target) * mask
        return normalize_weights(raw, mask), raw
