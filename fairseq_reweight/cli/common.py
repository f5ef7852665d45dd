"""What the commands share: one-line errors, the first checks, the common options and ``main``."""
import argparse
import logging
import os
import sys
from typing import Callable, List, Optional

import fairseq_reweight  # noqa: F401  (importing fairseq configures the root logger; run_command replaces that)
from fairseq_reweight.core.errors import ReweightConfigError, install_excepthook


def check_checkpoint_and_data(path: str, data: str) -> None:
    """The inspection commands' first check: the checkpoint file and the data-bin exist."""
    if not os.path.isfile(path):
        raise ReweightConfigError(f"checkpoint {path!r} not found: give --path a checkpoint_*.pt written by fairseq-train")
    if not os.path.isdir(data):
        raise ReweightConfigError(f"data directory {data!r} not found: give the fairseq data-bin the checkpoint was trained on")


def add_checkpoint_arguments(parser: argparse.ArgumentParser, path_help: str, out_prefix: str) -> None:
    """DATA, --path, the noise sidecar, --cpu and --out, as both inspection commands take them
    (``out_prefix`` as given to :func:`command`)."""
    parser.add_argument("data", help="fairseq data-bin directory (as for fairseq-train)")
    parser.add_argument("--path", required=True, help=path_help)
    parser.add_argument("--noise-sidecar", default=None,
                        help="0/1 noise labels, one line per sentence of the split (default: DATA/<subset>.noise if it exists)")
    parser.add_argument("--no-noise-sidecar", action="store_true", help="do not look for DATA/<subset>.noise")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is there")
    parser.add_argument("--out", default=None,
                        help=f"output directory (default: {out_prefix}_<subset> beside the checkpoint)")


def resolve_sidecar(args) -> Optional[str]:
    """The sidecar those options name: ``--noise-sidecar``, else ``DATA/<subset>.noise`` if it exists."""
    if args.noise_sidecar is not None or args.no_noise_sidecar:
        return args.noise_sidecar
    default = os.path.join(args.data, f"{args.subset}.noise")
    return default if os.path.isfile(default) else None


def command(build_parser: Callable[[], argparse.ArgumentParser], run: Callable, out_prefix: str):
    """``main(argv)`` (in-process: parse, default ``--out`` beside the checkpoint, run) and
    ``cli_main(argv)`` (the console script: warnings only on stderr, one-line errors)."""

    def main(argv: Optional[List[str]] = None):
        args = build_parser().parse_args(argv)
        if args.out is None:
            args.out = os.path.join(os.path.dirname(os.path.abspath(args.path)), f"{out_prefix}_{args.subset}")
        return run(args)

    def cli_main(argv: Optional[List[str]] = None):
        run_command(main, argv)

    return main, cli_main


def run_command(main, argv=None):
    """Run a command's ``main(argv)`` with warnings only on stderr and one-line errors."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s | %(name)s | %(message)s", stream=sys.stderr,
                        force=True)
    install_excepthook()
    return main(argv)
