"""reverse_hypergradient through momentum-SGD steps against plain unrolled autograd (float64, seeded):
an MLP with the paper's linear teacher and a tiny fairseq Transformer (tests/hypergrad_problems.py),
both history modes, the oldest step by forward mode and every step by forward-over-reverse.
"""
import pytest
import torch

from fairseq_reweight.core import HypergradOptions, reverse_hypergradient, unroll_steps
from hypergrad_problems import LRS, NUM_STEPS, MLPProblem, TransformerProblem, check_against_unrolled, relative_error


def test_mlp_matches_unrolled_with_weight_decay():
    problem = MLPProblem(seed=0)
    optimizer = problem.train(weight_decay=0.01)
    # the recorded trajectory is the one the unrolled reference replays
    first = optimizer.history[0]
    theta_k, v_k = unroll_steps(first.params, first.momentum_buffers, list(optimizer.history), problem.loss_fn)
    assert relative_error(theta_k, optimizer.student_params()) < 1e-13
    assert relative_error(v_k, optimizer.momentum_buffers()) < 1e-13
    results = check_against_unrolled(problem, optimizer)
    assert all(factor == 1.0 for factor in results[NUM_STEPS, "reverse"].clip_factors)


def test_reverse_mode_reconstructs_states():
    problem = MLPProblem(seed=1)
    optimizer = problem.train(weight_decay=0.01)
    theta_k = [p.detach() for p in optimizer.student_params()]
    val_grad = problem.val_grad(theta_k)
    for num_steps in range(1, NUM_STEPS + 1):
        window = optimizer.window(num_steps)
        result = reverse_hypergradient(
            theta_k, optimizer.momentum_buffers(), list(problem.teacher.parameters()), window,
            problem.loss_fn, val_grad,
        )
        assert relative_error(result.start_params, window[0].params) < 1e-12
        if num_steps < NUM_STEPS:  # v_0 = 0: compare absolutely
            assert relative_error(result.start_momentum_buffers, window[0].momentum_buffers) < 1e-11
        else:
            assert max(float(v.abs().max()) for v in result.start_momentum_buffers) < 1e-12


def test_empty_batches_and_constant_losses():
    problem = MLPProblem(seed=4)
    optimizer = problem.train(empty_steps=(1, 3))
    history = optimizer.history
    history[3].data = "constant"
    loss_fn = problem.loss_fn

    def with_constant(step, params):  # losses that do not depend on params (one on the teacher)
        if step.data == "constant":
            return [torch.zeros((), dtype=torch.float64), 2.0 * problem.teacher.bias]
        return loss_fn(step, params)

    problem.loss_fn = with_constant
    results = check_against_unrolled(problem, optimizer)
    assert results[NUM_STEPS, "reverse"].grad_norms[1] == 0.0
    assert results[NUM_STEPS, "reverse"].grad_norms[3] == 0.0


def test_checkpoint_mode_without_momentum_and_reverse_refuses_it():
    problem = MLPProblem(seed=5)
    optimizer = problem.train(momentum=0.0, weight_decay=0.0)
    check_against_unrolled(problem, optimizer, modes=("checkpoint",))
    theta_k = optimizer.student_params()
    with pytest.raises(ValueError, match="steps\\[0\\] has momentum 0.0.*checkpoint"):
        reverse_hypergradient(theta_k, optimizer.momentum_buffers(), list(problem.teacher.parameters()),
                              optimizer.window(2), problem.loss_fn, problem.val_grad(theta_k))


def test_lr_of_each_record_is_used():
    problem = MLPProblem(seed=6)
    optimizer = problem.train()
    assert [record.lr for record in optimizer.history] == LRS
    window = optimizer.window(2)
    theta_k = optimizer.student_params()
    args = (theta_k, optimizer.momentum_buffers(), list(problem.teacher.parameters()))
    val_grad = problem.val_grad(theta_k)
    checkpoint = HypergradOptions(mode="checkpoint")
    exact = reverse_hypergradient(*args, window, problem.loss_fn, val_grad, checkpoint)
    window[0].lr *= 2.0
    changed = reverse_hypergradient(*args, window, problem.loss_fn, val_grad, checkpoint)
    assert relative_error(changed.teacher_grad, exact.teacher_grad) > 1e-3


def test_fairseq_transformer_matches_unrolled(monkeypatch):
    from fairseq import utils

    from fairseq_reweight.cli.gradcheck import _softmax_in_dtype

    # fairseq's attention softmax runs in float32 even for a float64 model; in float64 here (as the
    # gradcheck command does), so that float32 round-off does not hide a difference between methods
    monkeypatch.setattr(utils, "softmax", _softmax_in_dtype)
    problem = TransformerProblem(seed=0)
    optimizer = problem.train(clip_norms=[0.0, 0.5, 0.0, 0.0])
    # dropout really is on and replayed: two seeds differ, one seed repeats
    params = optimizer.student_params()
    batch = problem.batches[0]
    assert problem.loss(batch, params, seed=1) != problem.loss(batch, params, seed=2)
    assert problem.loss(batch, params, seed=1) == problem.loss(batch, params, seed=1)
    results = check_against_unrolled(problem, optimizer, windows=(1, 2, problem.num_steps))
    assert results[problem.num_steps, "reverse"].clip_factors[1] < 1.0
    # fairseq's attention runs through scaled_dot_product_attention, whose fused kernels (CPU
    # flash included) have no double backward: the replay works only under math_attention()
    with pytest.raises(RuntimeError, match="not implemented"):
        reverse_hypergradient(params, optimizer.momentum_buffers(), list(problem.teacher.parameters()),
                              optimizer.window(1), problem.loss_fn, problem.val_grad(params),
                              HypergradOptions(math_sdpa=False))
