"""The fairseq glue: registration, uniform == plain fairseq, train -> generate -> BLEU, bad input."""
import collections
import os

import pytest
import torch

import fairseq_reweight  # noqa: F401  (registers the components)
from conftest import USER_DIR
from fairseq_reweight.nmt.task import ReweightTranslationTask
from fairseq_helpers import REWEIGHT, TINY_TRANSFORMER, inner_stats as _inner, run_generate, run_train
from driver_checks import check_teacher_steps, record_teacher_steps, run_fairseq_train

COMMON = TINY_TRANSFORMER + ["--lr", "0.05", "--momentum", "0.9", "--weight-decay", "0.0001",
                            "--label-smoothing", "0.1", "--clip-norm", "1.0", "--update-freq", "2",
                            "--max-update", "6", "--no-epoch-checkpoints"]


def _train_losses(stats):
    return [s["loss"] for s in _inner(stats)]


def test_uniform_weights_reproduce_fairseq_bit_for_bit(tiny_data_bin, tmp_path):
    plain = run_train(tiny_data_bin, str(tmp_path / "plain"), COMMON + [
        "--task", "translation", "--criterion", "label_smoothed_cross_entropy", "--optimizer", "sgd"])
    ours = run_train(tiny_data_bin, str(tmp_path / "ours"), COMMON + REWEIGHT + ["--reweight-teacher", "none"])
    assert len(_train_losses(plain)) == 6
    assert _train_losses(plain) == _train_losses(ours)
    a = torch.load(tmp_path / "plain" / "checkpoint_last.pt")["model"]
    b = torch.load(tmp_path / "ours" / "checkpoint_last.pt")["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_chunks_split_the_updates_a_meta_update_replays_and_train_as_whole_ones(tiny_data_bin, tmp_path,
                                                                              monkeypatch):
    """--reweight-chunks 3 with K = 4, B = 2 trains the micro-batches of updates 2 and 3 (the two that
    the meta-update before update 4 replays) as three chunks of their sentences each, updates 0 and
    1 whole; without dropout (whose masks the chunks draw differently) and with the teacher's weights
    uniform (as until the first meta-update), the same updates as without chunks."""
    calls = []
    train_micro_batch = ReweightTranslationTask._train_micro_batch

    def spy(self, sample, model, criterion, optimizer, update_num, ignore_grad):
        calls.append(update_num)
        return train_micro_batch(self, sample, model, criterion, optimizer, update_num, ignore_grad)

    monkeypatch.setattr(ReweightTranslationTask, "_train_micro_batch", spy)
    flags = COMMON + REWEIGHT + ["--dropout", "0", "--reweight-interval", "4", "--reweight-backprop-steps", "2",
                                 "--max-update", "4"]
    whole = run_train(tiny_data_bin, str(tmp_path / "whole"), flags)
    micro_batches = collections.Counter(calls)  # --update-freq 2: 2 per update (1 at an epoch's end)
    calls.clear()
    chunked = run_train(tiny_data_bin, str(tmp_path / "chunked"), flags + ["--reweight-chunks", "3"])
    assert sorted(micro_batches) == [0, 1, 2, 3]
    assert collections.Counter(calls) == {update: count * (3 if update in (2, 3) else 1)
                                          for update, count in micro_batches.items()}
    # the chunks sum their sentences' losses in another order: float32 round-off, which can move a loss
    # logged to 3 decimals by one unit of the last (1.5: parsing the decimal strings adds binary noise)
    assert [float(loss) for loss in _train_losses(chunked)] == pytest.approx(
        [float(loss) for loss in _train_losses(whole)], rel=0, abs=1.5e-3)
    assert len(_train_losses(whole)) == 4
    assert [s["bsz"] for s in _inner(chunked)] == [s["bsz"] for s in _inner(whole)]
    a = torch.load(tmp_path / "whole" / "checkpoint_last.pt")["model"]
    b = torch.load(tmp_path / "chunked" / "checkpoint_last.pt")["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_teacher_at_init_matches_uniform_loss(tiny_data_bin, tmp_path):
    """The zero-initialised teacher gives weight 0.5 everywhere, i.e. uniform after normalisation:
    the first update's loss equals the baseline's (the teacher changes only at the first meta-update)."""
    base = run_train(tiny_data_bin, str(tmp_path / "a"), COMMON + REWEIGHT + ["--reweight-teacher", "none"])
    deep = run_train(tiny_data_bin, str(tmp_path / "b"), COMMON + REWEIGHT + ["--reweight-interval", "4"])
    first_base, first_deep = float(_train_losses(base)[0]), float(_train_losses(deep)[0])
    # logged to 3 decimals; the teacher's criterion takes the loss from the logits (core.losses), not
    # fairseq's way: float32 round-off can move the last logged decimal by one (1.5: parsing noise)
    assert first_deep == pytest.approx(first_base, rel=0, abs=1.5e-3)


def test_bf16_trains_with_meta_updates(tiny_data_bin, tmp_path, monkeypatch):
    """--bf16 (fairseq 0.12 would turn it into --tpu; see fairseq_contract.bf16_without_tpu): the
    student in bf16 with fp32 master weights, the replay and the teacher in fp32."""
    steps = record_teacher_steps(monkeypatch)
    stats = _inner(run_train(tiny_data_bin, str(tmp_path), COMMON + REWEIGHT + [
        "--bf16", "--reweight-interval", "3", "--max-update", "7"]))
    assert len(stats) == 7
    # the meta-updates before updates 3 and 6 stepped the fp32 teacher (Adam, the default --teacher-lr
    # 1e-3) by the gradient whose norm is logged
    check_teacher_steps(stats, steps, [3, 6], lr=1e-3)
    assert all(p.dtype == torch.float32 for _, _, (params, _) in steps for p in params.values())
    state = torch.load(tmp_path / "checkpoint_last.pt")
    teacher = {k: v for k, v in state["criterion"].items() if ".teacher." in k}
    assert teacher and {v.dtype for v in teacher.values()} == {torch.float32}


def test_meta_valid_params_restricts_the_validation_gradient(tiny_data_bin, tmp_path, monkeypatch):
    """--meta-valid-params: the reverse loop starts from the validation gradient of the matching
    parameters only (zeros elsewhere), and the teacher learns from that."""
    from fairseq_reweight.core import reverse

    starts = []
    loop = reverse.reverse_hypergradient

    def recording(params, momentum, teacher, steps, loss_fn, val_grad, **kwargs):
        starts.append([float(g.abs().sum()) for g in val_grad])
        return loop(params, momentum, teacher, steps, loss_fn, val_grad, **kwargs)

    monkeypatch.setattr("fairseq_reweight.nmt.replay.reverse_hypergradient", recording)
    flags = COMMON + REWEIGHT + ["--reweight-interval", "3", "--max-update", "4"]
    full = _inner(run_train(tiny_data_bin, str(tmp_path / "all"), flags))
    assert all(value > 0 for value in starts[-1])
    part = _inner(run_train(tiny_data_bin, str(tmp_path / "embed"), flags + ["--meta-valid-params", "embed_tokens"]))
    # encoder.embed_tokens and decoder.embed_tokens (not shared here) out of all parameters
    assert sum(value > 0 for value in starts[-1]) == 2 and len(starts[-1]) > 10
    assert full[-1]["teacher_gnorm"] != part[-1]["teacher_gnorm"]


def test_reweighted_run_checkpoint_generate_bleu(tiny_data_bin, tmp_path, monkeypatch):
    save = tmp_path / "ckpt"
    steps = record_teacher_steps(monkeypatch)
    stats = run_train(tiny_data_bin, str(save), COMMON + REWEIGHT + [
        "--reweight-interval", "3", "--reweight-backprop-steps", "2", "--max-update", "9"])
    logged = {k for s in _inner(stats) for k in s}
    assert {"meta_val_loss", "teacher_gnorm", "meta_time", "w_mean", "w_std"} <= logged
    state = torch.load(save / "checkpoint_last.pt")  # safe loader (weights_only) with our allow-list
    teacher = {k: v for k, v in state["criterion"].items() if k.startswith("reweight.weigher.teacher.")}
    # meta-updates run at the start of updates 3 and 6 (K = 3; training stops at 9, before the one at 9),
    # each an Adam step of the teacher (the default --teacher-lr 1e-3); the last one's teacher is saved
    check_teacher_steps(_inner(stats), steps, [3, 6], lr=1e-3)
    assert teacher.keys() == {f"reweight.weigher.teacher.{name}" for name in steps[-1][2][0]}
    assert all(torch.equal(teacher[f"reweight.weigher.teacher.{name}"], p) for name, p in steps[-1][2][0].items())
    assert state["criterion"]["reweight._extra_state"]["num_meta_updates"] == 2
    out = run_generate(tiny_data_bin, str(save / "checkpoint_last.pt"),
                       ["--user-dir", USER_DIR, "--task", "reweight_translation"])
    fields = [line.split("\t") for line in out.splitlines()]
    hyps = {int(f[0][2:]): f[2] for f in fields if f[0].startswith("H-")}
    refs = {int(f[0][2:]): f[1] for f in fields if f[0].startswith("T-")}
    with open(os.path.join(os.path.dirname(tiny_data_bin), "text", "test.en")) as fh:  # conftest's corpus
        test_en = fh.read().splitlines()
    assert sorted(hyps) == sorted(refs) == list(range(40)) and [refs[i] for i in range(40)] == test_en
    import sacrebleu

    # fairseq-generate's own score line (BLEU4 on whitespace tokens, unsmoothed) is sacrebleu's on the lines written
    bleu = sacrebleu.corpus_bleu([hyps[i] for i in range(40)], [test_en], tokenize="none", smooth_method="none")
    precisions = "/".join(f"{p:.1f}" for p in bleu.precisions)
    assert (f"Generate test with beam=2: BLEU4 = {bleu.score:.2f}, {precisions} (BP={bleu.bp:.3f}, ratio="
            f"{bleu.sys_len / bleu.ref_len:.3f}, syslen={bleu.sys_len}, reflen={bleu.ref_len})") in out.splitlines()


def test_teacher_is_not_trained_by_the_student_optimizer(tiny_data_bin, tmp_path):
    from fairseq import options, tasks
    from fairseq.trainer import Trainer

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [tiny_data_bin] + COMMON + REWEIGHT)
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    trainer = Trainer(cfg, task, model, criterion)
    student = {id(p) for group in trainer.optimizer.optimizer.param_groups for p in group["params"]}
    assert all(id(p) not in student for p in criterion.reweight.teacher.parameters())
    assert len(student) == sum(1 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    "flags, max_tokens",
    [([], 400), (["--max-tokens-valid", "250"], 250), (["--meta-valid-max-tokens", "123"], 123)],
)
def test_meta_valid_batches_default_to_the_validation_batch_size(tiny_data_bin, flags, max_tokens):
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    args = options.parse_args_and_arch(options.get_training_parser(), [tiny_data_bin] + COMMON + REWEIGHT + flags)
    task = tasks.setup_task(convert_namespace_to_omegaconf(args).task)
    assert task.meta_valid_max_tokens() == max_tokens  # COMMON trains with --max-tokens 400
    batch = next(task.meta_valid_batches())
    assert 0 < batch["ntokens"] and batch["net_input"]["src_tokens"].numel() <= max_tokens


