"""Hypergradient core: reverse-mode differentiation through the student's momentum-SGD steps.

Plain PyTorch (never imports fairseq). See ``docs/METHOD.md`` for the equations.
"""
from .optim import RecordingSGD
from .reverse import (
    CLIP_EPS,
    HypergradResult,
    StepRecord,
    clip_factor,
    math_attention,
    reverse_hypergradient,
    select_window,
)
from .reparam import substitute_parameters
from .unrolled import unroll_steps, unrolled_hypergradient

__all__ = [
    "CLIP_EPS",
    "HypergradResult",
    "RecordingSGD",
    "StepRecord",
    "clip_factor",
    "math_attention",
    "reverse_hypergradient",
    "select_window",
    "substitute_parameters",
    "unroll_steps",
    "unrolled_hypergradient",
]
