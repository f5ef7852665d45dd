"""User-facing errors: one line that says what was wrong and what to do.

``ReweightConfigError`` is a ``ValueError`` (library callers and tests catch it as usual). When it
reaches the top of a command-line program, the hook installed below prints just
``fairseq-reweight: error: <message>`` instead of a traceback.
"""
import sys


class ReweightConfigError(ValueError):
    """A bad option, file or combination of options, with the fix in the message."""


def _excepthook(exc_type, exc, tb, _previous=sys.excepthook):
    if isinstance(exc, ReweightConfigError):
        print(f"fairseq-reweight: error: {exc}", file=sys.stderr)
        return
    _previous(exc_type, exc, tb)


def install_excepthook():
    if sys.excepthook is not _excepthook:
        sys.excepthook = _excepthook
