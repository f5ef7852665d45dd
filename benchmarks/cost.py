#!/usr/bin/env python
"""Time per update and peak memory of reweighted fine-tuning against plain fairseq momentum SGD.

Every configuration trains the same model from the same initial parameters on the same batches with
fairseq's own Trainer, in one run:

- ``plain``: ``--task translation --criterion label_smoothed_cross_entropy --optimizer sgd`` (fairseq);
- ``K=20,B=2``: this method with the paper's schedule, and a sweep over K and B;
- ``lookahead``: a one-step look-ahead meta-update before every step (K=1, B=1), the cost pattern of
  L2RW / Meta-Weight-Net;
- ``K=20,B=2 fwd-rev``: the ``--dual-sweep`` pairs with ``--reweight-hvp forward-over-reverse``
  (each replayed step's Hessian-vector products from a backward pass at dual numbers instead of a
  double backward);
- ``K=20,B=2 replay``: the ``--replay-sweep`` pairs with ``--reweight-newest-step replay`` (the update
  before a meta-update replayed like the others instead of keeping its gradient's graph);
- ``K=20,B=5 C=2``: the ``--chunk-sweep`` triples with ``--reweight-chunks C`` (every micro-batch
  of the B updates before a meta-update trained and replayed as C chunks of its sentences: the
  meta-update's peak memory is one chunk's);
- the Adam column: plain fairseq ``--optimizer adam`` against ``--optimizer reweight_adam``
  (``--reweight-history checkpoint``) at ``--adam-sweep`` (default K=20, B=2), as ratios to plain Adam.

Every configuration is timed on the same updates: after max(K)+1 warm-up updates, over
``--periods`` x lcm(K) updates (whole periods of every K; at least 20), so the meta-updates are
amortised exactly and batch sizes do not differ between configurations. Peak memory is what
training adds (model, optimizer, activations, replay): on a GPU ``torch.cuda.max_memory_allocated``
over what was allocated before the configuration's model was built, all configurations in one
process; on the CPU the peak resident set size (:class:`PeakRSS`) over the RSS before the model was
built, each configuration in a new process: a process's RSS does not shrink when PyTorch
frees memory, so in one process every configuration would inherit the peak of those before it.
Prints a table of ratios to ``plain``. ``--repeats N``
measures every configuration N times, round-robin, and prints each ratio's median over the
repeats (each repeat's ratio to that repeat's plain run) with its range: on a small shared CPU
machine single ratios vary between runs (docs/BENCHMARKS.md), and more when the machine slows for
a while. ``--interleave`` times only, robustly: plain and each configuration are trained side by side
in one process and timed in alternation, K updates (one meta-update) at a time, so that both sides
see the same machine; it prints the ratio of the summed times and the range over the K-update
stretches.

    python -m benchmarks.cost DATA_BIN --arch transformer_iwslt_de_en --max-tokens 4096   # GPU
    python -m benchmarks.cost DATA_BIN --preset cpu-small --repeats 3                      # CPU
    python -m benchmarks.cost DATA_BIN --preset cpu-small --interleave --repeats 3         # CPU, time only
"""
import argparse
import copy
import gc
import logging
import math
import shlex
import statistics
import time

import torch

from benchmarks.common import (PeakRSS, add_model_arguments, build, in_child, model_flags, summary, synchronize,
                               time_meta_updates, training_flags, uses_cuda)


def measure(name, data, flags, init_state, batches, warmup, timed_updates):
    cuda = uses_cuda(flags)
    # on a GPU all configurations share this process: the trainer before this one (reference cycles)
    # must be gone, and what is still allocated is not this configuration's
    gc.collect()
    start_allocated = torch.cuda.memory_allocated() if cuda else 0
    start_rss = PeakRSS.rss()
    trainer, _, _ = build(data, flags)
    trainer.model.load_state_dict(init_state)
    for sample in batches[:warmup]:
        trainer.train_step([sample])
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as rss:
        start = time.perf_counter()
        for sample in batches[warmup: warmup + timed_updates]:
            trainer.train_step([sample])
        synchronize(cuda)
        elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - start_allocated if cuda else rss.peak - start_rss
    del trainer
    gc.collect()
    return {"name": name, "ms": 1000 * elapsed / timed_updates, "peak": peak, "exact peak": cuda or rss.exact}


