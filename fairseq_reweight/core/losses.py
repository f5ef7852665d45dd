"""Label-smoothed token cross-entropy from the logits, with lean derivatives of the orders used here.

fairseq's ``label_smoothed_nll_loss`` works on the log-probabilities: autograd then keeps the
log-softmax's output, the gathered and summed gradients and, under ``create_graph`` (a kept or
replayed step), the graph of the log-softmax's backward, each a tokens x vocabulary tensor, and the
double backward of a replayed step adds as many again. Those tensors are most of a replay's memory.
Written from the logits ``z``, fairseq's per-token loss ``l = (1 - eps - eps_i) nll + eps_i smooth``
(``eps_i = eps / (V - 1)``) has the gradient ``dl/dz = p - q``, with ``p = softmax(z)`` and ``q`` the
smoothed target distribution (which sums to 1), and the product of that gradient's Jacobian with
``U`` is ``p * (U - <p, U>)``. Both are autograd Functions here that keep only the logits and
recompute ``p`` (one softmax) where a derivative needs it: first and second derivatives, forward
mode and forward-over-reverse, checked against autograd's in ``tests/test_losses.py``.

The tokens x vocabulary work is done in place where autograd allows it: on the CPU a fresh tensor of
that size costs more to allocate and touch than the arithmetic on it.
"""
from typing import Optional

import torch
from torch import Tensor


def smoothed_nll_from_logits(logits: Tensor, target: Tensor, epsilon: float, ignore_index: int):
    """Per-token ``(loss, nll)`` of fairseq's ``label_smoothed_nll_loss(log_softmax(logits), target,
    epsilon, ignore_index, reduce=False)``: ``logits`` N x V, ``target`` N, both results N (0 at
    ``ignore_index``), in float32 for half or float logits (fairseq's log-softmax) and float64 for
    float64. Only ``loss`` is differentiable."""
    keep = target.ne(ignore_index)
    safe_target = target.masked_fill(~keep, 0)
    return _SmoothedNLL.apply(logits, safe_target, keep.to(_compute_dtype(logits)), float(epsilon))


def _compute_dtype(logits: Tensor) -> torch.dtype:
    return torch.promote_types(logits.dtype, torch.float32)


def _probs(logits: Tensor) -> Tensor:
    return torch.softmax(logits.to(_compute_dtype(logits)), -1)


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """``<a_n, b_n>`` for every row n: on the CPU as a batched matrix product, without an N x V
    temporary; elsewhere as a product and a sum (a GPU's caching allocator makes the temporary
    cheap, and a float32 matrix product there may run in TF32 when the user allows it)."""
    b = b.to(a.dtype)
    if a.device.type == "cpu":
        return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)
    return (a * b).sum(-1)


def _target_dot(values: Tensor, target: Tensor, epsilon: float) -> Tensor:
    """``<q_n, values_n>`` for every row: ``(1 - eps - eps_i) values[y] + eps_i sum(values)``."""
    eps_i = epsilon / (values.size(-1) - 1)
    picked = values.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return (1.0 - epsilon - eps_i) * picked.to(values.dtype) + eps_i * values.sum(-1)


def _scaled_p_minus_q(probs: Tensor, target: Tensor, epsilon: float, scale: Tensor) -> Tensor:
    """``(p - q) * scale[:, None]``, in ``probs`` (which it overwrites) unless autograd records."""
    eps_i = epsilon / (probs.size(-1) - 1)
    if torch.is_grad_enabled():
        out = (probs - eps_i) * scale.unsqueeze(-1)
    else:
        out = probs.sub_(eps_i).mul_(scale.unsqueeze(-1))
    return out.scatter_add_(-1, target.unsqueeze(-1), (-(1.0 - epsilon - eps_i) * scale).unsqueeze(-1))


def _jacobian_product(probs: Tensor, vector: Tensor, scale: Tensor, p_dot_vector: Optional[Tensor] = None) -> Tensor:
    """``p * (vector - <p, vector>) * scale[:, None]``: the Jacobian of ``p - q`` times ``vector``
    (symmetric), scaled per row (``p_dot_vector``: ``<p, vector>`` if the caller has it). Overwrites
    ``probs`` unless autograd records (a third derivative)."""
    vector = vector.to(probs.dtype)
    if p_dot_vector is None:
        p_dot_vector = _row_dot(probs, vector)
    out = vector - p_dot_vector.unsqueeze(-1)
    if torch.is_grad_enabled():
        return out * probs * scale.unsqueeze(-1)
    return out.mul_(probs.mul_(scale.unsqueeze(-1)))


class _SmoothedNLL(torch.autograd.Function):
    """``(loss, nll)`` per token from logits (N x V); ``keep`` (N, 0/1) masks padding."""

    @staticmethod
    def forward(logits, target, keep, epsilon):
        lprobs = torch.log_softmax(logits.to(_compute_dtype(logits)), -1)
        nll = -lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1) * keep
        return -_target_dot(lprobs, target, epsilon) * keep, nll

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, target, keep, epsilon = inputs
        ctx.save_for_backward(logits, target, keep)
        ctx.save_for_forward(logits, target, keep)
        ctx.epsilon = epsilon
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad_loss, _grad_nll):
        logits, target, keep = ctx.saved_tensors
        return _SmoothedNLLGrad.apply(logits, target, keep, ctx.epsilon, grad_loss), None, None, None

    @staticmethod
    def jvp(ctx, logits_tangent, _target, _keep, _epsilon):
        logits, target, keep = ctx.saved_tensors
        tangent = logits_tangent.to(_compute_dtype(logits))
        return (_row_dot(_probs(logits), tangent) - _target_dot(tangent, target, ctx.epsilon)) * keep, None


class _SmoothedNLLGrad(torch.autograd.Function):
    """``grad_loss[:, None] * (p - q)`` (0 on padding): :class:`_SmoothedNLL`'s gradient, in the
    logits' dtype, differentiable in the logits and in ``grad_loss``."""

    @staticmethod
    def forward(logits, target, keep, epsilon, grad_loss):
        return _scaled_p_minus_q(_probs(logits), target, epsilon, grad_loss * keep).to(logits.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, target, keep, epsilon, grad_loss = inputs
        ctx.save_for_backward(logits, target, keep, grad_loss)
        ctx.save_for_forward(logits, target, keep, grad_loss)
        ctx.epsilon = epsilon

    @staticmethod
    def backward(ctx, upstream):
        logits, target, keep, grad_loss = ctx.saved_tensors
        probs = _probs(logits)
        upstream = upstream.to(probs.dtype)
        p_dot_upstream = _row_dot(probs, upstream)
        d_grad_loss = (p_dot_upstream - _target_dot(upstream, target, ctx.epsilon)) * keep
        d_logits = _jacobian_product(probs, upstream, grad_loss * keep, p_dot_upstream)
        return d_logits.to(logits.dtype), None, None, None, d_grad_loss.to(grad_loss.dtype)

    @staticmethod
    def jvp(ctx, logits_tangent, _target, _keep, _epsilon, grad_loss_tangent):
        logits, target, keep, grad_loss = ctx.saved_tensors
        probs, out = _probs(logits), None
        if grad_loss_tangent is not None:  # both helpers overwrite probs: a copy when both need it
            source = probs.clone() if logits_tangent is not None else probs
            out = _scaled_p_minus_q(source, target, ctx.epsilon, grad_loss_tangent * keep)
        if logits_tangent is not None:
            term = _jacobian_product(probs, logits_tangent, grad_loss * keep)
            out = term if out is None else out.add_(term)
        return out.to(logits.dtype)
