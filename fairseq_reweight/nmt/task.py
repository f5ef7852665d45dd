"""``--task reweight_translation``: fairseq's ``translation`` task whose training step a teacher
weights, token by token (Fan et al., "Learning to Reweight with Deep Interactions", AAAI 2021).

Same data format and options as ``translation``; the ``--reweight-*`` / ``--teacher-*`` options
below choose the teacher and its meta-update schedule. ``--reweight-teacher none`` is the uniform
baseline: bit-identical to ``--task translation --criterion label_smoothed_cross_entropy
--optimizer sgd``.
"""
import contextlib
import dataclasses
import glob
import itertools
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from fairseq.dataclass import ChoiceEnum
from fairseq.logging import metrics
from fairseq.tasks import register_task
from fairseq.tasks.translation import TranslationConfig, TranslationTask
from omegaconf import II

from fairseq_reweight.core import math_attention
from fairseq_reweight.core.checks import check_schedule
from fairseq_reweight.core.errors import ReweightConfigError, install_excepthook
from fairseq_reweight.nmt.driver import ReweightDriver
from fairseq_reweight.nmt.fairseq_contract import batch_rows, bf16_without_tpu, destroy_process_group_at_exit
from fairseq_reweight.nmt.optimizer import check_teacher_optimizer
from fairseq_reweight.nmt.weigher import ALL_FEATURES, TokenWeigher, parse_features

logger = logging.getLogger(__name__)