def measure_pair(name, data, plain_flags, flags, period, init_state, batches, warmup, timed_updates):
    """Time per update of plain fairseq and of one configuration, trained side by side in one process
    and timed in alternation, ``period`` updates at a time (the configuration's K: each stretch holds
    one meta-update), plain first in every other stretch. Whatever slows the machine for a while
    then slows both sides alike; the ratio is of the summed times, the range over the stretches.
    The meta-updates are timed too (the driver's ``meta_update_hook``), so that the ratio splits into
    the configuration's ordinary updates against plain and its meta-updates in plain updates."""
    trainers = [build(data, f)[0] for f in (plain_flags, flags)]
    cuda = uses_cuda(flags)
    for trainer in trainers:
        trainer.model.load_state_dict(init_state)
    meta_times = {}
    time_meta_updates(trainers[1], "meta", meta_times, cuda)
    for sample in batches[:warmup]:
        for trainer in trainers:
            trainer.train_step([sample])
    meta_times.clear()
    elapsed = _alternate(trainers, batches, warmup, timed_updates, period, cuda)
    updates = period * len(elapsed[0])
    meta = meta_times.get("meta", [])
    return {"name": name, "plain ms": 1000 * sum(elapsed[0]) / updates, "ms": 1000 * sum(elapsed[1]) / updates,
            "stretch ratios": [ours / plain for plain, ours in zip(*elapsed)],
            "step ms": 1000 * (sum(elapsed[1]) - sum(meta)) / updates,
            "meta ms": 1000 * statistics.mean(meta) if meta else math.nan}


def _alternate(trainers, batches, warmup, timed_updates, period, cuda):
    """Seconds per stretch of ``period`` updates, per trainer, taking turns (plain first in every
    other stretch)."""
    elapsed = ([], [])
    for stretch, start in enumerate(range(warmup, warmup + timed_updates - period + 1, period)):
        for side in ((0, 1) if stretch % 2 == 0 else (1, 0)):
            synchronize(cuda)
            begin = time.perf_counter()
            for sample in batches[start: start + period]:
                trainers[side].train_step([sample])
            synchronize(cuda)
            elapsed[side].append(time.perf_counter() - begin)
    return elapsed


def _fields(spec: str):
    """``"20:2,20:5"`` -> [["20", "2"], ["20", "5"]]; ``""`` -> []."""
    return [item.split(":") for item in spec.split(",") if item]


