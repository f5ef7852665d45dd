"""The fairseq glue: ``--task reweight_translation``, ``--criterion reweighted_cross_entropy`` and
``--optimizer reweight_sgd`` (importing this package registers them), the meta-update driver and
what it uses. Every assumption about fairseq's internals is in :mod:`.fairseq_contract`.
"""
from fairseq_reweight.nmt.checkpoint_compat import allow_fairseq_checkpoints

allow_fairseq_checkpoints()

from fairseq_reweight.nmt import criterion, optimizer, task  # noqa: E402,F401  (registration)
