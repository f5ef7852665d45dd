"""Shared fixtures: tiny generated parallel data, binarized with fairseq-preprocess in-process."""
import logging
import os
import random

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_DIR = os.path.join(REPO, "fairseq_reweight")


def write_parallel_corpus(directory, n_train=300, n_valid=40, n_test=40, seed=0, src="de", tgt="en"):
    """A small learnable corpus: target words are a fixed word-by-word mapping of the source."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(60)]
    mapping = {w: f"t{(i * 7) % 60}" for i, w in enumerate(vocab)}
    os.makedirs(directory, exist_ok=True)
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        with open(os.path.join(directory, f"{split}.{src}"), "w") as fs, open(
            os.path.join(directory, f"{split}.{tgt}"), "w"
        ) as ft:
            for _ in range(n):
                words = [rng.choice(vocab) for _ in range(rng.randint(3, 10))]
                fs.write(" ".join(words) + "\n")
                ft.write(" ".join(mapping[w] for w in words) + "\n")
    return directory


def binarize(text_dir, dest_dir, src="de", tgt="en"):
    from fairseq import options
    from fairseq_cli import preprocess

    parser = options.get_preprocessing_parser()
    args = parser.parse_args(
        [
            "--source-lang", src, "--target-lang", tgt,
            "--trainpref", os.path.join(text_dir, "train"),
            "--validpref", os.path.join(text_dir, "valid"),
            "--testpref", os.path.join(text_dir, "test"),
            "--destdir", dest_dir, "--joined-dictionary", "--workers", "1",
        ]
    )
    preprocess.main(args)
    return dest_dir


@pytest.fixture(scope="session")
def tiny_data_bin(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    write_parallel_corpus(str(root / "text"))
    return binarize(str(root / "text"), str(root / "bin"))


@pytest.fixture(scope="session")
def noisy_data_bin(tmp_path_factory):
    """The tiny corpus with 30 % of the training pairs misaligned (another pair's target, the
    commonest crawl noise), binarized, with its train.noise."""
    import numpy as np

    root = tmp_path_factory.mktemp("noisy")
    text = write_parallel_corpus(str(root / "text"))
    targets = (root / "text" / "train.en").read_text().splitlines()
    rng = np.random.RandomState(1)
    noisy = rng.rand(len(targets)) < 0.3
    shuffled = rng.permutation(len(targets))
    (root / "text" / "train.en").write_text("".join(
        (targets[shuffled[i]] if noisy[i] else line) + "\n" for i, line in enumerate(targets)))
    data = binarize(text, str(root / "bin"))
    (root / "bin" / "train.noise").write_text("".join(f"{int(v)}\n" for v in noisy))
    return data


@pytest.fixture(autouse=True)
def _quiet_logging():
    logging.disable(logging.INFO)
    yield
    logging.disable(logging.NOTSET)
