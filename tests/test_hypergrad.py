"""reverse_hypergradient against plain unrolled autograd (float64, seeded).

Students: a small MLP with the paper's linear teacher weighting each example, and a tiny fairseq
Transformer with per-token weights, label smoothing and dropout (replayed by re-seeding).
"""
import copy
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fairseq_reweight.core import (
    RecordingSGD,
    StepRecord,
    math_attention,
    reverse_hypergradient,
    select_window,
    unroll_steps,
    unrolled_hypergradient,
)
from fairseq_reweight.core.checks import validate_tensor_list
from fairseq_reweight.core.gradients import KeptStep
from fairseq_reweight.core.teacher import Teacher, normalize_weights

NUM_STEPS = 5
LRS = [0.3, 0.2, 0.25, 0.15, 0.1]
TOLERANCE = 1e-8


def relative_error(actual, expected):
    actual = torch.cat([a.detach().reshape(-1) for a in actual])
    expected = torch.cat([e.detach().reshape(-1) for e in expected])
    return float((actual - expected).norm() / expected.norm())


class MLP(nn.Module):
    def __init__(self, in_dim=5, hidden_dim=6, num_classes=3):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, num_classes)

    def forward(self, x):
        hidden = torch.tanh(self.fc1(x))  # N x H
        return hidden, self.fc2(hidden)  # N x C


def random_teacher(feature_dim, num_labels, seed):
    torch.manual_seed(seed)
    teacher = Teacher(feature_dim, num_labels).double()
    for weight in teacher.parameters():
        nn.init.normal_(weight, std=0.7)
    return teacher


class MLPProblem:
    """Student, teacher, data and loss functions of the MLP tests."""

    def __init__(self, seed=0, batch_size=8, num_chunks=1):
        torch.manual_seed(seed)
        self.student = MLP().double()
        self.names = [name for name, _ in self.student.named_parameters()]
        self.teacher = random_teacher(6, 3, seed + 1)
        self.batches = [
            (torch.randn(batch_size, 5, dtype=torch.float64), torch.randint(0, 3, (batch_size,)))
            for _ in range(NUM_STEPS)
        ]
        self.val_batch = (torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,)))
        self.chunks = torch.arange(batch_size).chunk(num_chunks)

    def chunk_losses(self, batch, params, chunks=None, student=None):
        """Per chunk: sum_k w_k CE_k / N, weights normalised within the chunk (like --update-freq)."""
        x, y = batch
        student = self.student if student is None else student
        for index in self.chunks if chunks is None else chunks:
            hidden, logits = functional_call(student, dict(zip(self.names, params)), (x[index],))
            weights = normalize_weights(self.teacher(hidden.detach(), y[index]))
            losses = F.cross_entropy(logits, y[index], reduction="none")
            yield (weights * losses).sum() / len(y)

    def loss_fn(self, step, params):
        if step.data is None:  # an empty batch
            return []
        return self.chunk_losses(self.batches[step.data], params)

    def val_loss(self, params):
        x, y = self.val_batch
        return F.cross_entropy(functional_call(self.student, dict(zip(self.names, params)), (x,))[1], y)

    def train(self, clip_norms=None, momentum=0.9, weight_decay=0.01, empty_steps=(), make_optimizer=None):
        """K steps of RecordingSGD(store_states=True) (or ``make_optimizer(params)``) the way a
        trainer takes them."""
        params = list(self.student.parameters())
        optimizer = make_optimizer(params) if make_optimizer else RecordingSGD(
            params, lr=LRS[0], momentum=momentum, weight_decay=weight_decay,
            history_size=NUM_STEPS, store_states=True,
        )
        for t in range(NUM_STEPS):
            data = None if t in empty_steps else t
            clip = clip_norms[t] if clip_norms else 0.0
            optimizer.group["lr"] = LRS[t]
            optimizer.zero_grad()
            if data is not None:
                for chunk in self.chunk_losses(self.batches[t], params):
                    chunk.backward()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(params, clip)

            def attach(record, data=data, clip=clip):
                record.data, record.clip_norm = data, clip

            optimizer.step_callback = attach
            optimizer.step()
        self.teacher.zero_grad(set_to_none=True)  # training backpropagated into the teacher too
        return optimizer

    def val_grad(self, params):
        params = [p.detach().clone().requires_grad_(True) for p in params]
        return list(torch.autograd.grad(self.val_loss(params), params))


