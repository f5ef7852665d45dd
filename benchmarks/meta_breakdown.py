#!/usr/bin/env python
"""Where a meta-update's time goes, in units of one training step of the same run.

Trains with this method through fairseq's Trainer (same flags as ``cost.py``) and times, per
meta-update, the validation gradient, each replayed step's Hessian-vector products (by double
backward, or with ``--reweight-hvp forward-over-reverse`` by a backward pass at dual numbers) and
the oldest replayed step by forward-mode AD (``teacher_grad_only``), and the whole meta-update,
against the mean time of a training step without a meta-update; the update before a meta-update,
which keeps its gradient's graph for it (``--reweight-newest-step kept``, the default), is timed
apart, and with it the newest step's products from that graph. The time per update of K=k, B=b is
then about ``1 + (validation + (b - 1) x replayed step + forward-mode + the rest + what the kept
update costs more) / k`` training steps (with a kept newest step, one of the b - 1 is the kept one).

    python benchmarks/meta_breakdown.py DATA_BIN --arch transformer_iwslt_de_en --max-tokens 4096   # GPU
    python benchmarks/meta_breakdown.py DATA_BIN --preset cpu-small [--reweight-hvp forward-over-reverse]
    python benchmarks/meta_breakdown.py DATA_BIN --preset cpu-small --memory   # also each part's peak memory

``--memory`` also prints each part's peak memory over the memory before the model was built: on the
CPU the resident set, sampled every millisecond in a thread (which perturbs the timings a little;
memory the allocator keeps after a part is counted in later parts, so training steps are given
before the first meta-update too), on a GPU ``torch.cuda.max_memory_allocated``.
"""
import argparse
import logging
import os
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cost  # noqa: E402  (build, training flags, presets)


def steady_mean(values):
    """(mean, count) of the timings after the first, which includes one-off costs (all if only one)."""
    values = values[1:] or values
    return sum(values) / len(values), len(values)


