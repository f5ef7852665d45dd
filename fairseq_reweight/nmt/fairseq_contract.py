"""Every assumption this package makes about fairseq 0.12's internals, in one place.

The replay must reproduce fairseq's training step exactly, which needs behaviour fairseq does not
document as API. Each function below names the fairseq code it mirrors, and
``tests/test_fairseq_contract.py`` pins each one against the installed fairseq, so that a fairseq
upgrade that changes any of them fails there, loudly, instead of giving a wrong hypergradient.
"""
import atexit
import importlib.util
from typing import Dict, List, Optional, Tuple

import torch
from fairseq import utils
from fairseq.optim.fp16_optimizer import MemoryEfficientFP16Optimizer
from omegaconf import OmegaConf
from torch import Tensor


def unwrap_model(model):
    """The fairseq model inside data-parallel wrappers (ModuleProxyWrapper, DDP, LegacyDDP ...),
    which all keep it as ``.module``."""
    while hasattr(model, "module"):
        model = model.module
    return model


def seed_for_update(seed: int, update_num: int) -> None:
    """Seed torch as ``Trainer._set_seed`` does before update ``update_num``'s micro-batches
    (``seed + num_updates``): the replay then draws the step's dropout masks again."""
    utils.set_torch_seed(seed + update_num)


def update_sample_size(sizes: List[float], last_is_dummy: bool) -> float:
    """The sample size ``Trainer.train_step`` divides an update's gradient by: the sum over its
    micro-batches, zeroed when the last one is a dummy batch (``sample_size *= 0.0``)."""
    return 0.0 if last_is_dummy else float(sum(sizes))


def update_attempt_started(model) -> bool:
    """Whether the next micro-batch is the first of an update attempt: ``Trainer.train_step``
    calls ``zero_grad()`` (gradients set to None) before its micro-batches, and again on a retry
    after an fp16 overflow, which no public hook announces (``task.optimizer_step`` is not called)."""
    return all(p.grad is None for p in unwrap_model(model).parameters() if p.requires_grad)


def inner_optimizer(optimizer):
    """The optimizer that steps the parameters: ``FP16Optimizer.fp32_optimizer`` under ``--fp16``,
    ``wrapped_optimizer`` under ``--memory-efficient-fp16`` and AMP, else the optimizer itself."""
    return getattr(optimizer, "fp32_optimizer", None) or getattr(optimizer, "wrapped_optimizer", None) or optimizer


def is_memory_efficient_fp16(optimizer) -> bool:
    """``--memory-efficient-fp16`` keeps no fp32 master weights to replay from."""
    return isinstance(optimizer, MemoryEfficientFP16Optimizer)


def master_params_in_model_shapes(tensors: List[Tensor], shapes: List[torch.Size]) -> List[Tensor]:
    """Optimizer tensors seen in the model's shapes. ``FP16Optimizer`` with flat master weights
    (the default) holds one fp32 tensor, the trainable parameters concatenated in
    ``model.parameters()`` order (``build_fp32_params``); otherwise one tensor per parameter."""
    tensors = list(tensors)
    if len(tensors) == len(shapes):
        return [t.view(shape) for t, shape in zip(tensors, shapes)]
    flat = torch.cat([t.reshape(-1) for t in tensors])
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    if flat.numel() != sum(sizes):
        raise RuntimeError("optimizer parameters do not match the model's trainable parameters")
    return [chunk.view(shape) for chunk, shape in zip(flat.split(sizes), shapes)]


def batch_rows(sample: Dict, rows: Tensor, pad: int) -> Dict:
    """The sentences ``rows`` of a collated translation batch (``LanguagePairDataset.collater``:
    every tensor with one row per sentence, in ``net_input`` too, is indexed; the padding width is
    kept), with its ``nsentences`` and ``ntokens`` recounted."""
    count = sample["target"].size(0)

    def pick(value):
        if isinstance(value, dict):
            return {key: pick(v) for key, v in value.items()}
        if torch.is_tensor(value) and value.dim() > 0 and value.size(0) == count:
            return value.index_select(0, rows.to(value.device))
        return value

    part = pick(sample)
    part["nsentences"] = int(rows.numel())
    part["ntokens"] = int(part["target"].ne(pad).sum())
    return part


