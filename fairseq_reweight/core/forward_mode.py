"""Two PyTorch operators that forward-mode AD (dual numbers) goes through badly, and the blocks
inside which this package routes them around it.

:func:`dual_dropout`: on CUDA, ``torch.nn.functional.dropout`` runs the fused ``native_dropout``
kernel, whose backward (``native_dropout_backward``) has no forward-mode derivative in PyTorch: the
backward pass of :func:`~.gradients.gradient_jvp` fails there with "Trying to use forward AD with
native_dropout_backward". On the CPU, dropout is a Bernoulli mask and a product, which has one.
Inside :func:`dual_dropout`, dropout on a tensor that would take the fused kernel draws its mask
with that same kernel (the same random numbers, so the replay keeps the training step's masks) and
applies it as a product, whose backward is a product too. The values are the kernel's
``(x * mask) * scale`` up to the rounding of the scale 1 / (1 - p).

:func:`folded_linear`: ``torch.nn.functional.linear`` of an input with more than two dimensions
folds them into one (one ``mm``) when the input requires grad or its leading dimensions are
contiguous; otherwise ``matmul`` runs a ``bmm`` against the weight expanded over the batch. fairseq's
decoder output is such an input (a transpose), and in the forward-mode pass of
:func:`~.gradients.teacher_vjp` nothing the student computes requires grad: its output projection,
the largest product of a small model, then runs as that ``bmm`` (a batch of smaller products
against the same weight, which the CPU's kernels run less efficiently than one ``mm`` of the folded
rows), three times (the value and both terms of its tangent). Inside :func:`folded_linear` the rows
are folded first (what that saved: docs/BENCHMARKS.md; the step's time: ``benchmarks/meta_breakdown.py``).
"""
import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad


def takes_fused_kernel(x: torch.Tensor) -> bool:
    """Whether ``torch.dropout`` runs ``native_dropout`` on ``x`` (ATen's ``is_fused_kernel_acceptable``:
    CUDA and the other accelerator back-ends; p in (0, 1) is checked by the caller)."""
    return x.is_cuda or x.is_xpu or x.device.type == "privateuseone"


def mask_then_scale(x: torch.Tensor, p: float) -> torch.Tensor:
    """``native_dropout(x, p)``'s output as a product with its mask (a constant), so that its backward
    is a product as well."""
    primal = forward_ad.unpack_dual(x).primal.detach()
    with torch.no_grad():
        _, mask = torch.native_dropout(primal, p, True)
    return x * mask * (1.0 / (1.0 - p))


@contextlib.contextmanager
def dual_dropout() -> Iterator[None]:
    """Replace ``torch.nn.functional.dropout`` (what fairseq's ``FairseqDropout`` and PyTorch's
    Python attention call) inside the block, for tensors that take the fused kernel; restored on exit.

    Dropout inside a C++ kernel (the ``dropout_p`` of ``scaled_dot_product_attention``) is out of
    reach: the fairseq task refuses attention dropout with forward-over-reverse on a GPU."""
    original = F.dropout

    def dropout(input, p=0.5, training=True, inplace=False):
        if training and 0.0 < p < 1.0 and input.numel() > 0 and takes_fused_kernel(input):
            return mask_then_scale(input, p)
        return original(input, p, training, inplace)

    F.dropout = dropout
    try:
        yield
    finally:
        F.dropout = original


@contextlib.contextmanager
def folded_linear() -> Iterator[None]:
    """Replace ``torch.nn.functional.linear`` (what ``nn.Linear`` calls) inside the block by one that
    folds an input's leading dimensions into one before the product (a copy where they are not
    contiguous, as ``matmul`` makes for an input that requires grad); restored on exit."""
    original = F.linear

    def linear(input, weight, bias=None):
        if input.dim() <= 2:
            return original(input, weight, bias)
        return original(input.reshape(-1, input.shape[-1]), weight, bias).unflatten(0, input.shape[:-1])

    F.linear = linear
    try:
        yield
    finally:
        F.linear = original
