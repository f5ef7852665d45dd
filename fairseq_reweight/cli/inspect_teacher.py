"""What did the teacher learn? Per-sentence and per-token weights of a reweight checkpoint.

    fairseq-reweight-inspect DATA --path CHECKPOINT [--noise-sidecar DATA/train.noise] \\
        [--subset train] [--max-sentences 5000] [--max-tokens 4096] [--cpu] [--out DIR]

(also installed as ``fairseq-reweight-inspect``). Loads the student and its teacher from a checkpoint
trained with ``--task reweight_translation`` and a teacher, runs the teacher over (a random subset of)
a split of DATA as training computes its inputs, with the student in eval mode (see
:mod:`fairseq_reweight.nmt.noise_monitor`), and writes to ``--out``:

- ``weights.tsv``: one row per sentence: ``id`` (data-bin line), ``noisy`` (with a sidecar),
  ``n_tokens`` (target tokens, eos included), ``mean_weight`` (mean raw teacher weight of its
  tokens), ``mean_loss`` (mean label-smoothed token cross-entropy, the training loss, in nats),
  ``mean_nll`` (mean plain token NLL, nats), ``src``, ``tgt`` (text, BPE kept);
- ``tokens.tsv``: one row per target token: ``id``, ``position``, ``token``, ``weight``, ``loss``,
  ``nll``;
- ``summary.txt``: the table printed at the end;
- ``weight_hist.png`` (weights of noisy vs clean sentences), ``weight_vs_loss.png`` and
  ``weight_by_frequency.png`` (mean token weight by the token's frequency on the target side of the
  split: the translation analogue of the paper's weight-by-class plot).

With a noise sidecar (``--noise-sidecar``; ``DATA/<subset>.noise`` is used when it exists) the table
gives the ROC AUC of "low weight => noisy pair" and the mean weight of noisy and clean sentences.
"""
import argparse
import os
from dataclasses import dataclass
from typing import List

import numpy as np
import torch
from fairseq import checkpoint_utils, utils

import fairseq_reweight  # noqa: F401  (registers the components and the safe-loading allow-list)
from fairseq_reweight.cli.common import add_checkpoint_arguments, check_checkpoint_and_data, command, resolve_sidecar
from fairseq_reweight.core.errors import ReweightConfigError
from fairseq_reweight.core.metrics import noise_summary, read_noise_sidecar, select_sentences, spearman
from fairseq_reweight.nmt.noise_monitor import score_sentences

PLOT_NAMES = ("weight_hist.png", "weight_vs_loss.png", "weight_by_frequency.png")


@dataclass
class LoadedTeacher:
    """A reweight checkpoint, ready to score: fairseq task, student, criterion and driver."""

    task: object
    model: object
    criterion: object
    driver: object
    num_updates: int
    teacher_kind: str


def load_teacher_checkpoint(path: str, data: str, use_cuda: bool) -> LoadedTeacher:
    """Student and teacher of a ``reweight_translation`` checkpoint, with DATA as its data-bin.

    Raises:
        ReweightConfigError: missing file, or a checkpoint without a teacher.
    """
    check_checkpoint_and_data(path, data)
    state = checkpoint_utils.load_checkpoint_to_cpu(path, arg_overrides={"data": data})
    task_cfg = state["cfg"]["task"] if state.get("cfg") is not None else None
    task_name = task_cfg.get("_name") if task_cfg is not None else None
    if task_name != "reweight_translation" or task_cfg.get("reweight_teacher") == "none":
        how = f"--task {task_name}" if task_name != "reweight_translation" else "--reweight-teacher none"
        raise ReweightConfigError(
            f"checkpoint {path} has no teacher (trained with {how}): give a checkpoint trained with "
            "--task reweight_translation --reweight-teacher deep or surface"
        )
    if not any(key.startswith("reweight.weigher.teacher.") for key in (state.get("criterion") or {})):
        raise ReweightConfigError(
            f"checkpoint {path} holds no teacher parameters in its criterion state: give a checkpoint "
            "written by fairseq-train with --task reweight_translation and a teacher"
        )
    criterion_state = state["criterion"]
    num_updates = int(state["optimizer_history"][-1].get("num_updates", 0)) if state.get("optimizer_history") else 0
    # Meta-validation is not used here: point it at a split that exists so that no valid split is needed.
    task_cfg.meta_valid_subset = state["cfg"]["dataset"]["train_subset"]
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([path], state=state)
    model = models[0]
    criterion = task.build_criterion(cfg.criterion)
    criterion.load_state_dict(criterion_state, strict=True)
    driver = task.driver
    driver.update_num = num_updates  # the "progress" feature, as at the checkpoint's last update
    if use_cuda:
        model.cuda()
        criterion.cuda()
    model.eval()
    return LoadedTeacher(task, model, criterion, driver, num_updates, cfg.task.reweight_teacher)


