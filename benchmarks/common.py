"""What the benchmarks share: the repository's paths and model presets, fairseq's Trainer built from
command-line flags, wall-clock timing (synchronised on a GPU), the peak resident set size, a
measurement in a new process and the median (range) summaries of repeated measurements."""
import contextlib
import logging
import multiprocessing
import os
import statistics
import threading
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_DIR = os.path.join(REPO, "fairseq_reweight")
CPU_SMALL = ["--arch", "transformer", "--encoder-layers", "2", "--decoder-layers", "2",
             "--encoder-embed-dim", "128", "--decoder-embed-dim", "128", "--encoder-ffn-embed-dim", "256",
             "--decoder-ffn-embed-dim", "256", "--encoder-attention-heads", "4", "--decoder-attention-heads", "4",
             "--max-tokens", "1024", "--cpu"]


# -- command line ------------------------------------------------------------------------------------
def add_model_arguments(parser):
    """The data-bin and ``--preset``; the other flags (``parse_known_args``) go to fairseq-train."""
    parser.add_argument("data")
    parser.add_argument("--preset", choices=["cpu-small"], help="small model and batches for the CPU")


def model_flags(args, flags):
    """fairseq-train's model and batch flags: the preset's, then those given."""
    return CPU_SMALL + flags if args.preset == "cpu-small" else flags


def uses_cuda(flags) -> bool:
    return torch.cuda.is_available() and "--cpu" not in flags


def training_flags(model_flags, optimizer="sgd"):
    """fairseq-train flags of plain fairseq (momentum SGD or Adam) and of this method, same model and data."""
    # --max-update only sets the surface teacher's "progress" feature (update / max-update), which
    # needs it; the benchmarks run their own number of updates.
    common = model_flags + ["--lr", "1e-3", "--label-smoothing", "0.1",
                            "--seed", "1", "--num-workers", "0", "--max-update", "1000"]
    common += ["--momentum", "0.9"] if optimizer == "sgd" else ["--adam-betas", "(0.9, 0.98)"]
    plain = common + ["--task", "translation", "--criterion", "label_smoothed_cross_entropy", "--optimizer", optimizer]
    ours = common + ["--user-dir", USER_DIR, "--task", "reweight_translation",
                     "--criterion", "reweighted_cross_entropy", "--optimizer", f"reweight_{optimizer}"]
    return plain, ours


def build(data, flags):
    """fairseq's Trainer, task and config from fairseq-train's flags (the train split loaded)."""
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.trainer import Trainer

    args = options.parse_args_and_arch(options.get_training_parser(), [data] + flags)
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    task.load_dataset(cfg.dataset.train_subset, combine=False, epoch=1)
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    return Trainer(cfg, task, model, criterion), task, cfg


# -- time --------------------------------------------------------------------------------------------
def synchronize(cuda: bool):
    if cuda:
        torch.cuda.synchronize()


@contextlib.contextmanager
def stopwatch(label, times: dict, cuda: bool):
    """Appends the block's wall time (synchronised on a GPU) to ``times[label]``."""
    synchronize(cuda)
    start = time.perf_counter()
    yield
    synchronize(cuda)
    times.setdefault(label, []).append(time.perf_counter() - start)


def timed(function, label, times: dict, cuda: bool):
    """``function`` wrapped to append its wall time (synchronised on a GPU) to ``times[label]``."""
    def wrapper(*args, **kwargs):
        with stopwatch(label, times, cuda):
            return function(*args, **kwargs)

    return wrapper


def time_meta_updates(trainer, label, times: dict, cuda: bool):
    """Each meta-update of ``trainer``'s driver timed into ``times[label]``, through the driver's
    ``meta_update_hook`` (none where the task has no meta-update driver)."""
    driver = getattr(trainer.task, "driver", None)
    if driver is not None:
        driver.meta_update_hook = lambda _driver: stopwatch(label, times, cuda)


def summary(values, digits=2):
    """``median`` or ``median (min-max)``."""
    middle = statistics.median(values)
    if len(values) == 1:
        return f"{middle:.{digits}f}"
    return f"{middle:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


# -- memory and processes ----------------------------------------------------------------------------
class PeakRSS:
    """Peak resident set size of this process inside the block (CPU runs): the kernel's high-water
    mark (``VmHWM``), reset on entry through ``/proc/self/clear_refs`` (Linux >= 4.0), so that no
    peak is missed; only where that reset is refused, the RSS sampled every millisecond in a thread
    (which can miss a peak shorter than that)."""

    def __init__(self):
        self.peak, self._stop, self.exact = 0, threading.Event(), False

    @staticmethod
    def rss():
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    @staticmethod
    def high_water_mark():
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        raise OSError("no VmHWM in /proc/self/status")

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # the high-water mark := the current RSS
            self.exact = True
        except OSError:
            self.exact = False
        self.base = self.rss()
        self.peak = self.base
        if not self.exact:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc):
        if self.exact:
            self.peak = max(self.peak, self.high_water_mark())
        else:
            self._stop.set()
            self._thread.join()


def _call_and_send(send, function, args):
    logging.disable(logging.WARNING)
    import fairseq.trainer  # noqa: F401  (imported before the RSS baseline, as in the parent)
    import fairseq_reweight  # noqa: F401

    send.send(function(*args))


def in_child(function, *args):
    """``function(*args)`` in a new process (CPU; spawned, as forking after OpenMP has started
    threads can hang): none of the configurations inherits another's peak RSS or allocator state."""
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_call_and_send, args=(send, function, args))
    process.start()
    send.close()  # the child's copy stays open: recv() raises EOFError if the child dies instead of waiting
    result = receive.recv()
    process.join()
    return result