@dataclass
class ReweightTranslationConfig(TranslationConfig):
    reweight_teacher: ChoiceEnum(["none", "deep", "surface", "oracle", "pairs", "l2t"]) = field(
        default="deep",
        metadata={
            "help": "none: uniform weights (plain fine-tuning, the baseline); deep: the paper's "
            "deep-interaction teacher on the student's internal states and the label; surface: "
            "a teacher on surface features only (progress, loss, best-valid, prediction, margin); "
            "oracle: weight 0 for every token of a pair --reweight-noise-sidecar marks noisy, 1 "
            "otherwise (the bound of down-weighting the noise; no meta-updates); pairs: the fixed "
            "per-pair weights of --reweight-pair-weights (e.g. a filter's 0/1; no meta-updates); l2t: L2T-data "
            "(Fan et al., ICLR 2018), a policy on surface features that keeps or drops each sentence, trained by "
            "REINFORCE on the validation loss's decrease every --reweight-interval updates (nmt/l2t.py)"
        },
    )
    reweight_preset: ChoiceEnum(["none", "robust"]) = field(
        default="none",
        metadata={"help": "robust: the configuration measured best on masked noise (examples/iwslt14/README.md): "
                  "--teacher-features label --teacher-lr 0.1; a preset fills in the options left at their "
                  "defaults (none: the paper's configuration)"},
    )
    teacher_features: str = field(
        default="",
        metadata={
            "help": "comma-separated teacher inputs from " + ",".join(ALL_FEATURES) + "; default "
            "encoder,label for --reweight-teacher deep and all surface features for surface and l2t"
        },
    )
    teacher_hidden_layers: int = field(
        default=0, metadata={"help": "0: the paper's linear teacher; N: an MLP with N ReLU layers"}
    )
    teacher_hidden_dim: int = field(default=64, metadata={"help": "width of the MLP teacher"})
    teacher_lr: float = field(default=1e-3, metadata={"help": "Adam learning rate of the teacher"})
    teacher_clip_norm: float = field(
        default=0.0, metadata={"help": "clip the teacher's gradient norm to this (0: off)"}
    )
    reweight_granularity: ChoiceEnum(["token", "sentence"]) = field(
        default="token", metadata={"help": "one weight per target token, or per sentence"}
    )
    reweight_eos: ChoiceEnum(["token", "sentence"]) = field(
        default="token", metadata={"help": "token: the teacher weighs </s> as any target token (the paper); "
                                           "sentence: </s> gets the mean weight of its sentence's other tokens"}
    )
    reweight_chunks: int = field(
        default=1, metadata={"help": "train (and replay) every micro-batch of the B updates before each meta-update, "
                                     "and take the meta-validation batch, as this many consecutive chunks of its "
                                     "sentences: the meta-update's peak memory is that of one chunk; the teacher's "
                                     "weights are normalised per chunk there (other updates train whole)"}
    )
    reweight_interval: int = field(
        default=20, metadata={"help": "K: student updates between teacher updates"}
    )
    reweight_backprop_steps: int = field(
        default=2, metadata={"help": "B: student updates the hypergradient differentiates through (B <= K)"}
    )
    reweight_history: ChoiceEnum(["reverse", "checkpoint"]) = field(
        default="reverse",
        metadata={
            "help": "reverse: recover earlier parameters by undoing the momentum-SGD steps (stores "
            "nothing; needs momentum > 0); checkpoint: keep B copies of parameters and momentum (exact)"
        },
    )
    reweight_hvp: ChoiceEnum(["double-backward", "forward-over-reverse"]) = field(
        default="double-backward",
        metadata={"help": "how a replayed step's Hessian-vector products are computed: by a double backward "
                  "(reverse-over-reverse) or by one backward pass at dual numbers (forward-over-reverse); "
                  "the same values up to round-off, at different cost (benchmarks/meta_breakdown.py)"},
    )
    reweight_newest_step: ChoiceEnum(["kept", "replay"]) = field(
        default="kept",
        metadata={"help": "kept: the update before a meta-update keeps its gradient's graph, and the meta-update "
                  "differentiates that instead of replaying the step (about one training step less per "
                  "meta-update; the graph is held through the validation gradient); replay: replay it like "
                  "the others. Kept only where it can be: one micro-batch per update, no --reweight-chunks, "
                  "fp32, one process, B >= 2"},
    )
    reweight_features_grad: bool = field(
        default=False,
        metadata={"help": "let the weights depend on the student through its features (off: detached, as in the paper)"},
    )
    meta_valid_subset: str = field(
        default="valid", metadata={"help": "data split whose loss the teacher minimises"}
    )
    meta_valid_loss: ChoiceEnum(["criterion", "nll", "sentence-nll"]) = field(
        default="criterion",
        metadata={"help": "the loss the teacher minimises on --meta-valid-subset: the training "
                  "criterion's (label-smoothed with --label-smoothing) or the plain NLL, averaged over tokens; "
                  "sentence-nll: each sentence's mean token NLL averaged over sentences (short sentences "
                  "count as much as long ones)"},
    )
    meta_valid_params: Optional[str] = field(
        default=None,
        metadata={"help": "a regular expression: the teacher minimises the validation loss's first-order change "
                  "through the student parameters whose names match it only (the validation gradient is "
                  "zero elsewhere), e.g. 'embed_tokens' for the (shared) embedding and output matrix; "
                  "default: all parameters"},
    )
    meta_valid_max_tokens: Optional[int] = field(
        default=None,
        metadata={"help": "tokens per meta-validation batch (default: --max-tokens-valid, which "
                  "defaults to --max-tokens: a batch like a training batch)"},
    )
    reweight_noise_sidecar: Optional[str] = field(
        default=None,
        metadata={
            "help": "a train.noise file (one 0/1 line per training pair, 1 = noised; see "
            "data_prep/README.md): log noise_auc, the ROC AUC of 'low teacher weight => noisy pair', "
            "and the mean weight of noisy/clean pairs (noise_w_noisy, noise_w_clean) on a fixed subset "
            "of the training split during training (does not change training)"
        },
    )
    reweight_pair_weights: Optional[str] = field(
        default=None,
        metadata={"help": "with --reweight-teacher pairs: one weight >= 0 per training pair, one a line in data-bin "
                  "order (0 drops the pair; normalised like a teacher's weights); --reweight-noise-sidecar, "
                  "if given, is only measured against"},
    )
    reset_teacher: bool = field(
        default=False,
        metadata={"help": "on --restore-file, do not load the checkpoint's teacher, its Adam state and counters: "
                  "start the teacher fresh (e.g. after changing its shape)"},
    )
    reweight_max_skips: int = field(
        default=5,
        metadata={"help": "stop after this many meta-updates in a row are skipped for a non-finite validation "
                  "gradient or teacher gradient (0: never stop)"},
    )
    reweight_noise_auc_interval: int = field(
        default=10, metadata={"help": "with --reweight-noise-sidecar: compute noise_auc every N meta-updates"}
    )
    seed: int = II("common.seed")
    memory_efficient_fp16: bool = II("common.memory_efficient_fp16")
    max_update: int = II("optimization.max_update")
    clip_norm: float = II("optimization.clip_norm")
    max_tokens_valid: Optional[int] = II("dataset.max_tokens_valid")
    batch_size_valid: Optional[int] = II("dataset.batch_size_valid")
    optimizer_config: Any = II("optimizer")  # --optimizer and its options, checked at set-up


