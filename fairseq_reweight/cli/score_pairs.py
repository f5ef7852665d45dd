"""Score every sentence pair of a split with translation models, for filtering a noisy corpus.

    fairseq-reweight-score DATA --path CKPT [--subset train] [--output FILE]
        [--reverse-path CKPT | --reference-path CKPT | --teacher] [--noise-sidecar FILE] [--max-tokens 4096] [--cpu]

(also ``python -m fairseq_reweight.cli.score_pairs``). Writes one score per pair of the split, one a
line in corpus (data-bin) order, like bicleaner's scores. Every model runs in eval mode (no dropout),
teacher-forced; H(model) is the per-token mean cross-entropy of the target given the source in nats,
``-1/|y| sum_t log p(y_t | y_<t, x)`` over the target's tokens and its end of sentence (no label
smoothing). The score is

- ``H_f`` of the ``--path`` model (source -> target), lower = better (more likely pair);
- with ``--reverse-path`` (a target -> source model, trained on the same data-bin with
  ``--source-lang``/``--target-lang`` swapped), the dual conditional cross-entropy of Junczys-Dowmunt
  (2018), "Dual Conditional Cross-Entropy Filtering of Noisy Parallel Corpora", WMT18 shared task
  papers: ``|H_f - H_r| + (H_f + H_r) / 2``, lower = better (both directions find the pair likely,
  and equally so);
- with ``--reference-path`` (a model trained on trusted data, e.g. the ``--path`` model fine-tuned on
  it), the excess loss ``H_path - H_reference``: Wang, Watanabe, Hughes, Nakagawa, Chelba (2018),
  "Denoising Neural Machine Translation Training with Trusted Data and Online Data Selection",
  WMT18, whose noise score is ``(log p_trusted(y|x) - log p_noisy(y|x)) / |y|``, the same number.
  Its sign is the opposite of the other two: HIGHER = better (the trusted model likes the pair more
  than the noisy one does); a noisy pair scores low;
- with ``--teacher`` (``--path`` a checkpoint trained with ``--task reweight_translation`` and a
  teacher): the trained teacher's mean raw weight over the pair's target tokens, computed as
  ``fairseq-reweight-inspect`` does (student in eval mode; the teacher's inputs as in training),
  HIGHER = better: the teacher as a filter.

``--noise-sidecar`` (0/1 per pair, e.g. ``data-bin/train.noise``) only reports the ROC AUC of the
scores as a noise detector (the worse side of the score => noisy); it never enters the score.
Pairs longer than a model's maximum positions cannot be scored; they get ``inf`` (``-inf`` for the
excess loss: the worst score either way), as fairseq-train skips them too.
"""
import argparse
import os
import sys
import time
from typing import Optional

import numpy as np
import torch
from fairseq import checkpoint_utils, utils

import fairseq_reweight  # noqa: F401  (registers the components and the safe-loading allow-list)
from fairseq_reweight.cli.common import check_checkpoint_and_data, run_command
from fairseq_reweight.cli.inspect_teacher import load_teacher_checkpoint
from fairseq_reweight.core.errors import ReweightConfigError
from fairseq_reweight.core.metrics import read_noise_sidecar, roc_auc_low_weight_noisy
from fairseq_reweight.nmt.noise_monitor import score_sentences


def dual_conditional_cross_entropy(h_forward, h_reverse):
    """Junczys-Dowmunt (2018): ``|H_f - H_r| + (H_f + H_r) / 2``, lower = better."""
    h_forward, h_reverse = np.asarray(h_forward, dtype=np.float64), np.asarray(h_reverse, dtype=np.float64)
    return np.abs(h_forward - h_reverse) + 0.5 * (h_forward + h_reverse)


def excess_loss(h_student, h_reference):
    """Wang et al. (2018): ``H_student - H_reference``, HIGHER = better (cleaner)."""
    return np.asarray(h_student, dtype=np.float64) - np.asarray(h_reference, dtype=np.float64)


def noise_auc(scores, noisy, higher_is_worse: bool = True) -> float:
    """ROC AUC of the score as a noise detector: the probability that a random noisy pair is on the
    worse side of a random clean one (ties half); 0.5 = no better than chance, NaN with one class."""
    badness = np.asarray(scores, dtype=np.float64) * (1.0 if higher_is_worse else -1.0)
    finite = badness[np.isfinite(badness)]
    top = finite.max() + 1.0 if finite.size else 1.0
    badness = np.nan_to_num(badness, nan=top, posinf=top, neginf=(finite.min() - 1.0 if finite.size else -1.0))
    return roc_auc_low_weight_noisy(-badness, noisy)


