# shellcheck shell=bash
# Shared functions of the data_prep/*.sh scripts (sourced, never run).
#
# Every script builds its whole output in a temporary directory beside OUT and renames it to OUT at
# the very end, so OUT either does not exist or is complete. OUT/prep.settings records the settings
# and input checksums; a re-run with the same settings and inputs finds it and does nothing.

DATA_PREP_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SCRIPT_NAME=${SCRIPT_NAME:-$(basename "$0")}
_STEP_START=$SECONDS
_WORK_DIR=""

log() { printf '[%s %s] %s\n' "$SCRIPT_NAME" "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '%s: error: %s\n' "$SCRIPT_NAME" "$*" >&2; exit 1; }
step() { log "($((SECONDS - _STEP_START))s) $*"; }

# Sets PYTHON to the interpreter that has the needed modules: $PYTHON if set, else `python3` of an
# activated virtual environment, else the repository's .venv, else `python3` from PATH.
find_python() {
  if [ -z "${PYTHON:-}" ]; then
    local repo_venv="$DATA_PREP_DIR/../.venv/bin/python"
    if [ -n "${VIRTUAL_ENV:-}" ] && command -v python3 >/dev/null; then
      PYTHON=python3
    elif [ -x "$repo_venv" ]; then
      PYTHON=$repo_venv
    else
      PYTHON=python3
    fi
  fi
  command -v "$PYTHON" >/dev/null || die "Python interpreter '$PYTHON' not found: set PYTHON=/path/to/python or activate .venv (scripts/setup.sh)"
  local missing
  missing=$("$PYTHON" - "$@" <<'EOF'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
EOF
)
  [ -z "$missing" ] || die "$PYTHON lacks the Python module(s) $missing: activate .venv or run scripts/setup.sh, or set PYTHON="
  export PYTHON
}

# `require_fraction NAME VALUE` dies unless VALUE is a number with 0 <= VALUE <= 1.
require_fraction() {
  awk -v x="$2" 'BEGIN { exit !(x ~ /^[+]?([0-9]+[.]?[0-9]*|[.][0-9]+)([eE][-+]?[0-9]+)?$/ && x + 0 >= 0 && x + 0 <= 1) }' \
    || die "$1 must be a number in [0, 1], got '$2'"
}
require_int() {  # NAME VALUE MIN
  if ! [[ "$2" =~ ^[0-9]+$ ]] || [ "$2" -lt "$3" ]; then die "$1 must be an integer >= $3, got '$2'"; fi
}
require_word() {  # NAME VALUE: one word, no white space
  [[ "$2" =~ ^[^[:space:]]+$ ]] || die "$1 must be one word without spaces, got '$2'"
}

# The command line of every script: -h/--help prints USAGE (the script's help text); --workers N
# (default 2) and --force are common to all; the script's own options go to its
# `script_option OPTION [VALUE]`, which sets the option's variable and SHIFT to the number of words
# it used, or SHIFT=0 for a word that is not one of its options. Exactly NPOS positional arguments
# must follow the options (else USAGE on stderr, exit 2); they are left in ARGS.
parse_options() {  # NPOS ARG...
  local npos=$1
  shift
  WORKERS=2 FORCE=0  # FORCE is read by check_existing_output
  while [ $# -gt 0 ]; do
    case "$1" in
      -h|--help) printf '%s\n' "$USAGE"; exit 0 ;;
      --workers) WORKERS=${2:?}; shift 2 ;;
      --force) export FORCE=1; shift ;;
      *)
        script_option "$@"
        if [ "$SHIFT" -gt 0 ]; then
          shift "$SHIFT"
        elif [[ "$1" == -* ]]; then
          die "unknown option $1 (see -h)"
        else
          break
        fi ;;
    esac
  done
  [ $# -eq "$npos" ] || { printf '%s\n' "$USAGE" >&2; exit 2; }
  ARGS=("$@")
}

