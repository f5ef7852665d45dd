"""The masked noise of data_prep/: make_noisy_iwslt.sh on the clean IWSLT-like data-bin (the session
fixtures of prep_fixtures.py), and mask_noise.noise_corpus in-process on generated token corpora.
"""

import math
import os
import subprocess
import sys

import pytest

import mask_noise
from prep_helpers import MASK, leftovers, read_bytes, read_lines, run, write_token_corpus

pytest_plugins = ["prep_fixtures"]


# ----------------------------------------------------------------------------- make_noisy_iwslt.sh


def _noisy_pairs(clean_dir, noisy_dir, lang):
    return read_lines(clean_dir / "tok" / f"train.{lang}"), read_lines(noisy_dir / "tok" / f"train.{lang}")


def test_noisy_train_agrees_with_sidecar_and_rates(iwslt_clean, iwslt_noisy):
    import json

    clean_dir, noisy_dir = iwslt_clean[0], iwslt_noisy[0]
    sidecar = read_lines(noisy_dir / "tok" / "train.noise")
    assert read_bytes(noisy_dir / "data-bin" / "train.noise") == read_bytes(noisy_dir / "tok" / "train.noise")
    stats = json.loads((noisy_dir / "noise_stats.json").read_text())
    masked = {}
    changed = [False] * len(sidecar)
    for lang in ("de", "en"):
        clean_lines, noisy_lines = _noisy_pairs(clean_dir, noisy_dir, lang)
        assert len(clean_lines) == len(noisy_lines) == len(sidecar)
        masked[lang] = 0
        for i, (c, n) in enumerate(zip(clean_lines, noisy_lines)):
            c_words, n_words = c.split(" "), n.split(" ")
            assert len(c_words) == len(n_words)
            diff = [(a, b) for a, b in zip(c_words, n_words) if a != b]
            assert all(b == MASK for _, b in diff)  # only whole words replaced by the mask
            masked[lang] += len(diff)
            changed[i] |= bool(diff)
    assert sidecar == ["1" if c else "0" for c in changed]
    assert stats["src_tokens_masked"] == masked["de"] and stats["tgt_tokens_masked"] == masked["en"]
    assert stats["pairs_changed"] == sum(changed)
    # Observed rates within 4 binomial standard deviations of p = 0.1 and q = 0.15.
    n, chosen = stats["pairs"], stats["pairs_chosen"]
    assert abs(chosen / n - 0.1) < 4 * math.sqrt(0.1 * 0.9 / n)
    for side in ("src", "tgt"):
        m = stats[f"{side}_tokens_in_chosen"]
        assert abs(stats[f"{side}_tokens_masked"] / m - 0.15) < 4 * math.sqrt(0.15 * 0.85 / m)
    assert "pairs chosen:" in iwslt_noisy[1].stderr and "(q = 0.15)" in iwslt_noisy[1].stderr


def test_mask_is_one_symbol_after_bpe_and_binarization(iwslt_noisy):
    from fairseq.data import Dictionary, data_utils

    noisy_dir = iwslt_noisy[0]
    dictionary = Dictionary.load(str(noisy_dir / "data-bin" / "dict.de.txt"))
    mask_index = dictionary.index(MASK)
    assert mask_index != dictionary.unk()
    for lang in ("de", "en"):
        tok_count = sum(line.split(" ").count(MASK) for line in read_lines(noisy_dir / "tok" / f"train.{lang}"))
        assert tok_count > 0
        subword_words = [w for line in read_lines(noisy_dir / "subword" / f"train.{lang}") for w in line.split(" ")]
        assert subword_words.count(MASK) == tok_count
        assert not [w for w in subword_words if "mask" in w and w != MASK]  # never split or glued
        dataset = data_utils.load_indexed_dataset(str(noisy_dir / "data-bin" / f"train.de-en.{lang}"), dictionary)
        assert sum(int((dataset[i] == mask_index).sum()) for i in range(len(dataset))) == tok_count
        assert all(int((dataset[i] == dictionary.unk()).sum()) == 0 for i in range(len(dataset)))


def test_valid_and_test_stay_clean(iwslt_clean, iwslt_noisy):
    clean_dir, noisy_dir = iwslt_clean[0], iwslt_noisy[0]
    for split in ("valid", "test"):
        for lang in ("de", "en"):
            for sub in (f"tok/{split}.{lang}", f"subword/{split}.{lang}", f"data-bin/{split}.de-en.{lang}.bin",
                        f"data-bin/{split}.de-en.{lang}.idx"):
                assert read_bytes(clean_dir / sub) == read_bytes(noisy_dir / sub), sub
    assert read_bytes(clean_dir / "data-bin" / "dict.de.txt") == read_bytes(noisy_dir / "data-bin" / "dict.de.txt")


