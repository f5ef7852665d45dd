"""Session fixtures of the data_prep/ tests: a seeded synthetic corpus, its IWSLT14-layout archive and
the clean and masked-noise data-bins made from it, built once however many modules use them.

A test module loads this file as a plugin (``pytest_plugins = ["prep_fixtures"]``), never by an import
statement: pytest warns about a plugin module that was imported before it could load it.
"""

import pytest

from prep_helpers import N_BAD, TALK_SIZE, run


@pytest.fixture(scope="session")
def iwslt_corpus(tmp_path_factory):
    """The seeded synthetic corpus (1500 train, 40 valid, 100 test pairs) as plain text files."""
    out = tmp_path_factory.mktemp("iwslt") / "corpus"
    run(["make_synthetic_corpus.py", out, "--train", 1500, "--valid", 40, "--test", 100, "--seed", 3])
    return out


@pytest.fixture(scope="session")
def iwslt_archive(iwslt_corpus):
    """iwslt_corpus packed with the IWSLT14 de-en.tgz layout, N_BAD bad pairs of each kind injected."""
    path = iwslt_corpus.parent / "de-en.tgz"
    run(["make_iwslt_like_archive.py", iwslt_corpus, path, "--talk-size", TALK_SIZE, "--bad-pairs", N_BAD,
         "--seed", 5])
    return path


@pytest.fixture(scope="session")
def iwslt_clean(iwslt_archive):
    """(directory, CompletedProcess) of prepare_iwslt14.sh on the archive."""
    out = iwslt_archive.parent / "bin" / "clean"
    result = run(["prepare_iwslt14.sh", "--archive", iwslt_archive, "--bpe-merges", 300, "--workers", 1, out])
    return out, result


@pytest.fixture(scope="session")
def iwslt_noisy(iwslt_clean):
    """(directory, CompletedProcess) of make_noisy_iwslt.sh with its defaults on the clean directory."""
    out = iwslt_clean[0].parent / "noisy"
    result = run(["make_noisy_iwslt.sh", "--workers", 1, iwslt_clean[0], out])  # defaults: p = 0.1, q = 0.15
    return out, result
