#!/usr/bin/env bash
# Sets up the environment (scripts/setup.sh, idempotent) and runs the whole test suite on the CPU.
# Extra arguments go to pytest, e.g. scripts/test.sh -k hypergrad -x
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${VENV:-.venv}/bin/python" -m pytest -q -p no:cacheprovider tests "$@"