# -- outputs ----------------------------------------------------------------------------------------
def write_weights_tsv(path, scores, src_texts, tgt_texts, noisy=None):
    """``weights.tsv``: one row per sentence (see the module docstring)."""
    header = ["id"] + (["noisy"] if noisy is not None else []) + ["n_tokens", "mean_weight", "mean_loss", "mean_nll", "src", "tgt"]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\t".join(header) + "\n")
        for i, sentence_id in enumerate(scores.ids):
            row = [str(sentence_id)] + ([str(int(noisy[i]))] if noisy is not None else [])
            row += [str(len(scores.tokens[i])), f"{scores.weights[i].mean():.6f}", f"{scores.losses[i].mean():.6f}",
                    f"{scores.nll[i].mean():.6f}", _one_field(src_texts[i]), _one_field(tgt_texts[i])]
            f.write("\t".join(row) + "\n")


def write_tokens_tsv(path, scores, tgt_dict):
    """``tokens.tsv``: one row per target token (eos included)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("id\tposition\ttoken\tweight\tloss\tnll\n")
        for i, sentence_id in enumerate(scores.ids):
            for position, (token, weight, loss, nll) in enumerate(
                zip(scores.tokens[i], scores.weights[i], scores.losses[i], scores.nll[i])
            ):
                f.write(f"{sentence_id}\t{position}\t{_one_field(tgt_dict[int(token)])}\t{weight:.6f}\t{loss:.6f}\t{nll:.6f}\n")


def _one_field(text: str) -> str:
    return text.replace("\t", " ").replace("\n", " ")


def target_frequencies(dataset, vocab_size: int) -> np.ndarray:
    """How often each token index occurs on the target side of ``dataset`` (eos included)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for i in range(len(dataset)):
        counts += np.bincount(dataset.tgt[i].numpy(), minlength=vocab_size)[:vocab_size]
    return counts


def frequency_buckets(token_ids: np.ndarray, frequencies: np.ndarray, special_ids=()):
    """Bucket of every token: its own bucket for each special symbol (eos), else the decade of its
    target-side frequency (1-9, 10-99, ...). Returns (bucket index per token, bucket labels)."""
    labels: List[str] = []
    bucket_of_label = {}
    special_ids = list(special_ids)
    result = np.empty(len(token_ids), dtype=np.int64)
    decades = np.floor(np.log10(np.maximum(frequencies[token_ids], 1))).astype(np.int64)
    keys = [("special", int(t)) if int(t) in special_ids else ("decade", int(d)) for t, d in zip(token_ids, decades)]
    order = sorted(set(keys), key=lambda k: (k[0] == "decade", k[1]))
    for key in order:
        bucket_of_label[key] = len(labels)
        labels.append(f"special {key[1]}" if key[0] == "special" else _decade_label(key[1]))
    for n, key in enumerate(keys):
        result[n] = bucket_of_label[key]
    return result, labels


def _decade_label(decade: int) -> str:
    """``[10, 100)`` for decade 1, ``[1k, 10k)`` for decade 3, ..."""
    def short(value):
        for unit, size in (("M", 10**6), ("k", 10**3)):
            if value >= size:
                return f"{value // size}{unit}"
        return str(value)

    return f"[{short(10**decade)}, {short(10 ** (decade + 1))})"


