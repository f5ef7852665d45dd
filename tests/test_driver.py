"""The meta-update driver inside fairseq training: resume, multi-process, history modes."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import fairseq_reweight  # noqa: F401
from conftest import REPO
from driver_checks import (LOGGED_UNITS, assert_equal, assert_logged_close, check_resume_is_bit_identical,
                           check_teacher_steps, load_state, record_teacher_steps)
from fairseq_helpers import REWEIGHT, TINY_TRANSFORMER, inner_stats as _inner, run_train

BASE = TINY_TRANSFORMER + REWEIGHT + [
    "--lr", "0.05", "--momentum", "0.9", "--label-smoothing", "0.1", "--clip-norm", "1.0",
    "--reweight-interval", "3", "--reweight-backprop-steps", "2", "--teacher-lr", "0.01",
    "--no-epoch-checkpoints", "--meta-valid-max-tokens", "300",
]


def test_resume_is_bit_identical_to_an_uninterrupted_run(tiny_data_bin, tmp_path):
    check_resume_is_bit_identical(tiny_data_bin, tmp_path, BASE)


def test_resume_mid_way_through_the_second_epoch_is_bit_identical(tiny_data_bin, tmp_path):
    """Stopped at update 11 (7 batches an epoch: the 4th of epoch 2; the meta-update at 12 replays
    update 11) and resumed into epoch 3. fairseq 0.12's own translation task draws other batches
    after such a restart (see ReweightTranslationTask.get_batch_iterator)."""
    log = check_resume_is_bit_identical(tiny_data_bin, tmp_path, BASE, stop=11, end=15)
    assert int(_inner(log)[-1]["epoch"]) == 3


@pytest.mark.parametrize("mode", ["reverse", "checkpoint"])
def test_resume_right_after_the_update_that_kept_its_graph_is_bit_identical(tiny_data_bin, tmp_path, mode):
    """Stopped after update 6, whose graph (--reweight-newest-step kept, the default) the
    meta-update before update 7 differentiates: the resumed run rebuilds that graph from the saved
    parameters (reverse mode) or the replay record (checkpoint mode) with the same dropout draws and
    training state, and is bit-identical to the uninterrupted run (a replay of update 6 differed by
    float32 round-off)."""
    from fairseq_reweight.nmt import driver

    rebuilt = []
    kept_forward = driver.ReweightDriver._kept_forward

    def spy(self, model, criterion, sample, update_num, params):
        rebuilt.append((update_num, self._state_override is not None))
        return kept_forward(self, model, criterion, sample, update_num, params)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(driver.ReweightDriver, "_kept_forward", spy)
        check_resume_is_bit_identical(tiny_data_bin, tmp_path, BASE + ["--reweight-history", mode], stop=6, end=8)
    assert (5, True) in rebuilt  # the resumed run rebuilt update 5's graph (0-based: the 6th update)


def test_shared_embeddings_stay_tied_through_meta_updates(tiny_data_bin, tmp_path, monkeypatch):
    """--share-all-embeddings: the replay must not untie the student's shared weights (it did with
    torch.func.functional_call), or the optimizer would stop updating one of the copies."""
    steps = record_teacher_steps(monkeypatch)
    stats = _inner(run_train(tiny_data_bin, str(tmp_path), BASE + ["--max-update", "8", "--share-all-embeddings"]))
    model, teacher = load_state(tmp_path / "checkpoint_last.pt")
    check_teacher_steps(stats, steps, [3, 6], lr=0.01)  # meta-updates happened, the teacher learned
    saved = {f"reweight.weigher.teacher.{name}": p for name, p in steps[-1][2][0].items()}
    assert_equal(teacher, saved)  # the teacher of the last meta-update, saved
    shared = model["encoder.embed_tokens.weight"]
    assert torch.equal(shared, model["decoder.embed_tokens.weight"])
    assert torch.equal(shared, model["decoder.output_projection.weight"])


def test_checkpoint_history_mode_trains_like_reverse(tiny_data_bin, tmp_path):
    """In float32 the two ways of recovering earlier states give the same meta-updates (to logged
    precision) and nearly the same student. (Teacher parameters are not compared one by one: the
    bias's gradient is ~0 under within-batch normalisation, so Adam turns round-off into +-lr steps.)"""
    logs = {}
    for mode in ("reverse", "checkpoint"):
        with pytest.MonkeyPatch.context() as patch:
            steps = record_teacher_steps(patch)
            stats = _inner(run_train(tiny_data_bin, str(tmp_path / mode),
                                     BASE + ["--max-update", "7", "--reweight-history", mode]))
        check_teacher_steps(stats, steps, [3, 6], lr=0.01)  # meta-updates happened, as logged
        logs[mode] = [(s["loss"], s.get("teacher_gnorm"), s.get("meta_val_loss")) for s in stats]
    assert_logged_close(logs["reverse"], logs["checkpoint"])
    rev_model, _ = load_state(tmp_path / "reverse" / "checkpoint_last.pt")
    ckp_model, _ = load_state(tmp_path / "checkpoint" / "checkpoint_last.pt")
    for key in rev_model:
        torch.testing.assert_close(rev_model[key], ckp_model[key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["reverse", "checkpoint"])
def test_the_kept_newest_step_gives_the_replays_meta_updates(tiny_data_bin, tmp_path, monkeypatch, mode):
    """--reweight-newest-step kept (the default) differentiates the graph the update before a
    meta-update kept, instead of replaying that update: the same meta-updates as the replay (to
    float32 round-off: other arithmetic), the same students, and the kept graph really used."""
    from fairseq_reweight.core import gradients

    used = []
    kept_vjp = gradients.kept_gradient_vjp
    monkeypatch.setattr("fairseq_reweight.core.reverse.kept_gradient_vjp",
                        lambda *args: used.append(1) or kept_vjp(*args))
    logs, steps = {}, record_teacher_steps(monkeypatch)
    for newest in ("kept", "replay"):
        steps.clear()
        stats = _inner(run_train(tiny_data_bin, str(tmp_path / newest), BASE + [
            "--max-update", "7", "--reweight-history", mode, "--reweight-newest-step", newest]))
        check_teacher_steps(stats, steps, [3, 6], lr=0.01)  # meta-updates happened, as logged
        logs[newest] = [(s["loss"], s.get("teacher_gnorm"), s.get("meta_val_loss")) for s in stats]
    assert len(used) == 2  # the meta-updates at 3 and 6, from the graphs of updates 2 and 5
    assert_logged_close(logs["kept"], logs["replay"])
    kept_model, _ = load_state(tmp_path / "kept" / "checkpoint_last.pt")
    replay_model, _ = load_state(tmp_path / "replay" / "checkpoint_last.pt")
    for key in kept_model:
        torch.testing.assert_close(kept_model[key], replay_model[key], rtol=1e-4, atol=1e-6)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ADAM_BASE = [a if a != "reweight_sgd" else "reweight_adam" for a in BASE if a not in ("--momentum", "0.9")] + [
    "--reweight-history", "checkpoint", "--lr", "0.005", "--adam-betas", "(0.9, 0.98)"]


@pytest.mark.parametrize("base", [BASE, ADAM_BASE], ids=["sgd", "adam"])
def test_two_gloo_processes_match_one_process_with_update_freq_2(tiny_data_bin, tmp_path, base):
    """fairseq's data parallelism on 2 CPU processes (gloo) sees the same global batches as one
    process with --update-freq 2 (dropout off: ranks draw their masks differently). The meta-updates
    must agree, and the driver checks after each one that both ranks hold the same teacher (it
    raises otherwise). On CPU, fairseq 0.12 needs --ddp-backend legacy_ddp (its pytorch_ddp wrapper
    passes CUDA device ids) and an explicit init method (its torchrun path assumes CUDA)."""
    flags = base + ["--max-update", "7", "--dropout", "0"]
    one = _inner(run_train(tiny_data_bin, str(tmp_path / "one"), flags + ["--update-freq", "2"]))
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "fairseq_cli.train", tiny_data_bin, "--save-dir", str(tmp_path / "two"),
           "--distributed-world-size", "2", "--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp",
           "--distributed-init-method", f"tcp://127.0.0.1:{_free_port()}", "--distributed-no-spawn",
           "--log-format", "json", "--log-interval", "1"] + flags
    rank1 = subprocess.Popen(cmd + ["--distributed-rank", "1"], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    rank0 = subprocess.run(cmd + ["--distributed-rank", "0"], env=env, capture_output=True, text=True, timeout=600)
    _, rank1_err = rank1.communicate(timeout=600)
    assert rank0.returncode == 0, rank0.stderr[-3000:]
    assert rank1.returncode == 0, rank1_err[-3000:]
    output = (rank0.stdout + rank0.stderr).splitlines()
    two = [json.loads(line.split(" | ")[-1]) for line in output if "train_inner" in line and '"loss"' in line]
    assert len(one) == len(two) >= 6
    assert [s["wpb"] for s in one] == [s["wpb"] for s in two]  # the same global batches
    for name in ("loss", "meta_val_loss", "teacher_gnorm"):  # equal up to summation order
        a = [float(s.get(name) or "nan") for s in one]
        b = [float(s.get(name) or "nan") for s in two]
        # and up to a unit of the last logged decimal: teacher_gnorm (~0.007) is logged to 4 decimals,
        # far coarser than rel=1e-3, so a round-off difference at a rounding boundary is a whole unit
        assert a == pytest.approx(b, rel=1e-3, abs=1.5 * LOGGED_UNITS[name], nan_ok=True), name
    assert sum(1 for s in one if s.get("teacher_gnorm")) >= 4  # meta-updates at 3 and 6
    one_model, one_teacher = load_state(tmp_path / "one" / "checkpoint_last.pt")
    two_model, two_teacher = load_state(tmp_path / "two" / "checkpoint_last.pt")
    for key in one_teacher:
        if not key.endswith(".bias"):  # see test_checkpoint_history_mode_trains_like_reverse
            torch.testing.assert_close(one_teacher[key], two_teacher[key], rtol=1e-3, atol=1e-5)
    for key in one_model:
        if base is ADAM_BASE and key.endswith("k_proj.bias"):
            # its gradient is 0 up to round-off (softmax ignores a shift of the keys), and Adam divides
            # by sqrt(v): summation-order round-off becomes a step of up to lr
            continue
        torch.testing.assert_close(one_model[key], two_model[key], rtol=1e-4, atol=1e-5, msg=key)


def _validation_gradient(data, chunks=1):
    """Replay.validation_gradient of a fixed tiny student on the first meta-validation batch, with
    the sentence ids each validation forward saw, and the batch's ids."""
    from types import SimpleNamespace

    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    from fairseq_reweight.nmt.replay import Replay

    args = options.parse_args_and_arch(options.get_training_parser(), [data] + BASE)
    cfg = convert_namespace_to_omegaconf(args)
    torch.manual_seed(1)
    task = tasks.setup_task(cfg.task)
    model, criterion = task.build_model(cfg.model), task.build_criterion(cfg.criterion)
    sample = next(task.meta_valid_batches())
    names = [n for n, _ in model.named_parameters()]
    student = SimpleNamespace(replay_model=model, device=torch.device("cpu"),
                              theta=lambda: [p.detach() for p in model.parameters()],
                              param_dict=lambda ps: dict(zip(names, ps)))
    replay, seen = Replay(student, criterion, {}, 1, chunks=chunks), []
    loss_of = replay.validation_loss
    replay.validation_loss = lambda part, params, size=None: seen.append(part["id"].tolist()) or loss_of(part, params, size)
    loss, grads = replay.validation_gradient(sample)
    return {"loss": loss, "grads": grads, "seen": seen, "ids": sample["id"].tolist()}


def test_validation_gradient_in_chunks_is_the_whole_batch_one(tiny_data_bin):
    one, chunked = _validation_gradient(tiny_data_bin), _validation_gradient(tiny_data_bin, chunks=3)
    assert len(chunked["seen"]) == 3 and sum(chunked["seen"], []) == one["ids"]
    assert chunked["loss"] == pytest.approx(one["loss"], rel=1e-6)
    for a, b in zip(chunked["grads"], one["grads"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def _validation_gradient_on_rank(rank, data, init_method, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
    try:
        torch.save(_validation_gradient(data), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_meta_validation_is_split_across_ranks(tiny_data_bin, tmp_path):
    """Two gloo ranks each run the validation forward and backward on half of the (same) batch;
    the all-reduced loss and gradient are the one-process ones."""
    import torch.multiprocessing as mp

    one = _validation_gradient(tiny_data_bin)
    assert one["seen"] == [one["ids"]]
    mp.spawn(_validation_gradient_on_rank, args=(tiny_data_bin, f"file://{tmp_path / 'init'}", str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for rank, result in enumerate(ranks):
        assert result["seen"] == [one["ids"][rank::2]]  # its own half of the sentences
        assert result["loss"] == pytest.approx(one["loss"], rel=1e-6)
        for a, b in zip(result["grads"], one["grads"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
