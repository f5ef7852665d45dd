"""The steps of examples/run_experiment.py, each a fairseq command-line program: pretraining, the
reweighted fine-tune (or pretraining), translation of the test set; the progress lines and logs."""
import shlex
import subprocess
import sys
import time
from pathlib import Path

import results  # examples/results.py

USER_DIR = Path(__file__).resolve().parent.parent / "fairseq_reweight"


def log(message):
    print(f"[experiment] {message}", flush=True)


def duration(seconds):
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
            f"{duration(time.time() - self.start)}, {left} run{'' if left == 1 else 's'} left)")


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


FINETUNE_OPTIMIZERS = {
    # the paper's: momentum SGD (the teacher's hypergradient undoes its steps, stores nothing)
    "sgd": ["--optimizer", "reweight_sgd", "--lr", "1e-3", "--momentum", "0.9", "--lr-scheduler", "fixed"],
    # the pretraining's Adam (betas, weight decay) at a constant lr after a short warm-up, fresh moments
    # (fairseq cannot carry the pretraining's Adam state across criteria): for a student that Adam took
    # close to convergence, where a switch to momentum SGD first undoes part of the pretraining
    "adam": ["--optimizer", "reweight_adam", "--reweight-history", "checkpoint", "--adam-betas", "(0.9,0.98)",
             "--lr", "3e-4", "--lr-scheduler", "fixed", "--warmup-updates", "50", "--weight-decay", "0.0001"],
}


def finetune(data, pretrained, out, preset, flags, seed, train_args):
    """The fine-tune from the pretrained student with ``preset["finetune_optimizer"]`` (FINETUNE_OPTIMIZERS;
    its lr is overridden by ``--finetune-args=--lr=...``)."""
    optimizer = FINETUNE_OPTIMIZERS[preset.get("finetune_optimizer", "sgd")] + [
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
