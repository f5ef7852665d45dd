#!/usr/bin/env bash
# The crawl-noise table on a real corpus (gettext De->En): noise kinds, one long Adam pretraining,
# every method fine-tuned from it with Adam. Usage:
#   examples/crawl_noise/run.sh [--corpus DIR] [--out runs/crawl-noise] [--seeds "1 2 3"]
#                               [--kinds "mix misaligned untranslated mask"] [--methods "..."]
#                               [--pretrain-updates 7170] [--finetune-updates 400]
# DIR holds train/valid/test.{de,en} (default ../shared/data/gettext-de-en). Every step is skipped
# when its output exists, and the pretraining resumes from its last checkpoint, so an interrupted
# run picks up where it stopped (the pretraining is about an hour on one CPU thread).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
corpus="$repo/../shared/data/gettext-de-en" out=runs/crawl-noise seeds="1 2 3"
kinds="mix misaligned untranslated mask"
methods="pretrained baseline oracle trusted excess-loss teacher-filter filter-ce filter-dcce l2t robust deep surface"
pretrain_updates=7170 finetune_updates=400
while [ $# -gt 0 ]; do
  case "$1" in
    --corpus) corpus="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --seeds) seeds="$2"; shift 2 ;;
    --kinds) kinds="$2"; shift 2 ;;
    --methods) methods="$2"; shift 2 ;;
    --pretrain-updates) pretrain_updates="$2"; shift 2 ;;
    --finetune-updates) finetune_updates="$2"; shift 2 ;;
    -h|--help) sed -n 2,9p "$0"; exit 0 ;;
    *) echo "run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
py="${PYTHON:-$repo/.venv/bin/python}"
[ -x "$py" ] || { echo "run.sh: no Python environment at $py: run scripts/setup.sh first" >&2; exit 1; }
[ -f "$corpus/train.de" ] || { echo "run.sh: no corpus at $corpus (train.de missing): pass --corpus DIR" >&2; exit 1; }
bin="$(dirname "$py")"

# 1. data: tokenize + joint BPE once, then 30 % of the training pairs noised per kind (valid/test clean)
bash "$repo/data_prep/prepare_parallel.sh" "$corpus" "$out/data/clean"
for kind in $(printf '%s\n' mix $kinds | awk '!seen[$0]++'); do  # mix: the pretraining's corpus
  q=(); [ "$kind" = mask ] && q=(-q 0.15)
  bash "$repo/data_prep/make_noisy_parallel.sh" --kind "$kind" -p 0.3 "${q[@]}" --seed 1 "$out/data/clean" \
    "$out/data/$kind-p03"
done

# 2. one student for every kind: Adam (lr 1e-3, inverse_sqrt, 1000 warm-up updates) on the mixed
#    noise, 7170 updates (--pretrain-updates; 30 epochs of gettext, where the validation loss still
#    falls by ~0.1 per 1000 updates: as close to converged as 2 CPU cores allow), the tiny-cpu
#    preset's model and device, which the fine-tunes load. Resumable: fairseq restarts from
#    checkpoint_last.pt. The kinds share clean/'s dictionary, so the one student fits them all.
read -r -a preset < <("$py" -c 'import sys; sys.path.insert(0, sys.argv[1]); from experiment_methods import PRESETS
p = PRESETS["tiny-cpu"]; print(p["model"], p["device"])' "$repo/examples")
# pretrain_mix DIR [FLAGS...]: that recipe into DIR, resumable, marked done at --pretrain-updates
pretrain_mix() {
  local dir="$1"; shift
  [ -f "$dir/done-$pretrain_updates" ] && return 0
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$bin/fairseq-train" "$out/data/mix-p03/data-bin" --task translation \
    --criterion label_smoothed_cross_entropy --label-smoothing 0.1 --optimizer adam --adam-betas '(0.9,0.98)' \
    --lr 1e-3 --lr-scheduler inverse_sqrt --warmup-updates 1000 --weight-decay 0.0001 --max-tokens 2048 \
    --max-update "$pretrain_updates" --seed 1 --save-dir "$dir" --no-epoch-checkpoints \
    --save-interval-updates 1000 --keep-interval-updates 1 --log-format simple --log-interval 200 "${preset[@]}" "$@"
  touch "$dir/done-$pretrain_updates"
}
pretrain_mix "$out/pretrain-mix"
models=("")  # the suffixes of the shared models: the student, and filter-dcce's reverse (en->de)
case " $methods " in *" filter-dcce "*)  # the same recipe, updates and noisy corpus as the student
  pretrain_mix "$out/pretrain-mix-reverse" --source-lang en --target-lang de; models+=(-reverse) ;; esac

# 3. per kind: the methods, each a 400-update (--finetune-updates) Adam fine-tune of that student
#    (lr 3e-4 after 50 warm-up updates), 3 seeds; the table in $out/table/results.md
data=()
for kind in $kinds; do
  for m in "${models[@]}"; do  # one file for every kind, where run_experiment looks for it
    mkdir -p "$out/table/$kind-pretrain$m-seed1"
    ln -f "$out/pretrain-mix$m/checkpoint_last.pt" "$out/table/$kind-pretrain$m-seed1/checkpoint_best.pt"
  done
  data+=(--data "$kind=$out/data/$kind-p03/data-bin")
done
# shellcheck disable=SC2086
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$py" "$repo/examples/run_experiment.py" --preset tiny-cpu \
  --out "$out/table" "${data[@]}" --pretrain-seed 1 --finetune-updates "$finetune_updates" \
  --finetune-optimizer adam --seeds $seeds --methods $methods
