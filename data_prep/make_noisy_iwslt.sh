#!/usr/bin/env bash
# The paper's masked-noise variant of a prepared corpus: noises the tokenized training words of
# CLEAN_DIR (output of prepare_iwslt14.sh or prepare_parallel.sh), segments them with CLEAN_DIR's
# subword model and binarizes them with CLEAN_DIR's dictionary. valid and test stay clean.
# It is make_noisy_parallel.sh --kind mask under this name (its help, options, errors and
# prep.settings are the ones this script always had); see -h.
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/make_noisy_parallel.sh" --as-make-noisy-iwslt "$@"
