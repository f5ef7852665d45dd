"""Step records as plain data (checkpoints), and their tensors mapped to other shapes or devices."""
import dataclasses
from typing import Callable

from .adam import AdamStepRecord
from .sgd import StepRecord

KINDS = {"sgd": StepRecord, "adam": AdamStepRecord}


def map_record_tensors(record, fn: Callable):
    """A copy of ``record`` whose stored tensor lists are ``fn(list)`` (None stays None)."""
    changes = {name: fn(getattr(record, name)) for name in record.TENSOR_FIELDS if getattr(record, name) is not None}
    return dataclasses.replace(record, **changes)


def record_to_state(record, data_to_state=lambda data: data) -> dict:
    """A record as plain data (tensors detached, on the CPU), loadable by torch's safe loader."""
    kind = next(name for name, cls in KINDS.items() if isinstance(record, cls))
    state = {"kind": kind}
    for item in dataclasses.fields(record):
        value = getattr(record, item.name)
        if item.name == "data":
            value = data_to_state(value)
        elif item.name in record.TENSOR_FIELDS and value is not None:
            value = [None if t is None else t.detach().cpu() for t in value]
        state[item.name] = value
    return state


def record_from_state(state: dict, data_from_state=lambda data: data, device=None):
    """The inverse of :func:`record_to_state`, stored tensors moved to ``device``. States without a
    ``kind`` were written before Adam records existed: SGD."""
    state = dict(state)
    cls = KINDS[state.pop("kind", "sgd")]
    state["data"] = data_from_state(state["data"])
    record = cls(**state)
    if device is None:
        return record
    return map_record_tensors(record, lambda tensors: [None if t is None else t.to(device) for t in tensors])
