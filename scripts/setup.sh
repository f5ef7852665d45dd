#!/usr/bin/env bash
# Creates (or reuses) the virtual environment .venv and installs fairseq-reweight into it.
# Idempotent: a second run only checks what is there, and reinstalls only what changed (the
# requirements when requirements.txt or the constraints file is newer than their last install, the
# package when setup.py is).
#
# Why the order matters: fairseq 0.12 compiles C++ extensions against the torch it finds, so torch
# is installed first and fairseq is built with --no-build-isolation (with build isolation pip would
# fetch a second, multi-GB CUDA torch just for the build). On Python >= 3.11 fairseq 0.12.2 does not
# import; the fairseq-fixed 0.12.3.1 fork does. fairseq is installed with --no-deps: its metadata asks
# for torchaudio, which this package never uses and which would replace torch.
#
# Versions: on Python >= 3.11 every pip call takes -c constraints.txt, the versions the test suite
# runs with (its pins need 3.11). torch comes from the default package index unless TORCH_INDEX_URL
# names another (e.g. https://download.pytorch.org/whl/cpu, or a CUDA build's index): then torch
# alone comes from there and its dependencies from the default index. An existing .venv keeps the
# torch it has (remove .venv to change builds).
#
# Environment: VENV (default .venv), PYTHON (default python3), TORCH_VERSION (default 2.13.0, the
# constraints' pin), TORCH_INDEX_URL (default unset), CONSTRAINTS (default constraints.txt on
# Python >= 3.11, none below; set it empty to install without pins, e.g. with another TORCH_VERSION).
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

if [ -z "${CONSTRAINTS+set}" ]; then
  if "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    CONSTRAINTS=constraints.txt
  else
    CONSTRAINTS=
    log "Python < 3.11: installing without constraints.txt (its pins are for Python 3.11)"
  fi
fi
constraint_args=()
if [ -n "$CONSTRAINTS" ]; then
  if [ ! -f "$CONSTRAINTS" ]; then
    log "error: constraints file $CONSTRAINTS not found (CONSTRAINTS= installs without one)"
    exit 1
  fi
  pinned=$(sed -n 's/^torch==\([^ ;]*\).*/\1/p' "$CONSTRAINTS")
  if [ -n "$pinned" ] && [ "$pinned" != "$TORCH_VERSION" ]; then
    log "error: TORCH_VERSION=$TORCH_VERSION but $CONSTRAINTS pins torch==$pinned (set CONSTRAINTS= to install untested versions)"
    exit 1
  fi
  constraint_args=(-c "$CONSTRAINTS")
fi
pipq() { "$py" -m pip install -q --disable-pip-version-check ${constraint_args[@]+"${constraint_args[@]}"} "$@"; }

if ! "$py" -c "import torch" 2>/dev/null; then
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    log "installing torch==$TORCH_VERSION from $TORCH_INDEX_URL (first, so fairseq builds against it)"
    pipq --no-deps --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION"
  else
    log "installing torch==$TORCH_VERSION (first, so fairseq builds against it)"
  fi
  pipq "torch==$TORCH_VERSION"  # with TORCH_INDEX_URL: the installed torch's dependencies
fi
if [ requirements.txt -nt "$VENV/.requirements-installed" ] \
    || { [ -n "$CONSTRAINTS" ] && [ "$CONSTRAINTS" -nt "$VENV/.requirements-installed" ]; }; then
  log "installing requirements.txt (fairseq's runtime needs and this package's)"
  pipq -r requirements.txt "pytest>=7"
  touch "$VENV/.requirements-installed"
fi
if ! "$py" -c "import fairseq" 2>/dev/null; then
  log "building fairseq against torch $("$py" -c 'import torch; print(torch.__version__)') (C++ extensions: about 3-4 minutes on 2 cores)"
  # --no-deps: its real runtime needs are in requirements.txt (see the header).
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
