"""The derivatives one replayed step needs, computed chunk by chunk from ``loss_fn(step, params)``.

A step's loss comes as chunks (e.g. fairseq's micro-batches) whose sum is the objective the
optimizer's gradient ``G`` came from. Each product function here takes that gradient through
fairseq's gradient clipping ``g = s(||G||) G``, ``s = min(1, c / (||G|| + 1e-6))``: it is given the
step (:class:`StepContext`) and g~, the adjoint of g, and returns what the reverse loop
(:mod:`.reverse`) asks for (:class:`StepProducts`), keeping one chunk's graph alive at a time.
"""
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Union

import torch
from torch import Tensor
from torch.autograd import forward_ad

from .forward_mode import dual_dropout, folded_linear
from .interfaces import AllReduce, LossFn, Record

CLIP_EPS = 1e-6  # fairseq.utils.clip_grad_norm_: coef = min(1, max_norm / (norm + 1e-6))


@dataclass(frozen=True)
class StepContext:
    """One replayed step, as every product function takes it.

    Attributes:
        step: the step's record (its ``clip_norm`` is read here, its data by ``loss_fn``).
        index: its position in the window, oldest first (for error messages).
        theta: theta_t, leaves that require grad.
        loss_fn: ``loss_fn(step, params)``, the step's training loss (a scalar or scalar chunks).
        teacher_params: omega (the products' second part; not needed for G alone).
        all_reduce: sums a list of tensors in place across data-parallel workers, or None.
    """

    step: Record
    index: int
    theta: List[Tensor]
    loss_fn: LossFn
    teacher_params: List[Tensor] = field(default_factory=list)
    all_reduce: Optional[AllReduce] = None

    def losses(self, params: Optional[List[Tensor]] = None) -> Iterator[Tensor]:
        """The scalar chunks of the step's loss at ``params`` (default theta; dual numbers in forward mode)."""
        return iter_loss_chunks(self.loss_fn(self.step, self.theta if params is None else params), self.index)


@dataclass
class StepProducts:
    """What one step gives the reverse loop, for ``g = s G`` and g~.

    Attributes:
        grad: G, summed over workers; None where it was not needed (the forward-mode oldest step).
        norm: ||G|| (nan where G was not computed).
        clip_scale: s, fairseq's clip factor (1.0 = unclipped).
        hvp_theta: ``d(g . g~)/d theta``, summed over workers; None where it was not needed.
        hvp_omega: ``d(g . g~)/d omega``, this worker's.
    """

    grad: Optional[List[Tensor]]
    norm: float
    clip_scale: float
    hvp_theta: Optional[List[Tensor]]
    hvp_omega: List[Tensor]


ProductFn = Callable[[StepContext, List[Tensor]], StepProducts]


def clip_factor(norm: float, clip_norm: float):
    """fairseq's clip factor ``s = min(1, c / (n + 1e-6))`` and its slope ``ds/dn`` at ``norm``."""
    if clip_norm <= 0:
        return 1.0, 0.0
    ratio = clip_norm / (norm + CLIP_EPS)
    if ratio >= 1.0:
        return 1.0, 0.0
    return ratio, -clip_norm / (norm + CLIP_EPS) ** 2


def clip_differentiably(grads: List[Tensor], clip_norm: float) -> List[Tensor]:
    """``s(||G||) G`` with the graph kept (the unrolled reference's clipping); unchanged when off."""
    if clip_norm <= 0:
        return grads
    norm = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads]))
    scale = (clip_norm / (norm + CLIP_EPS)).clamp(max=1.0)
    return [scale * g for g in grads]


def iter_loss_chunks(loss: Union[Tensor, Iterable[Tensor]], step_index: int) -> Iterator[Tensor]:
    """Yield the scalar chunks of what ``loss_fn`` returned (one tensor or an iterable of them)."""
    chunks = [loss] if isinstance(loss, Tensor) else loss
    for chunk in chunks:
        if not isinstance(chunk, Tensor) or chunk.numel() != 1:
            what = tuple(chunk.shape) if isinstance(chunk, Tensor) else type(chunk).__name__
            raise ValueError(
                f"loss_fn must return a scalar tensor or an iterable of scalar tensors; step "
                f"{step_index} gave {what}: reduce the loss (sum) before returning it"
            )
        yield chunk.reshape(())


def global_norm(tensors: List[Tensor]) -> float:
    if not tensors:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors])))


def add_into(accumulators: List[Tensor], grads: Sequence[Optional[Tensor]]) -> None:
    for acc, grad in zip(accumulators, grads):
        if grad is not None:
            acc.add_(grad.detach())


def _chunk_gradient(chunk: Tensor, params: List[Tensor], create_graph: bool):
    """``d chunk / d params`` (None entries for unused params), or None if the chunk is constant."""
    if not chunk.requires_grad:
        return None
    return torch.autograd.grad(chunk, params, create_graph=create_graph, allow_unused=True)


