"""The filter baselines of examples/run_experiment.py (``--methods filter-ce filter-dcce excess-loss
teacher-filter``): score every training pair once per condition and pretrained student (the teacher's
scores once per ``trusted`` fine-tune), drop the worst ``--filter-drop`` share, and fine-tune the same
student with ``--reweight-teacher pairs`` on the 0/1 pair weights; and the trusted reference's losses
that the ``trusted`` teacher reads."""
import argparse
import shlex
import sys
from pathlib import Path

import results  # examples/results.py
from experiment_methods import DEFAULT_FILTER_DROP, FILTERS
from experiment_steps import PROGRESS, finetune, log, pretrain, run


def score_bin():
    """``fairseq-reweight-score`` beside this Python, else ``python -m fairseq_reweight.cli.score_pairs``."""
    local = Path(sys.executable).parent / "fairseq-reweight-score"
    return [str(local)] if local.exists() else [sys.executable, "-m", "fairseq_reweight.cli.score_pairs"]


def flag_value(flags: str, name: str, default: str) -> str:
    """The value that command-line ``flags`` give option ``name`` (its first), else ``default``."""
    words = shlex.split(flags)
    return words[words.index(name) + 1] if name in words[:-1] else default


def trusted_subset(args):
    """The split the teacher meta-validates on (``--meta-valid-subset`` in --finetune-args, else the
    task's default, ``valid``): the trusted data of the excess-loss reference."""
    return flag_value(args.finetune_args, "--meta-valid-subset", "valid")


def filter_scores(kind, cond, data, pretrained, pre_seed, args, preset, train_args):
    """The score file of a filter (one line per training pair, corpus order), computed once per condition
    and pretrained student and kept under OUT/COND-filter-scores-seedS/:

    - ``ce``: the pretrained student's per-token cross-entropy of each pair (lower = better);
    - ``dcce``: the dual conditional cross-entropy (Junczys-Dowmunt 2018; lower = better) of the student
      and a reverse (target->source) model pretrained with the same recipe and updates on the same noisy
      corpus, OUT/COND-pretrain-reverse-seedS. Junczys-Dowmunt's two models were trained on clean data;
      here the only trusted data is the small validation set, so both directions see the noisy corpus;
    - ``excess``: H_student - H_reference (Wang et al. 2018; HIGHER = better), the reference being the
      student fine-tuned on the trusted split the teacher meta-validates on (``valid``) with the
      fine-tune's own optimizer and budget (``--finetune-optimizer``, ``--finetune-args``, the preset's
      fine-tuning updates), OUT/COND-reference-seedS: the reference then differs from the student
      only by the data it saw, as every method's fine-tune does.
    """
    out = args.out / f"{cond}-filter-scores-seed{pre_seed}"
    scores = out / f"{kind}.txt"
    if scores.exists():
        if out.name not in PROGRESS.started:
            PROGRESS.stage(out.name, "filter scores found")
        log(f"{kind} scores found: {scores}")
        return scores
    cmd = _score_cmd(data, pretrained, preset, train_args)
    if kind == "dcce":
        pair = results.language_pair(data, "train")
        if pair is None:
            sys.exit(f"[experiment] error: {data} has no binarized train split (train.SRC-TGT.SRC.idx)")
        src, tgt = pair
        reverse = pretrain(data, args.out / f"{cond}-pretrain-reverse-seed{pre_seed}", preset, pre_seed,
                           train_args + shlex.split(args.pretrain_args) + ["--source-lang", tgt, "--target-lang", src])
        cmd += ["--reverse-path", str(reverse)]
    elif kind == "excess":
        reference = reference_model(cond, data, pretrained, pre_seed, args, preset, train_args)
        cmd += ["--reference-path", str(reference)]
    return _write_scores(cmd, scores, kind, args)


def reference_model(cond, data, pretrained, pre_seed, args, preset, train_args):
    """The trusted reference (``excess`` scores, ``trusted`` teacher): the pretrained student fine-tuned
    on the split the teacher meta-validates on, OUT/COND-reference-seedS/checkpoint_last.pt."""
    trusted = trusted_subset(args)
    reference, _ = finetune(data, pretrained, args.out / f"{cond}-reference-seed{pre_seed}", preset,
                            f"--reweight-teacher none --train-subset {shlex.quote(trusted)} --disable-validation",
                            pre_seed, train_args + shlex.split(args.finetune_args))
    return reference


def reference_losses(cond, data, pretrained, pre_seed, args, preset, train_args):
    """OUT/COND-filter-scores-seedS/reference.txt: the trusted reference's per-token cross-entropy of
    every training pair, the ``--reweight-reference-losses`` of ``--reweight-preset trusted``."""
    losses = args.out / f"{cond}-filter-scores-seed{pre_seed}" / "reference.txt"
    if losses.exists():
        log(f"reference losses found: {losses}")
        return losses
    reference = reference_model(cond, data, pretrained, pre_seed, args, preset, train_args)
    return _write_scores(_score_cmd(data, reference, preset, train_args), losses, "reference", args)


def teacher_scores(cond, data, trusted_run, args, preset, train_args, stage=None):
    """The trained teacher of a ``trusted`` fine-tune as a filter: its mean weight of every training
    pair (``fairseq-reweight-score --teacher``; HIGHER = better), OUT/COND-filter-scores-seedS/teacher-RUN.txt
    for that run's directory RUN; ``stage`` names the run the progress line is about (default: the
    scores' directory)."""
    scores = args.out / f"{cond}-filter-scores-{trusted_run.name.rsplit('-', 1)[1]}" / f"teacher-{trusted_run.name}.txt"
    if scores.exists():
        log(f"teacher scores found: {scores}")
        return scores
    cmd = _score_cmd(data, trusted_run / "checkpoint_last.pt", preset, train_args) + ["--teacher"]
    return _write_scores(cmd, scores, "teacher", args, stage)


