#!/usr/bin/env python
"""A meta-update's cost per data-parallel rank at 1, 2, ... ranks, through fairseq's own distributed training.

Strong scaling: every rank count trains on the same global batches (one rank with ``--update-freq N``
against N ranks with ``--update-freq 1``; ``tests/test_driver.py`` checks that they train alike)
and draws the same meta-validation batches. Each rank replays only its own micro-batches and takes
the validation loss of its 1/N share of the validation sentences (``Replay.validation_gradient``),
so a meta-update's work per rank is 1/N of the one-rank work, as a training step's is; before the
validation batch was sharded, its forward and backward stayed whole on every rank.

For each rank count, in one run: ms per update of plain fairseq momentum SGD and of this method
(same model, same initial parameters, same batches), their ratio, and on rank 0 the ms of a
meta-update and of its validation gradient (medians over the timed meta-updates, the first one,
with its one-off costs, left out). Each (rank count, configuration) runs in new processes with
``--threads`` threads per rank (default 1), so that N ranks on an N-core machine do not compete for
cores; ``--repeats`` runs every one that many times, round-robin, and prints medians with ranges.
On the CPU the ranks use gloo and ``--ddp-backend legacy_ddp``, as fairseq 0.12 needs there; on
GPUs nccl and fairseq's default DDP wrapper, one GPU a rank (that path has not been run yet).

    python benchmarks/ranks.py DATA_BIN --preset cpu-small --ranks 1,2 --repeats 3   # CPU, >= 2 cores
    python benchmarks/ranks.py DATA_BIN --arch transformer_iwslt_de_en --max-tokens 4096 --ranks 1,2,4,8   # GPUs
"""
import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cost  # noqa: E402  (build, training flags, presets)


def distributed_flags(world: int, rank: int, init_method: str, cuda: bool):
    if world == 1:
        return []
    backend = ["--distributed-backend", "nccl"] if cuda else ["--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp"]
    return ["--distributed-world-size", str(world), "--distributed-rank", str(rank), "--device-id", str(rank),
            "--distributed-init-method", init_method, "--distributed-no-spawn"] + backend


def worker(rank, world, data, flags, threads, warmup, timed, init_method, out):
    """One rank: build fairseq's Trainer (DDP-wrapped when world > 1), train warmup + timed updates of
    update_freq = max ranks / world micro-batches each, write its timings to out/rank{rank}.json."""
    torch.set_num_threads(threads)
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")  # N copies of fairseq's and hydra's deprecation warnings
    sys.path.insert(0, cost.REPO)
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.distributed import utils as distributed_utils

    import fairseq_reweight  # noqa: F401
    from fairseq_reweight.nmt import replay
    from fairseq_reweight.nmt.driver import ReweightDriver

    cuda = torch.cuda.is_available() and "--cpu" not in flags
    flags = flags + distributed_flags(world, rank, init_method, cuda)
    if cuda:
        torch.cuda.set_device(rank)
    if world > 1:  # what fairseq's distributed_main does before it calls train's main
        args = options.parse_args_and_arch(options.get_training_parser(), [data] + flags)
        distributed_utils.distributed_init(convert_namespace_to_omegaconf(args))
    times = {"meta-update": [], "validation gradient": []}
    ReweightDriver.meta_update = cost.timed(ReweightDriver.meta_update, "meta-update", times, cuda)
    replay.Replay.validation_gradient = cost.timed(replay.Replay.validation_gradient, "validation gradient",
                                                   times, cuda)
    torch.manual_seed(1)  # the same initial parameters on every rank and at every rank count
    trainer, task, cfg = cost.build(data, flags)
    update_freq = cfg.optimization.update_freq[0]
    itr = trainer.get_train_iterator(epoch=1, load_dataset=False).next_epoch_itr(shuffle=True)
    elapsed = []
    for _ in range(warmup + timed):
        samples = [next(itr) for _ in range(update_freq)]
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        trainer.train_step(samples)
        if cuda:
            torch.cuda.synchronize()
        elapsed.append(time.perf_counter() - start)
    result = {"ms_per_update": 1000 * sum(elapsed[warmup:]) / timed, "updates": trainer.get_num_updates(),
              **{label: [1000 * t for t in values[1:]] for label, values in times.items()}}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump(result, fh)


