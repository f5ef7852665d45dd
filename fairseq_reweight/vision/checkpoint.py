"""Checkpoints of the image command: everything needed to continue exactly (weights, optimizers,
the last B recorded steps with their batches, RNG states, counters), written atomically."""
import os

import torch
from torch import Tensor

from fairseq_reweight.core.errors import ReweightConfigError
from fairseq_reweight.core.records import record_from_state, record_to_state
from fairseq_reweight.vision.reweight import StepData

# options a resumed run must share with the run that wrote the checkpoint
RESUME_KEYS = ("dataset", "noise", "noise_rate", "seed", "arch", "depth", "width", "teacher",
               "batch_size", "valid_size", "reweight_backprop_steps", "history_mode")


def save_checkpoint(path: str, model, optimizer, weigher, teacher_optimizer, progress: dict, args):
    """Everything needed to continue exactly: weights, optimizers, last B steps, RNG, counters."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "history": [record_to_state(r, _step_data_state) for r in optimizer.history],
        "teacher": weigher.state_dict() if weigher is not None else None,
        "teacher_optimizer": teacher_optimizer.state_dict() if teacher_optimizer else None,
        "progress": progress,
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "args": {k: getattr(args, k) for k in RESUME_KEYS},
    }
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(path: str, model, optimizer, weigher, teacher_optimizer, args) -> dict:
    """Restores a :func:`save_checkpoint` file in place; returns its progress counters."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved = state["args"]
    changed = [f"--{k.replace('_', '-')} {saved[k]} -> {getattr(args, k)}" for k in RESUME_KEYS
               if saved.get(k) != getattr(args, k)]
    if changed:
        raise ReweightConfigError(f"{path} was trained with other settings ({'; '.join(changed)}): "
                                  "use the same options or another --save-dir")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    device = next(model.parameters()).device
    optimizer.history.clear()
    for record in state["history"]:
        optimizer.history.append(record_from_state(record, lambda data: _step_data(data, device), device))
    if weigher is not None:
        weigher.load_state_dict(state["teacher"])
        teacher_optimizer.load_state_dict(state["teacher_optimizer"])
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["progress"]


def _step_data(state: dict, device) -> StepData:
    """A checkpoint's StepData, its batch back on ``device`` (RNG states stay CPU byte tensors)."""
    return StepData(**{k: v.to(device) if isinstance(v, Tensor) and "rng" not in k else v for k, v in state.items()})


def _step_data_state(data: StepData) -> dict:
    return {name: getattr(data, name) for name in StepData.__dataclass_fields__}