def _chunk_hvp(grads, vector: List[Tensor], inputs: List[Tensor]):
    """``d (grads . vector) / d inputs``, or None if ``grads`` does not depend on anything."""
    dot = None
    for grad, vec in zip(grads, vector):
        if grad is not None and grad.requires_grad:
            term = (grad * vec).sum()
            dot = term if dot is None else dot + term
    if dot is None:
        return None
    return torch.autograd.grad(dot, inputs, allow_unused=True)


def step_gradient(context: StepContext, create_graph: bool = False) -> List[Tensor]:
    """G = d loss_fn(step, theta) / d theta, summed chunk by chunk (zeros for unused parameters) and
    over workers with ``all_reduce``: detached, or differentiable with ``create_graph`` (the
    unrolled reference)."""
    grad = [torch.zeros_like(p) for p in context.theta]
    for chunk in context.losses():
        chunk_grad = _chunk_gradient(chunk, context.theta, create_graph)
        if chunk_grad is None:
            continue
        if create_graph:  # out of place: the graph keeps each partial sum
            grad = [g if c is None else g + c for g, c in zip(grad, chunk_grad)]
        else:
            add_into(grad, chunk_grad)
    if context.all_reduce is not None:
        context.all_reduce(grad)
    return grad


def clip_direction(grad_sum, norm, clip_norm, g_bar):
    """``u = s g~ + (G . g~) s'(n) / n G``, so that ``d(s(||G||) G . g~) = J_G^T u``."""
    scale, slope = clip_factor(norm, clip_norm)
    with torch.no_grad():
        u = [scale * v for v in g_bar]
        if slope != 0.0 and norm > 0.0:
            g_dot_v = float(torch.stack([(g * v).sum() for g, v in zip(grad_sum, g_bar)]).sum())
            coef = g_dot_v * slope / norm
            for u_i, g in zip(u, grad_sum):
                u_i.add_(g, alpha=coef)
    return u


def gradient_vjp(context: StepContext, g_bar: List[Tensor]) -> StepProducts:
    """G, ||G||, s and the products ``d(g . g~)/d theta``, ``d(g . g~)/d omega`` by
    reverse-over-reverse (double backward).

    Without clipping one pass suffices: per chunk, ``G_c`` with ``create_graph=True``, accumulate
    ``G_c.detach()``, then the Hessian-vector product ``d(G_c . g~)``, then free the chunk's graph.
    With clipping, ``d(g . g~) = J_G^T u`` (:func:`clip_direction`) needs the full G first: pass
    one computes G (no graph), pass two the per-chunk products ``d(G_c . u)``, so ``loss_fn`` is
    called twice for this step.
    """
    theta = context.theta
    inputs = list(theta) + list(context.teacher_params)
    hvp_theta = [torch.zeros_like(p) for p in theta]
    hvp_omega = [torch.zeros_like(w) for w in context.teacher_params]

    def accumulate(vector, grad_sum):
        for chunk in context.losses():
            grads = _chunk_gradient(chunk, theta, create_graph=True)
            if grads is None:
                continue
            if grad_sum is not None:
                add_into(grad_sum, grads)
            hvp = _chunk_hvp(grads, vector, inputs)
            del grads
            if hvp is not None:
                add_into(hvp_theta, hvp[: len(theta)])
                add_into(hvp_omega, hvp[len(theta):])

    return _through_clipping(accumulate, context, g_bar, hvp_theta, hvp_omega)


def gradient_jvp(context: StepContext, g_bar: List[Tensor]) -> StepProducts:
    """What :func:`gradient_vjp` returns, by forward-over-reverse: per chunk, one backward pass of
    the loss at dual numbers ``theta + eps v`` (forward-mode AD, ``v`` = g~ or the clipped
    direction u). Its gradient is ``G_c + eps (H v, d(G_c . v)/d omega)``: the primal is the step's
    gradient, the tangents are both products (the Hessian is symmetric, and so are mixed second
    derivatives), without a graph of the gradient. ``loss_fn`` must accept dual tensors; its dropout
    runs under :func:`~.forward_mode.dual_dropout` (the fused GPU kernel's backward has no forward mode)."""
    theta = context.theta
    hvp_theta = [torch.zeros_like(p) for p in theta]
    hvp_omega = [torch.zeros_like(w) for w in context.teacher_params]

    def accumulate(vector, grad_sum):
        with forward_ad.dual_level(), dual_dropout():
            primals = [t.detach().requires_grad_() for t in theta]
            duals = [forward_ad.make_dual(p, v) for p, v in zip(primals, vector)]
            for chunk in context.losses(duals):
                grads = _chunk_gradient(chunk, primals + list(context.teacher_params), create_graph=False)
                for index, grad in enumerate(grads or ()):
                    if grad is None:
                        continue
                    primal, tangent = forward_ad.unpack_dual(grad)
                    if index < len(theta):
                        if grad_sum is not None:
                            grad_sum[index].add_(primal)
                        if tangent is not None:
                            hvp_theta[index].add_(tangent)
                    elif tangent is not None:
                        hvp_omega[index - len(theta)].add_(tangent)
                del grads

    return _through_clipping(accumulate, context, g_bar, hvp_theta, hvp_omega)


