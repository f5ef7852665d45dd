"""The meta-update driver: the teacher inside fairseq training (Algorithm 1 of the paper).

Before update N = K, 2K, ... (``--reweight-interval``) the driver draws a ``--meta-valid-subset``
batch, differentiates its loss through the last B updates (:func:`.replay.meta_gradient`) and steps
the teacher with Adam. It is attached to the criterion because fairseq checkpoints the criterion's
state (never the task's); the teacher's parameters do not require grad, so the student optimizer
(built from the model's and criterion's trainable parameters) never sees them.
"""
import functools
import math
import time

import torch
from fairseq import utils
from fairseq.logging import metrics
from torch import nn

from fairseq_reweight.core import math_attention, substitute_parameters
from fairseq_reweight.core.features import TrainingState
from fairseq_reweight.core.gradients import KeptStep
from fairseq_reweight.core.teacher import apply_teacher_gradient
from fairseq_reweight.nmt import fairseq_contract as contract
from fairseq_reweight.nmt.data_parallel import check_in_sync, data_parallel
from fairseq_reweight.nmt.fairseq_contract import inner_optimizer, unwrap_model
from fairseq_reweight.nmt.recorder import StepRecorder
from fairseq_reweight.nmt.replay import Fp32ReplayModel, check_skips, meta_gradient, replay_session
from fairseq_reweight.nmt.weigher import TokenWeigher


def _inside_hook(meta_update):
    """``meta_update`` run inside ``driver.meta_update_hook(driver)``, a context manager, where an
    instance has one (the benchmarks time and profile the whole call through it)."""
    @functools.wraps(meta_update)
    def wrapper(self, *args, **kwargs):
        if self.meta_update_hook is None:
            return meta_update(self, *args, **kwargs)
        with self.meta_update_hook(self):
            return meta_update(self, *args, **kwargs)

    return wrapper


