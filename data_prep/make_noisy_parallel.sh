#!/usr/bin/env bash
# Noisy variants of a prepared corpus: noises the tokenized training words of CLEAN_DIR (output of
# prepare_iwslt14.sh or prepare_parallel.sh) with one kind of noise (crawl_noise.py: the paper's
# masked words, or a kind of crawl noise after Khayrallah & Koehn 2018), segments them with
# CLEAN_DIR's subword model and binarizes them with CLEAN_DIR's dictionary. valid and test stay clean.
# make_noisy_iwslt.sh runs this script with --as-make-noisy-iwslt (first argument): the mask kind
# under that script's name, help and options.
set -euo pipefail
SCRIPT_NAME=make_noisy_parallel.sh MASK_ONLY=0
if [ "${1:-}" = --as-make-noisy-iwslt ]; then
  SCRIPT_NAME=make_noisy_iwslt.sh MASK_ONLY=1
  shift
fi
# shellcheck source=data_prep/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

KINDS="mask, misaligned, untranslated, src-shuffle, short, mix"
OUTPUT_HELP="Writes OUT_DIR/tok/ (noisy train, clean valid/test), OUT_DIR/tok/train.noise (one line per
training pair: 1 = noised, 0 = unchanged; also copied to OUT_DIR/data-bin/train.noise),
OUT_DIR/noise_stats.json, OUT_DIR/subword/ and OUT_DIR/data-bin/ (same dictionary as CLEAN_DIR)."
COMMON_HELP="  --seed N             random seed (default 1); same seed and input give the same output
  --workers N          processes for binarization (default 2)
  --force              rebuild OUT_DIR even if it is complete
  -h, --help           this message"
if [ "$MASK_ONLY" = 1 ]; then
  USAGE="Usage: $SCRIPT_NAME [options] CLEAN_DIR OUT_DIR

Each training pair of CLEAN_DIR/tok is chosen with probability p; in a chosen pair each word of
source and target is replaced by the mask token with probability q (before subword segmentation).
$OUTPUT_HELP
The same as make_noisy_parallel.sh --kind mask, which also makes other kinds of noise.

Options:
  -p, --pair-prob P    probability that a training pair is chosen (default 0.1)
  -q, --word-prob Q    probability that a word of a chosen pair is masked (default 0.15)
$COMMON_HELP"
else
  USAGE="Usage: $SCRIPT_NAME --kind KIND [options] CLEAN_DIR OUT_DIR