def final_teacher_auc(cond, data, run_dir, args, preset, train_args):
    """The noise AUC of a run's final teacher over the whole training split (its mean weight of each
    pair, ``teacher_scores``): what the teacher learned by the end, where the run's log only has its
    last in-training evaluation (every --reweight-noise-auc-interval meta-updates, on a subset)."""
    import numpy as np

    from fairseq_reweight.cli.score_pairs import noise_auc
    from fairseq_reweight.core.metrics import read_noise_sidecar

    scores = np.loadtxt(teacher_scores(cond, data, run_dir, args, preset, train_args, stage=run_dir.name), ndmin=1)
    noisy = read_noise_sidecar(str(Path(data) / "train.noise"), len(scores))
    return round(noise_auc(scores, noisy, higher_is_worse=False), 4)


def learns_a_teacher(method_args: str) -> bool:
    """Whether a method's flags train a hypergradient teacher (``deep``, the default, or ``surface``),
    whose checkpoint ``fairseq-reweight-score --teacher`` reads."""
    return flag_value(method_args, "--reweight-teacher", "deep") in ("deep", "surface")


def _score_cmd(data, checkpoint, preset, train_args):
    cmd = score_bin() + [str(data), "--path", str(checkpoint), "--max-tokens", str(preset["max_tokens"])]
    return cmd + (["--cpu"] if "--cpu" in shlex.split(preset["device"]) + train_args else [])


def _write_scores(cmd, scores, kind, args, stage=None):
    """Run a scoring command into ``scores`` (through a .partial file: an interrupted run leaves none)."""
    out = scores.parent
    partial = scores.with_name(scores.name + ".partial")
    out.mkdir(parents=True, exist_ok=True)
    PROGRESS.stage(stage or out.name, f"scoring the training pairs ({kind}) …")
    run(cmd + ["--output", str(partial)], args.out / "logs" / f"{out.name}-{scores.stem}.log")
    partial.rename(scores)
    return scores


def drop_worst(scores, drop, higher_is_worse=True):
    """0/1 weights that drop the round(drop * N) worst pairs (ties: the later pair first)."""
    import numpy as np

    badness = np.asarray(scores, dtype=np.float64) * (1.0 if higher_is_worse else -1.0)
    weights = np.ones(len(badness), dtype=np.int64)
    n_drop = int(round(drop * len(badness)))
    if n_drop:
        weights[np.argsort(badness, kind="stable")[len(badness) - n_drop:]] = 0
    return weights


def filter_method(method, cond, data, pretrained, pre_seed, args, preset, train_args, trusted_run=None):
    """(row name, fine-tuning flags, the score's noise AUC or None) of a filter method: score the training
    pairs, drop the worst X % (--filter-drop, or the true noise rate with --filter-drop-oracle-rate: rows
    METHOD@true-rate), fine-tune with ``--reweight-teacher pairs`` on the 0/1 weights; (None, None, None)
    where --filter-drop-oracle-rate has no sidecar to read. The sidecar is read only for that rate and
    for the AUC, never for a score. ``teacher-filter`` scores with the teacher of ``trusted_run``, the
    same seed's ``trusted`` fine-tune."""
    import numpy as np

    from fairseq_reweight.cli.score_pairs import noise_auc
    from fairseq_reweight.core.metrics import read_noise_sidecar

    kind = FILTERS[method]
    if kind == "teacher":
        scores_file = teacher_scores(cond, data, trusted_run, args, preset, train_args)
    else:
        scores_file = filter_scores(kind, cond, data, pretrained, pre_seed, args, preset, train_args)
    scores = np.array([float(line) for line in scores_file.read_text().split()])
    sidecar = Path(data) / "train.noise"
    noisy = read_noise_sidecar(str(sidecar), len(scores)) if sidecar.exists() else None
    if args.filter_drop_oracle_rate:
        if noisy is None:
            log(f"{cond}: no train.noise in {data}, so no {method}@true-rate")
            return None, None, None
        drop, name = float(noisy.mean()), f"{method}@true-rate"
    else:
        drop = args.filter_drop
        name = method if drop == DEFAULT_FILTER_DROP else f"{method}@drop{drop:g}"
    higher_is_worse = kind not in ("excess", "teacher")
    weights = scores_file.parent / (f"{name}.weights" if kind != "teacher" else f"{name}-{trusted_run.name}.weights")
    if not weights.exists():
        kept = drop_worst(scores, drop, higher_is_worse=higher_is_worse)
        weights.write_text("".join(f"{w}\n" for w in kept))
        log(f"{name}: dropped {len(kept) - kept.sum()} of {len(kept)} pairs (X = {drop:.3f}): {weights}")
    auc = round(noise_auc(scores, noisy, higher_is_worse=higher_is_worse), 4) if noisy is not None else None
    return name, f"--reweight-teacher pairs --reweight-pair-weights {shlex.quote(str(weights))}", auc


def drop_fraction(text):
    """``--filter-drop``: a share in [0, 1)."""
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a share of the pairs in [0, 1), got {text}")
    return value
