"""fairseq-reweight: learning to reweight training data with deep interactions, for fairseq.

Use as a fairseq user dir: ``fairseq-train DATA --user-dir fairseq_reweight --task
reweight_translation --criterion reweighted_cross_entropy --optimizer reweight_sgd ...``.
The hypergradient core (:mod:`fairseq_reweight.hypergrad`) and the teacher
(:mod:`fairseq_reweight.teacher`) are plain PyTorch and also serve the image path
(:mod:`fairseq_reweight.vision`), which does not need fairseq.
"""
__version__ = "0.1.0"

try:
    import fairseq  # noqa: F401
except ImportError:  # the plain-PyTorch parts work without fairseq
    fairseq = None

if fairseq is not None:
    from fairseq_reweight.checkpoint_compat import allow_fairseq_checkpoints
    from fairseq_reweight.errors import install_excepthook

    allow_fairseq_checkpoints()
    install_excepthook()
    # fairseq only auto-imports the tasks/ and models/ sub-packages of a user dir, and only on the
    # first import: register every component here.
    from fairseq_reweight import criterions, optim  # noqa: F401,E402
    from fairseq_reweight.tasks import reweight_translation  # noqa: F401,E402
