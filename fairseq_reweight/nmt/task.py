"""``--task reweight_translation``: fairseq's ``translation`` task whose training step a teacher
weights, token by token (Fan et al., "Learning to Reweight with Deep Interactions", AAAI 2021).

Same data format and options as ``translation``; the ``--reweight-*`` / ``--teacher-*`` options
(:mod:`.config`) choose the teacher and its meta-update schedule. ``--reweight-teacher none`` is the
uniform baseline: bit-identical to ``--task translation --criterion label_smoothed_cross_entropy
--optimizer sgd``. The options are checked at set-up (:mod:`.checks`); :mod:`.batches` holds
``--reweight-chunks`` and the epoch iterator a resumed run needs.
"""
import contextlib
import itertools
import logging

import torch
from fairseq.logging import metrics
from fairseq.tasks import register_task
from fairseq.tasks.translation import TranslationTask

from fairseq_reweight.core import math_attention
from fairseq_reweight.core.errors import ReweightConfigError, install_excepthook
from fairseq_reweight.nmt.batches import iterator_as_at_epoch_one, row_chunks, train_chunks
from fairseq_reweight.nmt.checks import (
    check_chunks,
    check_data_dirs,
    check_dual_attention_dropout,
    check_meta_valid_split,
    check_options,
    check_param_pattern,
)
from fairseq_reweight.nmt.config import ReweightTranslationConfig, apply_preset
from fairseq_reweight.nmt.driver import ReweightDriver
from fairseq_reweight.nmt.fairseq_contract import bf16_without_tpu, destroy_process_group_at_exit
from fairseq_reweight.nmt.weigher import TokenWeigher, parse_features

logger = logging.getLogger(__name__)


@register_task("reweight_translation", dataclass=ReweightTranslationConfig)
class ReweightTranslationTask(TranslationTask):
    """Translation with a teacher that weights every target token of the training loss."""

    cfg: ReweightTranslationConfig

    @classmethod
    def setup_task(cls, cfg: ReweightTranslationConfig, **kwargs):
        install_excepthook()  # a ReweightConfigError reaching fairseq-train's top prints one line
        destroy_process_group_at_exit()
        check_data_dirs(cfg.data)
        preset = apply_preset(cfg)
        if preset is not None:
            logger.info(preset)
        check_chunks(cfg.reweight_chunks)
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
        check_meta_valid_split(self.cfg)
        if self.cfg.reweight_teacher == "l2t":
            from fairseq_reweight.nmt import l2t

            return l2t.attach(self, criterion)
        from fairseq_reweight.nmt.oracle import read_pair_losses, read_pair_scores

        model_cfg = self._model_cfg
        check_dual_attention_dropout(self.cfg.reweight_hvp, model_cfg)
        weigher = TokenWeigher(
            parse_features(self.cfg.teacher_features, self.cfg.reweight_teacher), self.tgt_dict.pad(),
            len(self.tgt_dict), model_cfg.encoder_embed_dim, model_cfg.decoder_embed_dim,
            self.cfg.teacher_hidden_layers, self.cfg.teacher_hidden_dim, self.cfg.reweight_granularity,
            self.cfg.reweight_features_grad,
            eos=self.tgt_dict.eos() if self.cfg.reweight_eos == "sentence" else None,
            reference_losses=self._per_pair(self.cfg.reweight_reference_losses, read_pair_losses),
            excess_init=self.cfg.teacher_excess_init or 0.0,
            pair_scores=self._per_pair(self.cfg.reweight_pair_scores, read_pair_scores),
            pair_score_init=self.cfg.teacher_pair_score_init or 0.0,
        )
        monitor = None
        if self.cfg.reweight_noise_sidecar:
            from fairseq_reweight.nmt.noise_monitor import NoiseAucMonitor

            monitor = NoiseAucMonitor(self.cfg, self)
        self.driver = ReweightDriver(self.cfg, weigher, self.meta_valid_batches, monitor)
        criterion.attach(self.driver, self.driver.token_weights, reads_lprobs=weigher.reads_lprobs,
                         loss_from_logits=True)
        return criterion

    def _train_size(self) -> int:
        """Pairs in the training split (loaded now if it is not yet): a per-pair file is checked
        against it at start-up."""
        if self.cfg.train_subset not in self.datasets:
            self.load_dataset(self.cfg.train_subset, combine=False, epoch=1)
        return len(self.dataset(self.cfg.train_subset))

    def _per_pair(self, path, read):
        """The float64 tensor of a per-pair file (``--reweight-reference-losses`` for the ``excess``
        feature, ``--reweight-pair-scores`` for ``pair-score``), ``read(path, size)`` checking it
        against the training split's size; None without the file."""
        return torch.from_numpy(read(path, self._train_size())) if path else None

    def _attach_oracle(self, criterion):
        from fairseq_reweight.nmt.oracle import OracleWeigher, pairs_weigher

        num_sentences = self._train_size()
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
        """fairseq's iterator, made as at epoch 1: a resumed run draws the batches of the run it
        continues (:func:`.batches.iterator_as_at_epoch_one`)."""
        return iterator_as_at_epoch_one(super().get_batch_iterator, self.dataset_to_epoch_iter, dataset, epoch,
                                        **kwargs)

    def _training_attention(self):
        """With attention dropout, fused attention kernels draw other dropout masks than the math
        kernel the replay needs (it has no double backward otherwise), so the training forward runs
        under the math kernel too; without attention dropout both give the same function."""
        if isinstance(self.driver, ReweightDriver) and getattr(self._model_cfg, "attention_dropout", 0.0) > 0:
            return math_attention()
        return contextlib.nullcontext()

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

        def train_one(chunk):
            return self._train_micro_batch(chunk, model, criterion, optimizer, update_num, ignore_grad)

        chunks = row_chunks(sample, self._chunks_of(update_num, ignore_grad), self.tgt_dict.pad())
        return train_chunks(chunks, model, train_one)

    def _chunks_of(self, update_num, ignore_grad) -> int:
        """``--reweight-chunks`` for a micro-batch of an update that a meta-update will replay (their
        replay's peak memory is what the chunks bound; a whole update trains faster), else 1."""
        if ignore_grad or self.driver is None or not self.driver.in_window(update_num):
            return 1
        return self.cfg.reweight_chunks

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
