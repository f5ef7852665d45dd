#!/usr/bin/env bash
# The paper's masked-noise variant of a prepared corpus: noises the tokenized training words of
# CLEAN_DIR (output of prepare_iwslt14.sh or prepare_parallel.sh), segments them with CLEAN_DIR's
# subword model and binarizes them with CLEAN_DIR's dictionary. valid and test stay clean.
set -euo pipefail
SCRIPT_NAME=make_noisy_iwslt.sh
# shellcheck source=data_prep/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

USAGE="Usage: $SCRIPT_NAME [options] CLEAN_DIR OUT_DIR

Each training pair of CLEAN_DIR/tok is chosen with probability p; in a chosen pair each word of
source and target is replaced by the mask token with probability q (before subword segmentation).
Writes OUT_DIR/tok/ (noisy train, clean valid/test), OUT_DIR/tok/train.noise (one line per
training pair: 1 = noised, 0 = unchanged; also copied to OUT_DIR/data-bin/train.noise),
OUT_DIR/noise_stats.json, OUT_DIR/subword/ and OUT_DIR/data-bin/ (same dictionary as CLEAN_DIR).

Options:
  -p, --pair-prob P    probability that a training pair is chosen (default 0.1)
  -q, --word-prob Q    probability that a word of a chosen pair is masked (default 0.15)
  --seed N             random seed (default 1); same seed and input give the same output
  --workers N          processes for binarization (default 2)
  --force              rebuild OUT_DIR even if it is complete
  -h, --help           this message"

P=0.1 Q=0.15 SEED=1
script_option() {  # see parse_options in lib.sh
  case "$1" in
    -p|--pair-prob) P=${2:?}; SHIFT=2 ;;
    -q|--word-prob) Q=${2:?}; SHIFT=2 ;;
    --seed) SEED=${2:?}; SHIFT=2 ;;
    *) SHIFT=0 ;;
  esac
}
parse_options 2 "$@"
CLEAN=${ARGS[0]%/} OUT=${ARGS[1]%/}
require_fraction "p (--pair-prob)" "$P"
require_fraction "q (--word-prob)" "$Q"
require_int --seed "$SEED" 0
require_int --workers "$WORKERS" 1

[ -f "$CLEAN/prep.settings" ] || die "$CLEAN is not a complete output of prepare_iwslt14.sh or prepare_parallel.sh (no prep.settings)"
grep -q '^recipe=prepare_' "$CLEAN/prep.settings" || die "$CLEAN is a noisy output already: pass the clean directory"
SRC=$(read_setting "$CLEAN/prep.settings" src)
TGT=$(read_setting "$CLEAN/prep.settings" tgt)
METHOD=$(read_setting "$CLEAN/prep.settings" subword)
MASK_TOKEN=$(read_setting "$CLEAN/prep.settings" mask_token)
MODEL_FILES=$([ "$METHOD" = bpe ] && echo code || echo "spm.model spm.vocab")
for f in tok/train.$SRC tok/train.$TGT data-bin/dict.$SRC.txt $(for m in $MODEL_FILES; do echo "subword/$m"; done) \
         $(for s in valid test; do for l in $SRC $TGT; do echo "tok/$s.$l subword/$s.$l"; done; done); do
  [ -f "$CLEAN/$f" ] || die "missing file $CLEAN/$f: re-run the prepare script for $CLEAN"
done
require_aligned "$CLEAN/tok/train.$SRC" "$CLEAN/tok/train.$TGT"
find_python subword_nmt sentencepiece fairseq_cli

SETTINGS="recipe=make_noisy v1
clean_dir=$(cd "$CLEAN" && pwd)
clean_settings_sha256=$(sha256_of "$CLEAN/prep.settings")
src=$SRC
tgt=$TGT
subword=$METHOD
mask_token=$MASK_TOKEN
p=$P
q=$Q
seed=$SEED"
check_existing_output "$OUT" "$SETTINGS"
begin_output "$OUT"
mkdir -p "$WORK/tok" "$WORK/subword"

step "masking training words (p = $P, q = $Q, seed $SEED, token $MASK_TOKEN)"
"$PYTHON" "$DATA_PREP_DIR/mask_noise.py" -p "$P" -q "$Q" --seed "$SEED" --mask-token "$MASK_TOKEN" \
  --stats-json "$WORK/noise_stats.json" \
  "$CLEAN/tok/train.$SRC" "$CLEAN/tok/train.$TGT" "$WORK/tok/train.$SRC" "$WORK/tok/train.$TGT" "$WORK/tok/train.noise"
for split in valid test; do
  for lang in $SRC $TGT; do
    cp "$CLEAN/tok/$split.$lang" "$WORK/tok/"
    cp "$CLEAN/subword/$split.$lang" "$WORK/subword/"
  done
done
for m in $MODEL_FILES; do cp "$CLEAN/subword/$m" "$WORK/subword/"; done

step "segmenting the noisy training set with the clean subword model"
apply_subwords "$WORK" "$CLEAN" "$SRC" "$TGT" "$METHOD" "$MASK_TOKEN" train
step "binarizing into data-bin/ with the clean dictionary"
binarize "$WORK" "$SRC" "$TGT" "$CLEAN/data-bin/dict.$SRC.txt" "$WORKERS"
cp "$WORK/tok/train.noise" "$WORK/data-bin/train.noise"
finish_output "$OUT" "$SETTINGS"