# The subword options of prepare_iwslt14.sh and prepare_parallel.sh (its --help refers to
# prepare_iwslt14.sh's): defaults, then subword_option as the fallback of their script_option.
subword_defaults() { METHOD=bpe BPE_MERGES=10000 SPM_VOCAB=10000 MASK_TOKEN="<mask>"; }
subword_option() {  # OPTION [VALUE]: as script_option
  case "$1" in
    --spm) METHOD=spm; SHIFT=1 ;;
    --bpe-merges) BPE_MERGES=${2:?}; SHIFT=2 ;;
    --spm-vocab-size) SPM_VOCAB=${2:?}; SHIFT=2 ;;
    --mask-token) MASK_TOKEN=${2:?}; SHIFT=2 ;;
    *) SHIFT=0 ;;
  esac
}
# Checks the numbers both prepare scripts take, --workers too (they check these first and in this
# order, which decides the error shown when several are wrong), and sets SIZE, the size of the
# chosen subword model.
check_prepare_numbers() {
  require_int --bpe-merges "$BPE_MERGES" 1
  require_int --spm-vocab-size "$SPM_VOCAB" 1
  require_int --workers "$WORKERS" 1
  SIZE=$([ "$METHOD" = bpe ] && echo "$BPE_MERGES" || echo "$SPM_VOCAB")
}
# The last lines of both prepare scripts' prep.settings (make_noisy_iwslt.sh reads subword and
# mask_token back from there).
subword_settings() { printf 'subword=%s\nsubword_size=%s\nmask_token=%s' "$METHOD" "$SIZE" "$MASK_TOKEN"; }

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

# Value of KEY in a prep.settings file (key=value lines).
read_setting() {  # FILE KEY
  local line
  line=$(grep -m1 "^$2=" "$1") || die "$1 has no '$2=' line: is it an output of data_prep/prepare_*.sh?"
  printf '%s' "${line#*=}"
}

# Decides what to do with an existing OUT: returns 0 when OUT must be (re)built; exits 0 when it is
# complete with the same SETTINGS (unless FORCE=1); dies when it was made with other settings
# (unless FORCE=1) or is not an output of these scripts at all (never replaced).
check_existing_output() {  # OUT SETTINGS_TEXT
  local out=$1 settings=$2
  [ -e "$out" ] || return 0
  if [ ! -f "$out/prep.settings" ]; then
    die "$out exists but is not an output of data_prep (no prep.settings): choose another directory or remove it"
  fi
  if [ "${FORCE:-0}" = 1 ]; then
    log "rebuilding $out (--force)"
  elif [ "$(cat "$out/prep.settings")" = "$settings" ]; then
    log "$out is complete and up to date with these settings and inputs: nothing to do"
    exit 0
  else
    die "$out was made with other settings or inputs (see $out/prep.settings): pass --force to rebuild it, or choose another directory"
  fi
}

# Creates the temporary directory beside OUT (same file system, so the final rename is atomic) and
# removes it again on any exit before finish_output.
begin_output() {  # OUT -> sets WORK
  local out=$1 parent
  parent=$(dirname "$out")
  mkdir -p "$parent"
  WORK=$(mktemp -d "$parent/.$(basename "$out").tmp.XXXXXX")
  chmod "$(umask -S)" "$WORK"  # mktemp makes it private; give it the usual permissions
  _WORK_DIR=$WORK
  trap '[ -n "$_WORK_DIR" ] && rm -rf -- "$_WORK_DIR"' EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
}

# Writes the settings file last and renames WORK to OUT (replacing an old OUT under --force).
finish_output() {  # OUT SETTINGS_TEXT
  local out=$1 settings=$2 old=""
  printf '%s\n' "$settings" >"$WORK/prep.settings"
  if [ -e "$out" ]; then
    old=$(mktemp -d "$(dirname "$out")/.$(basename "$out").old.XXXXXX")
    mv -- "$out" "$old/"
  fi
  mv -- "$WORK" "$out"
  _WORK_DIR=""
  [ -z "$old" ] || rm -rf -- "$old"
  log "done in $((SECONDS - _STEP_START))s: $out"
}

# Checks that two text files are UTF-8 and have the same number of lines, as the Python helpers
# read them (textfile.py: a last line without a newline counts, unlike in `wc -l`). Bytes that are
# not UTF-8 stop the script with one line naming the file, line and byte offset.
require_aligned() {  # FILE_A FILE_B
  local counts na nb
  find_python
  counts=$("$PYTHON" "$DATA_PREP_DIR/textfile.py" count "$1" "$2" 2>&1) || die "$counts"
  read -r na nb <<<"$counts"
  [ "$na" -eq "$nb" ] || die "misaligned corpus: $1 has $na lines but $2 has $nb"
}

