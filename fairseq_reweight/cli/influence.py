"""Which training tokens does the meta-objective want up-weighted? First-order influence at a checkpoint.

    fairseq-reweight-influence DATA --path CHECKPOINT [--noise-sidecar DATA/train.noise] \\
        [--meta-valid-loss {criterion,nll}] [--max-sentences 2000] [--cpu] [--out DIR]

(also installed as ``fairseq-reweight-influence``). For every target token i of (a random subset of)
the training split it computes

    s_i = grad l_i(theta) . grad L_valid(theta)

at the checkpoint's parameters theta: how much one SGD step on token i alone lowers the validation
loss (per unit of learning rate and weight). The teacher's gradient through one plain SGD step is
``-lr * sum_i s_i * dw_i/domega``, so a teacher trained on this objective raises the weights of the
tokens with large s_i (the normalised weights: above the batch's mean). It works on any translation
checkpoint, a pretrained student included, before any teacher is trained: with a noise sidecar it
tells whether the objective, at this student, points the teacher at the clean pairs (ROC AUC of
"low influence => noisy pair" above 0.5) or at the noisy ones (below 0.5). It ignores momentum, the
longer horizon of B > 1 replayed steps and the normalisation; ``inspect`` shows what a trained
teacher actually learned.

All s_i come from one forward pass per batch with dual parameters theta + eps * grad L_valid
(forward-mode AD), after one backward pass over the validation split; the student is in eval mode
(no dropout) for both. The training token loss is the criterion's (label-smoothed with the
checkpoint's ``--label-smoothing``); the validation loss is the criterion's or, with
``--meta-valid-loss nll``, the plain NLL, as in training.

As a control every token also gets the influence of a *random* label at its position (a uniformly
drawn word of the target dictionary): when that is positive on average, training on wrong labels
lowers the validation loss (the student is over-confident on it) and the objective cannot tell
noise from signal by its gradient.

Writes to ``--out``: ``tokens.tsv`` (``id``, ``position``, ``token``, ``noisy``, ``loss``,
``influence``, ``influence_random_label``), ``sentences.tsv`` (``id``, ``noisy``, ``n_tokens``,
``mean_loss``, ``mean_influence``) and ``summary.txt`` (the table printed at the end).
"""
import argparse
import os
from typing import List, Optional

import numpy as np
import torch
from fairseq import checkpoint_utils, utils
from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss

import fairseq_reweight  # noqa: F401  (registers the components and the safe-loading allow-list)
from fairseq_reweight.cli.common import add_checkpoint_arguments, check_checkpoint_and_data, command, resolve_sidecar
from fairseq_reweight.cli.influence_layers import influence_by_group, layer_table
from fairseq_reweight.cli.influence_tokens import TokenInfluence, sentence_means, token_influence
from fairseq_reweight.core import math_attention
from fairseq_reweight.core.errors import ReweightConfigError
from fairseq_reweight.core.metrics import read_noise_sidecar, roc_auc_low_weight_noisy, select_sentences, spearman


def load_checkpoint(path: str, data: str, use_cuda: bool):
    """(task, model, label smoothing) of any fairseq translation checkpoint, with DATA as its data-bin."""
    check_checkpoint_and_data(path, data)
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([path], arg_overrides={"data": data})
    model = models[0]
    if use_cuda:
        model.cuda()
    criterion_cfg = cfg.get("criterion") if cfg is not None else None
    eps = float(criterion_cfg.get("label_smoothing", 0.0) or 0.0) if criterion_cfg is not None else 0.0
    return task, model, eps


def validation_gradient(task, model, subset: str, eps: float, valid_loss: str, max_tokens: int, device):
    """(token-averaged validation loss, its gradient as a {name: tensor} dict, tokens) over SUBSET."""
    dataset = task.dataset(subset)
    indices = dataset.ordered_indices()
    batches = dataset.batch_by_size(indices, max_tokens=max_tokens)
    params = dict(model.named_parameters())
    grads = {name: torch.zeros_like(p) for name, p in params.items()}
    total_loss, total_tokens = 0.0, 0
    pad = task.target_dictionary.pad()
    model.eval()
    for batch in batches:
        sample = dataset.collater([dataset[int(i)] for i in batch])
        if device.type == "cuda":
            sample = utils.move_to_cuda(sample, device=device)
        with math_attention():
            lprobs = model.get_normalized_probs(model(**sample["net_input"]), log_probs=True)
        loss, nll = label_smoothed_nll_loss(lprobs.reshape(-1, lprobs.size(-1)), sample["target"].reshape(-1), eps,
                                            ignore_index=pad, reduce=True)
        objective = loss if valid_loss == "criterion" else nll
        for name, grad in zip(params, torch.autograd.grad(objective, list(params.values()), allow_unused=True)):
            if grad is not None:
                grads[name].add_(grad)
        total_loss += float(objective.detach())
        total_tokens += int(sample["target"].ne(pad).sum())
    if total_tokens == 0:
        raise ReweightConfigError(f"validation split {subset!r} has no target tokens")
    return total_loss / total_tokens, {n: g / total_tokens for n, g in grads.items()}, total_tokens


