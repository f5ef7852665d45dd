"""Let torch >= 2.6 load fairseq 0.12 checkpoints with its safe loader.

torch 2.6 made ``torch.load(weights_only=True)`` the default. The safe unpickler refuses any class it
does not know, and fairseq 0.12 checkpoints hold ``argparse.Namespace`` (the legacy ``args`` and the
model config). Rather than turning safe loading off (``weights_only=False`` or
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``), this allow-lists exactly that class with
``torch.serialization.add_safe_globals``; anything else is still refused.
"""
import argparse

import torch


def allow_fairseq_checkpoints() -> None:
    """Register ``argparse.Namespace`` as safe for ``torch.load(weights_only=True)``."""
    add = getattr(torch.serialization, "add_safe_globals", None)
    if add is not None:  # torch < 2.4 has no safe-globals list (and loads everything anyway)
        add([argparse.Namespace])
