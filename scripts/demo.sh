#!/usr/bin/env bash
# The main job, end to end on the CPU with generated data (no download): sets up .venv, writes a
# small synthetic German->English corpus, prepares it like IWSLT14 (Moses tokenization, joint BPE,
# fairseq-preprocess) clean and with the paper's masked noise, pretrains a small Transformer with Adam
# on each, fine-tunes it five ways (uniform; the oracle that drops the known noisy pairs, noisy data
# only; surface-feature teacher; the paper's deep-interaction teacher; --reweight-preset robust) and
# prints the BLEU / chrF table.
# Re-running skips finished steps. OUT (default runs/demo) holds it all.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
export PYTHON="$PWD/${VENV:-.venv}/bin/python" PATH="$PWD/${VENV:-.venv}/bin:$PATH"
OUT=${OUT:-runs/demo}
mkdir -p "$OUT"
[ -f "$OUT/corpus/test.en" ] || "$PYTHON" data_prep/make_synthetic_corpus.py "$OUT/corpus"
bash data_prep/prepare_parallel.sh "$OUT/corpus" "$OUT/clean"
bash data_prep/make_noisy_iwslt.sh "$OUT/clean" "$OUT/noisy"
"$PYTHON" examples/run_experiment.py --preset tiny-cpu --out "$OUT/experiment" \
  --data clean="$OUT/clean/data-bin" --data noisy="$OUT/noisy/data-bin" "$@"