def group_table(result: TokenInfluence, token_noisy: Optional[np.ndarray], mask_id: Optional[int]) -> List[str]:
    """The per-group lines of the summary: tokens, mean loss, mean influence, share > 0, random-label control."""
    groups = [("all tokens", np.ones(len(result.tokens), dtype=bool))]
    if token_noisy is not None:
        groups += [("tokens of clean pairs", token_noisy == 0), ("tokens of noisy pairs", token_noisy == 1)]
        if mask_id is not None and (result.tokens == mask_id).any():
            is_mask = result.tokens == mask_id
            groups += [("  noisy pairs, <mask> targets", (token_noisy == 1) & is_mask),
                       ("  noisy pairs, other targets", (token_noisy == 1) & ~is_mask)]
    lines = [f"{'group':32s} {'tokens':>8s} {'loss':>7s} {'influence':>11s} {'> 0':>6s} {'random label':>13s}"]
    for name, select in groups:
        n = int(select.sum())
        if n == 0:
            lines.append(f"{name:32s} {0:8d}")
            continue
        lines.append(
            f"{name:32s} {n:8d} {result.loss[select].mean():7.3f} {result.influence[select].mean():11.4g} "
            f"{(result.influence[select] > 0).mean():6.2f} {result.influence_random_label[select].mean():13.4g}"
        )
    return lines


def write_tables(out_dir, result: TokenInfluence, tgt_dict, token_noisy, sentences):
    """tokens.tsv and sentences.tsv; ``sentences`` = (ids, noisy or None, counts, mean loss, mean influence)."""
    os.makedirs(out_dir, exist_ok=True)
    tokens_path, sentences_path = os.path.join(out_dir, "tokens.tsv"), os.path.join(out_dir, "sentences.tsv")
    with open(tokens_path, "w", encoding="utf-8") as f:
        f.write("id\tposition\ttoken\tnoisy\tloss\tinfluence\tinfluence_random_label\n")
        for k in range(len(result.tokens)):
            noisy = "" if token_noisy is None else str(token_noisy[k])
            f.write(f"{result.ids[k]}\t{result.positions[k]}\t{tgt_dict[int(result.tokens[k])]}\t{noisy}\t"
                    f"{result.loss[k]:.6g}\t{result.influence[k]:.6g}\t{result.influence_random_label[k]:.6g}\n")
    sent_ids, sent_noisy, sent_counts, sent_loss, sent_influence = sentences
    with open(sentences_path, "w", encoding="utf-8") as f:
        f.write("id\tnoisy\tn_tokens\tmean_loss\tmean_influence\n")
        for k in range(len(sent_ids)):
            noisy = "" if sent_noisy is None else str(sent_noisy[k])
            f.write(f"{sent_ids[k]}\t{noisy}\t{sent_counts[k]}\t{sent_loss[k]:.6g}\t{sent_influence[k]:.6g}\n")
    return tokens_path, sentences_path


def noise_summary_lines(result, sent_influence, sent_noisy, token_noisy, sidecar):
    """The summary's noise lines and figures: the AUC of 'low influence => noisy pair', if labelled."""
    if sent_noisy is None:
        return ["no noise sidecar: no AUC (give --noise-sidecar, e.g. data-bin/train.noise)"], {}
    auc = roc_auc_low_weight_noisy(sent_influence, sent_noisy)
    token_auc = roc_auc_low_weight_noisy(result.influence, token_noisy)
    return [
        f"noise sidecar: {sidecar}",
        f"ROC AUC of 'low influence => noisy pair': sentences (mean influence of their tokens) {auc:.4f}, "
        f"tokens {token_auc:.4f}  (> 0.5: the objective points the teacher at the clean pairs; "
        "< 0.5: at the noisy ones)",
    ], {"sentence_auc": auc, "token_auc": token_auc}


