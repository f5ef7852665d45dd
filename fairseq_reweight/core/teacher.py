"""The teacher network: a small model that maps a training example's student features and label to
a weight in (0, 1). Shared by the translation and image paths; plain PyTorch.

Fan et al., "Learning to Reweight with Deep Interactions", AAAI 2021, section 3:
``w = sigmoid(W_I . I + E[y] + b)`` where I is the student's internal state (detached) and E is an
embedding of the label. All output-side parameters start at zero, so every weight starts at 0.5 and,
after normalisation within the minibatch, training starts exactly as uniform (plain) training.
"""
from typing import Optional

import torch
from torch import Tensor, nn


class Teacher(nn.Module):
    """Weights examples from dense features and a label.

    Args:
        feature_dim: size of the dense feature vector (student states and surface features
            concatenated); 0 for a label-only teacher.
        num_labels: size of the label vocabulary (target dictionary or classes); 0 for no label
            input.
        hidden_layers: 0 gives the paper's linear teacher; N > 0 an MLP with N ReLU hidden layers
            over ``[features; label embedding]``.
        hidden_dim: width of the hidden layers and of the label embedding of the MLP teacher.

    Its inputs come from :func:`~fairseq_reweight.core.features.teacher_inputs` (student states
    layer-normalised, surface features as they are), for the translation and image paths alike.
    """

    def __init__(
        self,
        feature_dim: int,
        num_labels: int,
        hidden_layers: int = 0,
        hidden_dim: int = 64,
    ):
        super().__init__()
        if feature_dim < 0 or num_labels < 0:
            raise ValueError(
                f"teacher needs feature_dim >= 0 and num_labels >= 0, got {feature_dim}, {num_labels}"
            )
        if feature_dim == 0 and num_labels == 0:
            raise ValueError("teacher has no input: give it dense features, labels or both")
        if hidden_layers < 0:
            raise ValueError(f"hidden_layers must be >= 0, got {hidden_layers}")
        self.feature_dim = feature_dim
        self.num_labels = num_labels
        self.hidden_layers = hidden_layers
        if hidden_layers == 0:
            # logit = W_I . I + E[y] + b
            self.feature_proj = nn.Linear(feature_dim, 1, bias=False) if feature_dim else None
            self.label_embed = nn.Embedding(num_labels, 1) if num_labels else None
            self.mlp = None
        else:
            self.feature_proj = None
            self.label_embed = nn.Embedding(num_labels, hidden_dim) if num_labels else None
            layers, in_dim = [], feature_dim + (hidden_dim if num_labels else 0)
            for _ in range(hidden_layers):
                layers += [nn.Linear(in_dim, hidden_dim), nn.ReLU()]
                in_dim = hidden_dim
            layers.append(nn.Linear(in_dim, 1, bias=False))
            self.mlp = nn.Sequential(*layers)
        self.bias = nn.Parameter(torch.zeros(()))
        self.reset_parameters()

    def reset_parameters(self):
        """Zero every parameter that reaches the output directly: all weights start equal."""
        if self.mlp is None:
            if self.feature_proj is not None:
                nn.init.zeros_(self.feature_proj.weight)
            if self.label_embed is not None:
                nn.init.zeros_(self.label_embed.weight)
        else:
            for module in self.mlp:
                if isinstance(module, nn.Linear):
                    module.reset_parameters()
            if self.label_embed is not None:
                nn.init.normal_(self.label_embed.weight, std=self.label_embed.embedding_dim**-0.5)
            nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.bias)

    def logits(self, features: Optional[Tensor], labels: Optional[Tensor]) -> Tensor:
        """Pre-sigmoid scores. ``features``: (..., feature_dim); ``labels``: (...) int64."""
        if (features is None) != (self.feature_dim == 0):
            raise ValueError(
                f"teacher was built for feature_dim={self.feature_dim} but got "
                f"{'no' if features is None else 'some'} features"
            )
        if (labels is None) != (self.num_labels == 0):
            raise ValueError(
                f"teacher was built for num_labels={self.num_labels} but got "
                f"{'no' if labels is None else 'some'} labels"
            )
        if features is not None:
            features = features.to(self.bias.dtype)
        if self.mlp is None:
            out = self.bias
            if features is not None:
                out = out + self.feature_proj(features).squeeze(-1)  # (...)
            if labels is not None:
                out = out + self.label_embed(labels).squeeze(-1)  # (...)
            return out.expand(labels.shape if labels is not None else features.shape[:-1])
        inputs = []
        if features is not None:
            inputs.append(features)
        if labels is not None:
            inputs.append(self.label_embed(labels))
        return self.mlp(torch.cat(inputs, dim=-1)).squeeze(-1) + self.bias

    def forward(self, features: Optional[Tensor], labels: Optional[Tensor]) -> Tensor:
        """Weights in (0, 1), one per example: shape ``labels.shape`` (or ``features.shape[:-1]``)."""
        return torch.sigmoid(self.logits(features, labels))


def normalize_weights(weights: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Scale weights so they average to one over the (unmasked) examples of a minibatch.

    ``w_k <- N w_k / sum_j w_j``: the paper's within-batch normalisation, scaled by the number of
    examples N so that uniform weights leave a summed loss unchanged. Masked entries (padding) get 0,
    and so does every entry of a batch whose weights are all 0 (it contributes nothing): ``N / sum``
    would be inf there, and 0 * inf NaN.
    """
    if mask is not None:
        weights = weights.masked_fill(~mask, 0.0)
        count = mask.sum()
    else:
        count = weights.numel()
    total = weights.sum()
    scale = count / total
    # where N / sum overflows (sum 0 or subnormal), divide first: w / sum <= 1 cannot overflow; a
    # zero sum means zero weights, divided by 1 (a clamped subnormal sum would shrink the weights)
    fallback = weights / torch.where(total > 0, total, torch.ones_like(total)) * count
    return torch.where(torch.isfinite(scale), weights * scale, fallback)


def apply_teacher_gradient(teacher: nn.Module, optimizer: torch.optim.Optimizer, grads, clip_norm: float = 0.0) -> Tensor:
    """One teacher step on a hypergradient (one tensor per ``teacher.parameters()``).

    Returns the gradient's norm before clipping (a tensor: no host synchronisation).
    """
    params = list(teacher.parameters())
    for p, g in zip(params, grads):
        p.grad = g.to(p.dtype)
    gnorm = torch.norm(torch.stack([g.float().norm() for g in grads]))
    if clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, clip_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return gnorm