def check_against_unrolled(problem, optimizer, modes=("reverse", "checkpoint"), windows=(1, 2, NUM_STEPS)):
    theta_k = [p.detach() for p in optimizer.student_params()]
    v_k = optimizer.momentum_buffers()
    val_grad = problem.val_grad(theta_k)
    teacher_params = list(problem.teacher.parameters())
    results = {}
    for num_steps in windows:
        window = optimizer.window(num_steps)
        expected = unrolled_hypergradient(
            window[0].params, window[0].momentum_buffers, teacher_params, window,
            problem.loss_fn, problem.val_loss,
        )
        assert torch.cat([e.reshape(-1) for e in expected]).norm() > 1e-4  # non-trivial
        for mode in modes:
            result = reverse_hypergradient(
                theta_k, v_k, teacher_params, window, problem.loss_fn, val_grad, mode=mode
            )
            error = relative_error(result.teacher_grad, expected)
            assert error <= TOLERANCE, (num_steps, mode, error)
            results[num_steps, mode] = result
            # the oldest step by forward-mode AD instead of a double backward
            fast = reverse_hypergradient(
                theta_k, v_k, teacher_params, window, problem.loss_fn, val_grad, mode=mode,
                teacher_grad_only=True,
            )
            error = relative_error(fast.teacher_grad, expected)
            assert error <= TOLERANCE, (num_steps, mode, "teacher_grad_only", error)
            assert fast.param_grad == [] and fast.start_params == []
            assert fast.clip_factors == result.clip_factors
            assert fast.grad_norms[1:] == result.grad_norms[1:]
            # every step's products by forward-over-reverse instead of a double backward
            dual = reverse_hypergradient(
                theta_k, v_k, teacher_params, window, problem.loss_fn, val_grad, mode=mode,
                hvp="forward-over-reverse",
            )
            error = relative_error(dual.teacher_grad, expected)
            assert error <= TOLERANCE, (num_steps, mode, "forward-over-reverse", error)
            # the adjoints at the window's start too (relative to theta's, as v's may be all zero)
            scale = torch.cat([g.reshape(-1) for g in result.param_grad]).norm()
            for a, b in zip(dual.param_grad + dual.momentum_grad, result.param_grad + result.momentum_grad):
                assert float((a - b).norm() / scale) <= TOLERANCE, (num_steps, mode, "forward-over-reverse")
            assert dual.clip_factors == pytest.approx(result.clip_factors, rel=1e-12)
    assert all(w.grad is None for w in teacher_params)
    return results


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
                                           mode=mode, teacher_grad_only=fast, kept=kept)
            assert relative_error(result.teacher_grad, expected) <= TOLERANCE, (num_steps, mode, fast)
    with pytest.raises(ValueError, match="all_reduce"):
        reverse_hypergradient(theta_k, v_k, teacher_params, window, problem.loss_fn, val_grad, kept=kept,
                              all_reduce=lambda tensors: None)


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
                                  optimizer.window(NUM_STEPS), fn, val_grad, mode=mode)
            for fn in (problem.loss_fn, one_scalar, as_list)
        ]
        for other in results[1:]:
            assert relative_error(other.teacher_grad, results[0].teacher_grad) < 1e-12
            assert relative_error(other.param_grad, results[0].param_grad) < 1e-12
    check_against_unrolled(problem, optimizer, windows=(NUM_STEPS,))


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


def test_overwrite_val_grad_uses_its_tensors_and_gives_the_same_hypergradient():
    """overwrite_val_grad: theta's adjoint starts in val_grad's own tensors (one copy of theta's size
    less), except where two entries share one storage, which would update each other in place."""
    problem = MLPProblem(seed=6)
    optimizer = problem.train(weight_decay=0.01)
    theta_k = [p.detach() for p in optimizer.student_params()]
    teacher_params = list(problem.teacher.parameters())
    expected = reverse_hypergradient(theta_k, optimizer.momentum_buffers(), teacher_params, optimizer.window(3),
                                     problem.loss_fn, problem.val_grad(theta_k), mode="reverse")
    val_grad = problem.val_grad(theta_k)
    before = [g.clone() for g in val_grad]
    result = reverse_hypergradient(theta_k, optimizer.momentum_buffers(), teacher_params, optimizer.window(3),
                                   problem.loss_fn, val_grad, mode="reverse", overwrite_val_grad=True)
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
    exact = reverse_hypergradient(*args, window, problem.loss_fn, val_grad, mode="checkpoint")
    window[0].lr *= 2.0
    changed = reverse_hypergradient(*args, window, problem.loss_fn, val_grad, mode="checkpoint")
    assert relative_error(changed.teacher_grad, exact.teacher_grad) > 1e-3