@register_task("reweight_translation", dataclass=ReweightTranslationConfig)
class ReweightTranslationTask(TranslationTask):
    """Translation with a teacher that weights every target token of the training loss."""

    cfg: ReweightTranslationConfig

    @classmethod
    def setup_task(cls, cfg: ReweightTranslationConfig, **kwargs):
        install_excepthook()  # a ReweightConfigError reaching fairseq-train's top prints one line
        destroy_process_group_at_exit()
        for path in (cfg.data or "").split(os.pathsep):
            if not os.path.isdir(path):
                raise ReweightConfigError(
                    f"data directory {path!r} not found: give a fairseq-preprocess output directory "
                    "(see data_prep/README.md)"
                )
        apply_preset(cfg)
        if cfg.reweight_chunks < 1:
            raise ReweightConfigError(f"--reweight-chunks must be >= 1, got {cfg.reweight_chunks}")
        if cfg.reweight_chunks > 1 and cfg.reweight_teacher in ("none", "oracle", "pairs", "l2t"):
            logger.info(f"--reweight-chunks {cfg.reweight_chunks} has no effect with --reweight-teacher "
                        f"{cfg.reweight_teacher}: no update is replayed, every micro-batch trains whole")
        if cfg.reweight_teacher != "none":
            check_options(cfg)
        if bf16_without_tpu(cfg):
            logger.info("--bf16 without torch_xla (not a TPU run): cleared the --tpu that fairseq 0.12 sets "
                        "for --bf16; the student trains in bf16, the replay and the teacher in fp32")
        return super().setup_task(cfg, **kwargs)

    def __init__(self, cfg, src_dict, tgt_dict):
        super().__init__(cfg, src_dict, tgt_dict)
        self.driver = None
        self.oracle = None

    def build_criterion(self, cfg):
        criterion = super().build_criterion(cfg)
        if self.cfg.reweight_teacher == "none":
            return criterion
        if not hasattr(criterion, "weight_fn"):
            raise ReweightConfigError(
                f"--reweight-teacher {self.cfg.reweight_teacher} needs --criterion "
                f"reweighted_cross_entropy (got {type(criterion).__name__})"
            )
        if self.cfg.reweight_teacher in ("oracle", "pairs"):
            return self._attach_oracle(criterion)
        self._check_meta_valid_split()
        if self.cfg.reweight_teacher == "l2t":
            from fairseq_reweight.nmt import l2t

            return l2t.attach(self, criterion)
        model_cfg = self._model_cfg
        check_dual_attention_dropout(self.cfg.reweight_hvp, model_cfg)
        weigher = TokenWeigher(
            parse_features(self.cfg.teacher_features, self.cfg.reweight_teacher), self.tgt_dict.pad(),
            len(self.tgt_dict), model_cfg.encoder_embed_dim, model_cfg.decoder_embed_dim,
            self.cfg.teacher_hidden_layers, self.cfg.teacher_hidden_dim, self.cfg.reweight_granularity,
            self.cfg.reweight_features_grad,
            eos=self.tgt_dict.eos() if self.cfg.reweight_eos == "sentence" else None,
        )
        monitor = None
        if self.cfg.reweight_noise_sidecar:
            from fairseq_reweight.nmt.noise_monitor import NoiseAucMonitor

            monitor = NoiseAucMonitor(self.cfg, self)
        self.driver = ReweightDriver(self.cfg, weigher, self.meta_valid_batches, monitor)
        criterion.attach(self.driver, self.driver.token_weights, reads_lprobs=bool(weigher.columns),
                         loss_from_logits=True)
        return criterion

    def _attach_oracle(self, criterion):
        from fairseq_reweight.nmt.oracle import OracleWeigher, pairs_weigher

        if self.cfg.train_subset not in self.datasets:  # the sidecar is checked against its size now
            self.load_dataset(self.cfg.train_subset, combine=False, epoch=1)
        num_sentences = len(self.dataset(self.cfg.train_subset))
        if self.cfg.reweight_teacher == "pairs":
            self.oracle = pairs_weigher(self.cfg.reweight_pair_weights, num_sentences, self.tgt_dict.pad(),
                                        self.cfg.seed, self.cfg.reweight_noise_sidecar)
        else:
            self.oracle = OracleWeigher(self.cfg.reweight_noise_sidecar, num_sentences, self.tgt_dict.pad(),
                                        self.cfg.seed)
        criterion.attach(self.oracle, name="oracle",  # the weights of sample["id"]; the other inputs unused
                         weight_fn=lambda sample, encoder_out, net_output, lprobs, params=None: self.oracle(sample))
        return criterion

    def build_model(self, cfg, from_checkpoint=False):
        self._model_cfg = cfg
        model = super().build_model(cfg, from_checkpoint)
        if self.cfg.reweight_teacher in ("deep", "surface") and self.cfg.meta_valid_params:
            check_param_pattern(self.cfg.meta_valid_params, [n for n, p in model.named_parameters() if p.requires_grad])
        return model

    def get_batch_iterator(self, dataset, epoch=1, **kwargs):
        """fairseq 0.12 orders the examples (ties among equal lengths broken at random) with numpy
        seed ``seed + epoch`` of the epoch the iterator is created in, then reuses that iterator
        for every later epoch. A run resumed in epoch e > 1 therefore draws other batches (the same
        sizes, other sentences) from then on than the run it continues. A new iterator is made as
        at epoch 1 and then moved to ``epoch``, so that its batches are an uninterrupted run's."""
        cached = self.dataset_to_epoch_iter.get(dataset)
        iterator = super().get_batch_iterator(dataset, epoch=1, **kwargs)
        if iterator is not cached and epoch > 1:
            iterator.epoch = epoch
            dataset.set_epoch(epoch)
        return iterator

    def _training_attention(self):
        """With attention dropout, fused attention kernels draw other dropout masks than the math
        kernel the replay needs (it has no double backward otherwise), so the training forward runs
        under the math kernel too; without attention dropout both give the same function."""
        if isinstance(self.driver, ReweightDriver) and getattr(self._model_cfg, "attention_dropout", 0.0) > 0:
            return math_attention()
        return contextlib.nullcontext()

    def _check_meta_valid_split(self):
        data = self.cfg.data.split(os.pathsep)[0]
        pattern = os.path.join(data, f"{self.cfg.meta_valid_subset}.*-*.{self.cfg.source_lang}.idx")
        if not glob.glob(pattern):
            src, tgt = self.cfg.source_lang, self.cfg.target_lang
            raise ReweightConfigError(
                f"--meta-valid-subset {self.cfg.meta_valid_subset}: no {self.cfg.meta_valid_subset}."
                f"{src}-{tgt}.{src}.{{bin,idx}} / .{tgt}.{{bin,idx}} in {data}; binarize a "
                "validation split with fairseq-preprocess --validpref"
            )

    def meta_valid_max_tokens(self):
        """``--meta-valid-max-tokens``, else fairseq's validation batch size in tokens."""
        return self.cfg.meta_valid_max_tokens or self.cfg.max_tokens_valid

    def meta_valid_batches(self, skip=0):
        """An endless stream of batches of ``--meta-valid-subset`` (the same on every rank), less
        the first ``skip`` (already used before a restart)."""
        return itertools.islice(self._meta_valid_stream(), skip, None)

    def _meta_valid_stream(self):
        epoch = 1
        if self.cfg.meta_valid_subset not in self.datasets:
            self.load_dataset(self.cfg.meta_valid_subset, combine=False, epoch=1)
        dataset = self.dataset(self.cfg.meta_valid_subset)
        while True:
            iterator = self.get_batch_iterator(
                dataset,
                max_tokens=self.meta_valid_max_tokens(),
                max_sentences=None if self.cfg.meta_valid_max_tokens else self.cfg.batch_size_valid,
                max_positions=self.max_positions(),
                ignore_invalid_inputs=True,
                seed=self.cfg.seed,
                epoch=epoch,
                disable_iterator_cache=True,
            ).next_epoch_itr(shuffle=True)
            yield from iterator
            epoch += 1

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        if self.oracle is not None:
            for key, value in self.oracle.noise_stats.items():  # as a teacher's, in every log line
                metrics.log_scalar(key, value, weight=0, round=4)
        chunks = self._chunks(sample, ignore_grad, update_num)
        if len(chunks) == 1:
            return self._train_micro_batch(sample, model, criterion, optimizer, update_num, ignore_grad)
        # The replay can only be as fine as the training step: a chunk's dropout masks are drawn in
        # its own forward, so the chunks are trained as they will be replayed, one after the other.
        total_loss, total_size, merged = 0.0, 0, {}
        for index, chunk in enumerate(chunks):
            sync = index == len(chunks) - 1 or not hasattr(model, "no_sync")
            with contextlib.nullcontext() if sync else model.no_sync():
                loss, size, logging_output = self._train_micro_batch(chunk, model, criterion, optimizer, update_num,
                                                                     ignore_grad)
            total_loss, total_size = total_loss + loss.detach(), total_size + size
            for key, value in logging_output.items():
                merged[key] = merged.get(key, 0) + value
        return total_loss, total_size, merged

    def _chunks(self, sample, ignore_grad, update_num):
        """``--reweight-chunks`` consecutive row chunks of a micro-batch of an update that a meta-update
        will replay (their replay's peak memory is what the chunks bound; a whole update trains
        faster); other updates, and a dummy batch, stay whole."""
        rows = sample["target"].size(0) if sample and "target" in sample else 0
        parts = min(self.cfg.reweight_chunks, rows)
        if parts <= 1 or ignore_grad or self.driver is None or not self.driver.in_window(update_num):
            return [sample]
        return [batch_rows(sample, index, self.tgt_dict.pad()) for index in torch.arange(rows).tensor_split(parts)]

    def _train_micro_batch(self, sample, model, criterion, optimizer, update_num, ignore_grad):
        if self.driver is None:
            return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)
        self.driver.on_micro_batch(model, criterion, optimizer, update_num, sample, ignore_grad)
        if self.driver.keeps_step(model, optimizer, update_num, ignore_grad,
                                  getattr(self._model_cfg, "update_freq", None) == [1]):
            loss, sample_size, logging_output = self.driver.train_kept_step(model, criterion, sample, update_num)
        else:
            with self._training_attention():
                loss, sample_size, logging_output = super().train_step(
                    sample, model, criterion, optimizer, update_num, ignore_grad
                )
        self.driver.observe(logging_output)
        return loss, sample_size, logging_output