def load_model(path: str, data: str, use_cuda: bool, what: str):
    """(task, model in eval mode) of a translation checkpoint, with DATA as its data-bin."""
    if not os.path.isfile(path):
        raise ReweightConfigError(f"{what} checkpoint {path!r} not found: give a checkpoint_*.pt written by fairseq-train")
    check_checkpoint_and_data(path, data)
    try:
        models, _cfg, task = checkpoint_utils.load_model_ensemble_and_task([path], arg_overrides={"data": data})
    except RuntimeError as error:
        if "size mismatch" not in str(error):
            raise
        raise ReweightConfigError(f"dictionary mismatch: {what} checkpoint {path} does not fit the dictionary of "
                                  f"{data} (its embeddings have another vocabulary size): give the data-bin it was "
                                  "trained on") from None
    except FileNotFoundError as error:
        raise ReweightConfigError(f"{what} checkpoint {path}: {error} (is {data} a fairseq-preprocess data-bin "
                                  "of its languages?)") from None
    model = models[0]
    if use_cuda:
        model.cuda()
    model.eval()
    return task, model


def load_split(task, subset: str, data: str):
    try:
        task.load_dataset(subset, combine=False, epoch=1)
    except FileNotFoundError as error:
        raise ReweightConfigError(f"split {subset!r} not found in {data} ({error})") from None
    return task.dataset(subset)


def sentence_cross_entropy(task, model, dataset, max_tokens: int, batch_size: Optional[int] = None,
                           log_interval: int = 100, what: str = "model") -> np.ndarray:
    """Per-token mean target NLL (nats) of every pair of ``dataset``, by pair index; inf where a
    pair is longer than the model's maximum positions."""
    device = next(model.parameters()).device
    scores = np.full(len(dataset), np.inf)
    iterator = task.get_batch_iterator(
        dataset=dataset, max_tokens=max_tokens, max_sentences=batch_size,
        max_positions=utils.resolve_max_positions(task.max_positions(), model.max_positions()),
        ignore_invalid_inputs=True, required_batch_size_multiple=1, seed=1, num_workers=0, epoch=1,
        disable_iterator_cache=True,
    ).next_epoch_itr(shuffle=False)
    pad = task.target_dictionary.pad()
    start, done = time.time(), 0
    for number, sample in enumerate(iterator, 1):
        if not sample:
            continue
        if device.type == "cuda":
            sample = utils.move_to_cuda(sample, device=device)
        with torch.no_grad():
            net_output = model(**sample["net_input"])
            lprobs = model.get_normalized_probs(net_output, log_probs=True).float()
            target = model.get_targets(sample, net_output)
            nll = -lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            mask = target.ne(pad)
            mean = (nll * mask).sum(1) / mask.sum(1).clamp_min(1)
        scores[sample["id"].cpu().numpy()] = mean.double().cpu().numpy()
        done += len(sample["id"])
        if log_interval and number % log_interval == 0:
            progress(f"{what}: {done}/{len(dataset)} pairs scored ({time.time() - start:.0f}s)")
    skipped = int(np.isinf(scores).sum())
    progress(f"{what}: {done}/{len(dataset)} pairs scored in {time.time() - start:.0f}s"
             + (f"; {skipped} longer than the model's max positions (score inf)" if skipped else ""))
    return scores


def progress(message: str) -> None:
    print(f"fairseq-reweight-score | {message}", file=sys.stderr, flush=True)


def check_pair(task, other_task, path: str, other_path: str, reverse: bool) -> None:
    """The second model's languages and dictionaries match the first's (swapped for ``reverse``)."""
    src, tgt = task.cfg.source_lang, task.cfg.target_lang
    want = (tgt, src) if reverse else (src, tgt)
    got = (other_task.cfg.source_lang, other_task.cfg.target_lang)
    if got != want:
        what = "--reverse-path" if reverse else "--reference-path"
        raise ReweightConfigError(f"{what} {other_path} translates {got[0]}->{got[1]}, expected {want[0]}->{want[1]} "
                                  f"(--path {path} translates {src}->{tgt})")
    dicts = (task.target_dictionary, task.source_dictionary) if reverse else (task.source_dictionary,
                                                                           task.target_dictionary)
    if [d.symbols for d in dicts] != [other_task.source_dictionary.symbols, other_task.target_dictionary.symbols]:
        raise ReweightConfigError(f"dictionary mismatch between {path} and {other_path}")


def teacher_scores(path: str, data: str, subset: str, use_cuda: bool, max_tokens: int,
                   batch_size: Optional[int]) -> np.ndarray:
    """The teacher's mean raw weight of every pair of ``subset`` (HIGHER = better), -inf where a pair
    is longer than the student's maximum positions."""
    loaded = load_teacher_checkpoint(path, data, use_cuda)
    dataset = load_split(loaded.task, subset, data)
    max_positions = utils.resolve_max_positions(loaded.task.max_positions(), loaded.model.max_positions())
    start = time.time()
    sentences = score_sentences(loaded.driver, loaded.model, loaded.criterion, dataset, np.arange(len(dataset)),
                                max_positions, max_tokens=max_tokens, batch_size=batch_size)
    scores = np.full(len(dataset), -np.inf)
    scores[sentences.ids] = sentences.mean_weight
    progress(f"--teacher: {len(sentences.ids)}/{len(dataset)} pairs scored in {time.time() - start:.0f}s"
             + (f"; {sentences.skipped} longer than the model's max positions (score -inf)" if sentences.skipped
                else ""))
    return scores