def test_window_selection_and_validation_errors():
    problem = MLPProblem(seed=7)
    optimizer = problem.train()
    with pytest.raises(ValueError, match="last 6 steps: only 5 were recorded"):
        optimizer.window(NUM_STEPS + 1)
    with pytest.raises(ValueError, match="at least 1 step"):
        select_window(optimizer.history, 0)
    theta_k = optimizer.student_params()
    v_k = optimizer.momentum_buffers()
    teacher_params = list(problem.teacher.parameters())
    window = optimizer.window(2)
    val_grad = problem.val_grad(theta_k)

    def call(**overrides):
        kwargs = dict(params=theta_k, momentum_buffers=v_k, teacher_params=teacher_params,
                      steps=window, loss_fn=problem.loss_fn, val_grad=val_grad)
        kwargs.update(overrides)
        return reverse_hypergradient(**kwargs)

    with pytest.raises(ValueError, match="steps is empty"):
        call(steps=[])
    with pytest.raises(ValueError, match="val_grad has 3 tensors but params has 4"):
        call(val_grad=val_grad[:3])
    with pytest.raises(ValueError, match="non-finite"):
        call(val_grad=[g * float("nan") for g in val_grad])
    with pytest.raises(ValueError, match=r"momentum_buffers\[0\] has shape \(6,\)"):
        call(momentum_buffers=[v_k[1]] + v_k[1:])
    with pytest.raises(ValueError, match="mode='reverse' needs momentum_buffers"):
        call(momentum_buffers=None)
    with pytest.raises(ValueError, match="mode must be"):
        call(mode="forward")
    with pytest.raises(ValueError, match="hvp must be one of 'double-backward', 'forward-over-reverse'"):
        call(hvp="forward")
    with pytest.raises(ValueError, match="does not require grad"):
        call(teacher_params=[w.detach() for w in teacher_params])
    with pytest.raises(ValueError, match="not a StepRecord"):
        call(steps=[{"lr": 0.1}])
    with pytest.raises(ValueError, match="has no stored params.*store_states=True"):
        call(steps=[StepRecord(lr=0.1, momentum=0.9, data=0)], mode="checkpoint")
    with pytest.raises(ValueError, match="scalar tensor.*gave \\(8,\\)"):
        call(loss_fn=lambda step, params: torch.zeros(8, dtype=torch.float64, requires_grad=True))


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
            results[rank] = reverse_hypergradient(
                theta_k, optimizer.momentum_buffers(), teacher_params, window, shard_loss, val_grad,
                all_reduce=lambda tensors: all_reduce(rank, tensors), math_sdpa=False,
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


def test_math_attention_restores_the_callers_backends():
    before = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
              torch.backends.cuda.math_sdp_enabled())
    try:
        torch.backends.cuda.enable_flash_sdp(False)  # the caller's own choice
        torch.backends.cuda.enable_mem_efficient_sdp(True)
        with math_attention():
            assert torch.backends.cuda.math_sdp_enabled()
            assert not torch.backends.cuda.flash_sdp_enabled()
            assert not torch.backends.cuda.mem_efficient_sdp_enabled()
        assert not torch.backends.cuda.flash_sdp_enabled()
        assert torch.backends.cuda.mem_efficient_sdp_enabled()
        with pytest.raises(RuntimeError, match="inside"):
            with math_attention():
                raise RuntimeError("inside")
        assert not torch.backends.cuda.flash_sdp_enabled()
        assert torch.backends.cuda.mem_efficient_sdp_enabled()
    finally:
        torch.backends.cuda.enable_flash_sdp(before[0])
        torch.backends.cuda.enable_mem_efficient_sdp(before[1])
        torch.backends.cuda.enable_math_sdp(before[2])


# --- a tiny fairseq Transformer: per-token weights, label smoothing, dropout replayed by seed ---


