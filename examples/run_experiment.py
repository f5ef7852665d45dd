#!/usr/bin/env python
"""Pretrain -> baseline / oracle / teacher fine-tunes -> BLEU table (the paper's Table 7, with bounds).

For each data condition (a fairseq data-bin made by data_prep/, e.g. ``clean`` and ``noisy``):
  1. pretrain a Transformer with Adam (lr 5e-4, inverse_sqrt, label smoothing 0.1) on that data,
     once per seed or, with ``--pretrain-seed N``, once for all fine-tuning seeds;
  2. from its best checkpoint, fine-tune with momentum SGD (lr 1e-3, momentum 0.9) for the same
     number of updates, one run per method and seed: ``baseline`` (--reweight-teacher none),
     ``oracle`` (noisy pairs weighted 0 from the data-bin's train.noise: the bound of
     down-weighting the noise; skipped where there is no sidecar), ``surface``, ``deep`` (the paper's),
     ``robust`` (``--reweight-preset robust``) and every
     ``--variant NAME="FLAGS"`` (the deep teacher with FLAGS, e.g. ``--teacher-hidden-layers 1``);
  3. translate the test set with ``fairseq-generate --beam 5`` and score it (examples/results.py):
     tokenized BLEU, sacreBLEU and chrF with signatures, paired bootstrap against the baseline,
     the share of the oracle gap closed, the final noise AUC and the time per update;
  4. add the runs to OUT/results.csv (kept across invocations) and write OUT/results.md.

With ``--reweight-phase pretrain`` the methods act during Adam pretraining from scratch instead
(``--optimizer reweight_adam --reweight-history checkpoint``, the same Adam recipe as step 1, the
same updates for every method; no fine-tune): the teacher where the noise does its harm. Use a
separate ``--out`` per phase.

Every step runs fairseq's own command-line programs (printed before they run, logged under
OUT/logs/), and is skipped when its output already exists, so an interrupted run picks up where it
stopped. ``--train-args`` passes flags to every fairseq-train call (e.g. ``--fp16``, or
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
    "baseline": "--reweight-teacher none",
    "oracle": "--reweight-teacher oracle",
    "surface": "--reweight-teacher surface",
    "deep": "--reweight-teacher deep",
    "robust": "--reweight-teacher deep --reweight-preset robust",
}
USER_DIR = Path(__file__).resolve().parent.parent / "fairseq_reweight"


def log(message):
    print(f"[experiment] {message}", flush=True)


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
        log(f"pretrained model found: {ckpt}")
        return ckpt
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
        log(f"{what} model found: {ckpt}")
    else:
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
        cmd = fairseq_bin("fairseq-generate") + [str(data), "--user-dir", str(USER_DIR),
               "--task", "reweight_translation", "--path", str(ckpt), "--gen-subset", "test",
               "--beam", str(preset["beam"]), "--max-tokens", str(preset["max_tokens"]),
               "--required-batch-size-multiple", "1",  # else fairseq drops a ragged last batch
               "--remove-bpe", remove_subword_flag(data), "--results-path", str(out_dir)]
        cmd += shlex.split(preset["device"])
        run(cmd, out_dir / "generate.log")
    return results.read_hypotheses(hyp_file)


def method_flags(args):
    """{method: fine-tuning flags} of --methods and every --variant."""
    flags = {m: METHODS[m] for m in args.methods}
    for spec in args.variant:
        name, sep, extra = spec.partition("=")
        if not sep or not name or name in METHODS:
            sys.exit(f"[experiment] error: --variant {spec!r}: expected NAME=\"FLAGS\" with a new NAME")
        flags[name] = extra if "--reweight-teacher" in extra else METHODS["deep"] + " " + extra
    return flags


def run_condition(cond, data, args, preset, flags, train_args):
    """Every method and seed of one data condition; returns the results.csv rows."""
    rows = []
    for seed in args.seeds:
        if args.reweight_phase == "finetune":
            pre_seed = args.pretrain_seed or seed
            pre = pretrain(data, args.out / f"{cond}-pretrain-seed{pre_seed}", preset, pre_seed,
                           train_args + shlex.split(args.pretrain_args))
        for method, method_args in flags.items():
            if "oracle" in method_args.split() and not (Path(data) / "train.noise").exists():
                log(f"{cond}: no train.noise in {data}, so no oracle (it would be the baseline)")
                continue
            name = f"{cond}-{method}-seed{seed}"
            if args.reweight_phase == "pretrain":
                ckpt, cmd = reweighted_pretrain(data, args.out / name, preset, method_args, seed,
                                                train_args + shlex.split(args.pretrain_args))
            else:
                ckpt, cmd = finetune(data, pre, args.out / name, preset, method_args, seed,
                                     train_args + shlex.split(args.finetune_args))
            hyps, refs = translate(data, ckpt, args.out / name / "test", preset)
            tok_bleu, sacre, chrf, bleu_sig, chrf_sig = results.score(hyps, refs)
            sec, auc = results.training_figures(args.out / "logs" / f"{name}.log")
            log(f"{name}: tokenized BLEU {tok_bleu:.2f}, sacreBLEU {sacre:.2f}, chrF {chrf:.2f}")
            rows.append(dict(data=cond, method=method, seed=seed, tokenized_bleu=round(tok_bleu, 2),
                             sacrebleu=round(sacre, 2), chrf=round(chrf, 2), noise_auc=auc, sec_per_update=round(sec, 4),
                             bleu_signature=bleu_sig, chrf_signature=chrf_sig, run_dir=str(args.out / name),
                             command=" ".join(shlex.quote(c) for c in cmd)))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", action="append", required=True, metavar="NAME=DATA_BIN",
                        help="a data condition: its name and fairseq data-bin (repeatable)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny-cpu")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
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
    started = time.time()
    rows = []
    for cond, data in conditions.items():
        rows += run_condition(cond, data, args, preset, flags, train_args)
    all_rows = results.merge_csv(args.out / "results.csv", rows)
    pretrained = (f"one pretrained student (seed {args.pretrain_seed}) per condition for all fine-tuning seeds"
                  if args.pretrain_seed else "one pretrained student per fine-tuning seed")
    note = (f"Test set, beam {preset['beam']}; mean ± std over seeds; {pretrained}; "
            f"{preset['finetune_updates']} fine-tuning updates.")
    if args.reweight_phase == "pretrain":
        note = (f"Test set, beam {preset['beam']}; mean ± std over seeds; the methods act during Adam pretraining "
                f"from scratch (reweight_adam), {preset['pretrain_updates']} updates each, last checkpoint; no fine-tune.")
    methods = list(dict.fromkeys(list(METHODS) + list(flags) + [r["method"] for r in all_rows]))
    table = results.write_tables(all_rows, args.out, list(conditions), methods, note)
    print("\n" + table)
    log(f"wrote {args.out / 'results.md'} and results.csv in {time.time() - started:.0f}s")


if __name__ == "__main__":
    main()
