#!/usr/bin/env python
"""Pretrain -> baseline / oracle / teacher fine-tunes -> BLEU table (the paper's Table 7, with bounds).

For each data condition (a fairseq data-bin made by data_prep/, e.g. ``clean`` and ``noisy``):
  1. pretrain a Transformer with Adam (lr 5e-4, inverse_sqrt, label smoothing 0.1) on that data,
     once per seed or, with ``--pretrain-seed N``, once for all fine-tuning seeds;
  2. from its best checkpoint, fine-tune with momentum SGD (lr 1e-3, momentum 0.9; or with
     ``--finetune-optimizer adam`` the pretraining's Adam at a constant lr) for the same number of
     updates, one run per method and seed: ``pretrained`` (no fine-tune at all: the row a
     fine-tune must beat), ``baseline`` (--reweight-teacher none),
     ``oracle`` (noisy pairs weighted 0 from the data-bin's train.noise: the bound of
     down-weighting the noise; skipped where there is no sidecar), ``surface``, ``deep`` (the paper's),
     ``robust`` (``--reweight-preset robust``), ``trusted`` (``--reweight-preset trusted``: a teacher on
     the pair's excess loss over a reference, the pretrained student fine-tuned on the validation split,
     whose losses of the training pairs are computed first), ``l2t`` (L2T-data, the paper's Table 7
     baseline) and every ``--variant NAME="FLAGS"`` (the deep teacher with FLAGS, e.g.
     ``--teacher-hidden-layers 1``);
  3. translate the test set with ``fairseq-generate --beam 5`` and score it (examples/results.py):
     sacreBLEU and chrF (sacrebleu's defaults, with signatures and 95 % bootstrap CIs) of the
     detokenized hypotheses against the raw test references data_prep keeps in raw/ (or
     ``--raw-references NAME=FILE``; without them the detokenized references, said in the legend),
     tokenized BLEU, the paired bootstrap against the baseline (p for BLEU and chrF), the share of
     the oracle gap closed, the noise AUC (of a learned teacher: its final weights' over the whole
     training split, ``fairseq-reweight-score --teacher``; of L2T: the last one it logged; of a filter:
     its scores') and the time per update;
  4. add the runs to OUT/results.csv (kept across invocations) and write OUT/results.md.

With ``--reweight-phase pretrain`` the methods act during Adam pretraining from scratch instead
(``--optimizer reweight_adam --reweight-history checkpoint``, the same Adam recipe as step 1, the
same updates for every method; no fine-tune): the teacher where the noise does its harm. Use a
separate ``--out`` per phase.

Filter baselines (``--methods filter-ce filter-dcce excess-loss teacher-filter``; not in the default):
score every training pair once per condition and pretrained student (``fairseq-reweight-score``;
cached under OUT/COND-filter-scores-seedS/), drop the worst ``--filter-drop`` share (default 0.2), and
fine-tune the same student for the same updates with ``--reweight-teacher pairs`` on the 0/1 weights.
``filter-ce``: the student's cross-entropy; ``filter-dcce``: dual conditional cross-entropy with a
reverse model pretrained like the student on the same noisy corpus; ``excess-loss``: student minus
reference cross-entropy, the reference being the student fine-tuned on the validation split (the
teacher's trusted data); ``teacher-filter``: the same seed's ``trusted`` teacher's mean weight of each
pair (``fairseq-reweight-score --teacher``; the trusted fine-tune runs first if it has not). None
reads the noise sidecar for its scores; their rows' noise AUC is the AUC of the scores against it.
Their s/update is the fine-tune's (scoring and extra models not counted).

Every step runs fairseq's own command-line programs (printed before they run, logged under
OUT/logs/), and is skipped when its output already exists, so an interrupted run picks up where it
stopped. The runs ahead are listed first, then each stage of a run prints one line,
``[i/N] RUN: STAGE (elapsed …, k runs left)``. ``--train-args`` passes flags to every fairseq-train
call (e.g. ``--fp16``, or
``--distributed-world-size 4`` for multi-GPU through fairseq's own distributed training);
``--pretrain-args`` and ``--finetune-args`` only to the pretraining or the fine-tuning calls.

    python examples/run_experiment.py --data clean=DIR/clean/data-bin --data noisy=DIR/noisy/data-bin \\
        --preset iwslt14 --seeds 1 2 3 --out runs/iwslt14 --variant mlp-b5="--teacher-hidden-layers 1 --reweight-backprop-steps 5"
"""
import argparse
import shlex
import sys
import time
from pathlib import Path

import results  # examples/results.py (this script's directory is on sys.path)
from experiment_filters import (drop_fraction, drop_worst, filter_method, final_teacher_auc,  # noqa: F401
                                learns_a_teacher, reference_losses)  # (drop_worst: the tests import it from here)
