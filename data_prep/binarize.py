"""Binarizes subword-segmented text with fairseq, building the joined dictionary plus a mask token.

    python binarize.py --src de --tgt en --subword-dir DIR --destdir DATA_BIN \
        (--mask-token '<mask>' | --dict DICT) [--workers 2]

Runs `fairseq-preprocess --joined-dictionary` on DIR/{train,valid,test}.{src,tgt} in this process.
With --mask-token the dictionary is built first, exactly as fairseq-preprocess builds it (fairseq's
tokenizer, symbols sorted by count, padded to a multiple of 8), except that the mask token is added
with count 0: it sorts after every word of the data and before the `madeupwordNNNN` padding, so every
other symbol gets the index fairseq-preprocess would give it. With --dict an existing dictionary is
reused: the noisy data-bin is binarized with the clean one's, so both share their vocabulary and a
model trained on one runs on the other.
"""

import argparse
import os


def build_dictionary(train_paths, mask_token, workers=1):
    """Returns the joined fairseq `Dictionary` of `train_paths` with `mask_token` added (count 0)."""
    from fairseq.data import Dictionary
    from fairseq.tokenizer import tokenize_line

    dictionary = Dictionary()
    for path in train_paths:
        Dictionary.add_file_to_dictionary(path, dictionary, tokenize_line, workers)
    if mask_token:
        dictionary.add_symbol(mask_token, n=0)
    dictionary.finalize(threshold=-1, nwords=-1, padding_factor=8)
    return dictionary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--src", required=True)
    parser.add_argument("--tgt", required=True)
    parser.add_argument("--subword-dir", required=True)
    parser.add_argument("--destdir", required=True)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--mask-token", help="build the dictionary from the training data, plus this token")
    group.add_argument("--dict", help="reuse this fairseq dictionary")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)

    from fairseq import options
    from fairseq_cli import preprocess

    prefix = os.path.join(args.subword_dir, "{}")
    os.makedirs(args.destdir, exist_ok=True)
    dict_path = args.dict
    if dict_path is None:
        dict_path = os.path.join(args.destdir, "dict.joined.txt")
        train = [prefix.format(f"train.{lang}") for lang in (args.src, args.tgt)]
        build_dictionary(train, args.mask_token, args.workers).save(dict_path)
    preprocess_args = options.get_preprocessing_parser().parse_args([
        "--source-lang", args.src, "--target-lang", args.tgt,
        "--trainpref", prefix.format("train"), "--validpref", prefix.format("valid"),
        "--testpref", prefix.format("test"), "--destdir", args.destdir,
        "--srcdict", dict_path, "--joined-dictionary", "--workers", str(args.workers),
    ])
    preprocess.main(preprocess_args)
    if args.dict is None:
        os.remove(dict_path)  # now dict.{src,tgt}.txt


if __name__ == "__main__":
    main()