HVP: Dict[str, ProductFn] = {"double-backward": gradient_vjp, "forward-over-reverse": gradient_jvp}


def _through_clipping(accumulate, context: StepContext, g_bar, hvp_theta, hvp_omega) -> StepProducts:
    """Run ``accumulate(direction, grad_sum)`` (the products along ``direction`` into ``hvp_theta``
    and ``hvp_omega``, G into ``grad_sum`` when given) along g~, or, with clipping, G first and then
    along u; G and ``hvp_theta`` are then summed over workers."""
    clip_norm, all_reduce = context.step.clip_norm, context.all_reduce
    if clip_norm <= 0:
        grad = [torch.zeros_like(p) for p in context.theta]
        accumulate(g_bar, grad)
        if all_reduce is not None:
            all_reduce(grad + hvp_theta)
        return StepProducts(grad, global_norm(grad), 1.0, hvp_theta, hvp_omega)
    grad = step_gradient(context)
    norm = global_norm(grad)
    accumulate(clip_direction(grad, norm, clip_norm, g_bar), None)
    if all_reduce is not None:
        all_reduce(hvp_theta)
    return StepProducts(grad, norm, clip_factor(norm, clip_norm)[0], hvp_theta, hvp_omega)


def teacher_vjp(context: StepContext, g_bar: List[Tensor]) -> StepProducts:
    """Only ``d(g . g~)/d omega`` of one step (the oldest, when theta's adjoint is not wanted):
    ``grad`` and ``hvp_theta`` come back None, ``norm`` nan unless the step was clipped.

    ``G . g~`` is the directional derivative of the step's loss along g~, so one forward pass with
    dual numbers (forward-mode AD: theta + eps g~) gives it as a function of omega, and a reverse
    pass through the teacher alone gives its gradient: no double backward through the student.
    Clipped steps use the direction ``u`` of :func:`clip_direction` (which needs G first, one
    gradient-only pass). The pass runs under :func:`~.forward_mode.folded_linear`: nothing in it
    requires grad but the teacher, so PyTorch would run a transposed input's linear layer (fairseq's
    output projection) as a batched product.
    """
    clip_norm, teacher_params = context.step.clip_norm, context.teacher_params
    norm, scale, direction = math.nan, 1.0, g_bar
    if clip_norm > 0:
        grad = step_gradient(context)
        norm = global_norm(grad)
        direction = clip_direction(grad, norm, clip_norm, g_bar)
        scale = clip_factor(norm, clip_norm)[0]
    domega = [torch.zeros_like(w) for w in teacher_params]
    with forward_ad.dual_level(), folded_linear():
        duals = [forward_ad.make_dual(t.detach(), d) for t, d in zip(context.theta, direction)]
        for chunk in context.losses(duals):
            tangent = forward_ad.unpack_dual(chunk).tangent
            if tangent is None or not tangent.requires_grad:
                continue  # the chunk does not depend on theta, or its slope not on omega
            add_into(domega, torch.autograd.grad(tangent, teacher_params, allow_unused=True))
    return StepProducts(None, norm, scale, None, domega)


@dataclass
class KeptStep:
    """The newest step's gradient with its graph, kept from the training step itself, so that the
    reverse loop takes that step's products by one backward through it instead of replaying the
    step's forward and first backward.

    Attributes:
        params: the leaves the step's loss was computed at (copies of theta_t: the optimizer updates
            the parameters in place, which the graph must not see).
        teacher_params: the teacher leaves the step's weights were computed with (omega's values).
        grads: ``d loss / d params`` with ``create_graph=True`` (None where a parameter is unused).
        scale: what turns that gradient into the optimizer's G (fairseq: 1 / the update's sample size).
    """

    params: List[Tensor]
    teacher_params: List[Tensor]
    grads: Sequence[Optional[Tensor]]
    scale: float = 1.0


def kept_gradient_vjp(context: StepContext, g_bar: List[Tensor], kept: KeptStep) -> StepProducts:
    """What :func:`gradient_vjp` returns, from ``kept``'s graph (which it frees) instead of a replay
    of ``context``'s step (of which only the clip norm is read)."""
    clip_norm = context.step.clip_norm
    grad = [torch.zeros_like(p) if g is None else g.detach() * kept.scale for p, g in zip(kept.params, kept.grads)]
    norm = global_norm(grad)
    direction = g_bar if clip_norm <= 0 else clip_direction(grad, norm, clip_norm, g_bar)
    hvp = _chunk_hvp(kept.grads, [v * kept.scale for v in direction], list(kept.params) + list(kept.teacher_params))
    hvp_theta = [torch.zeros_like(p) for p in kept.params]
    hvp_omega = [torch.zeros_like(w) for w in kept.teacher_params]
    if hvp is not None:
        add_into(hvp_theta, hvp[: len(kept.params)])
        add_into(hvp_omega, hvp[len(kept.params):])
    return StepProducts(grad, norm, clip_factor(norm, clip_norm)[0], hvp_theta, hvp_omega)
