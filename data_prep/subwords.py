"""Learns and applies joint subword models (subword-nmt BPE or sentencepiece), keeping a mask token whole.

Subcommands:
    learn-bpe   --merges N --out CODE TRAIN_SRC TRAIN_TGT
    apply-bpe   --codes CODE --mask-token TOK IN OUT [IN OUT ...]
    train-spm   --vocab-size N --mask-token TOK --model-prefix PREFIX TRAIN_SRC TRAIN_TGT
    apply-spm   --model MODEL IN OUT [IN OUT ...]

BPE follows fairseq's prepare-iwslt14.sh: merges are learned on the concatenation of both training
sides and applied without a vocabulary filter. The mask token is a subword-nmt glossary entry (and a
sentencepiece user-defined symbol), so it is never split and reaches fairseq's dictionary as one
symbol. Inputs must be UTF-8 (else a one-line error names the file, line and byte); a last line
without a newline counts as a line.
"""

import argparse
import itertools
import os
import re
import sys
import time

import textfile

_PROGRESS_EVERY_S = 10.0


def _progress(desc, done, total, start):
    elapsed = time.monotonic() - start
    print(f"  {desc}: {done:,}/{total:,} lines ({elapsed:.0f}s)", file=sys.stderr, flush=True)


def learn_bpe(train_paths, codes_path, merges):
    """Learns `merges` joint BPE merge operations on the given files (as fairseq's recipe does).

    Args:
        train_paths: tokenized training files (both languages); their lines are concatenated.
        codes_path: where to write the subword-nmt codes file.
        merges: number of merge operations (fewer are written if no pair occurs twice any more).
    """
    from subword_nmt.learn_bpe import learn_bpe as subword_nmt_learn_bpe

    n_lines = sum(textfile.count_lines(p) for p in train_paths)
    print(f"  learning {merges} BPE merges on {n_lines:,} lines of {', '.join(map(os.path.basename, train_paths))}",
          file=sys.stderr, flush=True)
    with open(codes_path, "w", encoding="utf-8") as out:
        subword_nmt_learn_bpe(itertools.chain.from_iterable(map(textfile.read_lines, train_paths)), out, merges)


def apply_bpe(codes_path, file_pairs, mask_token):
    """Segments each (input, output) file pair with BPE codes; `mask_token` is never split."""
    from subword_nmt.apply_bpe import BPE

    with open(codes_path, encoding="utf-8") as codes:
        bpe = BPE(codes, glossaries=[re.escape(mask_token)] if mask_token else None)
    for in_path, out_path in file_pairs:
        _map_lines(in_path, out_path, bpe.process_line, "apply BPE to " + os.path.basename(in_path))


def train_spm(train_paths, model_prefix, vocab_size, mask_token):
    """Trains a joint sentencepiece BPE model with `mask_token` as a user-defined symbol."""
    import sentencepiece as spm

    for path in train_paths:
        textfile.count_lines(path)  # sentencepiece reads the files itself: check that they are UTF-8
    print(f"  training sentencepiece (bpe, vocab {vocab_size}) on {', '.join(map(os.path.basename, train_paths))}",
          file=sys.stderr, flush=True)
    spm.SentencePieceTrainer.train(
        input=",".join(train_paths),
        model_prefix=model_prefix,
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        user_defined_symbols=[mask_token] if mask_token else [],
        hard_vocab_limit=False,  # small corpora: a smaller vocabulary instead of an error
        num_threads=2,
        minloglevel=1,
    )


def apply_spm(model_path, file_pairs):
    """Segments each (input, output) file pair into space-separated sentencepiece pieces."""
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=model_path)

    def encode(line):
        return " ".join(processor.encode(line, out_type=str))

    for in_path, out_path in file_pairs:
        _map_lines(in_path, out_path, encode, "apply sentencepiece to " + os.path.basename(in_path))


def _map_lines(in_path, out_path, fn, desc):
    """Writes fn(line) for each line of `in_path` (without its newline) as a line of `out_path`."""
    total = textfile.count_lines(in_path)
    start = last = time.monotonic()
    with open(out_path, "w", encoding="utf-8") as fout:
        for i, line in enumerate(textfile.read_lines(in_path), 1):
            fout.write(fn(line) + "\n")
            if time.monotonic() - last > _PROGRESS_EVERY_S:
                last = time.monotonic()
                _progress(desc, i, total, start)
    _progress(desc, total, total, start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("learn-bpe")
    p.add_argument("--merges", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("train", nargs="+")
    p = sub.add_parser("apply-bpe")
    p.add_argument("--codes", required=True)
    p.add_argument("--mask-token", default="")
    p.add_argument("files", nargs="+", metavar="IN OUT")
    p = sub.add_parser("train-spm")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--mask-token", default="")
    p.add_argument("--model-prefix", required=True)
    p.add_argument("train", nargs="+")
    p = sub.add_parser("apply-spm")
    p.add_argument("--model", required=True)
    p.add_argument("files", nargs="+", metavar="IN OUT")
    args = parser.parse_args(argv)
    if args.command in ("apply-bpe", "apply-spm") and len(args.files) % 2:
        parser.error("give files as IN OUT pairs")
    file_pairs = list(zip(args.files[::2], args.files[1::2])) if args.command.startswith("apply") else None
    try:
        if args.command == "learn-bpe":
            learn_bpe(args.train, args.out, args.merges)
        elif args.command == "apply-bpe":
            apply_bpe(args.codes, file_pairs, args.mask_token)
        elif args.command == "train-spm":
            train_spm(args.train, args.model_prefix, args.vocab_size, args.mask_token)
        else:
            apply_spm(args.model, file_pairs)
    except textfile.TextFileError as e:
        sys.exit(f"subwords.py: error: {e}")


if __name__ == "__main__":
    main()
