"""What a step may be made of, each against unrolled autograd or the plain loop (float64, seeded):
clipped steps, a loss in chunks, the newest step from the graph its training step kept, data-parallel
workers (two threads), and val_grad's tensors reused as theta's adjoint.
"""
import copy
import threading

import pytest
import torch

from fairseq_reweight.core import HypergradOptions, reverse_hypergradient, unrolled_hypergradient
from fairseq_reweight.core.checks import validate_tensor_list
from fairseq_reweight.core.gradients import KeptStep
from hypergrad_problems import NUM_STEPS, TOLERANCE, MLPProblem, check_against_unrolled, relative_error


def test_clipping_is_differentiated_exactly():
    problem = MLPProblem(seed=2)
    clip_norms = [0.05, 0.0, 0.03, 100.0, 0.05]  # clipped, off, clipped, inactive, clipped
    optimizer = problem.train(clip_norms=clip_norms)
    results = check_against_unrolled(problem, optimizer)
    factors = results[NUM_STEPS, "checkpoint"].clip_factors
    assert [f < 1.0 for f in factors] == [True, False, True, False, True]


def test_chunked_loss_equals_single_chunk():
    problem = MLPProblem(seed=3, batch_size=9, num_chunks=3)
    optimizer = problem.train(clip_norms=[0.05, 0.0, 0.05, 0.0, 0.05])
    theta_k = [p.detach() for p in optimizer.student_params()]
    val_grad = problem.val_grad(theta_k)
    teacher_params = list(problem.teacher.parameters())

    def one_scalar(step, params):
        return sum(problem.chunk_losses(problem.batches[step.data], params))

    def as_list(step, params):
        return list(problem.chunk_losses(problem.batches[step.data], params))

    for mode in ("reverse", "checkpoint"):
        results = [
            reverse_hypergradient(theta_k, optimizer.momentum_buffers(), teacher_params,
                                  optimizer.window(NUM_STEPS), fn, val_grad, HypergradOptions(mode=mode))
            for fn in (problem.loss_fn, one_scalar, as_list)
        ]
        for other in results[1:]:
            assert relative_error(other.teacher_grad, results[0].teacher_grad) < 1e-12
            assert relative_error(other.param_grad, results[0].param_grad) < 1e-12
    check_against_unrolled(problem, optimizer, windows=(NUM_STEPS,))


@pytest.mark.parametrize("clip_norms", [None, [0.05, 0.0, 0.03, 100.0, 0.05]])
def test_the_newest_step_from_its_kept_graph(clip_norms):
    """The newest step's products from the gradient graph its training step kept (KeptStep, scaled
    as fairseq divides by the sample size) instead of a replay: the unrolled reference's gradient."""
    problem = MLPProblem(seed=3, num_chunks=2)
    optimizer = problem.train(clip_norms=clip_norms)
    theta_k, v_k = [p.detach() for p in optimizer.student_params()], optimizer.momentum_buffers()
    val_grad = problem.val_grad(theta_k)
    teacher_params = list(problem.teacher.parameters())
    for num_steps in (2, NUM_STEPS):
        window = optimizer.window(num_steps)
        expected = unrolled_hypergradient(window[0].params, window[0].momentum_buffers, teacher_params, window,
                                          problem.loss_fn, problem.val_loss)
        for mode, fast in (("reverse", True), ("checkpoint", False), ("checkpoint", True)):
            leaves = [p.clone().requires_grad_() for p in window[-1].params]
            size = 4.0  # the loss before fairseq's division by the sample size
            loss = sum(problem.loss_fn(window[-1], leaves)) * size
            grads = torch.autograd.grad(loss, leaves, create_graph=True)
            kept = KeptStep(leaves, teacher_params, grads, 1.0 / size)
            result = reverse_hypergradient(theta_k, v_k, teacher_params, window, problem.loss_fn, val_grad,
                                           HypergradOptions(mode=mode, teacher_grad_only=fast), kept=kept)
            assert relative_error(result.teacher_grad, expected) <= TOLERANCE, (num_steps, mode, fast)
    with pytest.raises(ValueError, match="all_reduce"):
        reverse_hypergradient(theta_k, v_k, teacher_params, window, problem.loss_fn, val_grad,
                              HypergradOptions(all_reduce=lambda tensors: None), kept=kept)


