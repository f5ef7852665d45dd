"""Run fairseq's own command-line entry points in-process, the way fairseq's tests/test_binaries.py
does, on tiny models."""
import contextlib
import io
import json
import logging
import os
import subprocess
import sys

from fairseq import options
from fairseq_cli import generate, train

from conftest import REPO, USER_DIR

TINY_TRANSFORMER = [
    "--arch", "transformer",
    "--encoder-layers", "1", "--decoder-layers", "1",
    "--encoder-embed-dim", "16", "--decoder-embed-dim", "16",
    "--encoder-ffn-embed-dim", "32", "--decoder-ffn-embed-dim", "32",
    "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
    "--dropout", "0.1", "--max-tokens", "400", "--cpu", "--seed", "3",
    "--num-workers", "0",
]

# a plain fairseq student (pretraining, or a model to score pairs with): Adam, a few updates
PLAIN_PRETRAIN = ["--task", "translation", "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
                  "--optimizer", "adam", "--lr", "0.005", "--max-update", "4", "--no-epoch-checkpoints"]

REWEIGHT = [
    "--user-dir", USER_DIR, "--task", "reweight_translation",
    "--criterion", "reweighted_cross_entropy", "--optimizer", "reweight_sgd",
]


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.records = []

    def emit(self, record):
        self.records.append(record.getMessage())


def run_train(data_dir, save_dir, flags):
    """fairseq-train in-process; returns the json stats lines it logged."""
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(
        parser, [data_dir, "--save-dir", save_dir, "--log-format", "json", "--log-interval", "1"] + flags
    )
    handler = _Capture()
    root = logging.getLogger()
    previous = logging.root.manager.disable
    logging.disable(logging.NOTSET)
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.INFO)
    try:
        train.main(args)
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        logging.disable(previous)
    stats = []
    for message in handler.records:
        with contextlib.suppress(ValueError):
            if message.startswith("{"):
                stats.append(json.loads(message))
    return stats


def run_generate(data_dir, checkpoint, flags=()):
    """fairseq-generate in-process; returns its stdout."""
    parser = options.get_generation_parser()
    args = options.parse_args_and_arch(
        parser,
        [data_dir, "--path", checkpoint, "--beam", "2", "--max-tokens", "500", "--cpu",
         "--num-workers", "0", "--gen-subset", "test"] + list(flags),
    )
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        generate.main(args)
    return out.getvalue()


def inner_stats(stats):
    """The per-update ``train_inner`` records of a json log (--log-interval 1)."""
    return [s for s in stats if "update" in s and "loss" in s and "train_loss" not in s and "valid_loss" not in s]


def run_script(cmd):
    """A repository script in a subprocess with this Python and the repository on its path; its stdout
    (the test fails with the output's tail when it exits non-zero)."""
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=REPO,
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout
