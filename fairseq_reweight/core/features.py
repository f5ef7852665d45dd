"""The teacher's inputs, one rule for the translation and the image paths.

- Student states (NMT: encoder states mean-pooled, decoder states; image: penultimate features)
  are layer-normalised together (no learned parameters), so that the teacher's learning rate does
  not depend on the scale of the student's hidden states.
- Surface features (the paper's M1) enter as they are: each is already of order one (a fraction,
  a loss in nats, a probability, a 0/1 flag). :func:`surface_features` computes them per example
  (NMT: per target token) from the student's log-probabilities.
"""
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

# One column each, in the order the image path uses them all.
SURFACE_COLUMNS = ("progress", "mean_train_loss", "best_valid", "example_loss", "prediction", "margin")


@dataclass
class TrainingState:
    """The training-state part of the surface features (the same for every example of a batch)."""

    progress: float = 0.0  # update / total updates
    mean_train_loss: Union[float, Tensor] = 0.0  # running mean training loss (a tensor: no sync)
    best_valid: float = 0.0  # best validation score so far (NMT: loss; image: accuracy)


@torch.no_grad()
def surface_features(log_probs: Tensor, labels: Tensor, state: TrainingState,
                     columns: Sequence[str] = SURFACE_COLUMNS, losses: Optional[Tensor] = None) -> Tensor:
    """(..., len(columns)) surface features of each example.

    Args:
        log_probs: (..., V) the student's log-probabilities (detached).
        labels: (...) the training labels (NMT: target tokens).
        state: the training-state columns.
        columns: names from :data:`SURFACE_COLUMNS`, in the order wanted.
        losses: (...) the per-example loss; default ``-log p(label)``.
    """
    label_lp = log_probs.gather(-1, labels.unsqueeze(-1))  # ... x 1
    cols = []
    for name in columns:
        if name == "progress":
            cols.append(torch.full_like(label_lp, state.progress))
        elif name == "mean_train_loss":
            running = state.mean_train_loss
            cols.append(torch.zeros_like(label_lp) + (running.to(label_lp) if torch.is_tensor(running) else running))
        elif name == "best_valid":
            cols.append(torch.full_like(label_lp, state.best_valid))
        elif name == "example_loss":
            cols.append(-label_lp if losses is None else losses.unsqueeze(-1).to(label_lp))
        elif name == "prediction":
            cols.append(log_probs.argmax(-1, keepdim=True).eq(labels.unsqueeze(-1)).to(label_lp))
        elif name == "margin":
            probs = log_probs.exp()
            other = probs.scatter(-1, labels.unsqueeze(-1), 0.0).amax(-1, keepdim=True)
            cols.append(label_lp.exp() - other)
        else:
            raise ValueError(f"unknown surface feature {name!r}; valid: {', '.join(SURFACE_COLUMNS)}")
    return torch.cat(cols, dim=-1)


def teacher_inputs(states: Sequence[Tensor], surface: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """The dense teacher input: the states layer-normalised together, then the surface features."""
    parts = []
    if states:
        joined = torch.cat([s.to(dtype) for s in states], dim=-1)
        parts.append(F.layer_norm(joined, joined.shape[-1:]))
    if surface is not None:
        parts.append(surface.to(dtype))
    return torch.cat(parts, dim=-1) if parts else None