class Seq2Seq(nn.Module):
    """A fairseq TransformerModel that also returns the encoder states (the teacher's features)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, src_tokens, src_lengths, prev_output_tokens):
        encoder_out = self.model.encoder(src_tokens, src_lengths=src_lengths)
        logits, _ = self.model.decoder(prev_output_tokens, encoder_out=encoder_out)
        return encoder_out["encoder_out"][0], logits  # S x B x C, B x T x V


class TransformerProblem:
    def __init__(self, seed=0, num_steps=4, batch_size=3):
        pytest.importorskip("fairseq")
        from argparse import Namespace
        from types import SimpleNamespace

        from fairseq.data import Dictionary
        from fairseq.models.transformer import TransformerModel, base_architecture

        torch.manual_seed(seed)
        self.dictionary = Dictionary()
        for index in range(10):
            self.dictionary.add_symbol(f"w{index}")
        args = Namespace(
            encoder_embed_dim=8, encoder_ffn_embed_dim=16, encoder_layers=1, encoder_attention_heads=2,
            decoder_embed_dim=8, decoder_ffn_embed_dim=16, decoder_layers=1, decoder_attention_heads=2,
            dropout=0.1, max_source_positions=32, max_target_positions=32,
        )
        base_architecture(args)
        task = SimpleNamespace(source_dictionary=self.dictionary, target_dictionary=self.dictionary)
        self.student = Seq2Seq(TransformerModel.build_model(args, task)).double().train()
        self.names = [name for name, _ in self.student.named_parameters()]
        self.teacher = random_teacher(8, len(self.dictionary), seed + 1)
        self.batches = [self.random_batch(batch_size) for _ in range(num_steps)]
        self.val_batch = self.random_batch(4)
        self.num_steps = num_steps

    def random_batch(self, batch_size):
        pad, eos, nspecial = self.dictionary.pad(), self.dictionary.eos(), self.dictionary.nspecial
        vocab = len(self.dictionary)
        src = torch.randint(nspecial, vocab, (batch_size, 6))
        src[:, -1] = eos
        src[0, :2] = pad  # left-padded source, as fairseq batches it
        lengths = src.ne(pad).sum(1)
        target = torch.randint(nspecial, vocab, (batch_size, 5))
        target[:, -1] = eos
        target[1, 3:] = pad
        prev = torch.cat([torch.full((batch_size, 1), eos), target[:, :-1]], 1).masked_fill(target.eq(pad), pad)
        return src, lengths, prev, target

    def loss(self, batch, params, seed, weighted=True):
        from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss

        src, lengths, prev, target = batch
        pad = self.dictionary.pad()
        with torch.random.fork_rng():
            torch.manual_seed(seed)  # replay dropout
            states, logits = functional_call(self.student, dict(zip(self.names, params)), (src, lengths, prev))
        lprobs = F.log_softmax(logits, dim=-1)
        losses, _ = label_smoothed_nll_loss(
            lprobs.view(-1, lprobs.size(-1)), target.view(-1), 0.1, ignore_index=pad, reduce=False
        )
        losses = losses.view_as(target)  # B x T
        mask = target.ne(pad)
        if not weighted:
            return losses.sum() / mask.sum()
        src_mask = src.ne(pad).t().unsqueeze(-1)  # S x B x 1
        pooled = (states.detach() * src_mask).sum(0) / src_mask.sum(0)  # B x C
        features = pooled.unsqueeze(1).expand(-1, target.size(1), -1)  # B x T x C
        weights = normalize_weights(self.teacher(features, target), mask)
        return (weights * losses).sum() / mask.sum()

    def loss_fn(self, step, params):
        return self.loss(self.batches[step.data], params, seed=100 + step.data)

    def val_loss(self, params):
        return self.loss(self.val_batch, params, seed=999, weighted=False)

    def val_grad(self, params):
        params = [p.detach().clone().requires_grad_(True) for p in params]
        return list(torch.autograd.grad(self.val_loss(params), params))

    def train(self, clip_norms, make_optimizer=None):
        params = list(self.student.parameters())
        optimizer = make_optimizer(params) if make_optimizer else RecordingSGD(
            params, lr=0.5, momentum=0.9, weight_decay=1e-3, history_size=self.num_steps, store_states=True)
        for t in range(self.num_steps):
            optimizer.group["lr"] = LRS[t]
            optimizer.zero_grad()
            self.loss(self.batches[t], params, seed=100 + t).backward()
            if clip_norms[t] > 0:
                torch.nn.utils.clip_grad_norm_(params, clip_norms[t])

            def attach(record, t=t):
                record.data, record.clip_norm = t, clip_norms[t]

            optimizer.step_callback = attach
            optimizer.step()
        self.teacher.zero_grad(set_to_none=True)
        return optimizer


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
                              optimizer.window(1), problem.loss_fn, problem.val_grad(params), math_sdpa=False)
