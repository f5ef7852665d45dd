"""``--task reweight_translation``'s options: :class:`ReweightTranslationConfig` (fairseq's
``translation`` options and the ``--reweight-*`` / ``--teacher-*`` / ``--meta-valid-*`` ones) and
the ``--reweight-preset`` presets.
"""
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from fairseq.dataclass import ChoiceEnum
from fairseq.tasks.translation import TranslationConfig
from omegaconf import II

from fairseq_reweight.nmt.weigher import ALL_FEATURES


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
    reweight_preset: ChoiceEnum(["none", "robust", "trusted"]) = field(
        default="none",
        metadata={"help": "trusted: a linear teacher on the pair's excess loss against a reference trained on trusted "
                  "data, started as a soft excess-loss filter (--teacher-features excess --teacher-lr 0.3 "
                  "--teacher-excess-init 1; needs --reweight-reference-losses): for crawled corpora whose noise is "
                  "unknown; robust: the target token "
                  "only (--teacher-features label --teacher-lr 0.1), for noise visible in the target's words; a preset "
                  "fills in the options left at their defaults (none: the paper's configuration)"},
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
    teacher_excess_init: Optional[float] = field(
        default=None,
        metadata={"help": "with --teacher-features excess and the linear teacher: the excess feature's initial "
                  "coefficient, in logit units per nat (unset or 0: zero-initialised like every other input, the "
                  "paper's start; --reweight-preset trusted: 1). A positive value starts the teacher as a soft "
                  "excess-loss filter, the sign that the feature's first-order influence on the validation loss "
                  "gives, so that a few noisy early hypergradients cannot set the sign the wrong way; the teacher "
                  "learns from there"},
    )
    teacher_pair_score_init: Optional[float] = field(
        default=None,
        metadata={"help": "with --teacher-features pair-score and the linear teacher: the pair score's initial "
                  "coefficient, in logit units per standard deviation of the scores over the corpus (unset or 0: "
                  "zero, the teacher learns the score's sign and weight from the trusted data alone; e.g. -1 starts "
                  "it as a soft filter of a lower-is-better score such as the dual conditional cross-entropy)"},
    )
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
    reweight_reference_losses: Optional[str] = field(
        default=None,
        metadata={"help": "with --teacher-features excess: one number per training pair, one a line in data-bin order: "
                  "a reference model's per-token cross-entropy of the pair, the reference being trained on trusted "
                  "data (e.g. the pretrained student fine-tuned on --meta-valid-subset; "
                  "fairseq-reweight-score DATA --path REFERENCE --output FILE writes it)"},
    )
    reweight_pair_scores: Optional[str] = field(
        default=None,
        metadata={"help": "with --teacher-features pair-score: one score per training pair, one a line in data-bin "
                  "order, from any filter (e.g. fairseq-reweight-score --reverse-path, or bicleaner's); standardised "
                  "over the corpus (its sign does not matter: the teacher learns it); inf/-inf (a pair the filter "
                  "could not score) count as the corpus mean"},
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


PRESETS = {
    "robust": {"teacher_features": "label", "teacher_lr": 0.1},
    # teacher lr 0.3, not robust's 0.1: at 0.1 the hypergradient was still sharpening the weights (raising
    # the excess coefficient) when a fine-tune ended, and the trusted split's own loss prefers 0.3
    "trusted": {"teacher_features": "excess", "teacher_lr": 0.3, "teacher_excess_init": 1.0},
}


def apply_preset(cfg) -> Optional[str]:
    """``--reweight-preset``: its values for the options still at their defaults. Returns the line
    that says what it filled in (None without a preset)."""
    if cfg.reweight_preset == "none":
        return None
    defaults = {f.name: f.default for f in dataclasses.fields(ReweightTranslationConfig)}
    filled = {}
    for name, value in PRESETS[cfg.reweight_preset].items():
        if cfg[name] == defaults[name]:
            cfg[name] = filled[name] = value
    given = sorted(set(PRESETS[cfg.reweight_preset]) - set(filled))
    return (f"--reweight-preset {cfg.reweight_preset}: " + ", ".join(f"{k}={v}" for k, v in filled.items())
            + (f" (given: {', '.join(given)})" if given else ""))
