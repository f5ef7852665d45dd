"""The commands: ``fairseq-reweight-gradcheck``, ``fairseq-reweight-inspect`` and
``fairseq-reweight-influence`` (also ``python -m fairseq_reweight.cli.<module>``)."""
