#!/usr/bin/env python
"""Pretrain -> baseline / oracle / teacher fine-tunes -> BLEU table (the paper's Table 7, with bounds).

For each data condition (a fairseq data-bin made by data_prep/, e.g. ``clean`` and ``noisy``):
  1. pretrain a Transformer with Adam (lr 5e-4, inverse_sqrt, label smoothing 0.1) on that data,
     once per seed or, with ``--pretrain-seed N``, once for all fine-tuning seeds;
  2. from its best checkpoint, fine-tune with momentum SGD (lr 1e-3, momentum 0.9) for the same
     number of updates, one run per method and seed: ``pretrained`` (no fine-tune at all: the row
     a fine-tune must beat), ``baseline`` (--reweight-teacher none),
     ``oracle`` (noisy pairs weighted 0 from the data-bin's train.noise: the bound of
     down-weighting the noise; skipped where there is no sidecar), ``surface``, ``deep`` (the paper's),
     ``robust`` (``--reweight-preset robust``), ``l2t`` (L2T-data, the paper's Table 7 baseline) and every
     ``--variant NAME="FLAGS"`` (the deep teacher with FLAGS, e.g. ``--teacher-hidden-layers 1``);
  3. translate the test set with ``fairseq-generate --beam 5`` and score it (examples/results.py):
     sacreBLEU and chrF (sacrebleu's defaults, with signatures and 95 % bootstrap CIs) of the
     detokenized hypotheses against the raw test references data_prep keeps in raw/ (or
     ``--raw-references NAME=FILE``; without them the detokenized references, said in the legend),
     tokenized BLEU, the paired bootstrap against the baseline (p for BLEU and chrF), the share of
     the oracle gap closed, the final noise AUC and the time per update;
  4. add the runs to OUT/results.csv (kept across invocations) and write OUT/results.md.

With ``--reweight-phase pretrain`` the methods act during Adam pretraining from scratch instead
(``--optimizer reweight_adam --reweight-history checkpoint``, the same Adam recipe as step 1, the
same updates for every method; no fine-tune): the teacher where the noise does its harm. Use a
separate ``--out`` per phase.

Filter baselines (``--methods filter-ce filter-dcce excess-loss``; not in the default): score every
training pair once per condition and pretrained student (``fairseq-reweight-score``; cached under
OUT/COND-filter-scores-seedS/), drop the worst ``--filter-drop`` share (default 0.2), and fine-tune
the same student for the same updates with ``--reweight-teacher pairs`` on the 0/1 pair weights.
``filter-ce``: the student's cross-entropy; ``filter-dcce``: dual conditional cross-entropy with a
reverse model pretrained like the student on the same noisy corpus; ``excess-loss``: student minus
reference cross-entropy, the reference being the student fine-tuned on the validation split (the
teacher's trusted data). None reads the noise sidecar for its scores; their rows' noise AUC is the
AUC of the scores against it. Their s/update is the fine-tune's (scoring and extra models not counted).

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
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results  # noqa: E402  (examples/results.py)

_TINY_MODEL = (
    "--arch transformer --encoder-layers 2 --decoder-layers 2 --encoder-embed-dim 64 "
    "--decoder-embed-dim 64 --encoder-ffn-embed-dim 128 --decoder-ffn-embed-dim 128 "
    "--encoder-attention-heads 4 --decoder-attention-heads 4 --share-all-embeddings"
)
PRESETS = {
    # what the README's demo runs on 2 CPU cores
    "tiny-cpu": dict(
        model=_TINY_MODEL + " --dropout 0.1",
        max_tokens=2048, pretrain_updates=400, warmup=100, finetune_updates=150,
        interval=20, backprop=2, teacher_lr=1e-3, beam=5, device="--cpu",
    ),
    # the smallest thing that exercises every step (tests)
    "micro": dict(
        model=_TINY_MODEL.replace("64", "16").replace("128", "32").replace("heads 4", "heads 2")
        + " --encoder-layers 1 --decoder-layers 1 --dropout 0.1",
        max_tokens=1024, pretrain_updates=20, warmup=5, finetune_updates=6,
        interval=3, backprop=2, teacher_lr=1e-3, beam=2, device="--cpu",
    ),
    # the paper's IWSLT14 De->En setup (one GPU, 4096 tokens per update)
    "iwslt14": dict(
        model="--arch transformer_iwslt_de_en --share-decoder-input-output-embed --dropout 0.3",
        max_tokens=4096, pretrain_updates=60000, warmup=4000, finetune_updates=5000,
        interval=20, backprop=2, teacher_lr=1e-3, beam=5, device="",
    ),
}
METHODS = {
    "pretrained": "",  # the pretrained student as it is, no fine-tune (run_condition): what fine-tuning must beat
    "baseline": "--reweight-teacher none",
    "oracle": "--reweight-teacher oracle",
    "surface": "--reweight-teacher surface",
    "deep": "--reweight-teacher deep",
    "robust": "--reweight-teacher deep --reweight-preset robust",
    "l2t": "--reweight-teacher l2t",  # L2T-data (Fan et al., ICLR 2018): the paper's Table 7 baseline
    # filters (filter_method): drop the worst-scored pairs, fine-tune with the fixed 0/1 pair weights
    "filter-ce": "--reweight-teacher pairs",
    "filter-dcce": "--reweight-teacher pairs",
    "excess-loss": "--reweight-teacher pairs",
}
FILTERS = {"filter-ce": "ce", "filter-dcce": "dcce", "excess-loss": "excess"}  # method: its score (filter_scores)
DEFAULT_FILTER_DROP = 0.2  # --filter-drop (its help says why)
USER_DIR = Path(__file__).resolve().parent.parent / "fairseq_reweight"


def log(message):
    print(f"[experiment] {message}", flush=True)


def _duration(seconds):
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """The live progress lines: ``[i/N] RUN: STAGE (elapsed …, k runs left)``, a run being a pretraining
    or a method's training of one condition and seed (its output directory's name). ``plan`` lists the
    runs ahead; a run that is not in it is added when it starts."""

    def __init__(self):
        self.plan, self.started, self.start = [], [], time.time()

    def announce(self, plan):
        self.plan, self.started, self.start = list(plan), [], time.time()
        log(f"{len(self.plan)} runs: " + ", ".join(name for name, _ in self.plan))
        for i, (name, what) in enumerate(self.plan, 1):
            log(f"  [{i}/{len(self.plan)}] {name} ({what})")

    def stage(self, name, what):
        if name not in [n for n, _ in self.plan]:
            self.plan.append((name, "unplanned"))
        if name not in self.started:
            self.started.append(name)
        left = len(self.plan) - len(self.started)
        log(f"[{self.started.index(name) + 1}/{len(self.plan)}] {name}: {what} (elapsed "
            f"{_duration(time.time() - self.start)}, {left} run{'' if left == 1 else 's'} left)")


PROGRESS = Progress()


def fairseq_bin(name):
    """The fairseq program installed beside this Python (the project's virtual environment), or
    the same program as ``python -m fairseq_cli.<name>`` where no script was installed."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return [str(local)]
    return [sys.executable, "-m", "fairseq_cli." + name.split("-", 1)[1]]


def run(cmd, log_file):
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log("$ " + " ".join(shlex.quote(c) for c in cmd))
    start = time.time()
    with open(log_file, "w") as fh:
        result = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = Path(log_file).read_text().splitlines()[-15:]
        sys.exit("\n".join(tail) + f"\n[experiment] error: command failed (exit {result.returncode}); full log: {log_file}")
    log(f"  done in {time.time() - start:.0f}s (log: {log_file})")


def adam_recipe(p):
    """The pretraining's optimizer and schedule (the paper's: Adam, inverse_sqrt warm-up)."""
    return ["--adam-betas", "(0.9,0.98)", "--lr", "5e-4", "--lr-scheduler", "inverse_sqrt",
            "--warmup-updates", str(p["warmup"]), "--weight-decay", "0.0001",
            "--max-tokens", str(p["max_tokens"]), "--max-update", str(p["pretrain_updates"])]


def teacher_flags(data, p):
    """The teacher's schedule, and the noise sidecar where the data has one (the noise AUC in the log,
    which does not change training, and the oracle's labels)."""
    flags = ["--reweight-interval", str(p["interval"]), "--reweight-backprop-steps", str(p["backprop"]),
             "--teacher-lr", str(p["teacher_lr"])]
    sidecar = Path(data) / "train.noise"
    return flags + (["--reweight-noise-sidecar", str(sidecar)] if sidecar.exists() else [])


def pretrain(data, out, preset, seed, train_args):
    ckpt = out / "checkpoint_best.pt"
    if ckpt.exists():
        if out.name not in PROGRESS.started:  # (a shared pretraining is announced once)
            PROGRESS.stage(out.name, "pretrained model found")
        log(f"pretrained model found: {ckpt}")
        return ckpt
    PROGRESS.stage(out.name, "pretraining …")
    p = preset
    cmd = fairseq_bin("fairseq-train") + [str(data), "--task", "translation",
           "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1", "--optimizer", "adam"]
    cmd += adam_recipe(p) + ["--seed", str(seed), "--save-dir", str(out), "--no-epoch-checkpoints",
                             "--log-format", "simple", "--log-interval", "50"]
    run(cmd + shlex.split(p["model"]) + shlex.split(p["device"]) + train_args, out.parent / "logs" / f"{out.name}.log")
    return ckpt


def reweighted_train(data, out, preset, optimizer_flags, flags, seed, train_args, what):
    """One ``--task reweight_translation`` run (its checkpoint_last.pt and its fairseq-train command),
    run unless the checkpoint exists; ``what`` names it in the log."""
    ckpt = out / "checkpoint_last.pt"
    p = preset
    cmd = fairseq_bin("fairseq-train") + [str(data), "--user-dir", str(USER_DIR), "--task", "reweight_translation",
           "--criterion", "reweighted_cross_entropy", "--label-smoothing", "0.1"] + optimizer_flags
    cmd += teacher_flags(data, p) + ["--seed", str(seed), "--save-dir", str(out), "--no-epoch-checkpoints",
                                     "--log-format", "simple", "--log-interval", "20"]
    cmd += shlex.split(flags) + shlex.split(p["model"]) + shlex.split(p["device"]) + train_args
    if ckpt.exists():
        PROGRESS.stage(out.name, f"{what} model found")
        log(f"{what} model found: {ckpt}")
    else:
        PROGRESS.stage(out.name, ("fine-tuning" if what == "fine-tuned" else "pretraining with the method") + " …")
        run(cmd, out.parent / "logs" / f"{out.name}.log")
    return ckpt, cmd


def reweighted_pretrain(data, out, preset, flags, seed, train_args):
    """``--reweight-phase pretrain``: Adam pretraining from scratch with the method's weights (every
    method the same number of updates; the last checkpoint is scored)."""
    optimizer = ["--optimizer", "reweight_adam", "--reweight-history", "checkpoint"] + adam_recipe(preset)
    return reweighted_train(data, out, preset, optimizer, flags, seed, train_args, "pretrained")


def finetune(data, pretrained, out, preset, flags, seed, train_args):
    """The fine-tune (momentum SGD from the pretrained student)."""
    optimizer = ["--optimizer", "reweight_sgd", "--lr", "1e-3", "--momentum", "0.9", "--lr-scheduler", "fixed",
                 "--max-tokens", str(preset["max_tokens"]), "--max-update", str(preset["finetune_updates"]),
                 "--restore-file", str(pretrained), "--reset-optimizer", "--reset-lr-scheduler",
                 "--reset-meters", "--reset-dataloader"]
    return reweighted_train(data, out, preset, optimizer, flags, seed, train_args, "fine-tuned")


def remove_subword_flag(data):
    """``--remove-bpe`` argument matching the data-bin's subword model (see data_prep/)."""
    return "sentencepiece" if (Path(data).parent / "subword" / "spm.model").exists() else "subword_nmt"


def translate(data, ckpt, out_dir, preset):
    """Tokenized, lower-cased hypotheses and references of the test set, in corpus order."""
    hyp_file = out_dir / "generate-test.txt"
    if not hyp_file.exists():
        PROGRESS.stage(out_dir.parent.name, "translating the test set …")
        cmd = fairseq_bin("fairseq-generate") + [str(data), "--user-dir", str(USER_DIR),
               "--task", "reweight_translation", "--path", str(ckpt), "--gen-subset", "test",
               "--beam", str(preset["beam"]), "--max-tokens", str(preset["max_tokens"]),
               "--required-batch-size-multiple", "1",  # else fairseq drops a ragged last batch
               "--remove-bpe", remove_subword_flag(data), "--results-path", str(out_dir)]
        cmd += shlex.split(preset["device"])
        run(cmd, out_dir / "generate.log")
    return results.read_hypotheses(hyp_file)


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


def method_flags(args):
    """{method: fine-tuning flags} of --methods and every --variant."""
    flags = {m: METHODS[m] for m in args.methods}
    for spec in args.variant:
        name, sep, extra = spec.partition("=")
        if not sep or not name or name in METHODS:
            sys.exit(f"[experiment] error: --variant {spec!r}: expected NAME=\"FLAGS\" with a new NAME")
        flags[name] = extra if "--reweight-teacher" in extra else METHODS["deep"] + " " + extra
    return flags


def planned_runs(conditions, args, flags):
    """(run name, what it is) of every run run_condition will do, in its order (a shared pretraining
    once); a run whose outputs exist is marked done (it is only rescored)."""
    plan = []
    for cond, data in conditions.items():
        for seed in args.seeds:
            if args.reweight_phase == "finetune":
                pre = f"{cond}-pretrain-seed{args.pretrain_seed or seed}"
                if pre not in [name for name, _ in plan]:
                    done = (args.out / pre / "checkpoint_best.pt").exists()
                    plan.append((pre, "pretraining" + (", done" if done else "")))
            for method, method_args in flags.items():
                if "oracle" in method_args.split() and not (Path(data) / "train.noise").exists():
                    continue
                if method == "pretrained":
                    if args.reweight_phase == "finetune":
                        name = f"{cond}-pretrained-seed{args.pretrain_seed or seed}"
                        if name not in [n for n, _ in plan]:
                            plan.append((name, "the pretrained student's translation"))
                    continue
                if method in FILTERS:  # its helper runs first, and its row's name (as filter_method makes them)
                    if args.reweight_phase == "pretrain":
                        continue
                    pre_seed = args.pretrain_seed or seed
                    helpers = [(f"{cond}-filter-scores-seed{pre_seed}", "filter scores of the training pairs")]
                    if FILTERS[method] == "dcce":
                        helpers.insert(0, (f"{cond}-pretrain-reverse-seed{pre_seed}", "reverse-model pretraining"))
                    elif FILTERS[method] == "excess":
                        helpers.insert(0, (f"{cond}-reference-seed{pre_seed}", "reference fine-tune on the trusted split"))
                    plan += [h for h in helpers if h[0] not in [n for n, _ in plan]]
                    if args.filter_drop_oracle_rate:
                        if not (Path(data) / "train.noise").exists():
                            continue
                        method = f"{method}@true-rate"
                    elif args.filter_drop != DEFAULT_FILTER_DROP:
                        method = f"{method}@drop{args.filter_drop:g}"
                name = f"{cond}-{method}-seed{seed}"
                done = (args.out / name / "test" / "generate-test.txt").exists()
                what = "pretraining with the method" if args.reweight_phase == "pretrain" else "fine-tune"
                plan.append((name, f"{method} {what}" + (", done: rescored only" if done else "")))
    return plan


def language_pair(data):
    """(source, target) languages of a data-bin's train split (``train.SRC-TGT.SRC.idx``)."""
    for idx in sorted(Path(data).glob("train.*-*.*.idx")):
        src, _, tgt = idx.name.split(".")[1].partition("-")
        if idx.name == f"train.{src}-{tgt}.{src}.idx":
            return src, tgt
    sys.exit(f"[experiment] error: {data} has no binarized train split (train.SRC-TGT.SRC.idx)")


def score_bin():
    """``fairseq-reweight-score`` beside this Python, else ``python -m fairseq_reweight.cli.score_pairs``."""
    local = Path(sys.executable).parent / "fairseq-reweight-score"
    return [str(local)] if local.exists() else [sys.executable, "-m", "fairseq_reweight.cli.score_pairs"]


def trusted_subset(args):
    """The split the teacher meta-validates on (``--meta-valid-subset`` in --finetune-args, else the
    task's default, ``valid``): the trusted data of the excess-loss reference."""
    flags = shlex.split(args.finetune_args)
    return flags[flags.index("--meta-valid-subset") + 1] if "--meta-valid-subset" in flags[:-1] else "valid"


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
      fine-tune's own optimizer and budget (momentum SGD, lr 1e-3, the preset's fine-tuning updates),
      OUT/COND-reference-seedS. SGD rather than Adam: the reference then differs from the student only
      by the data it saw, as every method's fine-tune does, and a small SGD move on a small trusted set
      does not memorise it (fresh Adam moves every weight by about lr per step from the first update).
    """
    out = args.out / f"{cond}-filter-scores-seed{pre_seed}"
    scores = out / f"{kind}.txt"
    if scores.exists():
        if out.name not in PROGRESS.started:
            PROGRESS.stage(out.name, "filter scores found")
        log(f"{kind} scores found: {scores}")
        return scores
    cmd = score_bin() + [str(data), "--path", str(pretrained), "--max-tokens", str(preset["max_tokens"])]
    if "--cpu" in shlex.split(preset["device"]) + train_args:
        cmd.append("--cpu")
    if kind == "dcce":
        src, tgt = language_pair(data)
        reverse = pretrain(data, args.out / f"{cond}-pretrain-reverse-seed{pre_seed}", preset, pre_seed,
                           train_args + shlex.split(args.pretrain_args) + ["--source-lang", tgt, "--target-lang", src])
        cmd += ["--reverse-path", str(reverse)]
    elif kind == "excess":
        trusted = trusted_subset(args)
        reference, _ = finetune(data, pretrained, args.out / f"{cond}-reference-seed{pre_seed}", preset,
                                f"--reweight-teacher none --train-subset {shlex.quote(trusted)} --disable-validation",
                                pre_seed, train_args + shlex.split(args.finetune_args))
        cmd += ["--reference-path", str(reference)]
    partial = out / f"{kind}.txt.partial"
    out.mkdir(parents=True, exist_ok=True)
    PROGRESS.stage(out.name, f"scoring the training pairs ({kind}) …")
    run(cmd + ["--output", str(partial)], args.out / "logs" / f"{out.name}-{kind}.log")
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


def filter_method(method, cond, data, pretrained, pre_seed, args, preset, train_args):
    """(row name, fine-tuning flags, the score's noise AUC or None) of a filter method: score the training
    pairs, drop the worst X % (--filter-drop, or the true noise rate with --filter-drop-oracle-rate: rows
    METHOD@true-rate), fine-tune with ``--reweight-teacher pairs`` on the 0/1 weights; (None, None, None)
    where --filter-drop-oracle-rate has no sidecar to read. The sidecar is read only for that rate and
    for the AUC, never for a score."""
    import numpy as np

    from fairseq_reweight.cli.score_pairs import noise_auc
    from fairseq_reweight.core.metrics import read_noise_sidecar

    kind = FILTERS[method]
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
    weights = scores_file.parent / f"{name}.weights"
    if not weights.exists():
        kept = drop_worst(scores, drop, higher_is_worse=kind != "excess")
        weights.write_text("".join(f"{w}\n" for w in kept))
        log(f"{name}: dropped {len(kept) - kept.sum()} of {len(kept)} pairs (X = {drop:.3f}): {weights}")
    auc = round(noise_auc(scores, noisy, higher_is_worse=kind != "excess"), 4) if noisy is not None else None
    return name, f"--reweight-teacher pairs --reweight-pair-weights {shlex.quote(str(weights))}", auc


def drop_fraction(text):
    """``--filter-drop``: a share in [0, 1)."""
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a share of the pairs in [0, 1), got {text}")
    return value


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
            if method in FILTERS:
                if args.reweight_phase == "pretrain":
                    log(f"{cond}: {method} filters with the pretrained student's scores: not with --reweight-phase pretrain")
                    continue
                method, method_args, filter_auc = filter_method(method, cond, data, pre, pre_seed, args, preset,
                                                                train_args)
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
            rows.append(dict(data=cond, method=method, seed=seed, **scores, noise_auc=auc, sec_per_update=round(sec, 4),
                             run_dir=str(args.out / name), command=" ".join(shlex.quote(c) for c in cmd)))
    for row in rows:  # a filter's noise AUC is its score's (the fine-tune logs its 0/1 weights')
        row["noise_auc"] = filter_aucs.get((row["method"], row["seed"]), row["noise_auc"])
    return rows


def pretrained_row(cond, data, pretrained, seed, args, preset):
    """The results.csv row of the pretrained student without fine-tuning (translated once per
    pretraining, a row per fine-tuning seed so that each seed's runs are compared with it)."""
    run_dir = args.out / f"{cond}-pretrained-{pretrained.parent.name.rsplit('-', 1)[1]}"
    hyps, refs = translate(data, pretrained, run_dir / "test", preset)
    scores = score(cond, data, run_dir, hyps, refs, args)
    return dict(data=cond, method="pretrained", seed=seed, **scores, noise_auc=None, sec_per_update=float("nan"),
                run_dir=str(run_dir), command=f"(no fine-tune: {pretrained}; its command is in the pretraining log)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", action="append", required=True, metavar="NAME=DATA_BIN",
                        help="a data condition: its name and fairseq data-bin (repeatable)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny-cpu")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=[m for m in METHODS if m not in FILTERS],
                        help="default: all but the filters (filter-ce, filter-dcce, excess-loss: see the top)")
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
    parser.add_argument("--pretrain-updates", type=int, help="override the preset's pretraining updates")
    parser.add_argument("--raw-references", action="append", default=[], metavar="NAME=FILE",
                        help="the untokenized, original-case test references of condition NAME (default: the raw/ "
                        "test file data_prep kept beside the data-bin or its clean_dir; repeatable)")
    parser.add_argument("--reweight-phase", choices=["finetune", "pretrain"], default="finetune",
                        help="where the methods act: the SGD fine-tune after plain Adam pretraining (the paper), or "
                        "Adam pretraining from scratch (--optimizer reweight_adam; no fine-tune)")
    args = parser.parse_args(argv)
    preset = dict(PRESETS[args.preset])
    for key in ("finetune_updates", "pretrain_updates"):
        if getattr(args, key):
            preset[key] = getattr(args, key)
    conditions = {}
    for spec in args.data:
        name, sep, path = spec.partition("=")
        if not sep or not Path(path).is_dir():
            parser.error(f"--data {spec!r}: expected NAME=DATA_BIN with an existing directory")
        if not list(Path(path).glob("test.*.idx")):
            parser.error(f"--data {spec!r}: {path} has no binarized test split (test.*.idx)")
        conditions[name] = Path(path)
    train_args = shlex.split(args.train_args)
    args.out.mkdir(parents=True, exist_ok=True)
    flags = method_flags(args)
    overrides = {}
    for spec in args.raw_references:
        name, sep, path = spec.partition("=")
        if not sep or name not in conditions or not Path(path).is_file():
            parser.error(f"--raw-references {spec!r}: expected NAME=FILE with a --data NAME and an existing file")
        overrides[name] = Path(path)
    args.references = references(conditions, overrides)
    started = time.time()
    PROGRESS.announce(planned_runs(conditions, args, flags))
    rows = []
    for cond, data in conditions.items():
        rows += run_condition(cond, data, args, preset, flags, train_args)
    log(f"all {len(PROGRESS.plan)} runs done in {_duration(time.time() - started)}; paired bootstrap against the "
        "baselines …")
    all_rows = results.merge_csv(args.out / "results.csv", rows)
    results.add_p_values(all_rows, args.references, fresh=[(r["data"], r["method"], r["seed"]) for r in rows])
    results.write_csv(args.out / "results.csv", all_rows)
    pretrained = (f"one pretrained student (seed {args.pretrain_seed}) per condition for all fine-tuning seeds"
                  if args.pretrain_seed else "one pretrained student per fine-tuning seed")
    note = (f"Test set, beam {preset['beam']}; mean ± std over seeds; {pretrained}; "
            f"{preset['finetune_updates']} fine-tuning updates.")
    if args.reweight_phase == "pretrain":
        note = (f"Test set, beam {preset['beam']}; mean ± std over seeds; the methods act during Adam pretraining "
                f"from scratch (reweight_adam), {preset['pretrain_updates']} updates each, last checkpoint; no fine-tune.")
    if any(r["method"].endswith("@true-rate") for r in all_rows):
        note += (" METHOD@true-rate: a filter that drops the true noise rate, read from train.noise (oracle-informed: "
                 "not available to a real user).")
    methods = list(dict.fromkeys(list(METHODS) + list(flags) + [r["method"] for r in all_rows]))
    table = results.write_tables(all_rows, args.out, list(conditions), methods, note)
    print("\n" + table)
    log(f"wrote {args.out / 'results.md'} and results.csv in {time.time() - started:.0f}s")


if __name__ == "__main__":
    main()
