#!/usr/bin/env bash
# The main job, end to end on the CPU with generated data (no download): sets up .venv, writes a
# small synthetic German->English corpus, prepares it like IWSLT14 (Moses tokenization, joint BPE,
# fairseq-preprocess) and makes its crawl-like noisy variant: 30 % of the training pairs untranslated
# (the target a copy of the source, the kind of web-crawl noise Khayrallah & Koehn 2018 found most
# harmful). It pretrains a small Transformer with Adam on the noisy data, fine-tunes it (momentum
# SGD, lr 0.05, 400 updates) five ways: uniform (baseline), the oracle that drops the known noisy
# pairs (the bound), --reweight-preset trusted (the recommended teacher: each
# pair's excess loss over a reference tuned on the trusted validation pairs), --reweight-preset
# robust (the label-only teacher) and excess-loss (drop the 20 % of pairs with the lowest excess
# loss, the filter the same reference gives), and prints the table: the
# pretrained student as it is, each fine-tune, sacreBLEU and chrF with CIs, paired significance
# against the baseline, the share of the oracle gap closed and the noise AUC.
# Re-running skips finished steps. OUT (default runs/demo) holds it all; arguments go to
# examples/run_experiment.py (e.g. --seeds 1 2 3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
export PYTHON="$PWD/${VENV:-.venv}/bin/python" PATH="$PWD/${VENV:-.venv}/bin:$PATH"
OUT=${OUT:-runs/demo}
mkdir -p "$OUT"
[ -f "$OUT/corpus/test.en" ] || "$PYTHON" data_prep/make_synthetic_corpus.py "$OUT/corpus"
bash data_prep/prepare_parallel.sh "$OUT/corpus" "$OUT/clean"
bash data_prep/make_noisy_parallel.sh --kind untranslated -p 0.3 --seed 1 "$OUT/clean" "$OUT/untranslated"
"$PYTHON" examples/run_experiment.py --preset tiny-cpu --out "$OUT/experiment" \
  --data untranslated="$OUT/untranslated/data-bin" --pretrain-seed 1 \
  --methods pretrained baseline oracle trusted robust excess-loss \
  --finetune-updates 400 --finetune-args=--lr=0.05 "$@"