def make_plots(out_dir, scores, noisy, token_buckets, bucket_labels, token_noisy):
    """The three PNGs (see the module docstring); returns their paths."""
    # imported here: matplotlib would slow every start (--help too); no pyplot: no GUI backend, no global state
    from matplotlib.figure import Figure

    weights, losses = scores.mean_weight, scores.mean_loss
    groups = [("all sentences", np.ones(len(weights), dtype=bool), "tab:blue")]
    if noisy is not None:
        groups = [("clean", noisy == 0, "tab:blue"), ("noisy", noisy == 1, "tab:red")]
    paths = [os.path.join(out_dir, name) for name in PLOT_NAMES]

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    bins = np.linspace(weights.min(), weights.max(), 41) if len(weights) and weights.max() > weights.min() else 20
    for label, keep, colour in groups:
        if keep.any():
            ax.hist(weights[keep], bins=bins, density=True, alpha=0.5, color=colour, label=f"{label} ({keep.sum()})")
    ax.set_xlabel("sentence weight (mean raw teacher weight of its tokens)")
    ax.set_ylabel("density")
    ax.set_title("teacher weights" + (" of noisy vs clean pairs" if noisy is not None else ""))
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths[0], dpi=100)

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for label, keep, colour in groups:
        if keep.any():
            ax.scatter(losses[keep], weights[keep], s=6, alpha=0.5, color=colour, label=label, rasterized=True)
    ax.set_xlabel("sentence training loss (mean label-smoothed token cross-entropy, nats)")
    ax.set_ylabel("sentence weight")
    ax.set_title("teacher weight vs training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths[1], dpi=100)

    token_weights = np.concatenate(scores.weights) if scores.weights else np.zeros(0)
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    positions = np.arange(len(bucket_labels))
    token_groups = [("all tokens", np.ones(len(token_weights), dtype=bool), "tab:blue")]
    if token_noisy is not None:
        token_groups = [("tokens of clean pairs", token_noisy == 0, "tab:blue"), ("tokens of noisy pairs", token_noisy == 1, "tab:red")]
    width = 0.8 / len(token_groups)
    for n, (label, keep, colour) in enumerate(token_groups):
        counts = np.bincount(token_buckets[keep], minlength=len(bucket_labels))
        sums = np.bincount(token_buckets[keep], weights=token_weights[keep], minlength=len(bucket_labels))
        means = np.divide(sums, counts, out=np.full(len(counts), np.nan), where=counts > 0)
        x = positions + (n - (len(token_groups) - 1) / 2) * width
        bars = ax.bar(x, np.nan_to_num(means), width=width, color=colour, alpha=0.8, label=label)
        for bar, count in zip(bars, counts):
            if count:
                ax.annotate(str(count), (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                            va="bottom", fontsize=7)
    ax.set_xticks(positions)
    ax.set_xticklabels(bucket_labels, rotation=30, ha="right")
    ax.set_xlabel("frequency of the token on the target side of the split (number on a bar: tokens scored)")
    ax.set_ylabel("mean raw teacher weight")
    ax.set_title("teacher weight by target token frequency")
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths[2], dpi=100)
    return paths


# -- the command ------------------------------------------------------------------------------------
def run(args) -> dict:
    """Score, write the outputs, return the figures (and print the table)."""
    if args.max_sentences is not None and args.max_sentences < 1:
        raise ReweightConfigError(f"--max-sentences must be >= 1, got {args.max_sentences}")
    if args.max_tokens is None and args.batch_size is None:
        args.max_tokens = 4096
    use_cuda = torch.cuda.is_available() and not args.cpu
    loaded = load_teacher_checkpoint(args.path, args.data, use_cuda)
    task = loaded.task
    try:
        task.load_dataset(args.subset, combine=False, epoch=1)
    except FileNotFoundError as err:
        raise ReweightConfigError(f"--subset {args.subset}: no such split in {args.data} ({err})") from None
    dataset = task.dataset(args.subset)
    sidecar = resolve_sidecar(args)
    all_noisy = read_noise_sidecar(sidecar, len(dataset)) if sidecar else None
    indices = select_sentences(len(dataset), args.max_sentences, args.seed)
    max_positions = utils.resolve_max_positions(task.max_positions(), loaded.model.max_positions())
    scores = score_sentences(loaded.driver, loaded.model, loaded.criterion, dataset, indices, max_positions,
                             max_tokens=args.max_tokens, batch_size=args.batch_size)
    noisy = all_noisy[scores.ids] if all_noisy is not None else None

    os.makedirs(args.out, exist_ok=True)
    src_dict, tgt_dict = task.source_dictionary, task.target_dictionary
    src_texts = [src_dict.string(dataset.src[int(i)]) for i in scores.ids]
    tgt_texts = [tgt_dict.string(dataset.tgt[int(i)]) for i in scores.ids]
    weights_path, tokens_path = os.path.join(args.out, "weights.tsv"), os.path.join(args.out, "tokens.tsv")
    write_weights_tsv(weights_path, scores, src_texts, tgt_texts, noisy)
    write_tokens_tsv(tokens_path, scores, tgt_dict)

    token_ids = np.concatenate(scores.tokens) if scores.tokens else np.zeros(0, dtype=np.int64)
    token_noisy = np.repeat(noisy, scores.n_tokens) if noisy is not None else None
    frequencies = target_frequencies(dataset, len(tgt_dict))
    buckets, labels = frequency_buckets(token_ids, frequencies, special_ids=[tgt_dict.eos()])
    labels = [tgt_dict[int(label.split()[1])] if label.startswith("special ") else label for label in labels]
    plot_paths = make_plots(args.out, scores, noisy, buckets, labels, token_noisy)

    token_weights = np.concatenate(scores.weights) if scores.weights else np.zeros(0)
    lines = [
        f"checkpoint: {args.path} (update {loaded.num_updates}, {loaded.teacher_kind} teacher)",
        f"data: {args.data}, split {args.subset}: {len(scores.ids)} of {len(dataset)} sentences scored"
        + (f" ({scores.skipped} longer than the model's max positions skipped)" if scores.skipped else "")
        + f", {len(token_ids)} target tokens",
        "weight = raw teacher weight (sigmoid output, before normalisation), student in eval mode; "
        "sentence weight = mean over its target tokens (eos included)",
        f"loss = label-smoothed token cross-entropy (epsilon {loaded.criterion.eps:g}, nats); nll = plain token NLL",
        f"mean sentence weight {scores.mean_weight.mean():.4f} (std {scores.mean_weight.std():.4f}); "
        f"token weights min {token_weights.min():.4f} max {token_weights.max():.4f}",
        f"Spearman correlation of sentence weight and loss: {spearman(scores.mean_weight, scores.mean_loss):.4f}",
    ]
    result = {"num_sentences": len(scores.ids), "num_tokens": len(token_ids), "weights_tsv": weights_path,
              "tokens_tsv": tokens_path, "plots": plot_paths}
    if "<mask>" in tgt_dict.indices:
        is_mask = token_ids == tgt_dict.index("<mask>")
        if is_mask.any():
            lines.append(f"mean weight of <mask> target tokens {token_weights[is_mask].mean():.4f} "
                         f"({is_mask.sum()}), of all other tokens {token_weights[~is_mask].mean():.4f}")
    if noisy is not None:
        summary = noise_summary(scores.mean_weight, noisy)
        lines += [f"noise sidecar: {sidecar}", summary.table()]
        result["summary"] = summary
    else:
        lines.append("no noise sidecar: no AUC (give --noise-sidecar, e.g. data-bin/train.noise)")
    summary_path = os.path.join(args.out, "summary.txt")
    with open(summary_path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    result["summary_txt"] = summary_path
    print("\n".join(lines))
    print("wrote: " + ", ".join([weights_path, tokens_path, summary_path] + plot_paths))
    return result


def build_parser():
    parser = argparse.ArgumentParser(
        prog="fairseq-reweight-inspect",
        description="Run the teacher of a reweight checkpoint over a split; write per-sentence and per-token "
        "weights and losses (TSV), plots (PNG) and, with a noise sidecar, the ROC AUC of 'low weight => noisy'.",
    )
    add_checkpoint_arguments(parser, "checkpoint trained with --task reweight_translation and a teacher", "inspect")
    parser.add_argument("--subset", default="train", help="split to score (default train)")
    parser.add_argument("--max-sentences", type=int, default=None,
                        help="score a random subset of this many sentences (default: all)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the random subset (default 1)")
    parser.add_argument("--max-tokens", type=int, default=None, help="tokens per batch (default 4096)")
    parser.add_argument("--batch-size", type=int, default=None, help="sentences per batch")
    return parser


main, cli_main = command(build_parser, run, "inspect")  # cli_main: fairseq-reweight-inspect


if __name__ == "__main__":
    cli_main()
