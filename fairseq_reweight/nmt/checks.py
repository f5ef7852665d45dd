"""``--task reweight_translation``'s checks at set-up: each wrong option or missing input is one
:class:`~fairseq_reweight.core.errors.ReweightConfigError` that says what to do, raised before any
training step (the schedule's own checks are in :mod:`fairseq_reweight.core.checks`).
"""
import glob
import os
import re

import torch

from fairseq_reweight.core.checks import check_schedule
from fairseq_reweight.core.errors import ReweightConfigError
from fairseq_reweight.nmt.config import ReweightTranslationConfig
from fairseq_reweight.nmt.optimizer import check_teacher_optimizer
from fairseq_reweight.nmt.weigher import parse_features


def check_data_dirs(data: str) -> None:
    """Every directory of ``DATA`` (``os.pathsep``-separated) exists."""
    for path in (data or "").split(os.pathsep):
        if not os.path.isdir(path):
            raise ReweightConfigError(
                f"data directory {path!r} not found: give a fairseq-preprocess output directory "
                "(see data_prep/README.md)"
            )


def check_chunks(chunks: int) -> None:
    """``--reweight-chunks`` is a number of chunks."""
    if chunks < 1:
        raise ReweightConfigError(f"--reweight-chunks must be >= 1, got {chunks}")


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
    if ("excess" in features) != bool(cfg.reweight_reference_losses):
        raise ReweightConfigError("--teacher-features excess needs --reweight-reference-losses (a reference model's "
                                  "cross-entropy of every training pair), and that file is read by the excess feature "
                                  "only: give both or neither")
    if ("pair-score" in features) != bool(cfg.reweight_pair_scores):
        raise ReweightConfigError("--teacher-features pair-score needs --reweight-pair-scores (a filter's score of "
                                  "every training pair), and that file is read by the pair-score feature only: give "
                                  "both or neither")
    for option, init, feature in (("--teacher-excess-init", cfg.teacher_excess_init, "excess"),
                                  ("--teacher-pair-score-init", cfg.teacher_pair_score_init, "pair-score")):
        if init and (feature not in features or cfg.teacher_hidden_layers > 0):
            raise ReweightConfigError(f"{option} sets the linear teacher's coefficient of the {feature} feature: "
                                      f"it needs --teacher-features with {feature} and --teacher-hidden-layers 0")
    if "progress" in features and cfg.max_update <= 0:
        raise ReweightConfigError("--teacher-features progress needs --max-update > 0")
    check_teacher_optimizer(cfg.optimizer_config, cfg.reweight_history, f"--reweight-teacher {cfg.reweight_teacher}")
    if not cfg.teacher_lr > 0:
        raise ReweightConfigError(f"--teacher-lr must be > 0, got {cfg.teacher_lr}")
    if cfg.reweight_noise_auc_interval < 1:
        raise ReweightConfigError(
            f"--reweight-noise-auc-interval must be >= 1 (meta-updates), got {cfg.reweight_noise_auc_interval}"
        )


def check_meta_valid_split(cfg: ReweightTranslationConfig) -> None:
    """``--meta-valid-subset`` is a binarized split of the first data directory."""
    data = cfg.data.split(os.pathsep)[0]
    pattern = os.path.join(data, f"{cfg.meta_valid_subset}.*-*.{cfg.source_lang}.idx")
    if not glob.glob(pattern):
        src, tgt = cfg.source_lang, cfg.target_lang
        raise ReweightConfigError(
            f"--meta-valid-subset {cfg.meta_valid_subset}: no {cfg.meta_valid_subset}."
            f"{src}-{tgt}.{src}.{{bin,idx}} / .{tgt}.{{bin,idx}} in {data}; binarize a "
            "validation split with fairseq-preprocess --validpref"
        )


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