class PartPeaks:
    """Peak memory while each labelled part runs, parts nested (a meta-update inside an update):
    every part on the stack sees what its inner parts saw."""

    def __init__(self, cuda: bool):
        self.cuda, self.peaks, self.stack = cuda, {}, []
        self.base = torch.cuda.memory_allocated() if cuda else cost.PeakRSS.rss()
        self._stop = threading.Event()
        if not cuda:
            threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self):
        while not self._stop.wait(0.001):
            self._note(cost.PeakRSS.rss())

    def _note(self, value):
        for label in list(self.stack):
            self.peaks[label] = max(self.peaks.get(label, 0), value - self.base)

    def wrap(self, function, label):
        def wrapper(*args, **kwargs):
            if self.cuda:  # what the parts on the stack saw so far, before the peak counter restarts
                torch.cuda.synchronize()
                self._note(torch.cuda.max_memory_allocated())
                torch.cuda.reset_peak_memory_stats()
            self.stack.append(label)
            try:
                return function(*args, **kwargs)
            finally:
                if self.cuda:
                    torch.cuda.synchronize()
                    self._note(torch.cuda.max_memory_allocated())
                else:
                    self._note(cost.PeakRSS.rss())
                self.stack.pop()

        return wrapper

    def report(self, reference: str):
        self._stop.set()
        kind = "max_memory_allocated" if self.cuda else "peak RSS"
        print(f"peak memory by part ({kind} over the memory before the model was built; x that of {reference}):")
        ref = self.peaks.get(reference) or 1
        for label, peak in self.peaks.items():
            print(f"  {label:<52} {peak / 2**20:8.0f} MiB  {peak / ref:5.2f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data")
    parser.add_argument("--preset", choices=["cpu-small"], help="small model and batches for the CPU")
    parser.add_argument("--interval", type=int, default=10, help="K (default 10: more meta-updates to average)")
    parser.add_argument("--backprop-steps", type=int, default=2, help="B (default 2)")
    parser.add_argument("--updates", type=int, default=71, help="training updates to run (default 71)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also print the N operators with the most self time in the third meta-update "
                        "(torch.profiler; that meta-update is left out of the timings)")
    parser.add_argument("--memory", action="store_true", help="also print each part's peak memory")
    args, model_flags = parser.parse_known_args()
    if args.preset == "cpu-small":
        model_flags = cost.CPU_SMALL + model_flags
    logging.disable(logging.WARNING)
    sys.path.insert(0, cost.REPO)
    from fairseq_reweight.core import gradients, reverse
    from fairseq_reweight.nmt import replay
    from fairseq_reweight.nmt.driver import ReweightDriver

    cuda = torch.cuda.is_available() and "--cpu" not in model_flags
    times = {}

    def timed(function, label):
        return cost.timed(function, label, times, cuda)

    def wrap_parts(wrap):
        """``wrap(function, label)`` around each part of a meta-update."""
        replay.Replay.validation_gradient = wrap(replay.Replay.validation_gradient, "validation gradient")
        for hvp in gradients.HVP:  # the one --reweight-hvp picks (default: double-backward)
            gradients.HVP[hvp] = wrap(gradients.HVP[hvp], f"replayed step, {hvp}")
        reverse.teacher_vjp = wrap(reverse.teacher_vjp, "oldest replayed step, forward-mode")
        reverse.kept_gradient_vjp = wrap(reverse.kept_gradient_vjp, "newest step from its kept graph")

    wrap_parts(timed)
    profiles, profiled_at = [], []  # the profiles, and which meta-updates they were (by index)
    whole = {}  # the driver's whole meta-update, to show what the parts above leave out
    if args.profile:
        meta_update = ReweightDriver.meta_update

        def profiled(self, *a, **kw):
            if self.num_meta_updates != 2:  # the third one: past one-off costs
                return meta_update(self, *a, **kw)
            before = {label: len(values) for label, values in times.items()}
            with torch.profiler.profile(record_shapes=False) as prof:
                result = meta_update(self, *a, **kw)
            profiles.append(prof)
            for label, values in times.items():  # the profiler's overhead stays out of the means
                del values[before.get(label, 0):]
            profiled_at.append(len(whole.get("meta-update", [])))
            return result

        ReweightDriver.meta_update = profiled
    ReweightDriver.meta_update = cost.timed(ReweightDriver.meta_update, "meta-update", whole, cuda)
    peaks = PartPeaks(cuda) if args.memory else None
    if peaks is not None:
        wrap_parts(peaks.wrap)
        ReweightDriver.meta_update = peaks.wrap(ReweightDriver.meta_update, "the whole meta-update")
    first_steps = "a training step before the first meta-update"

    flags = cost.training_flags(model_flags)[1] + ["--reweight-interval", str(args.interval),
                                                    "--reweight-backprop-steps", str(args.backprop_steps)]
    trainer, _, _ = cost.build(args.data, flags)
    epoch = 1
    itr = trainer.get_train_iterator(epoch=epoch, load_dataset=False).next_epoch_itr(shuffle=True)
    steps, before_meta = [], []  # the updates before a meta-update keep their graph (--reweight-newest-step)
    for update in range(args.updates):
        try:
            sample = next(itr)
        except StopIteration:
            epoch += 1
            itr = trainer.get_train_iterator(epoch=epoch, load_dataset=False).next_epoch_itr(shuffle=True)
            sample = next(itr)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        if peaks is None:
            trainer.train_step([sample])
        else:
            label = (first_steps if update < args.interval else "the update that keeps its graph"
                     if (update + 1) % args.interval == 0 else "an update with a meta-update"
                     if update % args.interval == 0 else "a later training step")
            peaks.wrap(trainer.train_step, label)([sample])
        if cuda:
            torch.cuda.synchronize()
        # a meta-update runs before the first micro-batch of updates K, 2K, ...; skip warm-up
        if update > args.interval and update % args.interval != 0:
            (before_meta if (update + 1) % args.interval == 0 else steps).append(time.perf_counter() - start)
    step = sum(steps) / len(steps)
    # what the update before a meta-update costs more (none timed: fewer than 2K updates)
    extra = sum(before_meta) / len(before_meta) - step if before_meta else 0.0
    device = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"device: {device}; torch {torch.__version__}; K={args.interval}, B={args.backprop_steps}")
    print(f"training step without a meta-update: {1000 * step:.1f} ms (mean of {len(steps)}; the update before a "
          f"meta-update: {1000 * (step + extra):.1f} ms, mean of {len(before_meta)})")
    total = 0.0
    for label, values in times.items():
        mean, count = steady_mean(values)
        per_update = mean * len(times[label]) / max(1, len(times["validation gradient"]))
        total += per_update
        print(f"{label:<36} {1000 * mean:8.1f} ms = {mean / step:5.2f} training steps (mean of {count})")
    print(f"{'the parts':<36} {1000 * total:8.1f} ms = {total / step:5.2f} training steps")
    for index in profiled_at:
        del whole["meta-update"][index]
    mean, count = steady_mean(whole["meta-update"])
    print(f"{'the whole meta-update':<36} {1000 * mean:8.1f} ms = {mean / step:5.2f} training steps (mean of "
          f"{count}; besides the parts: the replay's set-up, the checks of the records and of the "
          "validation gradient, the optimizer's reverse steps, the teacher's update)")
    print(f"at K=20: {1 + (mean + extra) / step / 20:.2f}x a training step without a meta-update (the whole "
          "meta-update and what the update before it costs more)")
    if peaks is not None:
        peaks.report(first_steps)
    for prof in profiles:
        sort = "self_device_time_total" if cuda else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=args.profile))


if __name__ == "__main__":
    main()
