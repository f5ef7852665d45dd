"""``fairseq-reweight-influence --by-layer``: the influence split by the student's parameter groups.

``grad l_i . grad L_valid`` is a sum over parameters, so restricting the direction to one group of
parameters (the others zero) gives that group's share, and the shares add up to the whole. It shows
*where* a token's step lowers the validation loss: e.g. whether a ``<mask>`` target helps through
the shared embedding, the output projection, the decoder's cross-attention or its self-attention.
"""
import re
from typing import Dict, List, Optional

import numpy as np
import torch

from fairseq_reweight.cli.influence_tokens import sentence_means, token_influence
from fairseq_reweight.core.metrics import roc_auc_low_weight_noisy

# first match wins; names as fairseq's Transformer gives them
GROUPS = [
    ("embeddings (shared)", r"^(encoder|decoder)\.embed_tokens\."),
    ("output projection", r"^decoder\.output_projection\."),
    ("encoder layers", r"^encoder\."),
    ("decoder cross-attention", r"^decoder\.layers\.\d+\.encoder_attn"),
    ("decoder self-attention", r"^decoder\.layers\.\d+\.self_attn"),
    ("decoder feed-forward", r"^decoder\.layers\.\d+\.(fc1|fc2|final_layer_norm)"),
    ("other decoder", r"^decoder\."),
]


def parameter_groups(names: List[str]) -> Dict[str, List[str]]:
    """{group: parameter names} for the named parameters of a model (empty groups left out)."""
    groups: Dict[str, List[str]] = {}
    for name in names:
        label = next((g for g, pattern in GROUPS if re.search(pattern, name)), "other")
        groups.setdefault(label, []).append(name)
    return groups


def influence_by_group(model, dataset, indices, direction: dict, **kwargs):
    """{group: TokenInfluence with the direction restricted to that group}; ``kwargs`` as
    :func:`~fairseq_reweight.cli.influence_tokens.token_influence` takes them."""
    out = {}
    for label, names in parameter_groups(list(direction)).items():
        keep = set(names)
        restricted = {n: d if n in keep else torch.zeros_like(d) for n, d in direction.items()}
        out[label] = token_influence(model, dataset, indices, restricted, **kwargs)
    return out


def layer_table(by_group: dict, token_noisy: Optional[np.ndarray], mask_id: Optional[int]) -> List[str]:
    """Mean influence per parameter group on clean-pair tokens, other noisy-pair tokens and <mask>
    targets; with noise labels also each group's sentence-level ROC AUC of 'low influence => noisy
    pair' (what a teacher following only that group's share of the objective could separate, e.g.
    with ``--meta-valid-params``)."""
    first = next(iter(by_group.values()))
    columns = [("all", np.ones(len(first.tokens), dtype=bool))]
    if token_noisy is not None:
        is_mask = first.tokens == mask_id if mask_id is not None else np.zeros(len(first.tokens), dtype=bool)
        columns = [("clean pairs", token_noisy == 0), ("noisy, other", (token_noisy == 1) & ~is_mask),
                   ("noisy, <mask>", (token_noisy == 1) & is_mask)]
        sent_noisy = sentence_means(first.ids, token_noisy.astype(np.float64))[2]
    lines = ["mean influence by parameter group (rows add up to the total):",
             f"{'group':26s}" + "".join(f"{name:>15s}" for name, _ in columns)
             + (f"{'sentence AUC':>15s}" if token_noisy is not None else "")]
    for label, result in list(by_group.items()) + [("total", None)]:
        values = sum(r.influence for r in by_group.values()) if result is None else result.influence
        cells = "".join(f"{values[select].mean() if select.any() else float('nan'):15.4g}" for _, select in columns)
        if token_noisy is not None:
            cells += f"{roc_auc_low_weight_noisy(sentence_means(first.ids, values)[2], sent_noisy > 0):15.4f}"
        lines.append(f"{label:26s}{cells}")
    return lines
