"""The forward-mode work-arounds of core/forward_mode.py.

Forward-over-reverse through the GPU's fused dropout, checked on the CPU: on CUDA, F.dropout is
torch.native_dropout, whose backward has no forward-mode derivative. The CPU takes another dropout,
so these tests make F.dropout torch.native_dropout and let CPU tensors take the fused path
(``takes_fused_kernel``), as on a GPU. And F.linear of a dual input whose rows are not contiguous,
folded into one matrix product.
"""
import contextlib
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad
from torch.utils._python_dispatch import TorchDispatchMode

from fairseq_reweight.core import forward_mode as dual
from fairseq_reweight.core.errors import ReweightConfigError
from fairseq_reweight.core.gradients import StepContext, gradient_jvp, gradient_vjp
from fairseq_reweight.nmt.task import check_dual_attention_dropout

P = 0.3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_mask_is_the_fused_kernels_and_so_are_the_random_numbers(dtype):
    x = torch.randn(7, 11, dtype=dtype, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(3)
    expected = torch.native_dropout(x, P, True)[0]
    after_expected = torch.rand(4)
    torch.manual_seed(3)
    actual = dual.mask_then_scale(x, P)
    assert torch.equal(torch.rand(4), after_expected)  # the same draws: a replay keeps the step's masks
    torch.testing.assert_close(actual, expected, rtol=2 * torch.finfo(dtype).eps, atol=0)
    assert torch.equal(actual == 0, expected == 0)


def _problem(seed=0):
    generator = torch.Generator().manual_seed(seed)
    theta = [torch.randn(6, 5, generator=generator, dtype=torch.float64),
             torch.randn(5, generator=generator, dtype=torch.float64)]
    omega = [torch.randn(6, generator=generator, dtype=torch.float64).requires_grad_()]
    inputs = torch.randn(8, 6, generator=generator, dtype=torch.float64)
    return theta, omega, inputs


def _loss_fn(omega, inputs, dropout):
    def loss_fn(step, params):
        torch.manual_seed(11)  # the step's dropout replayed by re-seeding, as the fairseq replay does
        hidden = dropout(torch.tanh(inputs @ params[0]))
        per_example = (hidden @ params[1]) ** 2
        return (torch.sigmoid(inputs @ omega[0]) * per_example).sum()

    return loss_fn


def test_forward_over_reverse_through_fused_dropout_equals_the_double_backward(monkeypatch):
    theta, omega, inputs = _problem()
    generator = torch.Generator().manual_seed(1)
    g_bar = [torch.randn(t.shape, generator=generator, dtype=t.dtype) for t in theta]
    step = SimpleNamespace(clip_norm=0.0)

    # the GPU's training step and double backward: torch.native_dropout
    fused = _loss_fn(omega, inputs, lambda h: torch.native_dropout(h, P, True)[0])
    expected = gradient_vjp(StepContext(step, 0, [t.clone().requires_grad_() for t in theta], fused, omega), g_bar)

    # CPU tensors as CUDA ones: F.dropout is native_dropout, and takes the fused path in dual_dropout
    def cuda_dropout(h, p=0.5, training=True, inplace=False):
        return torch.native_dropout(h, p, training)[0]

    monkeypatch.setattr(F, "dropout", cuda_dropout)
    monkeypatch.setattr(dual, "takes_fused_kernel", lambda x: True)
    functional = _loss_fn(omega, inputs, lambda h: F.dropout(h, P, training=True))
    # what fails on a GPU without dual_dropout (PyTorch 2.13; if a later one passes, dual_dropout can go)
    with forward_ad.dual_level(), pytest.raises(NotImplementedError, match="native_dropout_backward"):
        primal = theta[0].clone().requires_grad_()
        loss = functional(step, [primal, forward_ad.make_dual(theta[1], g_bar[1])])
        torch.autograd.grad(loss, [primal])
    actual = gradient_jvp(StepContext(step, 0, [t.clone() for t in theta], functional, omega), g_bar)

    for a, b in zip(actual.grad + actual.hvp_theta + actual.hvp_omega,
                    expected.grad + expected.hvp_theta + expected.hvp_omega):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert any(float(h.abs().max()) > 0 for h in actual.hvp_omega)


def test_dual_dropout_leaves_other_tensors_and_f_dropout_as_they_were():
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    original = F.dropout
    with dual.dual_dropout():
        torch.manual_seed(0)
        inside = F.dropout(x, P, training=True)  # a CPU tensor: torch's own dropout
        assert torch.equal(F.dropout(x, P, training=False), x)
    torch.manual_seed(0)
    assert torch.equal(inside, F.dropout(x, P, training=True))
    assert F.dropout is original


class OpNames(TorchDispatchMode):
    """The ATen operators called inside the block (forward-mode tangents included)."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("bias", [False, True])
def test_folded_linear_takes_one_matrix_product_for_a_transposed_dual_input(bias):
    # small integers (|products| <= 16, sums of 16 of them): every product and sum below is exact in
    # float64, so mm, bmm and their tangents agree bit for bit whatever order a kernel sums in
    generator = torch.Generator().manual_seed(0)

    def small_integers(*shape):
        return torch.randint(-4, 5, shape, generator=generator).double()

    # fairseq's decoder output: (T, B, C) transposed to (B, T, C), rows not contiguous
    x = small_integers(9, 7, 16).transpose(0, 1)
    weight, tangent_x = small_integers(33, 16), small_integers(9, 7, 16).transpose(0, 1)
    tangent_w = small_integers(33, 16)
    b = small_integers(33) if bias else None
    original = F.linear
    results = []
    for folded in (False, True):
        with forward_ad.dual_level(), OpNames() as ops:
            dual_x, dual_w = forward_ad.make_dual(x, tangent_x), forward_ad.make_dual(weight, tangent_w)
            with dual.folded_linear() if folded else contextlib.nullcontext():
                out = forward_ad.unpack_dual(F.linear(dual_x, dual_w, b))
            results.append((out.primal, out.tangent))
        # PyTorch 2.13 runs the unfolded product as bmm against the expanded weight (1.4x mm's time
        # on the CPU at the output projection's size); if a later one folds it, folded_linear can go
        assert ("bmm" in ops.names) != folded
    assert F.linear is original
    assert results[1][0].shape == (7, 9, 33)
    expected_tangent = F.linear(tangent_x, weight) + F.linear(x, tangent_w)
    torch.testing.assert_close(results[1][0], F.linear(x, weight, b), rtol=0, atol=0)
    torch.testing.assert_close(results[1][1], expected_tangent, rtol=0, atol=0)
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)


def test_folded_linear_keeps_two_dimensional_and_one_dimensional_weights():
    # small integers: every product and partial sum is exact in float32, so any kernel and any
    # summation order give the same bits (random floats differ in the last bit between F.linear's
    # and matmul's kernels on most draws)
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(-8, 9, (4, 3, 5), generator=generator).float().transpose(0, 1)
    weight = torch.randint(-8, 9, (2, 5), generator=generator).float()
    with dual.folded_linear():
        assert torch.equal(F.linear(x[0], weight), x[0] @ weight.T)
        assert torch.equal(F.linear(x, weight), x @ weight.T)  # 3-d, rows not contiguous
        assert torch.equal(F.linear(x, weight[0]), (x * weight[0]).sum(-1))  # 1-d weight


@pytest.mark.parametrize("hvp, attention_dropout, cuda, refused", [
    ("forward-over-reverse", 0.1, True, True),
    ("forward-over-reverse", 0.0, True, False),
    ("forward-over-reverse", 0.1, False, False),
    ("double-backward", 0.1, True, False),
])
def test_attention_dropout_with_forward_over_reverse_on_a_gpu_is_refused(monkeypatch, hvp, attention_dropout,
                                                                         cuda, refused):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    model_cfg = SimpleNamespace(attention_dropout=attention_dropout, cpu=False)
    if refused:
        with pytest.raises(ReweightConfigError, match="--reweight-hvp double-backward"):
            check_dual_attention_dropout(hvp, model_cfg)
    else:
        check_dual_attention_dropout(hvp, model_cfg)
