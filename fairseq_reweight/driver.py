"""The meta-update driver: the teacher inside fairseq training.

Every K = ``--reweight-interval`` updates the driver takes a batch of ``--meta-valid-subset``,
computes the validation gradient at the current student parameters, differentiates it through the
last B = ``--reweight-backprop-steps`` student updates with
:func:`~fairseq_reweight.hypergrad.reverse_hypergradient`, and steps the teacher with Adam.

Where things live, and why:
- The driver (an ``nn.Module`` holding the teacher, its Adam state and counters) is attached to the
  criterion, because fairseq's trainer checkpoints and restores the criterion's state dict (it never
  restores task state on resume). Its parameters have ``requires_grad=False`` so the trainer's student
  optimizer, built from ``model.parameters() + criterion.parameters()`` with ``requires_grad``, never
  sees them; the hypergradient uses fresh leaf copies through ``torch.func.functional_call``.
- The student steps are fairseq's own. ``reweight_sgd`` records each step's learning rate etc.; the
  driver attaches what is needed to replay it: the micro-batches (``--update-freq``), the update number
  (the trainer seeds dropout with ``seed + num_updates``), the gradient clipping threshold. The replay
  divides by the step's total sample size exactly as the trainer does before clipping (the replay
  machinery is in :mod:`fairseq_reweight.replay`).
"""
import contextlib
import logging
import math
import time
from typing import List, Optional

import torch
import torch.distributed as dist
from fairseq import utils
from fairseq.logging import metrics
from torch import nn

from fairseq_reweight.criterions.reweighted_cross_entropy import unwrap_model
from fairseq_reweight.errors import ReweightConfigError
from fairseq_reweight.hypergrad import reverse_hypergradient
from fairseq_reweight.replay import (
    Replay,
    ReplayData,
    StudentView,
    all_reduce_fn,
    find_recorder,
    record_from_state,
    record_to_state,
)
from fairseq_reweight.teacher import Teacher, normalize_weights

logger = logging.getLogger(__name__)

STATE_FEATURES = ("encoder", "decoder")
SURFACE_FEATURES = {"progress": 1, "loss": 2, "best-valid": 1, "prediction": 1, "margin": 1}
ALL_FEATURES = STATE_FEATURES + ("label",) + tuple(SURFACE_FEATURES)
DEFAULT_FEATURES = {"deep": "encoder,label", "surface": "progress,loss,best-valid,prediction,margin"}


def parse_features(spec: str, teacher: str) -> List[str]:
    """``--teacher-features`` as a list; empty means the default of ``--reweight-teacher``."""
    spec = spec or DEFAULT_FEATURES.get(teacher, "")
    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in ALL_FEATURES]
    if unknown:
        raise ReweightConfigError(
            f"unknown --teacher-features {','.join(unknown)}; valid names: {','.join(ALL_FEATURES)}"
        )
    if not names:
        raise ReweightConfigError("--teacher-features is empty; give at least one of " + ",".join(ALL_FEATURES))
    return names

