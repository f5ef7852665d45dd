"""User-facing errors: one line that says what was wrong and what to do.

``ReweightConfigError`` is a ``ValueError`` (library callers and tests catch it as usual). When it
reaches the top of a command-line program, the hook installed below prints just
``fairseq-reweight: error: <message>`` instead of a traceback.
"""
import logging
import os
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


def check_checkpoint_and_data(path: str, data: str) -> None:
    """The inspection commands' first check: the checkpoint file and the data-bin exist."""
    if not os.path.isfile(path):
        raise ReweightConfigError(f"checkpoint {path!r} not found: give --path a checkpoint_*.pt written by fairseq-train")
    if not os.path.isdir(data):
        raise ReweightConfigError(f"data directory {data!r} not found: give the fairseq data-bin the checkpoint was trained on")


def run_command(main, argv=None):
    """Run a command's ``main(argv)`` with warnings only on stderr and one-line errors."""
    import fairseq_reweight  # noqa: F401  (importing fairseq configures the root logger; replaced below)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s | %(name)s | %(message)s", stream=sys.stderr,
                        force=True)
    install_excepthook()
    return main(argv)