def test_same_seed_gives_the_same_data_bin(iwslt_noisy):
    noisy_dir = iwslt_noisy[0]
    files = ["tok/train.de", "tok/train.en", "tok/train.noise", "data-bin/train.de-en.de.bin",
             "data-bin/train.de-en.en.bin", "data-bin/train.de-en.de.idx", "data-bin/dict.en.txt"]
    before = {f: read_bytes(noisy_dir / f) for f in files}
    settings = (noisy_dir / "prep.settings").read_text()
    clean_dir = settings.split("clean_dir=")[1].split("\n")[0]
    run(["make_noisy_iwslt.sh", "--force", "--workers", 1, clean_dir, noisy_dir])  # rebuilt from scratch
    assert {f: read_bytes(noisy_dir / f) for f in files} == before
    assert not leftovers(noisy_dir.parent)


def test_fairseq_translation_trains_on_the_noisy_data_bin(iwslt_noisy):
    train = os.path.join(os.path.dirname(sys.executable), "fairseq-train")
    cmd = [train, str(iwslt_noisy[0] / "data-bin"), "--task", "translation", "--arch", "transformer",
           "--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "16", "--decoder-embed-dim", "16",
           "--encoder-ffn-embed-dim", "32", "--decoder-ffn-embed-dim", "32", "--encoder-attention-heads", "2",
           "--decoder-attention-heads", "2", "--max-update", "3", "--max-tokens", "500", "--cpu",
           "--optimizer", "sgd", "--lr", "0.1", "--no-save", "--log-format", "simple", "--seed", "1",
           "--num-workers", "0"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    log = result.stdout + result.stderr
    assert "num_updates 3" in log and "valid on 'valid' subset" in log


# ----------------------------------------------------------------------------- mask_noise.noise_corpus


@pytest.mark.parametrize("p,q", [(0.1, 0.15), (0.3, 0.5)])
def test_noise_rates_on_a_large_corpus(tmp_path, p, q):
    write_token_corpus(tmp_path / "s", tmp_path / "t", 20000, seed=0)
    stats = mask_noise.noise_corpus(tmp_path / "s", tmp_path / "t", tmp_path / "so", tmp_path / "to",
                                    tmp_path / "noise", p, q, seed=1)
    assert abs(stats.pairs_chosen / stats.pairs - p) < 4 * math.sqrt(p * (1 - p) / stats.pairs)
    for masked, total in ((stats.src_tokens_masked, stats.src_tokens_in_chosen),
                          (stats.tgt_tokens_masked, stats.tgt_tokens_in_chosen)):
        assert abs(masked / total - q) < 4 * math.sqrt(q * (1 - q) / total)


def test_noise_seed_determinism_and_extremes(tmp_path):
    write_token_corpus(tmp_path / "s", tmp_path / "t", 500, seed=0)

    def noised(p, q, seed, tag):
        mask_noise.noise_corpus(tmp_path / "s", tmp_path / "t", tmp_path / f"so{tag}", tmp_path / f"to{tag}",
                                tmp_path / f"n{tag}", p, q, seed)
        return [read_lines(tmp_path / f"{name}{tag}") for name in ("so", "to", "n")]

    assert noised(0.2, 0.3, 7, "a") == noised(0.2, 0.3, 7, "b")
    assert noised(0.2, 0.3, 7, "a")[2] != noised(0.2, 0.3, 8, "c")[2]
    src, tgt, noise = noised(0.0, 1.0, 1, "zero")
    assert src == read_lines(tmp_path / "s") and tgt == read_lines(tmp_path / "t") and set(noise) == {"0"}
    src, tgt, noise = noised(1.0, 1.0, 1, "all")
    assert all(set(line.split(" ")) == {MASK} for line in src + tgt) and set(noise) == {"1"}
    src, _, noise = noised(1.0, 0.0, 1, "none")
    assert src == read_lines(tmp_path / "s") and set(noise) == {"0"}


@pytest.mark.parametrize("p,q", [(-0.01, 0.1), (1.01, 0.1), (0.1, float("nan")), (0.1, 2.0)])
def test_noise_corpus_rejects_bad_probabilities(tmp_path, p, q):
    write_token_corpus(tmp_path / "s", tmp_path / "t", 5, seed=0)
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        mask_noise.noise_corpus(tmp_path / "s", tmp_path / "t", tmp_path / "so", tmp_path / "to", tmp_path / "n", p, q, 1)


def test_noise_corpus_rejects_mask_token_in_input(tmp_path):
    (tmp_path / "s").write_text("a b\nc <mask> d\n")
    (tmp_path / "t").write_text("x\ny\n")
    with pytest.raises(ValueError, match="line 2 .* already contains the mask token"):
        mask_noise.noise_corpus(tmp_path / "s", tmp_path / "t", tmp_path / "so", tmp_path / "to", tmp_path / "n",
                                0.5, 0.5, 1)

