"""Per-token influence ``grad l_i . direction`` by forward-mode AD, and its means per sentence.

What ``fairseq-reweight-influence`` (:mod:`fairseq_reweight.cli.influence`, the direction
``grad L_valid``) and its ``--by-layer`` split (:mod:`fairseq_reweight.cli.influence_layers`, that
direction restricted to one parameter group) both compute; here so that neither imports the other.
"""
from dataclasses import dataclass

import numpy as np
import torch
from torch.autograd import forward_ad
from fairseq import utils

from fairseq_reweight.core import math_attention
from fairseq_reweight.core.reparam import substitute_parameters


@dataclass
class TokenInfluence:
    """Per-token results, flattened over sentences in ascending id order (eos included)."""

    ids: np.ndarray  # sentence id of each token
    positions: np.ndarray
    tokens: np.ndarray
    loss: np.ndarray  # training loss of the token (the criterion's, nats)
    influence: np.ndarray  # grad l_i . grad L_valid
    influence_random_label: np.ndarray  # the same with a random label at the token's position


def token_loss_slopes(dlprobs, labels, eps: float):
    """Directional derivatives of fairseq's label-smoothed token loss for the given labels.

    ``label_smoothed_nll_loss`` is ``(1 - eps - eps_i) * (-lprobs[y]) + eps_i * sum_v(-lprobs[v])``
    with ``eps_i = eps / (V - 1)``; it is linear in ``lprobs``, so its derivative along a direction is
    the same expression in the derivative ``dlprobs`` (B x T x V) of the log-probabilities.
    """
    vocab = dlprobs.size(-1)
    eps_i = eps / (vocab - 1)
    picked = dlprobs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return -(1.0 - eps - eps_i) * picked - eps_i * dlprobs.sum(-1)


def token_influence(model, dataset, indices, direction: dict, eps: float, pad: int,
                    max_tokens: int, seed: int, num_special: int) -> TokenInfluence:
    """``grad l_i . direction`` for every target token of ``dataset[indices]`` (forward-mode AD);
    ``direction`` maps the model's parameter names to tensors of their shapes."""
    device = next(model.parameters()).device
    indices = np.asarray(indices, dtype=np.int64)
    indices = indices[np.argsort(dataset.num_tokens_vec(indices), kind="mergesort")]  # less padding
    generator = torch.Generator().manual_seed(seed)
    rows = {}
    model.eval()
    for batch in dataset.batch_by_size(indices, max_tokens=max_tokens):
        sample = dataset.collater([dataset[int(i)] for i in batch])
        if device.type == "cuda":
            sample = utils.move_to_cuda(sample, device=device)
        target = sample["target"]
        with torch.no_grad(), math_attention(), forward_ad.dual_level():
            duals = {name: forward_ad.make_dual(p.detach(), direction[name]) for name, p in model.named_parameters()}
            with substitute_parameters(model, duals):
                lprobs = model.get_normalized_probs(model(**sample["net_input"]), log_probs=True)
            primal, tangent = forward_ad.unpack_dual(lprobs)
            primal, tangent = primal.float(), tangent.float()
        vocab = primal.size(-1)
        random_labels = torch.randint(num_special, vocab, target.shape, generator=generator).to(target.device)
        loss = token_loss_slopes(primal, target, eps)  # the loss is linear in lprobs too
        influence = token_loss_slopes(tangent, target, eps)
        influence_random = token_loss_slopes(tangent, random_labels, eps)
        mask = target.ne(pad)
        for row, sentence_id in enumerate(sample["id"].tolist()):
            keep = mask[row]
            rows[sentence_id] = tuple(
                t[row][keep].cpu().numpy() for t in (target, loss, influence, influence_random)
            )
    ids = sorted(rows)
    if not ids:
        empty = np.zeros(0)
        return TokenInfluence(empty.astype(np.int64), empty.astype(np.int64), empty.astype(np.int64), empty, empty, empty)
    lengths = [len(rows[i][0]) for i in ids]
    return TokenInfluence(
        ids=np.repeat(np.array(ids, dtype=np.int64), lengths),
        positions=np.concatenate([np.arange(n) for n in lengths]),
        tokens=np.concatenate([rows[i][0] for i in ids]).astype(np.int64),
        loss=np.concatenate([rows[i][1] for i in ids]).astype(np.float64),
        influence=np.concatenate([rows[i][2] for i in ids]).astype(np.float64),
        influence_random_label=np.concatenate([rows[i][3] for i in ids]).astype(np.float64),
    )


def sentence_means(ids: np.ndarray, values: np.ndarray):
    """(sentence ids, token counts, mean of ``values`` per sentence), ids ascending."""
    unique, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    return unique, counts, np.bincount(inverse, weights=values, minlength=len(unique)) / np.maximum(counts, 1)
