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

    python -m benchmarks.ranks DATA_BIN --preset cpu-small --ranks 1,2 --repeats 3   # CPU, >= 2 cores
    python -m benchmarks.ranks DATA_BIN --arch transformer_iwslt_de_en --max-tokens 4096 --ranks 1,2,4,8   # GPUs
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

from benchmarks import common


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
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.distributed import utils as distributed_utils

    import fairseq_reweight  # noqa: F401
    from fairseq_reweight.nmt import replay

    cuda = common.uses_cuda(flags)
    flags = flags + distributed_flags(world, rank, init_method, cuda)
    if cuda:
        torch.cuda.set_device(rank)
    if world > 1:  # what fairseq's distributed_main does before it calls train's main
        args = options.parse_args_and_arch(options.get_training_parser(), [data] + flags)
        distributed_utils.distributed_init(convert_namespace_to_omegaconf(args))
    times = {"meta-update": [], "validation gradient": []}
    replay.Replay.validation_gradient = common.timed(replay.Replay.validation_gradient, "validation gradient",
                                                     times, cuda)
    torch.manual_seed(1)  # the same initial parameters on every rank and at every rank count
    trainer, task, cfg = common.build(data, flags)
    common.time_meta_updates(trainer, "meta-update", times, cuda)
    update_freq = cfg.optimization.update_freq[0]
    itr = trainer.get_train_iterator(epoch=1, load_dataset=False).next_epoch_itr(shuffle=True)
    elapsed = []
    for _ in range(warmup + timed):
        samples = [next(itr) for _ in range(update_freq)]
        common.synchronize(cuda)
        start = time.perf_counter()
        trainer.train_step(samples)
        common.synchronize(cuda)
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
    common.add_model_arguments(parser)
    parser.add_argument("--ranks", default="1,2", help="rank counts to compare (default 1,2)")
    parser.add_argument("--interval", type=int, default=10, help="K (default 10)")
    parser.add_argument("--backprop-steps", type=int, default=5, help="B (default 5)")
    parser.add_argument("--periods", type=int, default=4, help="timed updates = PERIODS x K (default 4)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    parser.add_argument("--repeats", type=int, default=1)
    args, model_flags = parser.parse_known_args()
    model_flags = common.model_flags(args, model_flags)
    ranks = [int(n) for n in args.ranks.split(",")]
    plain, ours = common.training_flags(model_flags)
    ours = ours + ["--reweight-interval", str(args.interval), "--reweight-backprop-steps", str(args.backprop_steps)]
    warmup, timed = args.interval + 1, args.periods * args.interval
    cuda = common.uses_cuda(model_flags)
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
    print_table(ranks, results, args.repeats)


def print_table(ranks, results, repeats):
    """Per rank count: the medians (ranges) over the repeats of rank 0's figures."""
    width = 10 if repeats == 1 else 22
    print(f"\n{'ranks':>5} {'plain ms/update':>{width}} {'ours ms/update':>{width}} {'x plain':>{width}} "
          f"{'meta-update ms':>{width}} {'validation ms':>{width}}")
    for n in ranks:
        plain_runs, our_runs = results[(n, "plain")], results[(n, "ours")]
        ratio = [o["ms_per_update"] / p["ms_per_update"] for o, p in zip(our_runs, plain_runs)]
        meta = [statistics.median(o["meta-update"]) for o in our_runs]
        valid = [statistics.median(o["validation gradient"]) for o in our_runs]
        print(f"{n:>5} {common.summary([p['ms_per_update'] for p in plain_runs], 1):>{width}} "
              f"{common.summary([o['ms_per_update'] for o in our_runs], 1):>{width}} "
              f"{common.summary(ratio, 2):>{width}} {common.summary(meta, 1):>{width}} "
              f"{common.summary(valid, 1):>{width}}")
    if repeats > 1:
        print(f"(medians over {repeats} repeats, ranges in brackets; meta-update and validation: "
              "each repeat's median over its meta-updates, rank 0)")


if __name__ == "__main__":
    main()
