"""fairseq-reweight: learning to reweight with deep interactions (Fan et al., AAAI 2021) for fairseq.

Install with ``scripts/setup.sh`` (see README): fairseq 0.12 must be compiled against the torch that
is already installed, and its metadata asks for torchaudio, which is not needed here.
"""
from setuptools import find_packages, setup

setup(
    name="fairseq-reweight",
    version="0.1.0",
    description="Learning to reweight training data with deep interactions, as a fairseq user dir",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.8",
    packages=find_packages(include=["fairseq_reweight", "fairseq_reweight.*"]),
    install_requires=[
        "torch>=1.13",
        'fairseq==0.12.2; python_version < "3.11"',
        'fairseq-fixed==0.12.3.1; python_version >= "3.11"',
        "numpy",
        "sacrebleu>=2.0",
        "sacremoses>=0.1",
        "subword-nmt>=0.3.8",
        "sentencepiece>=0.1.99",
        "tensorboardX",
        "matplotlib",
        "scikit-learn",
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
