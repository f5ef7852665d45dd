"""fairseq-reweight: learning to reweight training data with deep interactions, for fairseq.

The hypergradient core (:mod:`fairseq_reweight.hypergrad`) and the teacher
(:mod:`fairseq_reweight.teacher`) are plain PyTorch.
"""
__version__ = "0.1.0"
