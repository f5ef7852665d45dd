"""Reverse-mode hypergradient through the student's last momentum-SGD steps.

Fan et al., "Learning to Reweight with Deep Interactions", AAAI 2021, Algorithm 1 (after Maclaurin,
Duvenaud and Adams, "Gradient-based Hyperparameter Optimization through Reversible Learning", 2015).
The equations are restated in ``docs/METHOD.md``. Plain PyTorch: this module never imports fairseq.
"""
import contextlib
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, List, Optional, Sequence, Union

import torch
from torch import Tensor
from torch.autograd import forward_ad

CLIP_EPS = 1e-6  # fairseq.utils.clip_grad_norm_: coef = min(1, max_norm / (norm + 1e-6))


@dataclass
class StepRecord:
    """One student step as taken, in PyTorch's momentum-SGD convention.

    ``g_t = s(||G||) G + weight_decay theta_t`` where G is the gradient of the replayed loss (the
    sum of its chunks) and s the clip factor; ``v_{t+1} = momentum v_t + g_t``;
    ``theta_{t+1} = theta_t - lr v_{t+1}``.

    Attributes:
        lr: learning rate of this step.
        momentum: momentum of this step (> 0 for mode="reverse").
        weight_decay: L2 coefficient added to the (clipped) gradient, as torch.optim.SGD does.
        clip_norm: fairseq's ``--clip-norm`` c: ``G <- G min(1, c / (||G|| + 1e-6))``; 0 = off.
        data: opaque to this module: whatever ``loss_fn`` needs to replay the step (batches,
            RNG seed, ...).
        params: theta_t before the step (mode="checkpoint" needs it).
        momentum_buffers: v_t before the step (None entries or zeros for the first step).
    """

    lr: float
    momentum: float
    weight_decay: float = 0.0
    clip_norm: float = 0.0
    data: Any = None
    params: Optional[List[Tensor]] = None
    momentum_buffers: Optional[List[Tensor]] = None


LossFn = Callable[[StepRecord, List[Tensor]], Union[Tensor, Iterable[Tensor]]]
AllReduce = Callable[[List[Tensor]], None]


def select_window(history: Sequence[StepRecord], num_steps: int) -> List[StepRecord]:
    """The last ``num_steps`` records of ``history`` (oldest first), or a clear error if too few."""
    if num_steps < 1:
        raise ValueError(f"the hypergradient needs at least 1 step to differentiate through, got {num_steps}")
    if len(history) < num_steps:
        raise ValueError(
            f"cannot differentiate through the last {num_steps} steps: only {len(history)} were "
            "recorded; take more student steps per teacher step (K >= B), keep a longer history "
            "(RecordingSGD history_size >= B) or lower B"
        )
    return list(history)[len(history) - num_steps:]


def clip_factor(norm: float, clip_norm: float):
    """fairseq's clip factor ``s = min(1, c / (n + 1e-6))`` and its slope ``ds/dn`` at ``norm``."""
    if clip_norm <= 0:
        return 1.0, 0.0
    ratio = clip_norm / (norm + CLIP_EPS)
    if ratio >= 1.0:
        return 1.0, 0.0
    return ratio, -clip_norm / (norm + CLIP_EPS) ** 2


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


def check_tensor_list(tensors, like: List[Tensor], name: str, allow_none: bool) -> List:
    """Check ``tensors`` against ``like`` (length, shapes, None entries); return them as a list."""
    tensors = list(tensors)
    if len(tensors) != len(like):
        raise ValueError(
            f"{name} has {len(tensors)} tensors but params has {len(like)}: pass one per parameter"
        )
    for index, (tensor, ref) in enumerate(zip(tensors, like)):
        if tensor is None:
            if not allow_none:
                raise ValueError(f"{name}[{index}] is None: pass a tensor for every parameter")
        elif tensor.shape != ref.shape:
            raise ValueError(
                f"{name}[{index}] has shape {tuple(tensor.shape)} but params[{index}] has "
                f"{tuple(ref.shape)}: pass tensors in the order of params"
            )
    return tensors


