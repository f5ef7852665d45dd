from . import reweight_sgd  # noqa: F401  (registers the optimizer)
