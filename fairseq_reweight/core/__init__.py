"""The plain-PyTorch core (never imports fairseq): the reverse-mode hypergradient through the
student's last optimizer steps, the optimizers it can differentiate, the teacher, its inputs and the
noise metrics. Equations in ``docs/METHOD.md``; the translation glue is :mod:`fairseq_reweight.nmt`.
"""
from .adam import ADAM_REVERSE, AdamReverse, AdamStepRecord
from .attention import math_attention
from .checks import select_window
from .gradients import CLIP_EPS, clip_factor
from .interfaces import AllReduce, LossFn, ReversibleOptimizer
from .recording_adam import RecordingAdam
from .recording_sgd import RecordingSGD
from .reparam import substitute_parameters
from .reverse import HypergradOptions, HypergradResult, reverse_hypergradient
from .sgd import SGD_REVERSE, SGDReverse, StepRecord
from .teacher import Teacher, apply_teacher_gradient, normalize_weights
from .unrolled import unroll_steps, unrolled_hypergradient

__all__ = [
    "ADAM_REVERSE",
    "AdamReverse",
    "AdamStepRecord",
    "CLIP_EPS",
    "AllReduce",
    "HypergradOptions",
    "HypergradResult",
    "LossFn",
    "RecordingAdam",
    "RecordingSGD",
    "ReversibleOptimizer",
    "SGD_REVERSE",
    "SGDReverse",
    "StepRecord",
    "Teacher",
    "apply_teacher_gradient",
    "clip_factor",
    "math_attention",
    "normalize_weights",
    "reverse_hypergradient",
    "select_window",
    "substitute_parameters",
    "unroll_steps",
    "unrolled_hypergradient",
]
