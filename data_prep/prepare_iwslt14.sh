#!/usr/bin/env bash
# Prepares IWSLT14 De->En the way fairseq's examples/translation/prepare-iwslt14.sh does, from the
# de-en.tgz archive, into OUT_DIR/{tok,subword,data-bin}. See data_prep/README.md.
set -euo pipefail
SCRIPT_NAME=prepare_iwslt14.sh
# shellcheck source=data_prep/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

URL="http://dl.fbaipublicfiles.com/fairseq/data/iwslt14/de-en.tgz"

USAGE="Usage: $SCRIPT_NAME [options] OUT_DIR

Builds OUT_DIR/tok/{train,valid,test}.{de,en} (Moses-tokenized, lowercased words),
OUT_DIR/subword/ (BPE codes or sentencepiece model, segmented text) and OUT_DIR/data-bin/ (fairseq
binaries, joined dictionary that also holds the mask token) from the IWSLT14 de-en.tgz archive.
valid = every 23rd cleaned training pair; test = dev2010 + TEDX.dev2012 + tst2010-2012.
OUT_DIR/raw/{valid,test}.{de,en} keeps the same pairs as extracted, before tokenization (original
case; the references sacreBLEU is scored against).

Options:
  --archive PATH       the de-en.tgz archive (default: OUT_DIR/../de-en.tgz, downloaded from
                       $URL if missing)
  --spm                sentencepiece (BPE model) instead of subword-nmt BPE
  --bpe-merges N       subword-nmt merge operations (default 10000)
  --spm-vocab-size N   sentencepiece vocabulary size (default 10000)
  --mask-token TOK     noise token added to the dictionary, kept whole by BPE (default <mask>)
  --workers N          processes for tokenization and binarization (default 2)
  --force              rebuild OUT_DIR even if it is complete
  -h, --help           this message
Environment: PYTHON (default: python3 of an active venv, else the repository's .venv)."

ARCHIVE=""
subword_defaults
script_option() {  # see parse_options in lib.sh
  case "$1" in
    --archive) ARCHIVE=${2:?--archive needs a path}; SHIFT=2 ;;
    *) subword_option "$@" ;;
  esac
}
parse_options 1 "$@"
OUT=${ARGS[0]%/}
check_prepare_numbers
require_word --mask-token "$MASK_TOKEN"
SRC=de TGT=en

find_python sacremoses subword_nmt sentencepiece fairseq_cli

if [ -z "$ARCHIVE" ]; then
  ARCHIVE=$(dirname "$OUT")/de-en.tgz
  if [ ! -e "$ARCHIVE" ]; then
    step "downloading $URL to $ARCHIVE"
    mkdir -p "$(dirname "$ARCHIVE")"
    "$PYTHON" - "$URL" "$ARCHIVE" <<'EOF' || die "could not download $URL (offline?): download it elsewhere and pass --archive PATH"
import os, sys, time, urllib.request
url, dest = sys.argv[1:]
part = f"{dest}.part.{os.getpid()}"
try:
    with urllib.request.urlopen(url, timeout=60) as r, open(part, "wb") as f:
        total, done, last = int(r.headers.get("Content-Length") or 0), 0, 0.0
        while chunk := r.read(1 << 20):
            f.write(chunk)
            done += len(chunk)
            if time.monotonic() - last > 5:
                last = time.monotonic()
                print(f"  {done >> 20} of {total >> 20} MiB", file=sys.stderr, flush=True)
    os.replace(part, dest)
except Exception as e:
    if os.path.exists(part):
        os.remove(part)
    sys.exit(f"  {type(e).__name__}: {e}")
EOF
  fi
fi
[ -f "$ARCHIVE" ] || die "archive not found: $ARCHIVE"

SETTINGS="recipe=prepare_iwslt14 v1
archive_sha256=$(sha256_of "$ARCHIVE")
src=$SRC
tgt=$TGT
lowercase=1
clean=1-175 ratio 1.5
valid=every 23rd training pair
raw=raw/{valid,test}.{$SRC,$TGT}: the extracted text, untokenized, original case
$(subword_settings)"
check_existing_output "$OUT" "$SETTINGS"
begin_output "$OUT"
mkdir -p "$WORK/raw" "$WORK/tok"