def bf16_without_tpu(cfg) -> bool:
    """``parse_args_and_arch`` in fairseq 0.12's ``options.py`` sets ``--tpu`` whenever ``--bf16``
    is given (bf16 once meant TPUs), and the trainer then asks torch_xla for its device. Where
    torch_xla is not installed the run cannot be meant for a TPU: clear ``common.tpu`` in the
    run's config (``cfg`` is any node of it, e.g. the task's), so that the trainer takes fairseq's
    own bf16 path on the GPU (model and batches in bf16, fp32 master weights in ``FP16Optimizer``,
    no loss scaling). Returns whether it cleared the flag."""
    root = cfg._get_root() if OmegaConf.is_config(cfg) else None
    common = root.get("common") if root is not None and "common" in root else None
    if common is None or not common.get("bf16", False) or not common.get("tpu", False):
        return False
    if importlib.util.find_spec("torch_xla") is not None:
        return False
    common.tpu = False
    return True


def encoder_states(encoder_out: Dict) -> Tuple[Tensor, Optional[Tensor]]:
    """(T x B x C states, B x T padding mask or None) of a ``TransformerEncoder`` output, the dict
    of lists ``{"encoder_out": [T x B x C], "encoder_padding_mask": [B x T] or [], ...}``."""
    if not isinstance(encoder_out, dict) or not encoder_out.get("encoder_out"):
        raise TypeError(
            "--teacher-features encoder needs a fairseq TransformerEncoder output (a dict with "
            f"'encoder_out' and 'encoder_padding_mask' lists); got {type(encoder_out).__name__}"
        )
    pads = encoder_out.get("encoder_padding_mask") or []
    return encoder_out["encoder_out"][0], (pads[0] if len(pads) else None)


def decoder_states(net_output) -> Tensor:
    """T x B x C final decoder states: ``net_output[1]["inner_states"][-1]`` of a
    ``TransformerDecoder``."""
    return net_output[1]["inner_states"][-1]


def logits_are_log_softmax_input(model) -> bool:
    """Whether ``model.get_normalized_probs(net_output, log_probs=True)`` is the log-softmax of
    ``net_output[0]``: the model routes it to its decoder (``BaseFairseqModel``'s and
    ``TransformerModelBase``'s ``get_normalized_probs``, ``BaseFairseqModel``'s scriptable helper)
    and the decoder is ``FairseqDecoder``'s without an adaptive softmax. Then the loss can be taken
    from the logits themselves (:mod:`fairseq_reweight.core.losses`)."""
    from fairseq.models import BaseFairseqModel, FairseqDecoder
    from fairseq.models.transformer import TransformerModelBase

    inner = unwrap_model(model)
    decoder = getattr(inner, "decoder", None)
    routes = (BaseFairseqModel.get_normalized_probs, TransformerModelBase.get_normalized_probs)
    return (isinstance(decoder, FairseqDecoder) and type(inner).get_normalized_probs in routes
            and type(inner).get_normalized_probs_scriptable is BaseFairseqModel.get_normalized_probs_scriptable
            and type(decoder).get_normalized_probs is FairseqDecoder.get_normalized_probs
            and type(decoder).get_normalized_probs_scriptable is FairseqDecoder.get_normalized_probs_scriptable
            and getattr(decoder, "adaptive_softmax", None) is None)


_EXIT_HANDLER = []


def destroy_process_group_at_exit() -> None:
    """fairseq 0.12's ``distributed_utils.call_main`` never destroys the process group it creates. At
    interpreter exit gloo's worker threads may then still hold tensors and abort the process
    ("terminate called without an active exception", exit status -6, after a finished run; see
    pytorch/pytorch#190489). Registered once: destroys the default group, if any, while the
    interpreter is still whole."""
    if not _EXIT_HANDLER:
        _EXIT_HANDLER.append(atexit.register(_destroy_default_group))


def _destroy_default_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