def validate_tensor_list(tensors, like: List[Tensor], name: str, none_is_zero: bool) -> List[Tensor]:
    """Detached copies of ``tensors`` checked against ``like`` (length, shapes); None -> zeros."""
    out = []
    for tensor, ref in zip(check_tensor_list(tensors, like, name, none_is_zero), like):
        if tensor is None:
            out.append(torch.zeros_like(ref, memory_format=torch.contiguous_format))
        else:
            out.append(tensor.detach().to(device=ref.device, dtype=ref.dtype, copy=True))
    return out


def validate_teacher_params(teacher_params: List[Tensor]) -> None:
    """omega must be a non-empty list of tensors that require grad."""
    if not teacher_params:
        raise ValueError("teacher_params is empty: pass the teacher's parameters (omega)")
    for index, weight in enumerate(teacher_params):
        if not weight.requires_grad:
            raise ValueError(
                f"teacher_params[{index}] does not require grad: pass leaf tensors with "
                "requires_grad=True (the teacher's parameters)"
            )


def validate_steps(steps: List[StepRecord], params: List[Tensor], mode: str) -> None:
    """Check the step records; raise a ValueError naming the first bad one.

    ``mode`` "reverse" also needs momentum > 0, "checkpoint" stored params; any other value (the
    unrolled reference) only the common checks.
    """
    if not params:
        raise ValueError("params is empty: pass the student's parameters (theta_K)")
    if not steps:
        raise ValueError("steps is empty: pass the last B >= 1 step records (see select_window)")
    for index, step in enumerate(steps):
        if not isinstance(step, StepRecord):
            raise ValueError(f"steps[{index}] is a {type(step).__name__}, not a StepRecord")
        for name in ("lr", "momentum", "weight_decay", "clip_norm"):
            value = getattr(step, name)
            if not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"steps[{index}].{name} must be a finite number, got {value!r}")
        if step.momentum < 0 or step.clip_norm < 0:
            raise ValueError(
                f"steps[{index}] has momentum {step.momentum} and clip_norm {step.clip_norm}: "
                "both must be >= 0"
            )
        if mode == "reverse" and step.momentum <= 0:
            raise ValueError(
                f"steps[{index}] has momentum {step.momentum}: mode='reverse' undoes a step by "
                "dividing by the momentum; use mode='checkpoint' (RecordingSGD(store_states=True))"
            )
        if mode == "checkpoint":
            if step.params is None:
                raise ValueError(
                    f"steps[{index}] has no stored params: mode='checkpoint' needs theta_t of every "
                    "step; record with RecordingSGD(store_states=True) or use mode='reverse'"
                )
            check_tensor_list(step.params, params, f"steps[{index}].params", allow_none=False)


__all__ = [
    "CLIP_EPS",
    "AllReduce",
    "LossFn",
    "HypergradResult",
    "StepRecord",
    "math_attention",
    "clip_factor",
    "reverse_hypergradient",
    "select_window",
]


