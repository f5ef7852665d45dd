"""``--reweight-teacher l2t``: L2T-data (Fan, Tian, Qin, Li, Liu, "Learning to Teach", ICLR 2018), the
paper's Table 7 baseline. A policy keeps or drops each training sentence; REINFORCE, no hypergradient.

- Policy: :class:`~fairseq_reweight.core.teacher.Teacher` (linear, or an MLP: ``--teacher-hidden-layers``)
  on a sentence's surface features (``--teacher-features``, default all; token features averaged over the
  sentence), ``p_i = sigmoid(...)``, starting at 0.9 for every sentence (:data:`INITIAL_LOGIT`): L2T
  starts by keeping almost everything, near plain training, and learns from the sentences it drops.
- Acting: ``a_i ~ Bernoulli(p_i)`` at every micro-batch, from the driver's own generator seeded from
  ``--seed``, the update and the rank before each update (dropout draws untouched; a resumed run or an
  fp16 retry draws the same actions); sentence i's tokens weigh ``a_i``, normalised as a teacher's.
- Learning: an episode is the K updates between meta-update points (``--reweight-interval``); its reward
  is the decrease of the ``--meta-valid-loss`` (eval mode) of one ``--meta-valid-subset`` batch, the same
  batch at both ends (a paired difference: two batches' losses differ far more than K updates change
  them). One Adam step (``--teacher-lr``) along ``(R - b) grad sum_t sum_i log pi(a_i | s_i)``, b a
  moving average of the rewards (the first episode's, then ``b <- 0.9 b + 0.1 R``).
"""
import logging
import math
import time
from typing import List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from fairseq import utils
from fairseq.logging import metrics
from torch import Tensor, nn

from fairseq_reweight.core.checks import all_finite, check_schedule
from fairseq_reweight.core.errors import ReweightConfigError
from fairseq_reweight.core.features import TrainingState, surface_features
from fairseq_reweight.core.teacher import Teacher, apply_teacher_gradient, normalize_weights
from fairseq_reweight.nmt import fairseq_contract as contract
from fairseq_reweight.nmt.data_parallel import all_reduce_fn, data_parallel
from fairseq_reweight.nmt.driver import log_teacher_step, updated_running_loss
from fairseq_reweight.nmt.noise_monitor import NoiseAucMonitor, inspection_mode
from fairseq_reweight.nmt.replay import check_skips, meta_valid_loss
from fairseq_reweight.nmt.weigher import SURFACE_FEATURES, _row_mean, parse_features

logger = logging.getLogger(__name__)

INITIAL_LOGIT = math.log(9.0)  # sigmoid: keep probability 0.9 for every sentence at the start
BASELINE_DECAY = 0.9


def check_options(cfg) -> None:
    """``--reweight-teacher l2t``'s options, checked when fairseq sets up the task."""
    check_schedule(cfg.reweight_interval, 1)
    features = parse_features(cfg.teacher_features, "l2t")
    other = ",".join(name for name in features if name not in SURFACE_FEATURES)
    if other:
        raise ReweightConfigError(f"--reweight-teacher l2t takes surface features only ({','.join(SURFACE_FEATURES)}) "
                                  f"as L2T-data's policy does; got --teacher-features {other}")
    if "progress" in features and cfg.max_update <= 0:
        raise ReweightConfigError("--teacher-features progress needs --max-update > 0")
    if not cfg.teacher_lr > 0:
        raise ReweightConfigError(f"--teacher-lr must be > 0, got {cfg.teacher_lr}")
    if cfg.reweight_features_grad:
        raise ReweightConfigError("--reweight-features-grad has no effect with --reweight-teacher l2t: its 0/1 keep "
                                  "decisions are sampled, no gradient reaches the student through them")
    if cfg.meta_valid_params:
        raise ReweightConfigError("--meta-valid-params restricts a hypergradient's validation gradient; "
                                  "--reweight-teacher l2t takes none (its reward is the validation loss itself)")
    if cfg.reweight_noise_auc_interval < 1:
        raise ReweightConfigError(f"--reweight-noise-auc-interval must be >= 1, got {cfg.reweight_noise_auc_interval}")