from experiment_methods import (DEFAULT_FILTER_DROP, FILTERS, METHODS, PRESETS, TRUSTED, method_flags, planned_runs,
                                reads_reference_losses)
from experiment_steps import (FINETUNE_OPTIMIZERS, PROGRESS, duration, finetune, log, pretrain, reweighted_pretrain,
                              translate)


def references(conditions, overrides):
    """{condition: results.References}: the raw test references data_prep kept (or ``--raw-references``
    NAME=FILE), each said once; where there are none, that the scores fall back to the detokenized ones."""
    found = {}
    for cond, data in conditions.items():
        ref = found[cond] = results.find_references(data, overrides.get(cond))
        tok = Path(data).parent / "tok" / f"test.{ref.tgt}"  # the test set, where data_prep made it
        n_raw, n_tok = (len(results.read_lines(f)) if f and f.is_file() else None for f in (ref.path, tok))
        if n_raw is not None and n_tok is not None and n_raw != n_tok:
            sys.exit(f"[experiment] error: the raw references {ref.path} of {cond} have {n_raw} lines but its test "
                     f"set {tok} has {n_tok}: pass the right file with --raw-references {cond}=FILE")
        if ref.path:
            log(f"{cond}: scoring against the raw references {ref.path}"
                + (" (the data is lowercased: the table adds the case-insensitive sacreBLEU)" if ref.lowercased else ""))
        else:
            log(f"{cond}: no raw test references (looked for {', '.join(map(str, ref.looked_at))}): sacreBLEU and chrF "
                "fall back to fairseq-generate's detokenized references, which the table's legend says "
                f"(pass --raw-references {cond}=FILE)")
    return found


def score(cond, data, run_dir, hyps, refs, args):
    """One run's score fields of results.csv (examples/results.py), logged."""
    PROGRESS.stage(run_dir.name, "scoring …")
    ref = getattr(args, "references", {}).get(cond) or results.find_references(data)
    sources = None
    if results.comet_available():
        sources = results.read_sources(run_dir / "test" / "generate-test.txt", ref)
    try:
        scores = results.score_run(hyps, refs, ref, sources)
    except ValueError as e:  # raw references that do not fit the test set
        sys.exit(f"[experiment] error: {cond}: {e}")
    log(f"{run_dir.name}: sacreBLEU {scores['sacrebleu']:.2f} (± {scores['sacrebleu_ci95']:.2f}), chrF "
        f"{scores['chrf']:.2f} (± {scores['chrf_ci95']:.2f}), tokenized BLEU {scores['tokenized_bleu']:.2f}"
        + (f", sacreBLEU (lc) {scores['sacrebleu_lc']:.2f}" if "sacrebleu_lc" in scores else "")
        + (f", COMET {scores['comet']:.4f}" if "comet" in scores else ""))
    return scores


def run_condition(cond, data, args, preset, flags, train_args):
    """Every method and seed of one data condition; returns the results.csv rows."""
    rows, filter_aucs = [], {}
    for seed in args.seeds:
        if args.reweight_phase == "finetune":
            pre_seed = args.pretrain_seed or seed
            pre = pretrain(data, args.out / f"{cond}-pretrain-seed{pre_seed}", preset, pre_seed,
                           train_args + shlex.split(args.pretrain_args))
        for method, method_args in flags.items():
            if "oracle" in method_args.split() and not (Path(data) / "train.noise").exists():
                log(f"{cond}: no train.noise in {data}, so no oracle (it would be the baseline)")
                continue
            if method == "pretrained":
                if args.reweight_phase == "finetune":
                    rows.append(pretrained_row(cond, data, pre, seed, args, preset))
                continue
            if (method in FILTERS or reads_reference_losses(method_args)) and args.reweight_phase == "pretrain":
                log(f"{cond}: {method} needs the pretrained student's scores: not with --reweight-phase pretrain")
                continue
            if reads_reference_losses(method_args):
                method_args += " " + trusted_flags(cond, data, pre, pre_seed, args, preset, train_args)
            if method in FILTERS:
                trusted_run = None
                if FILTERS[method] == "teacher":  # the same seed's trusted fine-tune first (or found)
                    trusted_run = args.out / f"{cond}-trusted-seed{seed}"
                    finetune(data, pre, trusted_run, preset,
                             METHODS["trusted"] + " " + trusted_flags(cond, data, pre, pre_seed, args, preset, train_args),
                             seed, train_args + shlex.split(args.finetune_args))
                method, method_args, filter_auc = filter_method(method, cond, data, pre, pre_seed, args, preset,
                                                                train_args, trusted_run)
                if method is None:
                    continue
                filter_aucs[(method, seed)] = filter_auc
            name = f"{cond}-{method}-seed{seed}"
            if args.reweight_phase == "pretrain":
                ckpt, cmd = reweighted_pretrain(data, args.out / name, preset, method_args, seed,
                                                train_args + shlex.split(args.pretrain_args))
            else:
                ckpt, cmd = finetune(data, pre, args.out / name, preset, method_args, seed,
                                     train_args + shlex.split(args.finetune_args))
            hyps, refs = translate(data, ckpt, args.out / name / "test", preset)
            scores = score(cond, data, args.out / name, hyps, refs, args)
            sec, auc = results.training_figures(args.out / "logs" / f"{name}.log")
            if learns_a_teacher(method_args) and (Path(data) / "train.noise").exists():
                auc = final_teacher_auc(cond, data, args.out / name, args, preset, train_args)
            rows.append(dict(data=cond, method=method, seed=seed, **scores, noise_auc=auc, sec_per_update=round(sec, 4),
                             run_dir=str(args.out / name), command=" ".join(shlex.quote(c) for c in cmd)))
    for row in rows:  # a filter's noise AUC is its score's (the fine-tune logs its 0/1 weights')
        row["noise_auc"] = filter_aucs.get((row["method"], row["seed"]), row["noise_auc"])
    return rows


