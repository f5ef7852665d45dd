"""Recording fairseq's student updates for their replay.

fairseq's trainer calls ``task.train_step`` once per micro-batch (``--update-freq``) and then
``task.optimizer_step``; ``reweight_sgd``'s :class:`~fairseq_reweight.core.RecordingSGD` (or
``reweight_adam``'s :class:`~fairseq_reweight.core.RecordingAdam`) records each step (learning rate,
momentum or betas, ...) and calls back, and the recorder attaches what the replay
needs: the update number (the trainer seeds dropout with ``seed + num_updates``), the micro-batches
in trainer order, and the ``--clip-norm`` threshold.
"""
import logging
from dataclasses import dataclass, field
from typing import Any, List, Optional

from fairseq import utils

from fairseq_reweight.core.errors import ReweightConfigError
from fairseq_reweight.core.recording import RecordingMixin
from fairseq_reweight.core.records import record_from_state, record_to_state
from fairseq_reweight.nmt.fairseq_contract import inner_optimizer, is_memory_efficient_fp16, update_attempt_started
from fairseq_reweight.nmt.optimizer import optimizer_error

logger = logging.getLogger(__name__)


@dataclass
class ReplayData:
    """What the replay of one student update needs (stored in ``StepRecord.data``)."""

    update_num: int
    micro_batches: List[Any] = field(default_factory=list)  # (sample, ignore_grad) in trainer order


def find_recorder(optimizer) -> Optional[RecordingMixin]:
    """The recording optimizer (RecordingSGD, RecordingAdam) inside fairseq's wrappers, or None."""
    return getattr(inner_optimizer(optimizer), "recorder", None)


class StepRecorder:
    """The last B student updates with their replay data.

    Args:
        history_size: B, the updates the hypergradient goes back through.
        store_states: keep theta_t and v_t of each (``--reweight-history checkpoint``).
        clip_norm: ``--clip-norm``, replayed with each step.
    """

    def __init__(self, history_size: int, store_states: bool, clip_norm: float):
        self.history_size, self.store_states, self.clip_norm = history_size, store_states, clip_norm
        self.optimizer: Optional[RecordingMixin] = None
        self._open: Optional[ReplayData] = None
        self._restored: list = []  # records from a checkpoint, until the optimizer is known

    def attach(self, optimizer, what: str) -> None:
        """Find the recording optimizer in fairseq's (``what`` names the option that needs it)."""
        if is_memory_efficient_fp16(optimizer):
            raise ReweightConfigError("--memory-efficient-fp16 keeps no fp32 master weights to replay steps from; use --fp16")
        recorder = find_recorder(optimizer)
        if recorder is None:
            raise optimizer_error(what, type(inner_optimizer(optimizer)).__name__)
        recorder.check_history("checkpoint" if self.store_states else "reverse", "--reweight-history")
        recorder.set_history_size(self.history_size)
        recorder.store_states = self.store_states
        recorder.step_callback = self._on_step
        self._adopt(recorder)

    def _adopt(self, recorder: RecordingMixin) -> None:
        """Hand records restored from a checkpoint to the optimizer, samples back on its device."""
        device = recorder.group["params"][0].device
        if not all(isinstance(r, recorder.record_class) for r in self._restored):
            logger.info("replay history from another --optimizer: the next meta-update waits for B new updates")
            self._restored = []
        for record in self._restored:
            if device.type == "cuda":
                record.data.micro_batches = [(utils.move_to_cuda(s, device), i) for s, i in record.data.micro_batches]
            recorder.history.append(record)
        self._restored = []
        self.optimizer = recorder

    def starts_update(self, model) -> bool:
        """Whether the next micro-batch is the first of an update attempt (the optimizer's step
        closed the last one, or the trainer restarted it)."""
        return self._open is None or update_attempt_started(model)

    def on_micro_batch(self, update_num: int, sample, ignore_grad: bool, first: bool) -> None:
        """Record a micro-batch before fairseq's forward/backward of it."""
        if first:
            self._open = ReplayData(update_num)
        self._open.micro_batches.append((sample, ignore_grad))

    def _on_step(self, record) -> None:
        record.data, self._open = self._open, None
        record.clip_norm = float(self.clip_norm)

    def window(self) -> Optional[list]:
        """The last B records, oldest first, or None while fewer have replay data."""
        history = list(self.optimizer.history)[-self.history_size:] if self.optimizer is not None else []
        if len(history) < self.history_size or not all(isinstance(r.data, ReplayData) for r in history):
            return None
        return history

    def state_dict(self) -> list:
        history = self.optimizer.history if self.optimizer is not None else self._restored
        return [record_to_state(r, _data_to_state) for r in history if isinstance(r.data, ReplayData)]

    def load_state_dict(self, states: list) -> None:
        self._restored = [record_from_state(s, _data_from_state) for s in states]
        if self._restored and self.store_states != all(r.params is not None for r in self._restored):
            # written with the other --reweight-history: its records lack (or carry) the stored states
            logger.info("replay history from another --reweight-history: the next meta-update waits for B new updates")
            self._restored = []
        if self.optimizer is not None:
            self.optimizer.history.clear()
            self._adopt(self.optimizer)


def _data_to_state(data: ReplayData) -> dict:
    return {"update_num": data.update_num,
            "micro_batches": [(utils.move_to_cpu(sample), ignore) for sample, ignore in data.micro_batches]}


def _data_from_state(state: dict) -> ReplayData:
    return ReplayData(state["update_num"], list(state["micro_batches"]))
