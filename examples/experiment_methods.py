"""The methods and presets of examples/run_experiment.py: each method's fine-tuning flags, the presets'
models and schedules, and the plan of the runs ahead."""
import sys
from pathlib import Path

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
    # the label and the excess loss over the trusted reference (its losses: experiment_filters.reference_losses)
    "trusted": "--reweight-teacher deep --reweight-preset trusted",
    "l2t": "--reweight-teacher l2t",  # L2T-data (Fan et al., ICLR 2018): the paper's Table 7 baseline
    # filters (filter_method): drop the worst-scored pairs, fine-tune with the fixed 0/1 pair weights
    "filter-ce": "--reweight-teacher pairs",
    "filter-dcce": "--reweight-teacher pairs",
    "excess-loss": "--reweight-teacher pairs",
    "teacher-filter": "--reweight-teacher pairs",  # by the same seed's trusted teacher (run first)
}
# method: its score (experiment_filters.filter_scores, teacher_scores)
FILTERS = {"filter-ce": "ce", "filter-dcce": "dcce", "excess-loss": "excess", "teacher-filter": "teacher"}
TRUSTED = "--reweight-preset trusted"  # flags that read the reference losses, computed before the run
DEFAULT_FILTER_DROP = 0.2  # --filter-drop (its help says why)


def reads_reference_losses(method_args: str) -> bool:
    """Whether a method's flags take the trusted reference's losses, run_experiment computing them."""
    return TRUSTED in method_args and "--reweight-reference-losses" not in method_args


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
                if (method in FILTERS or reads_reference_losses(method_args)) and args.reweight_phase == "pretrain":
                    continue
                pre_seed = args.pretrain_seed or seed
                helpers = []
                if reads_reference_losses(method_args) or FILTERS.get(method) in ("excess", "teacher"):
                    helpers.append((f"{cond}-reference-seed{pre_seed}", "reference fine-tune on the trusted split"))
                if reads_reference_losses(method_args) or FILTERS.get(method) == "teacher":
                    helpers.append((f"{cond}-filter-scores-seed{pre_seed}", "scores of the training pairs"))
                if FILTERS.get(method) == "teacher":
                    done = (args.out / f"{cond}-trusted-seed{seed}" / "checkpoint_last.pt").exists()
                    helpers.append((f"{cond}-trusted-seed{seed}", "trusted fine-tune" + (", done" if done else "")))
                if method in FILTERS:  # its helpers run first, and its row's name (as filter_method makes them)
                    if FILTERS[method] == "dcce":
                        helpers.append((f"{cond}-pretrain-reverse-seed{pre_seed}", "reverse-model pretraining"))
                    helpers.append((f"{cond}-filter-scores-seed{pre_seed}", "scores of the training pairs"))
                plan += [h for h in helpers if h[0] not in [n for n, _ in plan]]
                if method in FILTERS:
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
