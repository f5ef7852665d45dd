"""Input checks of the hypergradient functions: each raises a ValueError naming what to pass."""
from typing import List, Sequence

import torch
from torch import Tensor

from .errors import ReweightConfigError


def select_window(history: Sequence, num_steps: int) -> List:
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


def check_tensor_list(tensors, like: List[Tensor], name: str, allow_none: bool) -> List:
    """Check ``tensors`` against ``like`` (length, shapes, None entries); return them as a list."""
    tensors = list(tensors)
    if len(tensors) != len(like):
        raise ValueError(f"{name} has {len(tensors)} tensors but params has {len(like)}: pass one per parameter")
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


def validate_tensor_list(tensors, like: List[Tensor], name: str, none_is_zero: bool,
                         copy: bool = True) -> List[Tensor]:
    """Detached copies of ``tensors`` checked against ``like`` (length, shapes); None -> zeros.
    With ``copy=False`` a tensor already of ``like``'s device and dtype is taken as it is (detached,
    the same storage), unless it shares its storage with an earlier one (autograd may hand two
    parameters one gradient tensor): the results are updated in place, one by one."""
    out, storages = [], set()
    for tensor, ref in zip(check_tensor_list(tensors, like, name, none_is_zero), like):
        if tensor is None:
            out.append(torch.zeros_like(ref, memory_format=torch.contiguous_format))
            continue
        shared = not copy and tensor.untyped_storage().data_ptr() in storages
        out.append(tensor.detach().to(device=ref.device, dtype=ref.dtype, copy=copy or shared))
        storages.add(out[-1].untyped_storage().data_ptr())
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


def validate_inputs(params: List[Tensor], steps: List, check_step, mode: str) -> None:
    """The common checks of a window of steps; ``check_step(index, step, params, mode)`` is the
    optimizer's own check of one record."""
    if not params:
        raise ValueError("params is empty: pass the student's parameters (theta_K)")
    if not steps:
        raise ValueError("steps is empty: pass the last B >= 1 step records (see select_window)")
    for index, step in enumerate(steps):
        check_step(index, step, params, mode)


def all_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every entry of every tensor is finite (one host synchronisation)."""
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def check_finite(tensors: List[Tensor], message: str) -> None:
    if not all_finite(tensors):
        raise ValueError(message)


def check_schedule(interval: int, backprop_steps: int) -> None:
    """``--reweight-interval`` K and ``--reweight-backprop-steps`` B: 1 <= B <= K."""
    if interval < 1:
        raise ReweightConfigError(f"--reweight-interval must be >= 1, got {interval}")
    if not 1 <= backprop_steps <= interval:
        raise ReweightConfigError(
            f"--reweight-backprop-steps ({backprop_steps}) must be between 1 and --reweight-interval "
            f"({interval}): the teacher only differentiates through steps taken since its last update"
        )


def check_reversible(history: str, momentum: float, history_flag: str) -> None:
    """``reverse`` history undoes momentum-SGD steps by dividing by the momentum."""
    if history == "reverse" and momentum <= 0:
        raise ReweightConfigError(
            f"--momentum {momentum} cannot undo steps in reverse ({history_flag} reverse divides by the "
            f"momentum): set --momentum 0.9 (the paper's value) or {history_flag} checkpoint"
        )
