from . import reweighted_cross_entropy  # noqa: F401  (registers the criterion)
