#!/usr/bin/env bash
# Prepares any parallel corpus given as plain {train,valid,test}.{SRC,TGT} files the same way as
# prepare_iwslt14.sh (tokenize, lowercase, clean the training pairs, joint subwords, binarize).
set -euo pipefail
SCRIPT_NAME=prepare_parallel.sh
# shellcheck source=data_prep/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

USAGE="Usage: $SCRIPT_NAME [options] INPUT_DIR OUT_DIR

INPUT_DIR holds untokenized, line-aligned {train,valid,test}.{SRC,TGT}. Builds
OUT_DIR/tok/ (Moses-tokenized words), OUT_DIR/subword/ and OUT_DIR/data-bin/ exactly as
prepare_iwslt14.sh does, except that the splits are taken as given (only train is cleaned), and
OUT_DIR/raw/{valid,test}.{SRC,TGT}: the input's valid and test text as given (untokenized, original
case; the references sacreBLEU is scored against).

Options:
  --src LANG           source language suffix (default de)
  --tgt LANG           target language suffix (default en)
  --no-lowercase       keep the case (default: lowercase, as the IWSLT14 recipe)
  --no-clean           keep every training pair (default: drop empty pairs, pairs longer than
                       --max-len words and pairs whose length ratio exceeds --ratio)
  --max-len N          (default 175)
  --ratio R            (default 1.5)
  --spm, --bpe-merges N, --spm-vocab-size N, --mask-token TOK, --workers N, --force, -h:
                       as in prepare_iwslt14.sh"

SRC=de TGT=en LOWERCASE=1 CLEAN=1 MAX_LEN=175 RATIO=1.5
subword_defaults
script_option() {  # see parse_options in lib.sh
  case "$1" in
    --src) SRC=${2:?}; SHIFT=2 ;;
    --tgt) TGT=${2:?}; SHIFT=2 ;;
    --no-lowercase) LOWERCASE=0; SHIFT=1 ;;
    --no-clean) CLEAN=0; SHIFT=1 ;;
    --max-len) MAX_LEN=${2:?}; SHIFT=2 ;;
    --ratio) RATIO=${2:?}; SHIFT=2 ;;
    *) subword_option "$@" ;;
  esac
}
parse_options 2 "$@"
IN=${ARGS[0]%/} OUT=${ARGS[1]%/}
check_prepare_numbers
require_int --max-len "$MAX_LEN" 1
awk -v r="$RATIO" 'BEGIN { exit !(r ~ /^[0-9]+([.][0-9]*)?$/ && r + 0 >= 1) }' || die "--ratio must be a number >= 1, got '$RATIO'"
require_word --mask-token "$MASK_TOKEN"
[[ "$SRC" =~ ^[A-Za-z_-]+$ && "$TGT" =~ ^[A-Za-z_-]+$ && "$SRC" != "$TGT" ]] || die "--src and --tgt must be two different language codes, got '$SRC' and '$TGT'"

[ -d "$IN" ] || die "input directory not found: $IN"
for split in train valid test; do
  for lang in $SRC $TGT; do
    [ -f "$IN/$split.$lang" ] || die "input file not found: $IN/$split.$lang (expected {train,valid,test}.{$SRC,$TGT})"
  done
  require_aligned "$IN/$split.$SRC" "$IN/$split.$TGT"
done
find_python sacremoses subword_nmt sentencepiece fairseq_cli

SETTINGS="recipe=prepare_parallel v1
input=$(cd "$IN" && pwd)
$(for split in train valid test; do for lang in $SRC $TGT; do echo "sha256_$split.$lang=$(sha256_of "$IN/$split.$lang")"; done; done)
src=$SRC
tgt=$TGT
lowercase=$LOWERCASE
clean=$([ "$CLEAN" = 1 ] && echo "1-$MAX_LEN ratio $RATIO" || echo none)
raw=raw/{valid,test}.{$SRC,$TGT}: the input text, untokenized, original case
$(subword_settings)"
check_existing_output "$OUT" "$SETTINGS"
begin_output "$OUT"
mkdir -p "$WORK/raw" "$WORK/tok"

step "tokenizing (sacremoses, Moses escaping)$([ "$LOWERCASE" = 1 ] && echo " and lowercasing")"
TOKENIZE_FILES=()
for split in train valid test; do
  for lang in $SRC $TGT; do
    dest=$WORK/tok/$split.$lang
    [ "$split" = train ] && [ "$CLEAN" = 1 ] && dest=$WORK/raw/train.tok.$lang
    TOKENIZE_FILES+=("$lang" "$IN/$split.$lang" "$dest")
  done
done
LOWERCASE_ARG=()
[ "$LOWERCASE" = 0 ] || LOWERCASE_ARG=(--lowercase)
"$PYTHON" "$DATA_PREP_DIR/moses_tokenize.py" "${LOWERCASE_ARG[@]}" --workers "$WORKERS" "${TOKENIZE_FILES[@]}"
if [ "$CLEAN" = 1 ]; then
  step "cleaning the training pairs (length 1-$MAX_LEN, ratio $RATIO)"
  "$PYTHON" "$DATA_PREP_DIR/clean_corpus.py" --min 1 --max "$MAX_LEN" --ratio "$RATIO" \
    "$WORK/raw/train.tok.$SRC" "$WORK/raw/train.tok.$TGT" "$WORK/tok/train.$SRC" "$WORK/tok/train.$TGT"
fi
rm -rf "$WORK/raw"
for split in train valid test; do
  log "  $split: $(wc -l <"$WORK/tok/$split.$SRC") pairs"
done
step "keeping the untokenized, original-case valid and test text in raw/ (the references of sacreBLEU)"
mkdir -p "$WORK/raw"
for split in valid test; do
  for lang in $SRC $TGT; do
    awk 1 "$IN/$split.$lang" >"$WORK/raw/$split.$lang"  # as given, each line ending in a newline
  done
done

subword_and_binarize_clean "$WORK" "$SRC" "$TGT" "$METHOD" "$SIZE" "$MASK_TOKEN" "$WORKERS"
finish_output "$OUT" "$SETTINGS"