@pytest.mark.parametrize("given, lr", [([], 0.1), (["--teacher-lr", "0.01"], 0.01)])
def test_preset_fills_in_the_options_left_at_their_defaults(tiny_data_bin, given, lr):
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    args = options.parse_args_and_arch(options.get_training_parser(),
                                       [tiny_data_bin] + COMMON + REWEIGHT + ["--reweight-preset", "robust"] + given)
    task = tasks.setup_task(convert_namespace_to_omegaconf(args).task)
    assert (task.cfg.teacher_features, task.cfg.teacher_lr) == ("label", lr)


def test_meta_valid_loss_is_the_criterion_the_plain_nll_or_its_sentence_mean(tiny_data_bin):
    from types import SimpleNamespace

    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    from fairseq_reweight.nmt.fairseq_contract import batch_rows
    from fairseq_reweight.nmt.replay import Replay

    args = options.parse_args_and_arch(options.get_training_parser(), [tiny_data_bin] + COMMON + REWEIGHT)
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    torch.manual_seed(0)  # the student's initialisation: the values compared below
    model, criterion = task.build_model(cfg.model), task.build_criterion(cfg.criterion)
    sample = next(task.meta_valid_batches())
    model.eval()
    with torch.no_grad():
        _, _, logged = criterion(model, sample)  # eval mode: fairseq's label_smoothed_cross_entropy
    params = [p.detach() for p in model.parameters()]
    student = SimpleNamespace(replay_model=model, device=params[0].device,
                              param_dict=lambda ps: dict(zip([n for n, _ in model.named_parameters()], ps)))
    for kind, key in (("criterion", "loss"), ("nll", "nll_loss")):
        value = Replay(student, criterion, {}, 1, valid_loss=kind).validation_loss(sample, params)
        assert float(value) == pytest.approx(float(logged[key]) / sample["ntokens"], rel=1e-6)
    # label smoothing is on (smoothed and plain NLL differ; which is larger depends on the student)
    assert float(logged["loss"]) != pytest.approx(float(logged["nll_loss"]), rel=1e-4)
    dataset = task.dataset("valid")
    lengths = {int(dataset.tgt_sizes[i]): i for i in range(len(dataset))}
    mixed = dataset.collater([dataset[i] for i in list(lengths.values())[:4]])  # four target lengths
    assert len(lengths) >= 4
    per_sentence, sizes = [], []
    for row in range(mixed["target"].size(0)):
        one = batch_rows(mixed, torch.tensor([row]), criterion.padding_idx)
        with torch.no_grad():
            per_sentence.append(float(criterion(model, one)[2]["nll_loss"]) / one["ntokens"])
        sizes.append(one["ntokens"])
    sentence_mean = Replay(student, criterion, {}, 1, valid_loss="sentence-nll").validation_loss(mixed, params)
    token_mean = Replay(student, criterion, {}, 1, valid_loss="nll").validation_loss(mixed, params)
    assert float(sentence_mean) == pytest.approx(sum(per_sentence) / len(per_sentence), rel=1e-5)
    # the token mean weighs each sentence by its length
    assert float(token_mean) == pytest.approx(sum(n * v for n, v in zip(sizes, per_sentence)) / sum(sizes), rel=1e-5)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--reweight-teacher", "smart"], "invalid choice: 'smart'"),
        (["--optimizer", "adam", "--lr", "0.001"], "needs --optimizer reweight_sgd"),
        (["--momentum", "0"], "cannot undo steps in reverse"),
        (["--optimizer", "reweight_adam", "--lr", "0.001"], "reweight_adam needs --reweight-history checkpoint"),
        (["--teacher-features", "encoder,colour"], "unknown --teacher-features colour"),
        (["--reweight-interval", "2", "--reweight-backprop-steps", "3"], "must be between 1 and"),
        (["--meta-valid-subset", "dev"], "--meta-valid-subset dev: no dev.de-en.de"),
        (["--memory-efficient-fp16"], "--memory-efficient-fp16 keeps no fp32 master weights"),
        (["--teacher-lr", "-1"], "--teacher-lr must be > 0"),
        (["--reweight-chunks", "0"], "--reweight-chunks must be >= 1"),
        (["--meta-valid-params", "colour"], "--meta-valid-params 'colour' matches no trainable parameter"),
        (["--meta-valid-params", "(embed"], "--meta-valid-params '(embed' is not a regular expression"),
    ],
)
def test_bad_input_gives_one_clear_line(tiny_data_bin, tmp_path, extra, message):
    optimizer = [] if "--optimizer" in extra else ["--optimizer", "reweight_sgd", "--momentum", "0.9", "--lr", "0.1"]
    task = REWEIGHT[: REWEIGHT.index("--optimizer")]
    args = [tiny_data_bin] + task + TINY_TRANSFORMER + optimizer + ["--max-update", "2", "--no-save"] + extra
    result = run_fairseq_train(args, cwd=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert "task: ReweightTranslationTask" not in result.stdout  # refused before fairseq logs the task (set-up)


def test_missing_data_directory(tmp_path):
    result = run_fairseq_train([str(tmp_path / "nope")] + REWEIGHT + TINY_TRANSFORMER + ["--lr", "0.1"], cwd=tmp_path)
    assert result.returncode != 0
    assert "fairseq-reweight: error: data directory" in result.stderr
    assert "Traceback" not in result.stderr