step "extracting $ARCHIVE (stripping markup as fairseq does)"
"$PYTHON" "$DATA_PREP_DIR/iwslt14_extract.py" "$ARCHIVE" "$WORK/raw"

step "tokenizing (sacremoses, Moses escaping) and lowercasing"
TOKENIZE_FILES=()
for split in train test; do
  for lang in $SRC $TGT; do
    TOKENIZE_FILES+=("$lang" "$WORK/raw/$split.$lang" "$WORK/raw/$split.tok.$lang")
  done
done
"$PYTHON" "$DATA_PREP_DIR/moses_tokenize.py" --lowercase --workers "$WORKERS" "${TOKENIZE_FILES[@]}"

step "cleaning the training pairs (length 1-175, ratio 1.5)"
"$PYTHON" "$DATA_PREP_DIR/clean_corpus.py" --min 1 --max 175 --ratio 1.5 \
  "$WORK/raw/train.tok.$SRC" "$WORK/raw/train.tok.$TGT" "$WORK/raw/train.clean.$SRC" "$WORK/raw/train.clean.$TGT"

step "splitting valid = every 23rd training pair; test = dev2010 + TEDX.dev2012 + tst2010-2012"
for lang in $SRC $TGT; do
  awk 'NR % 23 == 0' "$WORK/raw/train.clean.$lang" >"$WORK/tok/valid.$lang"
  awk 'NR % 23 != 0' "$WORK/raw/train.clean.$lang" >"$WORK/tok/train.$lang"
  mv "$WORK/raw/test.tok.$lang" "$WORK/tok/test.$lang"
done
for split in train valid test; do
  log "  $split: $(wc -l <"$WORK/tok/$split.$SRC") pairs"
done

step "keeping the untokenized, original-case valid and test text in raw/ (the references of sacreBLEU)"
mkdir -p "$WORK/raw_text"
# valid: the extracted training pairs behind tok/valid (the cleaning filter on the tokenized pair
# decides, then every 23rd kept pair); test: the extracted segments
"$PYTHON" - "$DATA_PREP_DIR" "$WORK/raw" "$WORK/raw_text" "$SRC" "$TGT" "$(wc -l <"$WORK/tok/valid.$SRC")" <<'EOF' \
  || die "could not keep the raw valid text (see above)"
import shutil, sys
prep_dir, raw, out, src, tgt, n_valid = sys.argv[1:]
sys.path.insert(0, prep_dir)
import clean_corpus, textfile

def words(line):
    line = clean_corpus._WHITESPACE.sub(" ", line).strip(" ")
    return line.split(" ") if line else []

kept = 0
with open(f"{out}/valid.{src}", "w", encoding="utf-8") as fs, open(f"{out}/valid.{tgt}", "w", encoding="utf-8") as ft:
    pairs = zip(textfile.read_pairs(f"{raw}/train.{src}", f"{raw}/train.{tgt}"),
                textfile.read_pairs(f"{raw}/train.tok.{src}", f"{raw}/train.tok.{tgt}"))
    for (s, t), (tok_s, tok_t) in pairs:
        if clean_corpus.keep_pair(words(tok_s), words(tok_t), 1, 175, 1.5):
            kept += 1
            if kept % 23 == 0:
                fs.write(s + "\n")
                ft.write(t + "\n")
if kept // 23 != int(n_valid):
    sys.exit(f"raw valid: {kept // 23} pairs, but tok/valid has {n_valid}")
for lang in (src, tgt):
    shutil.copyfile(f"{raw}/test.{lang}", f"{out}/test.{lang}")
EOF
rm -rf "$WORK/raw"
mv "$WORK/raw_text" "$WORK/raw"

subword_and_binarize_clean "$WORK" "$SRC" "$TGT" "$METHOD" "$SIZE" "$MASK_TOKEN" "$WORKERS"
finish_output "$OUT" "$SETTINGS"
