"""The package's one user-facing error type (plain Python, importable without fairseq or torch)."""
import sys


class ReweightConfigError(ValueError):
    """A bad option, file or combination of options, with the fix in the message.

    A ``ValueError``, so library callers and tests catch it as usual; the command-line programs
    print it as one line (:mod:`fairseq_reweight.cli.common`).
    """


def _excepthook(exc_type, exc, tb, _previous=None):
    if isinstance(exc, ReweightConfigError):
        print(f"fairseq-reweight: error: {exc}", file=sys.stderr)
        return
    (_previous or sys.__excepthook__)(exc_type, exc, tb)


def install_excepthook() -> None:
    """Print a :class:`ReweightConfigError` that reaches the top of a program as one line,
    ``fairseq-reweight: error: <message>``, instead of a traceback. Called by the commands and when
    fairseq sets up ``--task reweight_translation``, never on import."""
    if getattr(sys.excepthook, "__name__", "") == "_reweight_excepthook":
        return
    previous = sys.excepthook

    def _reweight_excepthook(exc_type, exc, tb):
        _excepthook(exc_type, exc, tb, previous)

    sys.excepthook = _reweight_excepthook