def attach(task, criterion):
    """The policy's driver on ``criterion`` (which fairseq checkpoints) as its ``weight_fn``; returns it."""
    cfg = task.cfg
    if cfg.reweight_granularity != "token" or cfg.reweight_eos != "token":
        logger.info("--reweight-granularity / --reweight-eos: no effect with --reweight-teacher l2t (whole sentences)")
    monitor = NoiseAucMonitor(cfg, task) if cfg.reweight_noise_sidecar else None
    task.driver = L2TDriver(cfg, parse_features(cfg.teacher_features, "l2t"), task.tgt_dict.pad(),
                            task.meta_valid_batches, monitor)
    criterion.attach(task.driver, task.driver.act)  # fairseq's own loss formulation (loss_from_logits off)
    return criterion


def action_seed(seed: int, update_num: int, rank: int = 0) -> int:
    """The seed of one update's actions (not torch's ``seed + update``: not correlated with dropout)."""
    return int(np.random.SeedSequence([seed % 2**32, update_num, rank, 0x4C3254]).generate_state(1)[0])


def reinforce_gradient(policy: Teacher, features: Tensor, actions: Tensor, advantage: float) -> List[Tensor]:
    """``advantage * grad_omega sum_i log pi(a_i | s_i)``, one tensor per ``policy.parameters()``;
    ``log pi(a | s) = a log p + (1 - a) log(1 - p)``, from the logits."""
    params, flags = list(policy.parameters()), [p.requires_grad for p in policy.parameters()]
    try:
        with torch.enable_grad():
            logits = policy.requires_grad_(True).logits(features, None)
            log_likelihood = -F.binary_cross_entropy_with_logits(logits, actions.to(logits.dtype), reduction="sum")
            grads = torch.autograd.grad(log_likelihood, params, allow_unused=True)
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    return [advantage * (torch.zeros_like(p) if g is None else g) for p, g in zip(params, grads)]


def sentence_features(lprobs: Tensor, target: Tensor, pad: int, state: TrainingState, columns) -> Tensor:
    """B x C surface features: each token's (core.features), averaged over the sentence's non-pad tokens."""
    dtype = torch.promote_types(lprobs.dtype, torch.float32)
    tokens = surface_features(lprobs.detach().to(dtype), target, state, columns)  # B x T x C
    return _row_mean(tokens, target.ne(pad).to(dtype).unsqueeze(-1)).squeeze(1)