@dataclass
class HypergradResult:
    """What :func:`reverse_hypergradient` returns.

    Attributes:
        teacher_grad: ``dL_val(theta_K)/d omega`` through the given steps, one tensor per teacher
            parameter (summed over data-parallel workers when ``all_reduce`` is given).
        param_grad: adjoint of theta at the start of the window, ``dL_val/d theta_{K-B}``.
        momentum_grad: adjoint of v at the start of the window, ``dL_val/d v_{K-B}``.
        start_params: theta_{K-B} as used (recovered in reverse mode, copied in checkpoint mode).
        start_momentum_buffers: v_{K-B} (recovered in reverse mode; in checkpoint mode the oldest
            record's buffers, or None when that record has none).
        grad_norms: ``||G_t||`` of each replayed step, oldest first (after ``all_reduce``).
        clip_factors: the clip factor ``s_t`` of each replayed step, oldest first (1.0 = unclipped).
        val_grad_norm: ``||val_grad||``.
    """

    teacher_grad: List[Tensor]
    param_grad: List[Tensor]
    momentum_grad: List[Tensor] = field(default_factory=list)
    start_params: List[Tensor] = field(default_factory=list)
    start_momentum_buffers: Optional[List[Tensor]] = None
    grad_norms: List[float] = field(default_factory=list)
    clip_factors: List[float] = field(default_factory=list)
    val_grad_norm: float = 0.0


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """Select PyTorch's math kernel for ``scaled_dot_product_attention`` inside the block.

    The flash and memory-efficient kernels have no double backward; the math kernel is plain
    autograd. The caller's backend selection is restored on exit, also when an exception escapes.
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3
        sdpa_kernel = None
    if sdpa_kernel is not None:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    elif hasattr(torch.backends.cuda, "sdp_kernel"):  # torch 2.0 - 2.2
        with torch.backends.cuda.sdp_kernel(
            enable_flash=False, enable_math=True, enable_mem_efficient=False
        ):
            yield
    else:  # torch < 2.0 has no fused attention kernels
        yield


def _add_into(accumulators: List[Tensor], grads: Sequence[Optional[Tensor]]) -> None:
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


def _replay_step(step, theta, teacher_params, loss_fn, v_tilde, all_reduce, step_index):
    """Replay one step at ``theta``: returns (G, ||G||, s, dtheta (g.v~), domega (g.v~) w/o decay).

    Without clipping one pass suffices: per chunk, ``G_c`` with ``create_graph=True``, accumulate
    ``G_c.detach()``, then the Hessian-vector product ``d(G_c . v~)``, then free the chunk's graph.
    With clipping ``g = s(n) G``, ``n = ||G||``, ``s = min(1, c / (n + eps))``, and
    ``d(g . v~) = J_G^T u`` with ``u = s v~ + (G . v~) s'(n) / n * G`` (``s' = -c / (n + eps)^2``
    when clipped, else 0), which needs the full G first: pass one computes G (no graph), pass two
    the per-chunk products ``d(G_c . u)``. ``loss_fn`` is then called twice for this step.
    """
    inputs = theta + teacher_params
    grad_sum = [torch.zeros_like(p) for p in theta]
    hvp_theta = [torch.zeros_like(p) for p in theta]
    hvp_omega = [torch.zeros_like(w) for w in teacher_params]

    def accumulate_hvp(vector, first_pass):
        for chunk in iter_loss_chunks(loss_fn(step, theta), step_index):
            grads = _chunk_gradient(chunk, theta, create_graph=True)
            if grads is None:
                continue
            if first_pass:
                _add_into(grad_sum, grads)
            hvp = _chunk_hvp(grads, vector, inputs)
            del grads
            if hvp is not None:
                _add_into(hvp_theta, hvp[: len(theta)])
                _add_into(hvp_omega, hvp[len(theta):])

    if step.clip_norm <= 0:
        accumulate_hvp(v_tilde, first_pass=True)
        if all_reduce is not None:
            all_reduce(grad_sum + hvp_theta)
        norm = _global_norm(grad_sum)
        return grad_sum, norm, 1.0, hvp_theta, hvp_omega

    grad_sum, norm = _full_gradient(step, theta, loss_fn, all_reduce, step_index)
    scale = clip_factor(norm, step.clip_norm)[0]
    accumulate_hvp(_clip_direction(grad_sum, norm, step.clip_norm, v_tilde), first_pass=False)
    if all_reduce is not None:
        all_reduce(hvp_theta)
    return grad_sum, norm, scale, hvp_theta, hvp_omega


def _teacher_step(step, theta, teacher_params, loss_fn, v_tilde, all_reduce, step_index):
    """Only ``d(g_t . v~)/d omega`` of one step (the oldest, when theta's adjoint is not wanted).

    ``G . v~`` is the directional derivative of the step's loss along v~, so one forward pass with
    dual numbers (forward-mode AD: theta + eps v~) gives it as a function of omega, and a reverse
    pass through the teacher alone gives its gradient: no double backward through the student.
    Clipped steps use the direction ``u`` of :func:`_replay_step` (which needs G first, one
    gradient-only pass). Returns (||G|| or nan when not computed, s, domega).
    """
    norm, scale, direction = math.nan, 1.0, v_tilde
    if step.clip_norm > 0:
        grad_sum, norm = _full_gradient(step, theta, loss_fn, all_reduce, step_index)
        direction = _clip_direction(grad_sum, norm, step.clip_norm, v_tilde)
        scale = clip_factor(norm, step.clip_norm)[0]
    domega = [torch.zeros_like(w) for w in teacher_params]
    with forward_ad.dual_level():
        duals = [forward_ad.make_dual(t.detach(), d) for t, d in zip(theta, direction)]
        for chunk in iter_loss_chunks(loss_fn(step, duals), step_index):
            tangent = forward_ad.unpack_dual(chunk).tangent
            if tangent is None or not tangent.requires_grad:
                continue  # the chunk does not depend on theta, or its slope not on omega
            _add_into(domega, torch.autograd.grad(tangent, teacher_params, allow_unused=True))
    return norm, scale, domega


def _full_gradient(step, theta, loss_fn, all_reduce, step_index):
    """G of one step (no graph; summed over workers with ``all_reduce``) and its norm."""
    grad_sum = [torch.zeros_like(p) for p in theta]
    for chunk in iter_loss_chunks(loss_fn(step, theta), step_index):
        _add_into(grad_sum, _chunk_gradient(chunk, theta, create_graph=False) or ())
    if all_reduce is not None:
        all_reduce(grad_sum)
    return grad_sum, _global_norm(grad_sum)


def _clip_direction(grad_sum, norm, clip_norm, v_tilde):
    """``u = s v~ + (G . v~) s'(n) / n G``: ``d(s(||G||) G . v~) = J_G^T u`` (see _replay_step)."""
    scale, slope = clip_factor(norm, clip_norm)
    with torch.no_grad():
        u = [scale * v for v in v_tilde]
        if slope != 0.0 and norm > 0.0:
            g_dot_v = float(torch.stack([(g * v).sum() for g, v in zip(grad_sum, v_tilde)]).sum())
            coef = g_dot_v * slope / norm
            for u_i, g in zip(u, grad_sum):
                u_i.add_(g, alpha=coef)
    return u


def _global_norm(tensors: List[Tensor]) -> float:
    if not tensors:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors])))


