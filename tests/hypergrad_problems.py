"""The problems the hypergradient tests share (float64, seeded), and their comparison with plain
unrolled autograd.

Students: a small MLP with the paper's linear teacher weighting each example, and a tiny fairseq
Transformer with per-token weights, label smoothing and dropout (replayed by re-seeding). A test that
needs other learning rates patches this module's ``LRS`` (tests/test_adam.py).
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fairseq_reweight.core import (
    HypergradOptions,
    RecordingSGD,
    reverse_hypergradient,
    unrolled_hypergradient,
)
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
            args = (theta_k, v_k, teacher_params, window, problem.loss_fn, val_grad)
            result = reverse_hypergradient(*args, HypergradOptions(mode=mode))
            error = relative_error(result.teacher_grad, expected)
            assert error <= TOLERANCE, (num_steps, mode, error)
            results[num_steps, mode] = result
            # the oldest step by forward-mode AD instead of a double backward
            fast = reverse_hypergradient(*args, HypergradOptions(mode=mode, teacher_grad_only=True))
            error = relative_error(fast.teacher_grad, expected)
            assert error <= TOLERANCE, (num_steps, mode, "teacher_grad_only", error)
            assert fast.param_grad == [] and fast.start_params == []
            assert fast.clip_factors == result.clip_factors
            assert fast.grad_norms[1:] == result.grad_norms[1:]
            # every step's products by forward-over-reverse instead of a double backward
            dual = reverse_hypergradient(*args, HypergradOptions(mode=mode, hvp="forward-over-reverse"))
            error = relative_error(dual.teacher_grad, expected)
            assert error <= TOLERANCE, (num_steps, mode, "forward-over-reverse", error)
            # the adjoints at the window's start too (relative to theta's, as v's may be all zero)
            scale = torch.cat([g.reshape(-1) for g in result.param_grad]).norm()
            for a, b in zip(dual.param_grad + dual.momentum_grad, result.param_grad + result.momentum_grad):
                assert float((a - b).norm() / scale) <= TOLERANCE, (num_steps, mode, "forward-over-reverse")
            assert dual.clip_factors == pytest.approx(result.clip_factors, rel=1e-12)
    assert all(w.grad is None for w in teacher_params)
    return results


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
