#!/usr/bin/env bash
# Creates (or reuses) the virtual environment .venv and installs fairseq-reweight into it.
# Idempotent: a second run only checks what is there.
#
# Why the order matters: fairseq 0.12 compiles C++ extensions against the torch it finds, so torch
# is installed first and fairseq is built with --no-build-isolation (with build isolation pip would
# fetch a second, multi-GB CUDA torch just for the build). On Python >= 3.11 fairseq 0.12.2 does not
# import; the fairseq-fixed 0.12.3.1 fork does (chosen by environment markers in setup.py).
#
# Environment: VENV (default .venv), TORCH_VERSION (default 2.13.0), PYTHON (default python3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
log() { printf '[setup] %s\n' "$*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
py="$VENV/bin/python"
pipq() { "$py" -m pip install -q --disable-pip-version-check "$@"; }

if ! "$py" -c "import torch" 2>/dev/null; then
  log "installing torch==$TORCH_VERSION (first, so fairseq builds against it)"
  pipq "torch==$TORCH_VERSION"
fi
if [ requirements.txt -nt "$VENV/.requirements-installed" ]; then
  log "installing requirements.txt (fairseq's runtime needs and this package's)"
  pipq -r requirements.txt "pytest>=7"
  touch "$VENV/.requirements-installed"
fi
if ! "$py" -c "import fairseq" 2>/dev/null; then
  log "building fairseq against torch $("$py" -c 'import torch; print(torch.__version__)') (C++ extensions: about 3-4 minutes on 2 cores)"
  # --no-deps: fairseq's metadata asks for torchaudio, which would replace torch; its real runtime
  # needs are in requirements.txt.
  if "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    pipq --no-build-isolation --no-deps "fairseq-fixed==0.12.3.1"
  else
    pipq --no-build-isolation --no-deps "fairseq==0.12.2"
  fi
fi
if [ ! -f "$VENV/.fairseq_reweight-installed" ] || [ setup.py -nt "$VENV/.fairseq_reweight-installed" ]; then
  log "installing fairseq-reweight (editable)"
  pipq --no-build-isolation --no-deps -e .
  touch "$VENV/.fairseq_reweight-installed"
fi
log "ready: $("$py" -c 'import torch, fairseq; print("torch", torch.__version__, "| fairseq", fairseq.__version__)')"