def parse_args():
    """(parser, its arguments, fairseq-train's model and batch flags)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--sweep", default="20:2,20:5,50:5",
                        help="K:B pairs to measure besides plain and lookahead")
    parser.add_argument("--dual-sweep", default="20:2,20:5",
                        help="K:B pairs to measure also with --reweight-hvp forward-over-reverse ('' for none)")
    parser.add_argument("--replay-sweep", default="",
                        help="K:B pairs to measure also with --reweight-newest-step replay ('' for none)")
    parser.add_argument("--chunk-sweep", default="20:5:2",
                        help="K:B:C triples to measure with --reweight-chunks C ('' for none)")
    parser.add_argument("--history", default="reverse", choices=["reverse", "checkpoint"])
    parser.add_argument("--repeats", type=int, default=1,
                        help="measure every configuration this many times and print medians and ranges")
    parser.add_argument("--adam-sweep", default="20:2",
                        help="K:B pairs of reweight_adam to measure against plain fairseq Adam ('' for none)")
    parser.add_argument("--periods", type=int, default=1,
                        help="timed updates = PERIODS x lcm of the K values (default 1: 100 updates for the default sweep)")
    parser.add_argument("--no-lookahead", action="store_true",
                        help="leave out the look-ahead every step (K=1, B=1), the slowest configuration")
    parser.add_argument("--interleave", action="store_true",
                        help="time only: train plain and each configuration side by side in one process and "
                        "time them in alternation, K updates at a time (ratios robust to a machine that "
                        "slows for a while; no memory figures)")
    parser.add_argument("--reweight-args", default="",
                        help="extra flags for the reweighting configurations only, e.g. "
                        "\"--meta-valid-max-tokens 4096 --teacher-hidden-layers 1\"")
    args, flags = parser.parse_known_args()
    return parser, args, model_flags(args, flags)


def configurations(args, flags):
    """The tables to measure, each ((plain's name, plain's flags), [(name, K, flags), ...]): momentum
    SGD with every sweep, then, where ``--adam-sweep`` names any, Adam."""
    plain, ours = training_flags(flags)
    ours += ["--reweight-history", args.history] + shlex.split(args.reweight_args)

    def schedule(k, b, *more):
        return ours + ["--reweight-interval", k, "--reweight-backprop-steps", b, *more]

    configs = [(f"K={k},B={b}", int(k), schedule(k, b)) for k, b in _fields(args.sweep)]
    configs += [(f"K={k},B={b} fwd-rev", int(k), schedule(k, b, "--reweight-hvp", "forward-over-reverse"))
                for k, b in _fields(args.dual_sweep)]
    configs += [(f"K={k},B={b} replay", int(k), schedule(k, b, "--reweight-newest-step", "replay"))
                for k, b in _fields(args.replay_sweep)]
    configs += [(f"K={k},B={b} C={c}", int(k), schedule(k, b, "--reweight-chunks", c))
                for k, b, c in _fields(args.chunk_sweep)]
    if not args.no_lookahead:
        configs.append(("lookahead K=1,B=1", 1, schedule("1", "1")))
    plain_adam, ours_adam = training_flags(flags, "adam")
    ours_adam += ["--reweight-history", "checkpoint"] + shlex.split(args.reweight_args)
    adam_configs = [(f"Adam K={k},B={b}", int(k), ours_adam + ["--reweight-interval", k, "--reweight-backprop-steps", b])
                    for k, b in _fields(args.adam_sweep)]
    tables = [(("plain fairseq SGD", plain), configs)]
    if adam_configs:
        tables.append((("plain fairseq Adam", plain_adam), adam_configs))
    return tables


def update_counts(tables, periods):
    """(warm-up updates, timed updates): max(K) + 1, then PERIODS x lcm(K) updates, at least 20."""
    intervals = [k for _, configs in tables for _, k, _ in configs]
    period = math.lcm(*intervals)
    return max(intervals) + 1, periods * period * max(1, math.ceil(20 / (periods * period)))


def draw_batches(data, plain, needed):
    """(the initial parameters, ``needed`` training batches), from plain fairseq's Trainer (epochs
    after the first where one is not enough)."""
    trainer, _, _ = build(data, plain)
    init_state = copy.deepcopy(trainer.model.state_dict())
    itr = trainer.get_train_iterator(epoch=1, load_dataset=False).next_epoch_itr(shuffle=True)
    batches = []
    while len(batches) < needed:
        try:
            batches.append(next(itr))
        except StopIteration:
            itr = trainer.get_train_iterator(epoch=2, load_dataset=False).next_epoch_itr(shuffle=True)
    return init_state, batches


def compare_interleaved(args, tables, run, init_state, batches, warmup, timed_updates):
    """``--interleave``: every configuration against its plain, side by side (:func:`measure_pair`)."""
    runs = [[[] for _ in table_configs] for _, table_configs in tables]
    for _ in range(args.repeats):
        for ((_, plain_flags), table_configs), table_runs in zip(tables, runs):
            for (name, k, flags), config_runs in zip(table_configs, table_runs):
                config_runs.append(run(measure_pair, name, args.data, plain_flags, flags, k, init_state,
                                       batches, warmup, timed_updates))
                result = config_runs[-1]
                print(f"measured {name}: {result['ms']:.1f} ms/update, plain {result['plain ms']:.1f}",
                      flush=True)
    for ((plain_name, _), table_configs), table_runs in zip(tables, runs):
        print_pairs(plain_name, table_configs, table_runs)
    print("\n(interleaved: time only, plain and each configuration in one process)")


def compare_separately(args, tables, run, init_state, batches, warmup, timed_updates, cuda):
    """Plain and every configuration one after the other (:func:`measure`): time and peak memory."""
    runs = [[[] for _ in range(len(table_configs) + 1)] for _, table_configs in tables]
    for _ in range(args.repeats):
        for (base, table_configs), table_runs in zip(tables, runs):
            for (name, flags), config_runs in zip([base] + [(n, f) for n, _, f in table_configs], table_runs):
                config_runs.append(run(measure, name, args.data, flags, init_state, batches, warmup, timed_updates))
                result = config_runs[-1]
                print(f"measured {name}: {result['ms']:.1f} ms/update, peak {result['peak'] / 2**20:.0f} MiB",
                      flush=True)
    for (base, table_configs), table_runs in zip(tables, runs):
        print_table([base[0]] + [name for name, _, _ in table_configs], table_runs)
    exact = all(r["exact peak"] for table_runs in runs for config_runs in table_runs for r in config_runs)
    peak = "torch.cuda.max_memory_allocated" if cuda else "peak RSS ({})".format(
        "the kernel's high-water mark" if exact else "sampled every millisecond")
    print(f"\n(history mode: {args.history}, Adam: checkpoint; peak memory: {peak} over what was there before "
          "the model was built)")


def main():
    parser, args, flags = parse_args()
    logging.disable(logging.WARNING)
    import fairseq_reweight  # noqa: F401

    tables = configurations(args, flags)
    if not any(table_configs for _, table_configs in tables):
        parser.error("nothing to measure: every sweep is empty and --no-lookahead is given")
    warmup, timed_updates = update_counts(tables, args.periods)
    plain = tables[0][0][1]
    init_state, batches = draw_batches(args.data, plain, warmup + timed_updates)
    cuda = uses_cuda(plain)
    device = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"device: {device}; torch {torch.__version__}; {sum(v.numel() for v in init_state.values()):,} "
          f"parameters; {sum(b['ntokens'] for b in batches) / len(batches):.0f} target tokens per batch")
    print(f"timing updates {warmup + 1}-{warmup + timed_updates} of every configuration (after {warmup} warm-up "
          "updates)")
    # a discarded first run absorbs one-off costs (CUDA context, kernel selection, allocator growth);
    # on a GPU it takes every batch, since the first pass over each batch shape selects its kernels
    # (the configuration measured first would otherwise run slower: docs/BENCHMARKS.md)
    measure("warm-up", args.data, plain, init_state, batches, warmup if cuda else 2, timed_updates if cuda else 2)
    # on the CPU every measurement in its own process (peak RSS); on a GPU in this one
    run = (lambda function, *function_args: function(*function_args)) if cuda else in_child
    if args.interleave:
        compare_interleaved(args, tables, run, init_state, batches, warmup, timed_updates)
    else:
        compare_separately(args, tables, run, init_state, batches, warmup, timed_updates, cuda)


def print_pairs(plain_name, configs, runs):
    """Interleaved runs: per configuration, the median ms of both sides, the median (min-max) over
    the repeats of the ratio of summed times, and the range of the per-stretch ratios."""
    repeats = len(runs[0])
    width = 8 if repeats == 1 else 18
    print(f"\n{'configuration':<22} {'plain ms':>9} {'ms/update':>10} {'x plain':>{width}} {'stretches':>11}"
          f" {'steps x plain':>{width}} {'meta-update in plain updates':>{width + 12}}   (plain: {plain_name})")
    for (name, _, _), config_runs in zip(configs, runs):
        stretches = [ratio for r in config_runs for ratio in r["stretch ratios"]]
        print(f"{name:<22} {statistics.median(r['plain ms'] for r in config_runs):>9.1f} "
              f"{statistics.median(r['ms'] for r in config_runs):>10.1f} "
              f"{summary([r['ms'] / r['plain ms'] for r in config_runs]):>{width}} "
              f"{min(stretches):>5.2f}-{max(stretches):.2f} "
              f"{summary([r['step ms'] / r['plain ms'] for r in config_runs]):>{width}} "
              f"{summary([r['meta ms'] / r['plain ms'] for r in config_runs]):>{width + 12}}")
    print("(stretches: the range of the ratios of single K-update stretches; steps: the configuration's time "
          "without its meta-updates, per update; meta-update: its mean time over plain's time per update"
          + (f"; medians over {repeats} repeats" if repeats > 1 else "") + ")")


def print_table(names, runs):
    """Per configuration: median ms and peak, and the median (min-max) of its ratios to the plain
    run of the same repeat."""
    base = runs[0]
    width = 8 if len(base) == 1 else 18
    print(f"\n{'configuration':<22} {'ms/update':>10} {'x plain':>{width}} {'peak MiB':>9} {'x plain':>{width}}")
    for name, config_runs in zip(names, runs):
        ms = statistics.median(r["ms"] for r in config_runs)
        peak = statistics.median(r["peak"] for r in config_runs)
        time_ratios = [r["ms"] / b["ms"] for r, b in zip(config_runs, base)]
        peak_ratios = [r["peak"] / b["peak"] for r, b in zip(config_runs, base)]
        print(f"{name:<22} {ms:>10.1f} {summary(time_ratios):>{width}} {peak / 2**20:>9.0f} "
              f"{summary(peak_ratios):>{width}}")
    if len(base) > 1:
        print(f"(medians over {len(base)} repeats; ratios: median (min-max) of each repeat's ratio to its plain run)")


if __name__ == "__main__":
    main()
