"""Adam in the core: fairseq's arithmetic bit for bit, and the hypergradient through Adam steps
against unrolled autograd (float64: MLP and a tiny fairseq Transformer with dropout, clipping,
decoupled weight decay and a warm-up schedule)."""
import pytest
import torch

from fairseq_reweight.core import (
    ADAM_REVERSE, AdamStepRecord, HypergradOptions, RecordingAdam, reverse_hypergradient, unroll_steps,
    unrolled_hypergradient,
)
from fairseq_reweight.core.errors import ReweightConfigError
import hypergrad_problems
from hypergrad_problems import NUM_STEPS, MLPProblem, TransformerProblem, relative_error

TOLERANCE = 1e-12
WARMUP_LRS = [0.002, 0.004, 0.006, 0.008, 0.01]  # inverse_sqrt's linear warm-up


def adam(params, weight_decay=0.01, history_size=NUM_STEPS):
    return RecordingAdam(params, lr=WARMUP_LRS[0], betas=(0.9, 0.98), eps=1e-8, weight_decay=weight_decay,
                         history_size=history_size, store_states=True)


def train(problem, clip_norms=None, **kwargs):
    """The problem's K steps with RecordingAdam (the tests patch hypergrad_problems.LRS, the learning
    rate of each step, to the warm-up above: SGD's are too large for Adam)."""
    return problem.train(clip_norms=clip_norms, make_optimizer=lambda params: adam(params, **kwargs))


def check_adam_against_unrolled(problem, optimizer, windows):
    theta_k = [p.detach() for p in optimizer.student_params()]
    val_grad = problem.val_grad(theta_k)
    omega = list(problem.teacher.parameters())
    errors = {}
    for num_steps in windows:
        window = optimizer.window(num_steps)
        expected = unrolled_hypergradient(window[0].params, (window[0].exp_avg, window[0].exp_avg_sq), omega, window,
                                          problem.loss_fn, problem.val_loss, optimizer=ADAM_REVERSE)
        assert torch.cat([e.reshape(-1) for e in expected]).norm() > 1e-6  # non-trivial
        for fast, hvp in ((False, "double-backward"), (True, "double-backward"), (False, "forward-over-reverse")):
            options = HypergradOptions(mode="checkpoint", optimizer=ADAM_REVERSE, hvp=hvp, teacher_grad_only=fast)
            result = reverse_hypergradient(theta_k, None, omega, window, problem.loss_fn, val_grad, options)
            errors[num_steps, fast, hvp] = relative_error(result.teacher_grad, expected)
    assert max(errors.values()) <= TOLERANCE, errors
    return errors


def test_recording_adam_is_fairseq_adam_bit_for_bit():
    from fairseq.optim.adam import Adam

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float16):
        start = [torch.randn(7, 3).to(dtype), torch.randn(5).to(dtype)]
        ours = [p.clone().requires_grad_() for p in start]
        theirs = [p.clone().requires_grad_() for p in start]
        recording = RecordingAdam(ours, lr=1e-3, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.1)
        reference = Adam(theirs, lr=1e-3, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.1)
        for step, lr in enumerate([1e-3, 5e-4, 2e-3, 1e-4]):
            grads = [torch.randn_like(p) for p in start]
            for optimizer, params in ((recording, ours), (reference, theirs)):
                optimizer.param_groups[0]["lr"] = lr
                for p, g in zip(params, grads):
                    p.grad = g.clone()
                optimizer.step()
            for a, b in zip(ours, theirs):
                assert torch.equal(a, b), (dtype, step)
        assert [r.step for r in recording.history] == [4]  # history_size 1: the last step
        for a, b in zip(recording.moments()[1], [reference.state[p]["exp_avg_sq"] for p in theirs]):
            assert torch.equal(a, b)


def test_mlp_through_adam_steps_matches_unrolled(monkeypatch):
    monkeypatch.setattr(hypergrad_problems, "LRS", WARMUP_LRS)
    problem = MLPProblem(seed=0)
    optimizer = train(problem, clip_norms=[0.05, 0.0, 0.0, 100.0, 0.05])
    assert [r.lr for r in optimizer.history] == WARMUP_LRS
    assert [r.step for r in optimizer.history] == [1, 2, 3, 4, 5]
    # the records replay the trajectory taken
    first = optimizer.history[0]
    theta_k, (m_k, v_k) = unroll_steps(first.params, (first.exp_avg, first.exp_avg_sq), list(optimizer.history),
                                       problem.loss_fn, optimizer=ADAM_REVERSE)
    assert relative_error(theta_k, optimizer.student_params()) < 1e-13
    assert relative_error(v_k, optimizer.moments()[1]) < 1e-13
    check_adam_against_unrolled(problem, optimizer, windows=(1, 2, NUM_STEPS))


def test_mlp_without_weight_decay_and_chunked_losses(monkeypatch):
    monkeypatch.setattr(hypergrad_problems, "LRS", WARMUP_LRS)
    problem = MLPProblem(seed=3, batch_size=9, num_chunks=3)
    optimizer = train(problem, weight_decay=0.0)
    check_adam_against_unrolled(problem, optimizer, windows=(2, NUM_STEPS))


def test_fairseq_transformer_through_adam_steps_matches_unrolled(monkeypatch):
    from fairseq import utils

    from fairseq_reweight.cli.gradcheck import _softmax_in_dtype

    monkeypatch.setattr(hypergrad_problems, "LRS", WARMUP_LRS)
    # fairseq's attention softmax runs in float32 even for a float64 model; kept in float64 here (as
    # the gradcheck command does) so that the comparison can reach 1e-12
    monkeypatch.setattr(utils, "softmax", _softmax_in_dtype)
    problem = TransformerProblem(seed=0)
    optimizer = problem.train(clip_norms=[0.0, 0.5, 0.0, 0.0],
                              make_optimizer=lambda params: adam(params, weight_decay=1e-3, history_size=4))
    check_adam_against_unrolled(problem, optimizer, windows=(1, 2, problem.num_steps))


def test_what_adam_cannot_do_is_refused_in_one_line():
    params = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(ValueError, match="amsgrad"):
        RecordingAdam(params, amsgrad=True)
    optimizer = RecordingAdam(params, store_states=False)
    with pytest.raises(ReweightConfigError, match="reweight_adam needs --reweight-history checkpoint"):
        optimizer.check_history("reverse", "--reweight-history")
    optimizer.check_history("checkpoint", "--reweight-history")
    params[0].grad = torch.ones(3)
    optimizer.step()
    omega = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match="mode must be one of 'checkpoint'"):
        reverse_hypergradient(params, None, omega, optimizer.window(1), lambda s, p: p[0].sum(), [torch.ones(3)],
                              HypergradOptions(optimizer=ADAM_REVERSE))
    with pytest.raises(ValueError, match="no stored params.*store_states=True"):
        reverse_hypergradient(params, None, omega, optimizer.window(1), lambda s, p: p[0].sum(), [torch.ones(3)],
                              HypergradOptions(mode="checkpoint", optimizer=ADAM_REVERSE))
    record = AdamStepRecord(lr=0.1, beta1=0.9, beta2=1.0, eps=1e-8, weight_decay=0.0, step=1)
    with pytest.raises(ValueError, match="0 <= beta < 1"):
        ADAM_REVERSE.check_step(0, record, params, "checkpoint")