PRESETS = {"robust": {"teacher_features": "label", "teacher_lr": 0.1}}


def apply_preset(cfg) -> None:
    """``--reweight-preset``: its values for the options still at their defaults (logged)."""
    if cfg.reweight_preset == "none":
        return
    defaults = {f.name: f.default for f in dataclasses.fields(ReweightTranslationConfig)}
    filled = {}
    for name, value in PRESETS[cfg.reweight_preset].items():
        if cfg[name] == defaults[name]:
            cfg[name] = filled[name] = value
    given = sorted(set(PRESETS[cfg.reweight_preset]) - set(filled))
    logger.info(f"--reweight-preset {cfg.reweight_preset}: " + ", ".join(f"{k}={v}" for k, v in filled.items())
                + (f" (given: {', '.join(given)})" if given else ""))


def check_param_pattern(pattern: str, names) -> None:
    """``--meta-valid-params``: a valid regular expression that matches some trainable parameter."""
    try:
        regex = re.compile(pattern)
    except re.error as error:
        raise ReweightConfigError(f"--meta-valid-params {pattern!r} is not a regular expression: {error}") from None
    if not any(regex.search(name) for name in names):
        raise ReweightConfigError(f"--meta-valid-params {pattern!r} matches no trainable parameter of the model "
                                  f"(e.g. {', '.join(names[:3])})")