class L2TDriver(nn.Module):
    """The policy, its Adam, the baseline, the action generator and the episode (see the module docstring).
    The task calls it as it calls the meta-update driver; it never keeps or replays a step."""

    COUNTERS = ("num_episodes", "baseline", "best_valid", "meta_valid_consumed", "last_boundary", "episode_loss",
                "skipped", "consecutive_skips")

    def __init__(self, cfg, features, pad: int, meta_valid_batches, noise_monitor=None):
        super().__init__()
        self.cfg, self.pad, self.meta_valid_batches, self.noise_monitor = cfg, pad, meta_valid_batches, noise_monitor
        self.features, self.running_loss, self.last_stats = list(features), None, {}
        self.columns = [col for name in self.features for col in SURFACE_FEATURES[name]]
        self.policy = Teacher(len(self.columns), 0, cfg.teacher_hidden_layers, cfg.teacher_hidden_dim)
        nn.init.constant_(self.policy.bias, INITIAL_LOGIT)
        self.policy.requires_grad_(False)  # trained here by REINFORCE, never by the student's optimizer
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=cfg.teacher_lr)
        self.generator = torch.Generator()
        self.num_episodes = self.meta_valid_consumed = self.skipped = self.consecutive_skips = 0
        self.baseline = self.episode_loss = None  # episode_loss: the start loss of the running episode
        self.best_valid, self.last_boundary, self.update_num = float("inf"), -1, 0
        self.records = []  # (update_num, B x C features, B actions) of the running episode
        self.episode_batch, self._valid_iter, self.recording = None, None, True

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)  # the trainer casts the criterion to fp16/bf16: the policy stays fp32
        for p in self.policy.parameters():
            if p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()
        return self

    def training_state(self) -> TrainingState:
        best = self.best_valid if math.isfinite(self.best_valid) else 0.0
        return TrainingState(self.update_num / max(self.cfg.max_update, 1),
                             0.0 if self.running_loss is None else self.running_loss, best)

    def keep_probabilities(self, lprobs: Tensor, target: Tensor) -> Tuple[Tensor, Tensor]:
        """(B x C features, B keep probabilities), without gradients."""
        features = sentence_features(lprobs, target, self.pad, self.training_state(), self.columns)
        with torch.no_grad():
            return features, self.policy(features, None)

    def act(self, sample, encoder_out, net_output, lprobs, params=None):
        """The criterion's ``weight_fn`` in training: sampled 0/1 per sentence, on its tokens."""
        target, mask = sample["target"], sample["target"].ne(self.pad)
        features, p = self.keep_probabilities(lprobs, target)
        draws = torch.rand(p.shape, generator=self.generator, device=p.device, dtype=p.dtype)  # in [0, 1): p = 1 keeps
        actions = (draws < p).to(torch.float32)
        if self.recording:
            self.records.append((self.update_num, features, actions))
        raw = actions.unsqueeze(1) * mask.to(actions.dtype)
        return normalize_weights(raw, mask), raw

    def token_weights(self, sample, encoder_out, net_output, lprobs, params=None):
        """The keep probabilities on each sentence's tokens (what the noise monitor scores)."""
        target, mask = sample["target"], sample["target"].ne(self.pad)
        raw = self.keep_probabilities(lprobs, target)[1].unsqueeze(1) * mask.to(torch.float32)
        return normalize_weights(raw, mask), raw

    # -- the task's hooks (those of the meta-update driver) -----------------------------------------------
    def in_window(self, update_num: int) -> bool:  # no step is replayed: --reweight-chunks has no effect
        return False

    def keeps_step(self, *args) -> bool:
        return False

    def on_micro_batch(self, model, criterion, optimizer, update_num, sample, ignore_grad):
        """Before each micro-batch: at the first of an update attempt, the update's action seed (an fp16
        retry draws the same actions again and records them once) and, at N = K, 2K, ... (or the first
        update with no episode running), the episode boundary."""
        self.update_num, self.recording = update_num, not ignore_grad
        if not contract.update_attempt_started(model):
            return
        if self.generator.device != self.policy.bias.device:  # drawn where p is: no host synchronisation
            self.generator = torch.Generator(device=self.policy.bias.device)
        self.generator.manual_seed(action_seed(self.cfg.seed, update_num,
                                               torch.distributed.get_rank() if data_parallel() else 0))
        self.records = [r for r in self.records if r[0] != update_num]
        due = self.episode_loss is None or (update_num > 0 and update_num % self.cfg.reweight_interval == 0)
        if due and update_num != self.last_boundary:
            self.last_boundary = update_num
            self.boundary(model, criterion, update_num)
        for key, value in self.last_stats.items():  # shown in every log line (weight 0)
            metrics.log_scalar(key, value, weight=0, round=4)

    def observe(self, logging_output):
        """The running mean training loss (surface feature ``loss``) after each micro-batch."""
        if "loss" in self.features:
            self.running_loss = updated_running_loss(self.running_loss, logging_output)

    # -- episodes ---------------------------------------------------------------------------------------
    def _next_batch(self):
        if self._valid_iter is None:
            self._valid_iter = self.meta_valid_batches(skip=self.meta_valid_consumed)
        self.meta_valid_consumed += 1
        return next(self._valid_iter)

    def validation_loss(self, model, criterion, sample) -> float:
        """``--meta-valid-loss`` of ``sample`` (nats), the model in eval mode (called in inspection mode)."""
        device = next(model.parameters()).device
        sample = utils.move_to_cuda(sample, device=device) if device.type == "cuda" else sample
        # averaged over the batch's tokens, or its sentences for sentence-nll
        size = sample["target"].size(0) if self.cfg.meta_valid_loss == "sentence-nll" else sample["ntokens"]
        return meta_valid_loss(model, criterion, sample, self.cfg.meta_valid_loss, float(size)).item()

    def boundary(self, model, criterion, update_num):
        """End the running episode (reward, policy step), start the next on a new validation batch."""
        start = time.perf_counter()
        inner = contract.unwrap_model(model)
        with inspection_mode(inner):  # no dropout, torch's RNG restored (a new validation epoch draws from it)
            if self.episode_loss is not None:
                batch = self.episode_batch if self.episode_batch is not None else self._next_batch()
                end_loss = self.validation_loss(inner, criterion, batch)
            self.episode_batch = self._next_batch()
            start_loss = self.validation_loss(inner, criterion, self.episode_batch)
        if self.episode_loss is not None:
            self.end_episode(model, criterion, self.episode_loss - end_loss, end_loss, update_num, start)
        self.episode_loss, self.records = start_loss, []
        if math.isfinite(start_loss):
            self.best_valid = min(self.best_valid, start_loss)

    def end_episode(self, model, criterion, reward: float, end_loss: float, update_num: int, start: float):
        device = self.policy.bias.device
        features, actions = ([torch.cat([r[i].to(device) for r in self.records]) for i in (1, 2)] if self.records
                             else (None, None))
        keep_rate = actions.mean().item() if actions is not None else float("nan")
        stats = {"l2t_reward": reward, "l2t_keep_rate": keep_rate, "meta_val_loss": end_loss / math.log(2)}
        if features is not None and math.isfinite(reward) and self.learn(features, actions, reward, stats):
            self.consecutive_skips = 0
        elif features is not None:  # a diverged student: the policy stays (None: dummy batches only, no sentence)
            self.skipped, self.consecutive_skips = self.skipped + 1, self.consecutive_skips + 1
            stats["meta_skipped"] = self.skipped
            check_skips(self.consecutive_skips, self.cfg.reweight_max_skips, update_num, end_loss)
        if math.isfinite(end_loss):
            self.best_valid = min(self.best_valid, end_loss)
        self.num_episodes += 1
        stats["meta_time"] = time.perf_counter() - start
        # the noise monitor's figures: the AUC of the keep probabilities (token_weights)
        log_teacher_step(stats, self.last_stats, self.noise_monitor, self, model, criterion, self.num_episodes)

    def learn(self, features, actions, reward: float, stats=None) -> bool:
        """The REINFORCE step on one episode; False where nothing was stepped for a non-finite gradient
        (the first episode only sets the baseline, which counts as done)."""
        stats = {} if stats is None else stats
        if self.baseline is None:
            self.baseline = stats["l2t_baseline"] = reward
            return True
        advantage = reward - self.baseline
        self.baseline = BASELINE_DECAY * self.baseline + (1 - BASELINE_DECAY) * reward
        grads = reinforce_gradient(self.policy, features, actions, advantage)
        all_reduce = all_reduce_fn()
        if all_reduce is not None:  # each rank's episode is its own sentences
            all_reduce(grads)
        if not all_finite(grads):
            return False
        # Adam minimises: the negative of the policy gradient, an ascent on the expected reward
        gnorm = apply_teacher_gradient(self.policy, self.optimizer, [-g for g in grads], self.cfg.teacher_clip_norm)
        stats.update(l2t_baseline=self.baseline, teacher_gnorm=gnorm.item())
        return True

    # -- checkpoint state -------------------------------------------------------------------------------
    def get_extra_state(self):
        """Adam, baseline, counters, the action generator and the running episode: a resumed run continues."""
        records = [(u, f.detach().cpu(), a.detach().cpu()) for u, f, a in self.records]
        generator = {"device": self.generator.device.type, "state": self.generator.get_state()}
        return {**{name: getattr(self, name) for name in self.COUNTERS},
                "running_train_loss": None if self.running_loss is None else float(self.running_loss),
                "optimizer": self.optimizer.state_dict(), "generator": generator, "records": records,
                "last_stats": dict(self.last_stats)}

    def set_extra_state(self, state):
        for name in self.COUNTERS:
            setattr(self, name, state[name])
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # a new --teacher-lr wins, as fairseq's --lr does
            group["lr"] = self.cfg.teacher_lr
        self.running_loss = None if state["running_train_loss"] is None else torch.tensor(state["running_train_loss"])
        self.generator = torch.Generator(device=self.policy.bias.device)
        if state["generator"]["device"] == self.generator.device.type:  # (else reseeded before any draw anyway)
            self.generator.set_state(state["generator"]["state"])
        self.records, self.last_stats = list(state["records"]), dict(state["last_stats"])
        self._valid_iter, self.episode_batch = None, None
        if self.episode_loss is not None:  # the running episode's batch is drawn again at its end
            self.meta_valid_consumed -= 1