def run(args) -> dict:
    """Compute, write the outputs, return the figures (and print the table)."""
    if args.max_sentences is not None and args.max_sentences < 1:
        raise ReweightConfigError(f"--max-sentences must be >= 1, got {args.max_sentences}")
    use_cuda = torch.cuda.is_available() and not args.cpu
    task, model, eps = load_checkpoint(args.path, args.data, use_cuda)
    if args.label_smoothing is not None:
        eps = args.label_smoothing
    device = next(model.parameters()).device
    for subset in (args.subset, args.valid_subset):
        try:
            task.load_dataset(subset, combine=False, epoch=1)
        except FileNotFoundError as err:
            raise ReweightConfigError(f"split {subset!r} not found in {args.data} ({err})") from None
    dataset = task.dataset(args.subset)
    sidecar = resolve_sidecar(args)
    all_noisy = read_noise_sidecar(sidecar, len(dataset)) if sidecar else None

    valid_value, direction, valid_tokens = validation_gradient(
        task, model, args.valid_subset, eps, args.meta_valid_loss, args.max_tokens, device)
    indices = select_sentences(len(dataset), args.max_sentences, args.seed, noisy=all_noisy)
    max_positions = utils.resolve_max_positions(task.max_positions(), model.max_positions())
    indices, ignored = dataset.filter_indices_by_size(indices, max_positions)
    tgt_dict = task.target_dictionary
    result = token_influence(model, dataset, indices, direction, eps, tgt_dict.pad(), args.max_tokens, args.seed,
                             num_special=tgt_dict.nspecial)
    token_noisy = all_noisy[result.ids].astype(np.int64) if all_noisy is not None else None
    sent_ids, sent_counts, sent_influence = sentence_means(result.ids, result.influence)
    _, _, sent_loss = sentence_means(result.ids, result.loss)
    sent_noisy = all_noisy[sent_ids].astype(np.int64) if all_noisy is not None else None
    mask_id = tgt_dict.index("<mask>") if "<mask>" in tgt_dict.indices else None

    tokens_path, sentences_path = write_tables(args.out, result, tgt_dict, token_noisy,
                                               (sent_ids, sent_noisy, sent_counts, sent_loss, sent_influence))

    objective = "label-smoothed cross-entropy" if args.meta_valid_loss == "criterion" else "plain NLL"
    lines = [
        f"checkpoint: {args.path}",
        f"data: {args.data}, split {args.subset}: {len(sent_ids)} of {len(dataset)} sentences"
        + (f" ({len(ignored)} longer than the model's max positions skipped)" if len(ignored) else "")
        + f", {len(result.tokens)} target tokens; label smoothing {eps:g}",
        f"validation objective: {objective} on {args.valid_subset} ({valid_tokens} tokens): {valid_value:.4f} nats/token",
        "influence = grad(training token loss) . grad(validation loss), student in eval mode: > 0 means an SGD "
        "step on the token lowers the validation loss, so the teacher's gradient raises its weight",
        "random label = the same for a random dictionary word at the token's position (a control: > 0 means wrong "
        "labels lower the validation loss too)",
        *group_table(result, token_noisy, mask_id),
        f"Spearman correlation of sentence influence and loss: {spearman(sent_influence, sent_loss):.4f}",
    ]
    figures = {"num_sentences": len(sent_ids), "num_tokens": len(result.tokens), "valid_loss": valid_value,
               "result": result, "tokens_tsv": tokens_path, "sentences_tsv": sentences_path}
    if args.by_layer:
        by_group = influence_by_group(model, dataset, indices, direction, eps=eps, pad=tgt_dict.pad(),
                                      max_tokens=args.max_tokens, seed=args.seed, num_special=tgt_dict.nspecial)
        lines += layer_table(by_group, token_noisy, mask_id)
        figures["by_layer"] = by_group
    noise_lines, noise_figures = noise_summary_lines(result, sent_influence, sent_noisy, token_noisy, sidecar)
    lines += noise_lines
    figures.update(noise_figures)
    summary_path = os.path.join(args.out, "summary.txt")
    with open(summary_path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    figures["summary_txt"] = summary_path
    print("\n".join(lines))
    print("wrote: " + ", ".join([tokens_path, sentences_path, summary_path]))
    return figures


def build_parser():
    parser = argparse.ArgumentParser(
        prog="fairseq-reweight-influence",
        description="First-order influence of each training token on the validation loss at a checkpoint "
        "(grad l_i . grad L_valid): which tokens the meta-objective asks the teacher to up-weight.",
    )
    add_checkpoint_arguments(parser, "a translation checkpoint (pretrained or fine-tuned)", "influence")
    parser.add_argument("--subset", default="train", help="training split to score (default train)")
    parser.add_argument("--valid-subset", default="valid", help="split of the validation loss (default valid)")
    parser.add_argument("--meta-valid-loss", choices=["criterion", "nll"], default="criterion",
                        help="validation objective, as the task's option (default: criterion, label-smoothed)")
    parser.add_argument("--label-smoothing", type=float, default=None,
                        help="epsilon of the token losses (default: the checkpoint's criterion's)")
    parser.add_argument("--max-sentences", type=int, default=2000,
                        help="score this many training sentences, half noisy where a sidecar allows (default 2000)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the subset and the random labels (default 1)")
    parser.add_argument("--max-tokens", type=int, default=2048, help="tokens per batch (default 2048)")
    parser.add_argument("--by-layer", action="store_true",
                        help="also split the influence by parameter group (embeddings, attention, ...; one more "
                        "forward-mode pass per group)")
    return parser


main, cli_main = command(build_parser, run, "influence")  # cli_main: fairseq-reweight-influence


if __name__ == "__main__":
    cli_main()