def reverse_hypergradient(
    params: Sequence[Tensor],
    momentum_buffers: Optional[Sequence[Optional[Tensor]]],
    teacher_params: Sequence[Tensor],
    steps: Sequence[StepRecord],
    loss_fn: LossFn,
    val_grad: Sequence[Optional[Tensor]],
    *,
    mode: str = "reverse",
    all_reduce: Optional[AllReduce] = None,
    math_sdpa: bool = True,
    teacher_grad_only: bool = False,
) -> HypergradResult:
    """Gradient of a validation loss at theta_K with respect to the teacher, through the last steps.

    Runs Algorithm 1 backwards from t = K-1 to K-B (B = ``len(steps)``), with the student step of
    :class:`StepRecord` (momentum SGD, PyTorch convention, optional clipping and weight decay)::

        theta_bar = val_grad, v_bar = 0, omega_bar = 0
        for each step, newest first:
            theta_t = theta_{t+1} + lr v_{t+1}       (mode="reverse"; "checkpoint": step.params)
            g_t     = s(||G||) G + wd theta_t,  G = d loss_fn(step, theta_t) / d theta
            v_t     = (v_{t+1} - g_t) / momentum     (mode="reverse" only)
            v~      = v_bar - lr theta_bar
            theta_bar += d(g_t . v~)/d theta   (= J_G^T u + wd v~, see below)
            omega_bar += d(g_t . v~)/d omega
            v_bar    = momentum v~

    Gradients are taken chunk by chunk (one ``create_graph=True`` backward, then one
    Hessian-vector product, then the chunk's graph is freed), so peak memory is one chunk's
    double-backward graph plus a few copies of theta. Clipping is differentiated exactly: with
    ``n = ||G||`` and ``s = min(1, c/(n+1e-6))``, ``d(s G . v~) = J_G^T u`` where
    ``u = s v~ + (G . v~) (ds/dn) / n G`` and ``ds/dn = -c/(n+1e-6)^2`` when clipped (0 otherwise).
    That needs G in full before any product, so clipped steps replay ``loss_fn`` twice: a
    gradient-only pass, then a pass of products ``d(G_chunk . u)``. Unclipped steps replay it once.

    Args:
        params: theta_K, the student's parameters after the last step (values only; not modified).
        momentum_buffers: v_K (None entries are zeros). Only read in mode="reverse"; may be None in
            mode="checkpoint".
        teacher_params: omega, leaf tensors with ``requires_grad=True`` (not modified; ``.grad``
            untouched).
        steps: the last B step records, oldest first (see :func:`select_window`).
        loss_fn: ``loss_fn(step, params)`` evaluates the training loss of ``step`` at the given
            parameter tensors (e.g. with ``torch.func.functional_call``), depending on omega
            through the teacher's weights. It returns one scalar or an iterable of scalar chunks
            whose sum is the objective whose gradient the optimizer received (before clipping and
            weight decay). A generator yielding chunks keeps only one chunk's graph alive. It must
            replay the step's randomness (dropout): it is called once per step, twice when
            clipping is on, and each call must give the same loss.
        val_grad: ``d L_val(theta_K) / d theta`` (None entries are zeros).
        mode: ``"reverse"`` recovers theta_t and v_t by undoing the steps (needs momentum > 0;
            floating-point error grows by about 1/momentum per step); ``"checkpoint"`` reads
            ``step.params`` (exact; costs B copies of theta).
        all_reduce: for data parallelism, a callable summing a list of tensors in place across
            workers, whose ``loss_fn`` each return their own shard of the loss. Applied to G of
            every step, to the theta-part of every Hessian-vector product and to omega_bar at the
            end; every worker must call this function with the same steps.
        math_sdpa: run the replay under :func:`math_attention` (flash and memory-efficient
            attention have no double backward).
        teacher_grad_only: the caller wants ``teacher_grad`` alone (a teacher update). The oldest
            step then needs no theta-adjoint, and its omega-part ``d(g_t . v~)/d omega`` is
            computed by forward-mode AD (the step's loss at dual parameters theta + eps v~; its
            slope is ``G . v~``, differentiated back to omega through the teacher alone) instead
            of a double backward through the student: one of the B replays costs about 1.5
            training steps instead of about 3 (measured on the CPU, ``benchmarks/meta_breakdown.py``). ``loss_fn`` must then also accept dual tensors
            (``torch.autograd.forward_ad``; fairseq's Transformer does). ``param_grad``,
            ``momentum_grad`` and ``start_params`` come back empty, ``start_momentum_buffers``
            None, and ``grad_norms`` holds nan for the oldest step unless it was clipped.

    Returns:
        a :class:`HypergradResult`.

    Raises:
        ValueError: on empty or inconsistent inputs, non-finite ``val_grad``, a step with momentum
            0 in mode="reverse", or a step without stored parameters in mode="checkpoint".
    """
    if mode not in ("reverse", "checkpoint"):
        raise ValueError(f"mode must be 'reverse' or 'checkpoint', got {mode!r}")
    params = list(params)
    teacher_params = list(teacher_params)
    steps = list(steps)
    validate_steps(steps, params, mode)
    validate_teacher_params(teacher_params)
    theta_bar = validate_tensor_list(val_grad, params, "val_grad", none_is_zero=True)
    if not bool(torch.stack([torch.isfinite(g).all() for g in theta_bar]).all()):
        raise ValueError("val_grad has non-finite entries: the validation loss diverged at theta_K")
    if mode == "reverse":
        if momentum_buffers is None:
            raise ValueError("mode='reverse' needs momentum_buffers (v_K); got None")
        velocity = validate_tensor_list(momentum_buffers, params, "momentum_buffers", True)
    else:
        velocity = None

    val_grad_norm = _global_norm(theta_bar)
    # theta_t as leaves: updated in place under no_grad, differentiated inside each step
    theta = [p.detach().clone().requires_grad_(True) for p in params]
    v_bar = [torch.zeros_like(p) for p in theta_bar]
    omega_bar = [torch.zeros_like(w) for w in teacher_params]
    grad_norms, clip_factors = [], []
    start_momentum = None

    attention = math_attention() if math_sdpa else contextlib.nullcontext()
    with attention, torch.enable_grad():
        for index in reversed(range(len(steps))):
            step = steps[index]
            with torch.no_grad():
                if mode == "reverse":
                    for theta_i, v_i in zip(theta, velocity):
                        theta_i.add_(v_i, alpha=step.lr)
                else:
                    for theta_i, stored in zip(theta, step.params):
                        theta_i.copy_(stored)
                v_tilde = [vb - step.lr * tb for vb, tb in zip(v_bar, theta_bar)]
            if teacher_grad_only and index == 0:
                norm, scale, hvp_omega = _teacher_step(
                    step, theta, teacher_params, loss_fn, v_tilde, all_reduce, index
                )
                grad_norms.append(norm)
                clip_factors.append(scale)
                with torch.no_grad():
                    for ob, h in zip(omega_bar, hvp_omega):
                        ob.add_(h)
                break
            grad, norm, scale, hvp_theta, hvp_omega = _replay_step(
                step, theta, teacher_params, loss_fn, v_tilde, all_reduce, index
            )
            grad_norms.append(norm)
            clip_factors.append(scale)
            with torch.no_grad():
                if mode == "reverse":
                    for v_i, g_i, theta_i in zip(velocity, grad, theta):
                        # v_t = (v_{t+1} - s G - wd theta_t) / momentum
                        v_i.sub_(g_i, alpha=scale)
                        if step.weight_decay:
                            v_i.sub_(theta_i, alpha=step.weight_decay)
                        v_i.div_(step.momentum)
                for tb, h, vt in zip(theta_bar, hvp_theta, v_tilde):
                    tb.add_(h)
                    if step.weight_decay:
                        tb.add_(vt, alpha=step.weight_decay)
                for ob, h in zip(omega_bar, hvp_omega):
                    ob.add_(h)
                v_bar = [step.momentum * vt for vt in v_tilde]
            del grad, hvp_theta, hvp_omega, v_tilde

    if all_reduce is not None:
        all_reduce(omega_bar)
    grad_norms.reverse()
    clip_factors.reverse()
    if teacher_grad_only:
        return HypergradResult(teacher_grad=omega_bar, param_grad=[], grad_norms=grad_norms,
                               clip_factors=clip_factors, val_grad_norm=val_grad_norm)
    if mode == "reverse":
        start_momentum = velocity
    elif steps[0].momentum_buffers is not None:
        start_momentum = validate_tensor_list(
            steps[0].momentum_buffers, params, "steps[0].momentum_buffers", none_is_zero=True
        )
    return HypergradResult(
        teacher_grad=omega_bar,
        param_grad=theta_bar,
        momentum_grad=v_bar,
        start_params=[t.detach() for t in theta],
        start_momentum_buffers=start_momentum,
        grad_norms=grad_norms,
        clip_factors=clip_factors,
        val_grad_norm=val_grad_norm,
    )
