"""scikit-learn's bundled ``digits`` images (1797 real 8 x 8 grey-scale scans, values 0..16) in the
same :class:`~fairseq_reweight.vision.cifar.ImageSplits` interface as CIFAR: a small, real data set
for checking the image path on a CPU in minutes, no download needed.

The test set is a fixed draw of ``TEST_SIZE`` images (independent of ``--seed``) so that errors from
different seeds and methods are measured on the same images; the validation split and the noise are
drawn from ``seed`` exactly as for CIFAR.
"""
import numpy as np

from fairseq_reweight.vision.cifar import ImageSplits, make_splits

TEST_SIZE = 500
TEST_SPLIT_SEED = 12345


def load_digits_splits(
    noise: str = "none", noise_rate: float = 0.0, valid_size: int = 100, seed: int = 1
) -> ImageSplits:
    """Digits as :class:`ImageSplits`: 500 fixed test images; the other 1297 split into clean valid
    (``valid_size``) and noisy train."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.uint8)[:, None]  # N x 1 x 8 x 8, values 0..16
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(TEST_SPLIT_SEED).permutation(len(labels))
    test_idx, pool_idx = order[:TEST_SIZE], order[TEST_SIZE:]
    return make_splits(
        images[pool_idx], labels[pool_idx], images[test_idx], labels[test_idx],
        num_classes=10, valid_size=valid_size, noise=noise, noise_rate=noise_rate, seed=seed,
        scale=1 / 16,
    )