class ReweightDriver(nn.Module):
    """Teacher, teacher optimizer and meta-update schedule for ``reweight_translation``."""

    def __init__(self, cfg, tgt_dict, encoder_dim: int, decoder_dim: int):
        super().__init__()
        self.cfg = cfg
        self.features = parse_features(cfg.teacher_features, cfg.reweight_teacher)
        if cfg.reweight_interval < 1:
            raise ReweightConfigError(f"--reweight-interval must be >= 1, got {cfg.reweight_interval}")
        if not 1 <= cfg.reweight_backprop_steps <= cfg.reweight_interval:
            raise ReweightConfigError(
                f"--reweight-backprop-steps ({cfg.reweight_backprop_steps}) must be between 1 and "
                f"--reweight-interval ({cfg.reweight_interval}): the teacher only differentiates "
                "through steps taken since its last update"
            )
        if "progress" in self.features and cfg.max_update <= 0:
            raise ReweightConfigError("--teacher-features progress needs --max-update > 0")
        self.pad = tgt_dict.pad()
        dense_dim = sum(SURFACE_FEATURES[name] for name in self.features if name in SURFACE_FEATURES)
        dense_dim += encoder_dim if "encoder" in self.features else 0
        dense_dim += decoder_dim if "decoder" in self.features else 0
        self.teacher = Teacher(
            dense_dim,
            len(tgt_dict) if "label" in self.features else 0,
            hidden_layers=cfg.teacher_hidden_layers,
            hidden_dim=cfg.teacher_hidden_dim,
        )
        self.teacher.requires_grad_(False)  # invisible to the student optimizer (see module doc)
        self.teacher_optimizer = torch.optim.Adam(self.teacher.parameters(), lr=cfg.teacher_lr)
        self.num_meta_updates = 0
        self.best_meta_valid_loss = float("inf")
        self._running_loss = None  # running mean training loss (a tensor on the student's device)
        self.last_meta_update = -1
        self.meta_valid_consumed = 0
        self._restored_history = []
        # transient (not checkpointed)
        self._pending: Optional[ReplayData] = None
        self._replay_teacher_params = None
        self._recorder = None
        self._meta_valid_iter = None
        self._update_num = 0
        self._last_meta_stats = {}

    # -- state ------------------------------------------------------------------------------
    def _apply(self, fn, *args, **kwargs):
        # The trainer casts the criterion to fp16/bf16 with the student; the teacher stays fp32.
        super()._apply(fn, *args, **kwargs)
        for p in self.teacher.parameters():
            if p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()
        return self

    def get_extra_state(self):
        """Teacher optimizer, counters and the replay history: a resumed run continues exactly."""
        history = self._recorder.history if self._recorder is not None else self._restored_history
        return {
            "teacher_optimizer": self.teacher_optimizer.state_dict(),
            "num_meta_updates": self.num_meta_updates,
            "best_meta_valid_loss": self.best_meta_valid_loss,
            "running_train_loss": None if self._running_loss is None else float(self._running_loss),
            "last_meta_update": self.last_meta_update,
            "meta_valid_consumed": self.meta_valid_consumed,
            "last_meta_stats": dict(self._last_meta_stats),
            "history": [record_to_state(r) for r in history if isinstance(r.data, ReplayData)],
        }

    def set_extra_state(self, state):
        self.teacher_optimizer.load_state_dict(state["teacher_optimizer"])
        self.num_meta_updates = state["num_meta_updates"]
        self.best_meta_valid_loss = state["best_meta_valid_loss"]
        loss = state["running_train_loss"]
        self._running_loss = None if loss is None else torch.tensor(loss)
        self.last_meta_update = state["last_meta_update"]
        self.meta_valid_consumed = state["meta_valid_consumed"]
        self._last_meta_stats = dict(state["last_meta_stats"])
        self._restored_history = [record_from_state(r) for r in state["history"]]
        if self._recorder is not None:
            self._recorder.history.clear()
            self._recorder.history.extend(self._restored_history)

    # -- weights ----------------------------------------------------------------------------
    def token_weights(self, sample, encoder_out, net_output, lprobs):
        """Normalised per-token weights (B x T, 0 on padding) and the raw non-pad weights."""
        target = sample["target"]  # B x T
        mask = target.ne(self.pad)
        dense = self._dense_features(encoder_out, net_output, lprobs, target, mask)
        labels = target if "label" in self.features else None
        if self._replay_teacher_params is None:
            raw = self.teacher(dense, labels)  # B x T
        else:  # replay inside the hypergradient: weights as a function of fresh leaves omega
            raw = torch.func.functional_call(self.teacher, self._replay_teacher_params, (dense, labels))
        mask_f = mask.to(raw.dtype)
        if self.cfg.reweight_granularity == "sentence":  # one weight per sentence: its tokens' mean
            raw = ((raw * mask_f).sum(1, keepdim=True) / mask_f.sum(1, keepdim=True).clamp_min(1)).expand_as(raw)
        return normalize_weights(raw, mask), raw * mask_f

    def _dense_features(self, encoder_out, net_output, lprobs, target, mask):
        parts = []
        bsz, tgt_len = target.shape
        if "encoder" in self.features:
            states = encoder_out["encoder_out"][0].transpose(0, 1)  # B x S x C
            pads = encoder_out["encoder_padding_mask"]
            keep = (~pads[0]).to(states.dtype).unsqueeze(-1) if len(pads) else torch.ones_like(states[..., :1])
            pooled = (states * keep).sum(1) / keep.sum(1).clamp_min(1)  # B x C
            parts.append(pooled.unsqueeze(1).expand(bsz, tgt_len, -1))
        if "decoder" in self.features:
            parts.append(net_output[1]["inner_states"][-1].transpose(0, 1))  # B x T x C
        if any(name in SURFACE_FEATURES for name in self.features):
            parts.append(self._surface_features(lprobs, target))
        if not parts:
            return None
        dense = torch.cat([p.float() for p in parts], dim=-1)
        return dense if self.cfg.reweight_features_grad else dense.detach()

    def _surface_features(self, lprobs, target):
        """The paper's surface features M1, per target token (B x T x d)."""
        with torch.no_grad():
            lprobs = lprobs.float()
            token_lprob = lprobs.gather(-1, target.unsqueeze(-1))  # B x T x 1
            cols = []
            for name in self.features:
                if name == "progress":
                    cols.append(torch.full_like(token_lprob, self._update_num / self.cfg.max_update))
                elif name == "loss":
                    running = 0.0 if self._running_loss is None else self._running_loss.to(token_lprob)
                    cols += [-token_lprob, torch.zeros_like(token_lprob) + running]
                elif name == "best-valid":
                    best = self.best_meta_valid_loss if self.num_meta_updates else 0.0
                    cols.append(torch.full_like(token_lprob, best))
                elif name == "prediction":
                    cols.append(lprobs.argmax(-1, keepdim=True).eq(target.unsqueeze(-1)).float())
                elif name == "margin":
                    probs = lprobs.exp()
                    p_true = probs.gather(-1, target.unsqueeze(-1))
                    other = probs.scatter(-1, target.unsqueeze(-1), 0.0).amax(-1, keepdim=True)
                    cols.append(p_true - other)
            return torch.cat(cols, dim=-1)

    # -- recording the student's steps --------------------------------------------------------
    def observe(self, logging_output):
        """Track the running mean training loss (surface feature ``loss``) after each micro-batch,
        as a tensor: no GPU synchronisation in the training step."""
        size = float(logging_output.get("sample_size", 0) or 0)
        if size > 0 and "loss" in self.features:
            loss = logging_output["loss"].detach().float() / size
            if self._running_loss is None:
                self._running_loss = loss
            else:
                self._running_loss = 0.99 * self._running_loss + 0.01 * loss

    def before_micro_batch(self, model, criterion, optimizer, update_num, sample, ignore_grad, meta_valid_batches):
        """Called by the task before fairseq's forward/backward of each micro-batch."""
        if self._recorder is None:
            self._attach(optimizer, meta_valid_batches)
        self._update_num = update_num
        inner = unwrap_model(model)
        # The trainer zeroes gradients (to None) before the first micro-batch of every update
        # attempt, so "no gradient yet" marks the start of an update, retries after an fp16
        # overflow included.
        if self._pending is None or all(p.grad is None for p in inner.parameters() if p.requires_grad):
            if self._meta_update_due(update_num):
                self.meta_update(model, criterion, optimizer, update_num)
            for key, value in self._last_meta_stats.items():  # shown in every log line (weight 0)
                metrics.log_scalar(key, value, weight=0, round=4)
            self._pending = ReplayData(update_num)
        self._pending.micro_batches.append((sample, ignore_grad))

    def _attach(self, optimizer, meta_valid_batches):
        recorder = find_recorder(optimizer)
        if recorder is None:
            name = type(getattr(optimizer, "fp32_optimizer", optimizer)).__name__
            raise ReweightConfigError(
                f"--reweight-teacher {self.cfg.reweight_teacher} needs --optimizer reweight_sgd "
                f"(got {name}); or use --reweight-teacher none"
            )
        if type(optimizer).__name__ == "MemoryEfficientFP16Optimizer":
            raise ReweightConfigError(
                "--memory-efficient-fp16 keeps no fp32 master weights to replay steps from; use --fp16"
            )
        momentum = recorder.param_groups[0]["momentum"]
        if self.cfg.reweight_history == "reverse" and momentum <= 0:
            raise ReweightConfigError(
                f"reweight_sgd with --momentum {momentum} cannot undo steps in reverse; set --momentum "
                "0.9 (the paper's value) or --reweight-history checkpoint"
            )
        recorder.set_history_size(self.cfg.reweight_backprop_steps)
        recorder.store_states = self.cfg.reweight_history == "checkpoint"
        recorder.step_callback = self._on_step
        device = recorder.param_groups[0]["params"][0].device
        for record in self._restored_history:  # from a checkpoint: samples back to the device
            for i, (sample, ignore) in enumerate(record.data.micro_batches):
                record.data.micro_batches[i] = (utils.move_to_cuda(sample, device) if device.type == "cuda" else sample, ignore)
            recorder.history.append(record)
        self._recorder = recorder
        self._meta_valid_iter = meta_valid_batches(skip=self.meta_valid_consumed)

    def _on_step(self, record):
        record.data, self._pending = self._pending, None
        record.clip_norm = float(self.cfg.clip_norm)

    def _meta_update_due(self, update_num):
        return update_num > 0 and update_num % self.cfg.reweight_interval == 0 and update_num != self.last_meta_update

    # -- the meta-update ----------------------------------------------------------------------
    def meta_update(self, model, criterion, optimizer, update_num):
        """One teacher step from the validation loss at the current student parameters."""
        self.last_meta_update = update_num
        steps = list(self._recorder.history)[-self.cfg.reweight_backprop_steps :]
        if len(steps) < self.cfg.reweight_backprop_steps or not all(isinstance(s.data, ReplayData) for s in steps):
            logger.info(f"update {update_num}: no meta-update yet (fewer than B recorded steps, e.g. after a restart)")
            return
        start = time.perf_counter()
        with self.replaying(model, criterion, update_num) as replay:
            # inside: a new epoch of the meta-valid DataLoader draws from torch's global RNG
            sample = next(self._meta_valid_iter)
            self.meta_valid_consumed += 1
            val_loss, val_grad = replay.validation_gradient(sample)
            result = reverse_hypergradient(
                replay.student.theta(), replay.student.momentum(), replay.omega,
                [replay.student.convert_record(s) for s in steps], replay.loss_fn, val_grad,
                mode=self.cfg.reweight_history, all_reduce=all_reduce_fn(), teacher_grad_only=True,
            )
        for p, g in zip(self.teacher.parameters(), result.teacher_grad):
            p.grad = g.to(p.dtype)
        gnorm = torch.norm(torch.stack([g.float().norm() for g in result.teacher_grad]))
        if self.cfg.teacher_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(list(self.teacher.parameters()), self.cfg.teacher_clip_norm)
        self.teacher_optimizer.step()
        self.teacher_optimizer.zero_grad(set_to_none=True)
        self._check_teacher_in_sync()
        self.num_meta_updates += 1
        self.best_meta_valid_loss = min(self.best_meta_valid_loss, val_loss)
        self._last_meta_stats = {
            "meta_val_loss": val_loss / math.log(2),
            "teacher_gnorm": gnorm.item(),
            "meta_time": time.perf_counter() - start,
        }
        for key, value in self._last_meta_stats.items():
            metrics.log_scalar(key, value, round=4)
        if self.cfg.reweight_noise_sidecar:
            self._log_noise_auc(model, criterion)

    def _log_noise_auc(self, model, criterion):
        """``--reweight-noise-sidecar``: every ``--reweight-noise-auc-interval`` meta-updates, log the
        ROC AUC of "low weight => noisy" on a fixed training subset (``noise_auc.NoiseAucMonitor``; no
        gradients, eval mode, RNG restored: training is unchanged), shown in every log line after."""
        from fairseq_reweight.noise_auc import NoiseAucMonitor

        criterion = unwrap_model(criterion)
        if getattr(self, "_noise_auc_monitor", None) is None:  # transient; the task is criterion.task
            self._noise_auc_monitor = NoiseAucMonitor(self.cfg, criterion.task, model)
        stats, new = self._noise_auc_monitor.update(self, model, criterion, self.num_meta_updates)
        for key, value in stats.items() if new else ():
            metrics.log_scalar(key, value, round=4)
        self._last_meta_stats.update(stats)

    def _check_teacher_in_sync(self):
        """Under data parallelism every rank applies the same all-reduced teacher gradient; check
        that the teachers are still identical (one all-reduce of a few numbers)."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        sums = torch.stack([p.detach().double().sum() for p in self.teacher.parameters()])
        low, high = sums.clone(), sums.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        if not torch.equal(low, high):
            raise RuntimeError("the teacher differs between data-parallel ranks after a meta-update")

    @contextlib.contextmanager
    def replaying(self, model, criterion, update_num):
        """Everything a hypergradient needs, as a :class:`Replay`; restores the RNG, the model's
        mode and update counter afterwards, so that training continues exactly as without it."""
        inner = unwrap_model(model)
        rng_state = utils.get_rng_state()
        names = [name for name, _ in self.teacher.named_parameters()]
        omega = [p.detach().clone().requires_grad_() for p in self.teacher.parameters()]
        self._replay_teacher_params = dict(zip(names, omega))
        try:
            yield Replay(StudentView(inner, self._recorder), criterion, omega, self.cfg.seed,
                         valid_loss=self.cfg.meta_valid_loss)
        finally:
            self._replay_teacher_params = None
            utils.set_rng_state(rng_state)
            inner.set_num_updates(update_num)
            inner.train()