def check_dual_attention_dropout(hvp: str, model_cfg) -> None:
    """Forward-over-reverse on a GPU cannot go through attention dropout: it is drawn inside the
    attention kernel, whose dropout backward has no forward-mode derivative (core/forward_mode.py)."""
    on_gpu = torch.cuda.is_available() and not getattr(model_cfg, "cpu", False)
    if hvp == "forward-over-reverse" and on_gpu and getattr(model_cfg, "attention_dropout", 0.0) > 0:
        raise ReweightConfigError(
            "--reweight-hvp forward-over-reverse with --attention-dropout > 0 cannot run on a GPU (PyTorch's "
            "fused dropout has no forward-mode derivative of its backward); use --reweight-hvp double-backward"
        )


def check_options(cfg: ReweightTranslationConfig) -> None:
    """The teacher's options, checked when fairseq sets up the task (before any data is read)."""
    if cfg.reweight_teacher == "oracle":
        if not cfg.reweight_noise_sidecar:
            raise ReweightConfigError("--reweight-teacher oracle needs --reweight-noise-sidecar (the train.noise file "
                                      "written by data_prep/make_noisy_iwslt.sh)")
        return
    if cfg.reweight_teacher == "pairs":
        if not cfg.reweight_pair_weights:
            raise ReweightConfigError("--reweight-teacher pairs needs --reweight-pair-weights (one weight per "
                                      "training pair, e.g. written by examples/run_experiment.py's filter methods)")
        return
    if cfg.reweight_teacher == "l2t":
        from fairseq_reweight.nmt import l2t

        return l2t.check_options(cfg)
    check_schedule(cfg.reweight_interval, cfg.reweight_backprop_steps)
    if cfg.memory_efficient_fp16:
        raise ReweightConfigError("--memory-efficient-fp16 keeps no fp32 master weights to replay steps from; use --fp16")
    features = parse_features(cfg.teacher_features, cfg.reweight_teacher)
    if "progress" in features and cfg.max_update <= 0:
        raise ReweightConfigError("--teacher-features progress needs --max-update > 0")
    check_teacher_optimizer(cfg.optimizer_config, cfg.reweight_history, f"--reweight-teacher {cfg.reweight_teacher}")
    if not cfg.teacher_lr > 0:
        raise ReweightConfigError(f"--teacher-lr must be > 0, got {cfg.teacher_lr}")
    if cfg.reweight_noise_auc_interval < 1:
        raise ReweightConfigError(
            f"--reweight-noise-auc-interval must be >= 1 (meta-updates), got {cfg.reweight_noise_auc_interval}"
        )
