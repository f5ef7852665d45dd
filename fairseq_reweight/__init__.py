"""fairseq-reweight: learning to reweight training data with deep interactions, for fairseq.

Use as a fairseq user dir: ``fairseq-train DATA --user-dir fairseq_reweight --task
reweight_translation --criterion reweighted_cross_entropy --optimizer reweight_sgd ...``.

Layers: :mod:`fairseq_reweight.core` (plain PyTorch: the hypergradient, the teacher, metrics),
:mod:`fairseq_reweight.nmt` (the fairseq components), :mod:`fairseq_reweight.cli` (commands),
:mod:`fairseq_reweight.vision` (the image path, no fairseq).
"""
__version__ = "0.2.0"

try:
    import fairseq  # noqa: F401
except ImportError:  # the core and the image path work without fairseq
    fairseq = None

if fairseq is not None:
    # fairseq only auto-imports the tasks/ and models/ sub-packages of a user dir, and only on the
    # first import: register every component here.
    from fairseq_reweight import nmt  # noqa: F401,E402