def test_fake_all_reduce_over_two_thread_ranks_equals_one_process():
    problem = MLPProblem(seed=8, batch_size=8, num_chunks=2)
    optimizer = problem.train(clip_norms=[0.05, 0.0, 0.05, 0.0, 0.0])
    theta_k = optimizer.student_params()
    val_grad = problem.val_grad(theta_k)
    teacher_params = list(problem.teacher.parameters())
    window = optimizer.window(3)
    expected = reverse_hypergradient(theta_k, optimizer.momentum_buffers(), teacher_params,
                                     window, problem.loss_fn, val_grad)
    barrier, slots, results = threading.Barrier(2, timeout=60), {}, {}

    def all_reduce(rank, tensors):
        slots[rank] = [t.clone() for t in tensors]
        barrier.wait()
        total = [a + b for a, b in zip(slots[0], slots[1])]  # same order on both ranks
        barrier.wait()
        for tensor, summed in zip(tensors, total):
            tensor.copy_(summed)

    def worker(rank):
        # each rank its own module: functional_call swaps a module's tensors while it runs
        student = copy.deepcopy(problem.student)

        def shard_loss(step, params):  # this rank's half of the batch
            chunks = [problem.chunks[rank]]
            return problem.chunk_losses(problem.batches[step.data], params, chunks, student)

        try:
            options = HypergradOptions(all_reduce=lambda tensors: all_reduce(rank, tensors), math_sdpa=False)
            results[rank] = reverse_hypergradient(
                theta_k, optimizer.momentum_buffers(), teacher_params, window, shard_loss, val_grad, options
            )
        except BaseException as error:  # re-raised below, in the test's thread
            results[rank] = error
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(rank,), daemon=True) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for rank in (0, 1):
        if isinstance(results.get(rank), BaseException):
            raise results[rank]
        assert relative_error(results[rank].teacher_grad, expected.teacher_grad) < 1e-12
        assert relative_error(results[rank].param_grad, expected.param_grad) < 1e-12
    assert results[0].clip_factors == pytest.approx(expected.clip_factors, rel=1e-12)


def test_overwrite_val_grad_uses_its_tensors_and_gives_the_same_hypergradient():
    """overwrite_val_grad: theta's adjoint starts in val_grad's own tensors (one copy of theta's size
    less), except where two entries share one storage, which would update each other in place."""
    problem = MLPProblem(seed=6)
    optimizer = problem.train(weight_decay=0.01)
    theta_k = [p.detach() for p in optimizer.student_params()]
    teacher_params = list(problem.teacher.parameters())
    expected = reverse_hypergradient(theta_k, optimizer.momentum_buffers(), teacher_params, optimizer.window(3),
                                     problem.loss_fn, problem.val_grad(theta_k), HypergradOptions(mode="reverse"))
    val_grad = problem.val_grad(theta_k)
    before = [g.clone() for g in val_grad]
    result = reverse_hypergradient(theta_k, optimizer.momentum_buffers(), teacher_params, optimizer.window(3),
                                   problem.loss_fn, val_grad, HypergradOptions(mode="reverse", overwrite_val_grad=True))
    for ours, theirs in zip(result.teacher_grad + result.param_grad, expected.teacher_grad + expected.param_grad):
        torch.testing.assert_close(ours, theirs, rtol=1e-14, atol=1e-14)
    assert any(not torch.equal(g, b) for g, b in zip(val_grad, before))  # overwritten: its tensors were used

    # two entries of one storage (as autograd may return them) are taken apart
    shared = [torch.ones(3, dtype=torch.float64)] * 2
    like = [torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)]
    taken = validate_tensor_list(shared, like, "val_grad", none_is_zero=True, copy=False)
    assert taken[0].data_ptr() == shared[0].data_ptr() and taken[1].data_ptr() != shared[0].data_ptr()
    taken[0].add_(1.0)
    assert torch.equal(taken[1], torch.ones(3, dtype=torch.float64))