def score(args):
    """(scores in corpus order, higher_is_worse) of the command's options."""
    if sum(map(bool, (args.reverse_path, args.reference_path, args.teacher))) > 1:
        raise ReweightConfigError("give one of --reverse-path (dual conditional cross-entropy), --reference-path "
                                  "(excess loss) and --teacher (the teacher's weights), not several")
    if args.max_tokens < 1:
        raise ReweightConfigError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    use_cuda = torch.cuda.is_available() and not args.cpu
    if args.teacher:
        return teacher_scores(args.path, args.data, args.subset, use_cuda, args.max_tokens, args.batch_size), False
    task, model = load_model(args.path, args.data, use_cuda, "--path")
    dataset = load_split(task, args.subset, args.data)
    second_path = args.reverse_path or args.reference_path
    second = None
    if second_path:  # checked before the long part
        second = load_model(second_path, args.data, use_cuda,
                            "--reverse-path" if args.reverse_path else "--reference-path")
        check_pair(task, second[0], args.path, second_path, reverse=bool(args.reverse_path))
    h_forward = sentence_cross_entropy(task, model, dataset, args.max_tokens, args.batch_size, args.log_interval,
                                       "--path")
    if second is None:
        return h_forward, True
    other_dataset = load_split(second[0], args.subset, args.data)
    if len(other_dataset) != len(dataset):
        raise ReweightConfigError(f"split {args.subset!r} has {len(dataset)} pairs for --path but "
                                  f"{len(other_dataset)} for {second_path}")
    h_second = sentence_cross_entropy(second[0], second[1], other_dataset, args.max_tokens, args.batch_size,
                                      args.log_interval, "--reverse-path" if args.reverse_path else "--reference-path")
    if args.reverse_path:
        return dual_conditional_cross_entropy(h_forward, h_second), True
    excess = excess_loss(h_forward, h_second)
    excess[~(np.isfinite(h_forward) & np.isfinite(h_second))] = -np.inf  # unscorable: the worst
    return excess, False


def run(args) -> dict:
    """Score, write the scores, report the noise AUC; returns the figures."""
    scores, higher_is_worse = score(args)
    kind = ("dcce" if args.reverse_path else "excess-loss" if args.reference_path else "teacher" if args.teacher
            else "ce")
    lines = "".join(f"{value:.6f}\n" for value in scores)
    if args.output in (None, "-"):
        sys.stdout.write(lines)
        sys.stdout.flush()
    else:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(lines)
        progress(f"wrote {len(scores)} {kind} scores ({'lower' if higher_is_worse else 'higher'} = better) "
                 f"to {args.output}")
    figures = {"scores": scores, "kind": kind, "higher_is_worse": higher_is_worse}
    if args.noise_sidecar:
        noisy = read_noise_sidecar(args.noise_sidecar, len(scores))
        figures["noise_auc"] = noise_auc(scores, noisy, higher_is_worse)
        progress(f"ROC AUC of the {kind} score as a noise detector against {args.noise_sidecar} (reporting only): "
                 f"{figures['noise_auc']:.4f}")
    return figures


def build_parser():
    parser = argparse.ArgumentParser(
        prog="fairseq-reweight-score",
        description="One score per sentence pair of a split, in corpus order: cross-entropy, dual conditional "
        "cross-entropy (--reverse-path), excess loss over a trusted reference (--reference-path) or a trained "
        "teacher's weight (--teacher).",
    )
    parser.add_argument("data", help="fairseq data-bin directory")
    parser.add_argument("--path", required=True, help="source->target checkpoint (the student)")
    parser.add_argument("--subset", default="train", help="split to score (default train)")
    parser.add_argument("--reverse-path", default=None,
                        help="target->source checkpoint: output the dual conditional cross-entropy "
                        "|H_f - H_r| + (H_f + H_r)/2 (Junczys-Dowmunt 2018; lower = better)")
    parser.add_argument("--reference-path", default=None,
                        help="checkpoint trained on trusted data: output H_path - H_reference (Wang et al. 2018; "
                        "HIGHER = better, noisy pairs score low)")
    parser.add_argument("--teacher", action="store_true",
                        help="--path is a checkpoint of --task reweight_translation with a teacher: output the "
                        "teacher's mean weight of each pair's target tokens (HIGHER = better)")
    parser.add_argument("--output", default="-", help="score file, one line per pair (default: stdout)")
    parser.add_argument("--noise-sidecar", default=None,
                        help="0/1 noise labels of the split: report the scores' noise AUC (never used for the score)")
    parser.add_argument("--max-tokens", type=int, default=4096, help="tokens per batch (default 4096)")
    parser.add_argument("--batch-size", type=int, default=None, help="pairs per batch at most (default: no limit)")
    parser.add_argument("--log-interval", type=int, default=100, help="a progress line every N batches (0: off)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is there")
    return parser


def main(argv=None):
    return run(build_parser().parse_args(argv))


def cli_main(argv=None):
    run_command(main, argv)


if __name__ == "__main__":
    cli_main()
