#!/usr/bin/env bash
# The paper's IWSLT14 De->En experiment (Table 7): data, pretraining, the three fine-tunes on clean
# and masked-noise data, BLEU table. Usage:
#   examples/iwslt14/run.sh [--archive de-en.tgz] [--seeds "1 2 3"] [--out runs/iwslt14] [-- extra fairseq-train flags]
# Without --archive the official archive is downloaded (needs network). Extra fairseq-train flags
# after "--" go to every training run, e.g. -- --fp16 --distributed-world-size 4
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
archive=() seeds="1" out=runs/iwslt14 extra=""
while [ $# -gt 0 ]; do
  case "$1" in
    --archive) archive=(--archive "$2"); shift 2 ;;
    --seeds) seeds="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --) shift; extra="$*"; break ;;
    -h|--help) sed -n 2,6p "$0"; exit 0 ;;
    *) echo "run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
py="${PYTHON:-$repo/.venv/bin/python}"
[ -x "$py" ] || { echo "run.sh: no Python environment at $py: run scripts/setup.sh first" >&2; exit 1; }
bash "$repo/data_prep/prepare_iwslt14.sh" "${archive[@]}" "$out/data/clean"
bash "$repo/data_prep/make_noisy_iwslt.sh" -p 0.1 -q 0.15 --seed 1 "$out/data/clean" "$out/data/noisy"
# shellcheck disable=SC2086
"$py" "$repo/examples/run_experiment.py" --preset iwslt14 --seeds $seeds --out "$out/experiment" \
  --data clean="$out/data/clean/data-bin" --data noisy="$out/data/noisy/data-bin" --train-args "$extra"