# Learns the subword model on DIR/tok/train.{SRC,TGT} into DIR/subword/ (code or spm.model).
learn_subwords() {  # DIR SRC TGT METHOD SIZE MASK_TOKEN
  local dir=$1 src=$2 tgt=$3 method=$4 size=$5 mask=$6
  mkdir -p "$dir/subword"
  if [ "$method" = bpe ]; then
    "$PYTHON" "$DATA_PREP_DIR/subwords.py" learn-bpe --merges "$size" --out "$dir/subword/code" \
      "$dir/tok/train.$src" "$dir/tok/train.$tgt"
  else
    "$PYTHON" "$DATA_PREP_DIR/subwords.py" train-spm --vocab-size "$size" --mask-token "$mask" \
      --model-prefix "$dir/subword/spm" "$dir/tok/train.$src" "$dir/tok/train.$tgt"
  fi
}

# Applies the subword model MODEL_DIR/subword to DIR/tok/SPLIT.LANG for each SPLIT and language,
# writing DIR/subword/SPLIT.LANG. The mask token is kept as one symbol.
apply_subwords() {  # DIR MODEL_DIR SRC TGT METHOD MASK_TOKEN SPLIT...
  local dir=$1 model_dir=$2 src=$3 tgt=$4 method=$5 mask=$6 split lang files=()
  shift 6
  mkdir -p "$dir/subword"
  for split in "$@"; do
    for lang in "$src" "$tgt"; do
      files+=("$dir/tok/$split.$lang" "$dir/subword/$split.$lang")
    done
  done
  if [ "$method" = bpe ]; then
    "$PYTHON" "$DATA_PREP_DIR/subwords.py" apply-bpe --codes "$model_dir/subword/code" --mask-token "$mask" "${files[@]}"
  else
    "$PYTHON" "$DATA_PREP_DIR/subwords.py" apply-spm --model "$model_dir/subword/spm.model" "${files[@]}"
  fi
}

# Binarizes DIR/subword/{train,valid,test} into DIR/data-bin: with the dictionary DICT, or, when
# DICT is "build:TOKEN", with the joined dictionary of the training set plus the mask token TOKEN.
binarize() {  # DIR SRC TGT DICT WORKERS
  local dir=$1 src=$2 tgt=$3 dict=$4 workers=$5 dict_arg
  if [[ "$dict" == build:* ]]; then dict_arg=(--mask-token "${dict#build:}"); else dict_arg=(--dict "$dict"); fi
  "$PYTHON" "$DATA_PREP_DIR/binarize.py" --src "$src" --tgt "$tgt" --subword-dir "$dir/subword" \
    --destdir "$dir/data-bin" "${dict_arg[@]}" --workers "$workers" >"$dir/preprocess.stdout" 2>&1 \
    || { tail -n 20 "$dir/preprocess.stdout" >&2; die "fairseq preprocess failed (log above)"; }
  grep -E 'sents, .* tokens' "$dir/preprocess.stdout" | sed -E 's/^.*preprocess[:| ]+/  /' >&2 || true
  rm -f "$dir/preprocess.stdout"
}

# The shared tail of the clean pipelines: from DIR/tok/{train,valid,test}.{SRC,TGT} learn the
# subword model, segment all splits, build the joined dictionary (with the mask token) and binarize.
subword_and_binarize_clean() {  # DIR SRC TGT METHOD SIZE MASK_TOKEN WORKERS
  local dir=$1 src=$2 tgt=$3 method=$4 size=$5 mask=$6 workers=$7
  step "learning the joint subword model ($method, $size) on the training set"
  learn_subwords "$dir" "$src" "$tgt" "$method" "$size" "$mask"
  step "segmenting train/valid/test into subwords"
  apply_subwords "$dir" "$dir" "$src" "$tgt" "$method" "$mask" train valid test
  step "building the joined dictionary (plus $mask) and binarizing into data-bin/"
  binarize "$dir" "$src" "$tgt" "build:$mask" "$workers"
}