Each training pair of CLEAN_DIR/tok is chosen independently with probability p and gets the noise
of KIND, applied to its tokenized words (before subword segmentation):
  mask          each word of source and target replaced by the mask token with probability q
                (the paper's noise: the same output as make_noisy_iwslt.sh with the same -p, -q, --seed)
  misaligned    target = the target of another chosen pair: the chosen pairs' targets are deranged
                (shuffled so that none keeps its own); a pair chosen alone takes the target of a
                random other pair of the corpus
  untranslated  target = a copy of the source
  src-shuffle   source words shuffled (target kept)
  short         target cut to its first K words, K drawn uniformly from 1, 2, 3
  mix           each chosen pair gets one of misaligned, untranslated, src-shuffle, short, drawn
                uniformly; the pairs that drew misaligned are deranged among themselves
misaligned, untranslated, src-shuffle and short follow Khayrallah & Koehn (2018); their sixth kind,
wrong-lang (the target in a third language), is not available: it needs a second target language,
which this repository's data does not have. misaligned and mix need 2 training pairs at least.
A chosen pair whose text comes out as it was (another target that is string-identical, a target
equal to its source, a shuffle that keeps the original order, as always for a one-word source, a
target of K words or fewer) is 0 in the sidecar and counted as chosen but unchanged.

$OUTPUT_HELP
For the kinds other than mask, noise_stats.json has the counts per kind (chosen, changed); for mix
also OUT_DIR/tok/train.noise_kind has one line per training pair: the kind of a noised pair, 'clean'
for the others.

Options:
  --kind KIND          $KINDS (required)
  -p, --pair-prob P    probability that a training pair is chosen (default 0.1)
  -q, --word-prob Q    mask only: probability that a word of a chosen pair is masked (default 0.15)
$COMMON_HELP"
fi

KIND="" P=0.1 Q="" SEED=1
[ "$MASK_ONLY" = 0 ] || KIND=mask
script_option() {  # see parse_options in lib.sh
  case "$1" in
    --kind)
      [ "$MASK_ONLY" = 0 ] || die "$SCRIPT_NAME makes the masked noise only: for --kind use make_noisy_parallel.sh"
      KIND=${2:?}; SHIFT=2 ;;
    -p|--pair-prob) P=${2:?}; SHIFT=2 ;;
    -q|--word-prob) Q=${2:?}; SHIFT=2 ;;
    --seed) SEED=${2:?}; SHIFT=2 ;;
    *) SHIFT=0 ;;
  esac
}
parse_options 2 "$@"
CLEAN=${ARGS[0]%/} OUT=${ARGS[1]%/}
case "$KIND" in
  mask|misaligned|untranslated|src-shuffle|short|mix) ;;
  "") die "--kind is required: one of $KINDS (see -h)" ;;
  wrong-lang) die "--kind wrong-lang needs a second target language, which this repository's data does not have: it is not available (see -h)" ;;
  *) die "unknown --kind '$KIND': one of $KINDS" ;;
esac
require_fraction "p (--pair-prob)" "$P"
if [ "$KIND" = mask ]; then
  Q=${Q:-0.15}
  require_fraction "q (--word-prob)" "$Q"
elif [ -n "$Q" ]; then
  die "-q (--word-prob) is for --kind mask only, not $KIND"
fi
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
if [ "$KIND" = misaligned ] || [ "$KIND" = mix ]; then
  N_TRAIN=$("$PYTHON" "$DATA_PREP_DIR/textfile.py" count "$CLEAN/tok/train.$SRC" 2>&1) || die "$N_TRAIN"
  [ "$N_TRAIN" -ge 2 ] || die "--kind $KIND needs at least 2 training pairs (a chosen pair takes another pair's target), $CLEAN/tok/train.$SRC has $N_TRAIN"
fi

# The settings of the mask kind are those make_noisy_iwslt.sh always wrote (no kind line), so that its
# existing outputs stay up to date; the other kinds add kind= and have no q.
if [ "$KIND" = mask ]; then KIND_SETTINGS="p=$P
q=$Q"; else KIND_SETTINGS="kind=$KIND
p=$P"; fi
SETTINGS="recipe=make_noisy v1
clean_dir=$(cd "$CLEAN" && pwd)
clean_settings_sha256=$(sha256_of "$CLEAN/prep.settings")
src=$SRC
tgt=$TGT
subword=$METHOD
mask_token=$MASK_TOKEN
$KIND_SETTINGS
seed=$SEED"
check_existing_output "$OUT" "$SETTINGS"
begin_output "$OUT"
mkdir -p "$WORK/tok" "$WORK/subword"

NOISE_ARGS=(--kind "$KIND" -p "$P" --seed "$SEED" --stats-json "$WORK/noise_stats.json")
if [ "$KIND" = mask ]; then
  step "masking training words (p = $P, q = $Q, seed $SEED, token $MASK_TOKEN)"
  NOISE_ARGS+=(-q "$Q" --mask-token "$MASK_TOKEN")
else
  step "noising training pairs: $KIND (p = $P, seed $SEED)"
  [ "$KIND" != mix ] || NOISE_ARGS+=(--kind-out "$WORK/tok/train.noise_kind")
fi
"$PYTHON" "$DATA_PREP_DIR/crawl_noise.py" "${NOISE_ARGS[@]}" \
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
