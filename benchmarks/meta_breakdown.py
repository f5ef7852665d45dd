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

    python -m benchmarks.meta_breakdown DATA_BIN --arch transformer_iwslt_de_en --max-tokens 4096   # GPU
    python -m benchmarks.meta_breakdown DATA_BIN --preset cpu-small [--reweight-hvp forward-over-reverse]
    python -m benchmarks.meta_breakdown DATA_BIN --preset cpu-small --memory   # also each part's peak memory

``--memory`` also prints each part's peak memory over the memory before the model was built: on the
CPU the resident set, sampled every millisecond in a thread (which perturbs the timings a little;
memory the allocator keeps after a part is counted in later parts, so training steps are given
before the first meta-update too), on a GPU ``torch.cuda.max_memory_allocated``.
"""
import argparse
import contextlib
import logging
import threading
import time

import torch

from benchmarks import common


def steady_mean(values):
    """(mean, count) of the timings after the first, which includes one-off costs (all if only one)."""
    values = values[1:] or values
    return sum(values) / len(values), len(values)


class PartPeaks:
    """Peak memory while each labelled part runs, parts nested (a meta-update inside an update):
    every part on the stack sees what its inner parts saw."""

    def __init__(self, cuda: bool):
        self.cuda, self.peaks, self.stack = cuda, {}, []
        self.base = torch.cuda.memory_allocated() if cuda else common.PeakRSS.rss()
        self._stop = threading.Event()
        if not cuda:
            threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self):
        while not self._stop.wait(0.001):
            self._note(common.PeakRSS.rss())

    def _note(self, value):
        for label in list(self.stack):
            self.peaks[label] = max(self.peaks.get(label, 0), value - self.base)

    @contextlib.contextmanager
    def part(self, label):
        """The block as the part ``label``."""
        if self.cuda:  # what the parts on the stack saw so far, before the peak counter restarts
            torch.cuda.synchronize()
            self._note(torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
        self.stack.append(label)
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
                self._note(torch.cuda.max_memory_allocated())
            else:
                self._note(common.PeakRSS.rss())
            self.stack.pop()

    def wrap(self, function, label):
        """``function`` as the part ``label``."""
        def wrapper(*args, **kwargs):
            with self.part(label):
                return function(*args, **kwargs)

        return wrapper

    def report(self, reference: str):
        self._stop.set()
        kind = "max_memory_allocated" if self.cuda else "peak RSS"
        print(f"peak memory by part ({kind} over the memory before the model was built; x that of {reference}):")
        ref = self.peaks.get(reference) or 1
        for label, peak in self.peaks.items():
            print(f"  {label:<52} {peak / 2**20:8.0f} MiB  {peak / ref:5.2f}x")


FIRST_STEPS = "a training step before the first meta-update"


def parse_args():
    """(the arguments, fairseq-train's model and batch flags)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_model_arguments(parser)
    parser.add_argument("--interval", type=int, default=10, help="K (default 10: more meta-updates to average)")
    parser.add_argument("--backprop-steps", type=int, default=2, help="B (default 2)")
    parser.add_argument("--updates", type=int, default=71, help="training updates to run (default 71)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also print the N operators with the most self time in the third meta-update "
                        "(torch.profiler; that meta-update is left out of the timings)")
    parser.add_argument("--memory", action="store_true", help="also print each part's peak memory")
    args, flags = parser.parse_known_args()
    return args, common.model_flags(args, flags)


def wrap_parts(wrap):
    """``wrap(function, label)`` around each part of a meta-update."""
    from fairseq_reweight.core import gradients, reverse
    from fairseq_reweight.nmt import replay

    replay.Replay.validation_gradient = wrap(replay.Replay.validation_gradient, "validation gradient")
    for hvp in gradients.HVP:  # the one --reweight-hvp picks (default: double-backward)
        gradients.HVP[hvp] = wrap(gradients.HVP[hvp], f"replayed step, {hvp}")
    reverse.teacher_vjp = wrap(reverse.teacher_vjp, "oldest replayed step, forward-mode")
    reverse.kept_gradient_vjp = wrap(reverse.kept_gradient_vjp, "newest step from its kept graph")


class MetaUpdateHook:
    """The driver's ``meta_update_hook``: every whole meta-update timed into ``whole`` (to show what
    the parts leave out), a part of ``peaks`` where memory is measured, and with ``profile`` the
    third one (past one-off costs) profiled, its parts' times left out of ``times``."""

    def __init__(self, times, cuda, peaks=None, profile=False):
        self.times, self.cuda, self.peaks, self.profile = times, cuda, peaks, profile
        self.whole, self.profiles, self.profiled_at = {}, [], []  # profiled_at: which meta-updates, by index

    @contextlib.contextmanager
    def __call__(self, driver):
        with contextlib.ExitStack() as stack:
            if self.peaks is not None:
                stack.enter_context(self.peaks.part("the whole meta-update"))
            stack.enter_context(common.stopwatch("meta-update", self.whole, self.cuda))
            if self.profile and driver.num_meta_updates == 2:
                stack.enter_context(self._profiled())
            yield

    @contextlib.contextmanager
    def _profiled(self):
        before = {label: len(values) for label, values in self.times.items()}
        with torch.profiler.profile(record_shapes=False) as prof:
            yield
        self.profiles.append(prof)
        for label, values in self.times.items():  # the profiler's overhead stays out of the means
            del values[before.get(label, 0):]
        self.profiled_at.append(len(self.whole.get("meta-update", [])))

    def whole_times(self):
        """The whole meta-updates' times, the profiled ones left out."""
        times = list(self.whole["meta-update"])
        for index in self.profiled_at:
            del times[index]
        return times


def train(trainer, args, cuda, peaks):
    """``--updates`` updates; (the times of the training steps without a meta-update, of the updates
    before a meta-update), after the first K updates (warm-up)."""
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
        common.synchronize(cuda)
        start = time.perf_counter()
        if peaks is None:
            trainer.train_step([sample])
        else:
            label = (FIRST_STEPS if update < args.interval else "the update that keeps its graph"
                     if (update + 1) % args.interval == 0 else "an update with a meta-update"
                     if update % args.interval == 0 else "a later training step")
            peaks.wrap(trainer.train_step, label)([sample])
        common.synchronize(cuda)
        # a meta-update runs before the first micro-batch of updates K, 2K, ...; skip warm-up
        if update > args.interval and update % args.interval != 0:
            (before_meta if (update + 1) % args.interval == 0 else steps).append(time.perf_counter() - start)
    return steps, before_meta


def report(args, cuda, times, hook, steps, before_meta):
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
    mean, count = steady_mean(hook.whole_times())
    print(f"{'the whole meta-update':<36} {1000 * mean:8.1f} ms = {mean / step:5.2f} training steps (mean of "
          f"{count}; besides the parts: the replay's set-up, the checks of the records and of the "
          "validation gradient, the optimizer's reverse steps, the teacher's update)")
    print(f"at K=20: {1 + (mean + extra) / step / 20:.2f}x a training step without a meta-update (the whole "
          "meta-update and what the update before it costs more)")
    if hook.peaks is not None:
        hook.peaks.report(FIRST_STEPS)
    for prof in hook.profiles:
        sort = "self_device_time_total" if cuda else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=args.profile))


def main():
    args, model_flags = parse_args()
    logging.disable(logging.WARNING)
    cuda = common.uses_cuda(model_flags)
    times = {}

    def time_part(function, label):
        return common.timed(function, label, times, cuda)

    wrap_parts(time_part)
    # the memory before the model is built: every part's peak is over it
    peaks = PartPeaks(cuda) if args.memory else None
    if peaks is not None:
        wrap_parts(peaks.wrap)
    flags = common.training_flags(model_flags)[1] + ["--reweight-interval", str(args.interval),
                                                      "--reweight-backprop-steps", str(args.backprop_steps)]
    trainer, task, _ = common.build(args.data, flags)
    hook = task.driver.meta_update_hook = MetaUpdateHook(times, cuda, peaks, bool(args.profile))
    steps, before_meta = train(trainer, args, cuda, peaks)
    report(args, cuda, times, hook, steps, before_meta)


if __name__ == "__main__":
    main()
