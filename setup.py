"""fairseq-reweight: learning to reweight with deep interactions (Fan et al., AAAI 2021) for fairseq.

Installs like a fairseq extension: into an environment that already has torch and fairseq
(``scripts/setup.sh`` builds one; or ``pip install --no-build-isolation -e .`` into yours). fairseq
itself is not a requirement here: its metadata (fairseq 0.12.2 and fairseq-fixed 0.12.3.1 alike)
asks for torchaudio, which this package never uses and which would replace the installed torch, and
its C++ extensions must be compiled against that torch. So fairseq is installed on its own with
``--no-deps --no-build-isolation`` (fairseq-fixed==0.12.3.1 on Python >= 3.11, where fairseq 0.12.2
does not import; fairseq==0.12.2 below), and its runtime needs are listed here instead, as in
requirements.txt. constraints.txt pins the versions the test suite runs with.
"""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent

setup(
    name="fairseq-reweight",
    version="0.2.0",
    description="Learning to reweight training data with deep interactions, as a fairseq user dir",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    # Python >= 3.9: the package itself parses as 3.8, but the repository's benchmarks need 3.9
    # (math.lcm), Python 3.8 is past its end of life, and no torch after 2.4 supports it. Tested on
    # Python 3.11 only (with fairseq-fixed); 3.9 and 3.10 take fairseq 0.12.2 (untested here).
    python_requires=">=3.9",
    packages=find_packages(include=["fairseq_reweight", "fairseq_reweight.*"]),
    install_requires=[
        # torch >= 2.0: torch.func.functional_call (nmt/weigher.py, vision/reweight.py) and
        # autograd.Function with a separate setup_context and a jvp (core/losses.py) are 2.0 APIs.
        # Newer features are used only where present (torch.nn.attention.sdpa_kernel, 2.3;
        # torch.serialization.add_safe_globals, 2.4). Tested with torch 2.13.0.
        "torch>=2.0",
        # fairseq's runtime needs (those of fairseq-fixed 0.12.3.1's metadata, less torchaudio),
        # which installing fairseq with --no-deps skips. The hydra-core and omegaconf pins are
        # fairseq-fixed's; fairseq 0.12.2's metadata asks for hydra-core < 1.1 and omegaconf < 2.1.
        "cffi",
        "cython",
        "hydra-core==1.3.2",
        "omegaconf==2.3.0",
        "numpy>=1.21.3",
        "regex",
        "tqdm",
        "bitarray",
        "packaging",
        # this package's own
        "sacrebleu>=2.0",
        "sacremoses>=0.1",
        "subword-nmt>=0.3.8",
        "sentencepiece>=0.1.99",
        "tensorboardX",
        "matplotlib",
        "scikit-learn",
        "scipy>=1.10",  # core/metrics.py: spearmanr(...).statistic
    ],
    extras_require={"test": ["pytest>=7"]},
    entry_points={
        "console_scripts": [
            "fairseq-reweight-gradcheck = fairseq_reweight.cli.gradcheck:cli_main",
            "fairseq-reweight-inspect = fairseq_reweight.cli.inspect_teacher:cli_main",
            "fairseq-reweight-influence = fairseq_reweight.cli.influence:cli_main",
        ]
    },
)