class ReweightDriver(nn.Module):
    """Teacher, teacher optimizer and meta-update schedule for ``reweight_translation``."""

    def __init__(self, cfg, weigher: TokenWeigher, meta_valid_batches, noise_monitor=None):
        super().__init__()
        self.cfg, self.weigher = cfg, weigher
        self.teacher_optimizer = torch.optim.Adam(weigher.teacher.parameters(), lr=cfg.teacher_lr)
        self.recorder = StepRecorder(cfg.reweight_backprop_steps, cfg.reweight_history == "checkpoint", cfg.clip_norm)
        self.meta_valid_batches, self.noise_monitor = meta_valid_batches, noise_monitor
        self.num_meta_updates = self.meta_valid_consumed = self.meta_skipped = self.consecutive_skips = 0
        self.best_meta_valid_loss = float("inf")
        self.running_loss = None  # running mean training loss, a tensor: no GPU sync per step
        self.update_num, self.last_meta_update = 0, -1
        self.last_meta_stats = {}
        self._meta_valid_iter, self._shadow = None, Fp32ReplayModel()  # the replay's model under --fp16/--bf16
        self.kept = None  # (update_num, KeptStep): the update before a meta-update, until that uses it
        # what rebuilds that graph after a restart (:meth:`_rebuild_kept`): the kept update's number,
        # training state and, with --reweight-history reverse, its parameters
        self.kept_inputs = None
        self._state_override = None  # the training state a rebuilt kept step was taken at

    @property
    def teacher(self):
        return self.weigher.teacher

    def training_state(self) -> TrainingState:
        if self._state_override is not None:
            return self._state_override
        best = self.best_meta_valid_loss if self.num_meta_updates else 0.0
        running = 0.0 if self.running_loss is None else self.running_loss
        return TrainingState(self.update_num / max(self.cfg.max_update, 1), running, best)

    def token_weights(self, sample, encoder_out, net_output, lprobs, params=None):
        """The criterion's ``weight_fn``: (normalised weights, raw weights), both B x T."""
        return self.weigher(sample, encoder_out, net_output, lprobs, self.training_state(), params)

    # -- fairseq's hooks (called by the task) ---------------------------------------------------------
    def on_micro_batch(self, model, criterion, optimizer, update_num, sample, ignore_grad):
        """Before fairseq's forward/backward of each micro-batch: the meta-update before the first
        micro-batch of update N = K, 2K, ... (once, also when an fp16 overflow retries it)."""
        if self.recorder.optimizer is None:
            self.recorder.attach(optimizer, f"--reweight-teacher {self.cfg.reweight_teacher}")
        self.update_num = update_num
        first = self.recorder.starts_update(model)
        if first:
            due = update_num > 0 and update_num % self.cfg.reweight_interval == 0
            if due and update_num != self.last_meta_update:
                self.last_meta_update = update_num
                self.meta_update(model, criterion, update_num)
            self.kept = self.kept_inputs = None
            for key, value in self.last_meta_stats.items():  # shown in every log line (weight 0)
                metrics.log_scalar(key, value, weight=0, round=4)
        self.recorder.on_micro_batch(update_num, sample, ignore_grad, first)

    def in_window(self, update_num: int) -> bool:
        """Whether the next meta-update differentiates through update ``update_num``: one of the B
        before each K-th (the schedule of :meth:`on_micro_batch`)."""
        interval = self.cfg.reweight_interval
        return update_num % interval >= interval - self.cfg.reweight_backprop_steps

    def keeps_step(self, model, optimizer, update_num, ignore_grad, one_micro_batch) -> bool:
        """Whether this micro-batch is trained by :meth:`train_kept_step`: the whole update before a
        meta-update (``--reweight-newest-step kept``), where its graph can serve the replay: fp32
        parameters that the optimizer steps itself (no --fp16/--bf16/--amp wrapper), one process,
        one micro-batch and one chunk, and B >= 2 (with B = 1 the newest step is the forward-mode one)."""
        cfg = self.cfg
        asked = cfg.reweight_newest_step == "kept"
        before_meta_update = (update_num + 1) % cfg.reweight_interval == 0
        whole_update = one_micro_batch and not ignore_grad and cfg.reweight_chunks == 1
        newest_double_backward = cfg.reweight_backprop_steps >= 2
        steps_own_params = inner_optimizer(optimizer) is optimizer  # no fp32 masters of an fp16/bf16/AMP wrapper
        one_process = not data_parallel() and unwrap_model(model) is model  # no DDP wrapper either
        return (asked and before_meta_update and whole_update and newest_double_backward and steps_own_params
                and one_process)

    def train_kept_step(self, model, criterion, sample, update_num):
        """fairseq's ``FairseqTask.train_step`` for this micro-batch, with the gradient's graph kept
        for the next meta-update (:meth:`_kept_forward`); the gradient goes to ``p.grad`` as
        ``loss.backward()`` would put it."""
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        state = self.training_state()
        loss, size, logging_output, kept = self._kept_forward(model, criterion, sample, update_num,
                                                              [p.detach() for _, p in named])
        for (_, p), grad in zip(named, kept.grads):
            if grad is not None:
                p.grad = grad.detach().clone() if p.grad is None else p.grad.add_(grad.detach())
        self.kept = (update_num, kept)
        # a checkpoint saved now lets a resumed run rebuild this graph exactly; the parameters are
        # in the replay record with --reweight-history checkpoint, else they must be saved
        params = None if self.recorder.store_states else kept.params
        self.kept_inputs = {"update_num": update_num, "params": params, "progress": state.progress,
                            "running_train_loss": self.running_loss, "best": state.best_valid}
        return loss.detach(), size, logging_output

    def _kept_forward(self, model, criterion, sample, update_num, params):
        """(loss, sample size, logging output, :class:`KeptStep`) of the micro-batch at copies of
        ``params`` (the optimizer steps the parameters in place, which the graph must not see) and
        at teacher leaves, under the math attention kernel (the fused ones have no double backward).
        The update being this one micro-batch, the trainer divides its gradient by this
        micro-batch's sample size: the kept graph's scale."""
        model.train()
        model.set_num_updates(update_num)
        names = [name for name, p in model.named_parameters() if p.requires_grad]
        leaves = [p.detach().clone().requires_grad_() for p in params]
        omega = {name: w.detach().clone().requires_grad_() for name, w in self.teacher.named_parameters()}
        with math_attention(), substitute_parameters(model, dict(zip(names, leaves))):
            loss, size, logging_output = criterion(model, sample, teacher_params=omega)
        grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        return loss, size, logging_output, KeptStep(leaves, list(omega.values()), grads, 1.0 / (float(size) or 1.0))

    def _rebuild_kept(self, model, criterion, steps):
        """After a restart right after the update that kept its graph, that graph again: the same
        forward and backward at the same parameters, teacher, training state and dropout seed, so
        that the meta-update is the uninterrupted run's bit for bit (replaying the step instead
        differs by round-off). Run inside the meta-update's replay session, which restores the
        model's mode and update counter; torch's RNG is restored here."""
        inputs, self.kept_inputs = self.kept_inputs, None
        data = steps[-1].data
        if (inputs is None or self.kept is not None or data.update_num != inputs["update_num"]
                or len(data.micro_batches) != 1 or data.micro_batches[0][1]):
            return
        params = inputs["params"] if inputs["params"] is not None else steps[-1].params
        device = next(p for p in model.parameters()).device
        running = inputs["running_train_loss"]
        self._state_override = TrainingState(inputs["progress"], 0.0 if running is None else torch.as_tensor(running),
                                             inputs["best"])
        rng_state = utils.get_rng_state()
        try:
            contract.seed_for_update(self.cfg.seed, data.update_num)
            kept = self._kept_forward(model, criterion, data.micro_batches[0][0], data.update_num,
                                      [p.to(device) for p in params])[3]
        finally:
            self._state_override = None
            utils.set_rng_state(rng_state)
        self.kept = (data.update_num, kept)

    def _kept_for(self, steps):
        """The kept graph if it is the newest step's (the update just taken, whole); else None (the
        step is replayed)."""
        if self.kept is None:
            return None
        update_num, kept = self.kept
        data = steps[-1].data
        if data.update_num != update_num or len(data.micro_batches) != 1 or data.micro_batches[0][1]:
            return None
        return kept

    def observe(self, logging_output):
        """The running mean training loss (surface feature ``loss``) after each micro-batch."""
        if "loss" in self.weigher.features:
            self.running_loss = updated_running_loss(self.running_loss, logging_output)

    # -- the meta-update -----------------------------------------------------------------------------
    meta_update_hook = None  # or hook(driver) -> a context manager around each meta_update (benchmarks)

    @_inside_hook
    def meta_update(self, model, criterion, update_num):
        """One teacher step from the validation loss at the current student parameters."""
        steps = self.recorder.window()
        if steps is None:  # fewer than B recorded updates, e.g. right after a restart
            return
        start = time.perf_counter()
        if self._meta_valid_iter is None:
            self._meta_valid_iter = self.meta_valid_batches(skip=self.meta_valid_consumed)
        with replay_session(model, criterion, self.teacher, self.recorder.optimizer, self.cfg.seed,
                            self.cfg.meta_valid_loss, update_num, self._shadow, self.cfg.reweight_chunks) as replay:
            self._rebuild_kept(contract.unwrap_model(model), criterion, steps)
            sample = next(self._meta_valid_iter)  # inside: a new epoch draws from torch's global RNG
            self.meta_valid_consumed += 1
            val_loss, grads = meta_gradient(replay, steps, sample, self.cfg.reweight_history, self.cfg.reweight_hvp,
                                           self.cfg.meta_valid_params, self._kept_for(steps))
        self.consecutive_skips = 0 if grads is not None else self.consecutive_skips + 1
        if grads is None:  # keep the teacher as it was; the count is logged with every update from now on
            self.meta_skipped += 1
            self.last_meta_stats["meta_skipped"] = self.meta_skipped
            return check_skips(self.consecutive_skips, self.cfg.reweight_max_skips, update_num, val_loss)
        gnorm = apply_teacher_gradient(self.teacher, self.teacher_optimizer, grads, self.cfg.teacher_clip_norm)
        check_in_sync(self.teacher)
        self.num_meta_updates += 1
        self.best_meta_valid_loss = min(self.best_meta_valid_loss, val_loss)
        stats = {"meta_val_loss": val_loss / math.log(2), "teacher_gnorm": gnorm.item(),
                 "meta_time": time.perf_counter() - start}
        log_teacher_step(stats, self.last_meta_stats, self.noise_monitor, self, model, criterion, self.num_meta_updates)

    # -- checkpoint state ----------------------------------------------------------------------------
    COUNTERS = ("num_meta_updates", "best_meta_valid_loss", "meta_valid_consumed", "last_meta_update", "meta_skipped")

    def get_extra_state(self):
        """Teacher optimizer, counters and the replay history: a resumed run continues exactly."""
        running = None if self.running_loss is None else float(self.running_loss)
        return {**{name: getattr(self, name) for name in self.COUNTERS}, "running_train_loss": running,
                "teacher_optimizer": self.teacher_optimizer.state_dict(), "last_meta_stats": dict(self.last_meta_stats),
                "history": self.recorder.state_dict(), "kept_inputs": self._kept_inputs_state()}

    def _kept_inputs_state(self):
        """:attr:`kept_inputs` while its graph waits for the next meta-update, else None."""
        if self.kept is None or self.kept_inputs is None:
            return None
        params = self.kept_inputs["params"]
        return {**self.kept_inputs, "params": None if params is None else [p.detach().cpu() for p in params],
                "running_train_loss": _float_or_none(self.kept_inputs["running_train_loss"])}

    def set_extra_state(self, state):
        for name in self.COUNTERS:
            setattr(self, name, state.get(name, getattr(self, name)))
        self.teacher_optimizer.load_state_dict(state["teacher_optimizer"])
        for group in self.teacher_optimizer.param_groups:  # a new --teacher-lr wins, as fairseq's --lr does
            group["lr"] = self.cfg.teacher_lr
        loss = state["running_train_loss"]
        self.running_loss = None if loss is None else torch.tensor(loss)
        self.last_meta_stats = dict(state["last_meta_stats"])
        self.recorder.load_state_dict(state["history"])
        self._meta_valid_iter = None  # re-created, skipping the batches already used
        self.kept, self.kept_inputs = None, state.get("kept_inputs")


def updated_running_loss(running, logging_output):
    """The running mean training loss (surface feature ``loss``) after a micro-batch: an exponential
    mean (0.99) of its per-token loss, kept as a tensor (no GPU sync per step); ``running`` itself
    after an empty micro-batch."""
    size = float(logging_output.get("sample_size", 0) or 0)
    if size <= 0:
        return running
    loss = logging_output["loss"].detach().float() / size
    return loss if running is None else 0.99 * running + 0.01 * loss


def log_teacher_step(stats, last_stats, noise_monitor, driver, model, criterion, num_steps):
    """Logs one teacher step's ``stats``, with the noise monitor's figures when it has new ones, and
    adds both to ``last_stats`` (which every later log line repeats)."""
    if noise_monitor is not None:
        noise, new = noise_monitor.update(driver, model, criterion, num_steps)
        stats.update(noise if new else {})
        last_stats.update(noise)
    for key, value in stats.items():
        metrics.log_scalar(key, value, round=4)
    last_stats.update(stats)


def _float_or_none(value):
    return None if value is None else float(value)