def trusted_flags(cond, data, pretrained, pre_seed, args, preset, train_args):
    """``--reweight-reference-losses FILE`` for ``--reweight-preset trusted``: the losses of the
    reference fine-tuned on the trusted split (computed once per condition and pretrained student)."""
    losses = reference_losses(cond, data, pretrained, pre_seed, args, preset, train_args)
    return f"--reweight-reference-losses {shlex.quote(str(losses))}"


def pretrained_row(cond, data, pretrained, seed, args, preset):
    """The results.csv row of the pretrained student without fine-tuning (translated once per
    pretraining, a row per fine-tuning seed so that each seed's runs are compared with it)."""
    run_dir = args.out / f"{cond}-pretrained-{pretrained.parent.name.rsplit('-', 1)[1]}"
    hyps, refs = translate(data, pretrained, run_dir / "test", preset)
    scores = score(cond, data, run_dir, hyps, refs, args)
    return dict(data=cond, method="pretrained", seed=seed, **scores, noise_auc=None, sec_per_update=float("nan"),
                run_dir=str(run_dir), command=f"(no fine-tune: {pretrained}; its command is in the pretraining log)")


def parse_args(argv=None):
    """(the parser, its arguments)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", action="append", required=True, metavar="NAME=DATA_BIN",
                        help="a data condition: its name and fairseq data-bin (repeatable)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny-cpu")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=[m for m in METHODS if m not in FILTERS],
                        help="default: all but the filters (filter-ce, filter-dcce, excess-loss, teacher-filter: see the top)")
    parser.add_argument("--filter-drop", type=drop_fraction, default=DEFAULT_FILTER_DROP, metavar="X",
                        help="share of the training pairs the filter methods drop, the worst-scored (default 0.2, "
                        "fixed before any result here: a crawled corpus's noise rate is unknown, so X is set above "
                        "the rates commonly injected or estimated for a moderately noisy corpus (10%% of pairs in "
                        "the paper's IWSLT setup) because a ranking that is not perfect must drop more than the noise "
                        "to remove most of it, while keeping 80%% of the data, as NMT suffers more from noisy pairs "
                        "than from a somewhat smaller corpus (Khayrallah & Koehn 2018); rows METHOD@dropX unless 0.2)")
    parser.add_argument("--filter-drop-oracle-rate", action="store_true",
                        help="the filters drop the true noise rate, the mean of the data-bin's train.noise, instead: "
                        "rows METHOD@true-rate, oracle-informed (a real user does not know the rate)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1])
    parser.add_argument("--variant", action="append", default=[], metavar='NAME="FLAGS"',
                        help="another method: the deep teacher with these fine-tuning flags (repeatable)")
    parser.add_argument("--pretrain-seed", type=int, default=None,
                        help="pretrain once with this seed and fine-tune every seed from it (default: one per seed)")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--train-args", default="", help="extra flags for every fairseq-train call")
    parser.add_argument("--pretrain-args", default="", help="extra flags for the pretraining calls only (e.g. --fp16)")
    parser.add_argument("--finetune-args", default="",
                        help="extra flags for the fine-tuning calls only (e.g. --teacher-hidden-layers 1)")
    parser.add_argument("--finetune-updates", type=int, help="override the preset's fine-tuning updates")
    parser.add_argument("--finetune-optimizer", choices=sorted(FINETUNE_OPTIMIZERS), default="sgd",
                        help="the fine-tune's optimizer (and the trusted reference's): sgd, the paper's momentum "
                        "SGD (lr 1e-3, momentum 0.9), or adam, the pretraining's Adam at a constant lr (3e-4 "
                        "after 50 warm-up updates; fresh moments; --optimizer reweight_adam --reweight-history "
                        "checkpoint) for a student Adam took close to convergence; the lr of either with "
                        "--finetune-args=--lr=X")
    parser.add_argument("--pretrain-updates", type=int, help="override the preset's pretraining updates")
    parser.add_argument("--raw-references", action="append", default=[], metavar="NAME=FILE",
                        help="the untokenized, original-case test references of condition NAME (default: the raw/ "
                        "test file data_prep kept beside the data-bin or its clean_dir; repeatable)")
    parser.add_argument("--reweight-phase", choices=["finetune", "pretrain"], default="finetune",
                        help="where the methods act: the SGD fine-tune after plain Adam pretraining (the paper), or "
                        "Adam pretraining from scratch (--optimizer reweight_adam; no fine-tune)")
    args = parser.parse_args(argv)
    return parser, args


def data_conditions(parser, args):
    """{name: data-bin} of the --data conditions, each checked for a binarized test split."""
    conditions = {}
    for spec in args.data:
        name, sep, path = spec.partition("=")
        if not sep or not Path(path).is_dir():
            parser.error(f"--data {spec!r}: expected NAME=DATA_BIN with an existing directory")
        if not list(Path(path).glob("test.*.idx")):
            parser.error(f"--data {spec!r}: {path} has no binarized test split (test.*.idx)")
        conditions[name] = Path(path)
    return conditions


def reference_overrides(parser, args, conditions):
    """{condition: file} of --raw-references."""
    overrides = {}
    for spec in args.raw_references:
        name, sep, path = spec.partition("=")
        if not sep or name not in conditions or not Path(path).is_file():
            parser.error(f"--raw-references {spec!r}: expected NAME=FILE with a --data NAME and an existing file")
        overrides[name] = Path(path)
    return overrides


def table_note(args, preset, rows):
    """The line under the results table: test set, beam, seeds, pretraining and updates."""
    pretrained = (f"one pretrained student (seed {args.pretrain_seed}) per condition for all fine-tuning seeds"
                  if args.pretrain_seed else "one pretrained student per fine-tuning seed")
    note = (f"Test set, beam {preset['beam']}; mean ± std over seeds; {pretrained}; "
            f"{preset['finetune_updates']} fine-tuning updates"
            + (" (Adam at a constant lr, --finetune-optimizer adam)." if preset.get("finetune_optimizer") == "adam"
               else " (momentum SGD)."))
    if args.reweight_phase == "pretrain":
        note = (f"Test set, beam {preset['beam']}; mean ± std over seeds; the methods act during Adam pretraining "
                f"from scratch (reweight_adam), {preset['pretrain_updates']} updates each, last checkpoint; no fine-tune.")
    if any(r["method"].endswith("@true-rate") for r in rows):
        note += (" METHOD@true-rate: a filter that drops the true noise rate, read from train.noise (oracle-informed: "
                 "not available to a real user).")
    return note


def main(argv=None):
    parser, args = parse_args(argv)
    preset = dict(PRESETS[args.preset])
    for key in ("finetune_updates", "pretrain_updates"):
        if getattr(args, key):
            preset[key] = getattr(args, key)
    preset["finetune_optimizer"] = args.finetune_optimizer
    conditions = data_conditions(parser, args)
    train_args = shlex.split(args.train_args)
    args.out.mkdir(parents=True, exist_ok=True)
    flags = method_flags(args)
    args.references = references(conditions, reference_overrides(parser, args, conditions))
    started = time.time()
    PROGRESS.announce(planned_runs(conditions, args, flags))
    rows = []
    for cond, data in conditions.items():
        rows += run_condition(cond, data, args, preset, flags, train_args)
    log(f"all {len(PROGRESS.plan)} runs done in {duration(time.time() - started)}; paired bootstrap against the "
        "baselines …")
    all_rows = results.merge_csv(args.out / "results.csv", rows)
    results.add_p_values(all_rows, args.references, fresh=[(r["data"], r["method"], r["seed"]) for r in rows])
    results.write_csv(args.out / "results.csv", all_rows)
    note = table_note(args, preset, all_rows)
    methods = list(dict.fromkeys(list(METHODS) + list(flags) + [r["method"] for r in all_rows]))
    table = results.write_tables(all_rows, args.out, list(conditions), methods, note)
    print("\n" + table)
    log(f"wrote {args.out / 'results.md'} and results.csv in {time.time() - started:.0f}s")


if __name__ == "__main__":
    main()