def run(world, data, flags, threads, warmup, timed):
    """``world`` processes of :func:`worker` (spawned: forking after OpenMP has started threads can
    hang); rank 0's timings."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        init_method = "file://" + os.path.join(out, "init")
        mp.spawn(worker, args=(world, data, flags, threads, warmup, timed, init_method, out), nprocs=world)
        with open(os.path.join(out, "rank0.json")) as fh:
            return json.load(fh)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data")
    parser.add_argument("--preset", choices=["cpu-small"], help="small model and batches for the CPU")
    parser.add_argument("--ranks", default="1,2", help="rank counts to compare (default 1,2)")
    parser.add_argument("--interval", type=int, default=10, help="K (default 10)")
    parser.add_argument("--backprop-steps", type=int, default=5, help="B (default 5)")
    parser.add_argument("--periods", type=int, default=4, help="timed updates = PERIODS x K (default 4)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    parser.add_argument("--repeats", type=int, default=1)
    args, model_flags = parser.parse_known_args()
    if args.preset == "cpu-small":
        model_flags = cost.CPU_SMALL + model_flags
    ranks = [int(n) for n in args.ranks.split(",")]
    plain, ours = cost.training_flags(model_flags)
    ours = ours + ["--reweight-interval", str(args.interval), "--reweight-backprop-steps", str(args.backprop_steps)]
    warmup, timed = args.interval + 1, args.periods * args.interval
    cuda = torch.cuda.is_available() and "--cpu" not in model_flags
    if cuda and max(ranks) > torch.cuda.device_count():
        parser.error(f"--ranks {args.ranks}: only {torch.cuda.device_count()} GPUs")
    if not cuda and max(ranks) * args.threads > os.cpu_count():
        print(f"warning: {max(ranks)} ranks x {args.threads} threads on {os.cpu_count()} cores: "
              "the ranks compete for cores and the per-rank times are not comparable", file=sys.stderr)
    device = torch.cuda.get_device_name() if cuda else f"CPU, {args.threads} thread(s) per rank"
    print(f"device: {device}; torch {torch.__version__}; K={args.interval}, B={args.backprop_steps}; "
          f"global batch = {max(ranks)} micro-batches at every rank count; timing updates "
          f"{warmup + 1}-{warmup + timed} ({args.periods} meta-updates)")
    configs = [(n, name, flags + ["--update-freq", str(max(ranks) // n)])
               for n in ranks for name, flags in (("plain", plain), ("ours", ours))]
    results = {(n, name): [] for n, name, _ in configs}
    for _ in range(args.repeats):
        for n, name, flags in configs:
            results[(n, name)].append(run(n, args.data, flags, args.threads, warmup, timed))

    def summary(values, digits=1):
        middle = statistics.median(values)
        if len(values) == 1:
            return f"{middle:.{digits}f}"
        return f"{middle:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"

    width = 10 if args.repeats == 1 else 22
    print(f"\n{'ranks':>5} {'plain ms/update':>{width}} {'ours ms/update':>{width}} {'x plain':>{width}} "
          f"{'meta-update ms':>{width}} {'validation ms':>{width}}")
    for n in ranks:
        plain_runs, our_runs = results[(n, "plain")], results[(n, "ours")]
        ratio = [o["ms_per_update"] / p["ms_per_update"] for o, p in zip(our_runs, plain_runs)]
        meta = [statistics.median(o["meta-update"]) for o in our_runs]
        valid = [statistics.median(o["validation gradient"]) for o in our_runs]
        print(f"{n:>5} {summary([p['ms_per_update'] for p in plain_runs]):>{width}} "
              f"{summary([o['ms_per_update'] for o in our_runs]):>{width}} "
              f"{summary(ratio, 2):>{width}} {summary(meta):>{width}} {summary(valid):>{width}}")
    if args.repeats > 1:
        print(f"(medians over {args.repeats} repeats, ranges in brackets; meta-update and validation: "
              "each repeat's median over its meta-updates, rank 0)")


if __name__ == "__main__":
    main()
