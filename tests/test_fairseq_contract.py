"""Each assumption of fairseq_reweight.nmt.fairseq_contract, pinned against the installed fairseq:
a fairseq change that breaks one fails here, by name, instead of giving a wrong hypergradient."""
import inspect
from types import SimpleNamespace
from unittest import mock

import torch
from fairseq import options, tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.distributed import ModuleProxyWrapper
from fairseq.optim.fp16_optimizer import FP16Optimizer, MemoryEfficientFP16Optimizer
from fairseq.trainer import Trainer

from fairseq_helpers import REWEIGHT, TINY_TRANSFORMER
from fairseq_reweight.nmt import fairseq_contract as contract
from fairseq_reweight.nmt.optimizer import ReweightSGD
from fairseq_reweight.nmt.recorder import find_recorder


def _setup(data, extra=()):
    args = options.parse_args_and_arch(options.get_training_parser(), [data] + TINY_TRANSFORMER + REWEIGHT
                                       + ["--lr", "0.01", "--momentum", "0.9"] + list(extra))
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    torch.manual_seed(0)  # the model's initialisation (and dropout below): the values the tests compare
    return cfg, task, task.build_model(cfg.model), task.build_criterion(cfg.criterion)


def test_data_parallel_wrappers_keep_the_model_as_module():
    model = torch.nn.Linear(2, 2)
    assert contract.unwrap_model(ModuleProxyWrapper(_Holder(model))) is model


class _Holder(torch.nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module


def test_the_process_group_that_fairseq_leaves_is_destroyed_at_exit(tmp_path, monkeypatch):
    import torch.distributed as dist
    from fairseq import distributed_utils

    assert "destroy_process_group" not in inspect.getsource(distributed_utils)  # fairseq 0.12 never does
    handlers = []
    monkeypatch.setattr(contract, "_EXIT_HANDLER", [])
    monkeypatch.setattr(contract.atexit, "register", lambda fn: handlers.append(fn) or fn)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        contract.destroy_process_group_at_exit()
        contract.destroy_process_group_at_exit()
        assert len(handlers) == 1
        handlers[0]()
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    handlers[0]()  # nothing left to destroy: no error


def test_the_trainer_seeds_with_seed_plus_num_updates():
    fake = SimpleNamespace(cfg=SimpleNamespace(common=SimpleNamespace(seed=5)), get_num_updates=lambda: 7)
    Trainer._set_seed(fake)
    theirs = torch.rand(4)
    contract.seed_for_update(5, 7)
    assert torch.equal(torch.rand(4), theirs)


def test_a_dummy_last_batch_zeroes_the_update_sample_size():
    source = inspect.getsource(Trainer.train_step)
    assert "if is_dummy_batch:" in source and "sample_size *= 0.0" in source
    assert contract.update_sample_size([3.0, 4.0], last_is_dummy=True) == 0.0
    assert contract.update_sample_size([3.0, 4.0], last_is_dummy=False) == 7.0


def test_gradients_are_none_exactly_before_the_first_micro_batch_of_an_update(tiny_data_bin):
    cfg, task, model, criterion = _setup(tiny_data_bin, ["--update-freq", "2", "--reweight-teacher", "none"])
    trainer = Trainer(cfg, task, model, criterion)
    seen = []
    original = task.train_step

    def spy(sample, model, *args, **kwargs):
        seen.append(contract.update_attempt_started(model))
        return original(sample, model, *args, **kwargs)

    task.train_step = spy
    batches = trainer.get_train_iterator(epoch=1).next_epoch_itr(shuffle=False)
    for _ in range(2):
        trainer.train_step([next(batches), next(batches)])
    assert seen == [True, False, True, False]


def test_fp16_optimizer_wraps_ours_with_flat_fp32_masters_in_parameter_order(tiny_data_bin):
    cfg, _, model, _ = _setup(tiny_data_bin, ["--fp16"])
    params = [p for p in model.half().parameters() if p.requires_grad]
    with mock.patch("torch.cuda.current_device", return_value=0):  # only a dict key on the CPU
        optimizer = FP16Optimizer.build_optimizer(cfg, params)
    assert isinstance(contract.inner_optimizer(optimizer), ReweightSGD) and find_recorder(optimizer) is not None
    masters = contract.inner_optimizer(optimizer).recorder.group["params"]
    assert len(masters) == 1 and masters[0].dtype == torch.float32  # one flat tensor
    views = contract.master_params_in_model_shapes(masters, [p.shape for p in params])
    for view, param in zip(views, params):
        assert torch.equal(view, param.float())
    assert not contract.is_memory_efficient_fp16(optimizer)
    memory_efficient = MemoryEfficientFP16Optimizer.build_optimizer(cfg, params, allow_unsupported=True)
    assert contract.is_memory_efficient_fp16(memory_efficient)


def test_bf16_runs_without_tpu_where_torch_xla_is_missing(tiny_data_bin):
    args = options.parse_args_and_arch(options.get_training_parser(), [tiny_data_bin] + TINY_TRANSFORMER + REWEIGHT
                                       + ["--lr", "0.01", "--momentum", "0.9", "--bf16"])
    assert args.bf16 and args.tpu  # fairseq 0.12's options.py: --bf16 implies --tpu
    cfg, task, model, criterion = _setup(tiny_data_bin, ["--bf16"])
    assert cfg.common.bf16 and not cfg.common.tpu  # cleared by the task's set-up
    trainer = Trainer(cfg, task, model, criterion)
    assert not trainer.tpu and trainer.device.type == "cpu"
    assert {p.dtype for p in trainer.model.parameters()} == {torch.bfloat16}  # fairseq's bf16 path
    assert {p.dtype for p in criterion.reweight.teacher.parameters()} == {torch.float32}
    with mock.patch("importlib.util.find_spec", return_value=object()):  # torch_xla installed: a TPU run
        cfg, *_ = _setup(tiny_data_bin, ["--bf16"])
    assert cfg.common.tpu


def test_transformer_outputs_have_the_layout_the_teacher_reads(tiny_data_bin):
    _, task, model, _ = _setup(tiny_data_bin)
    task.load_dataset("valid")
    sample = next(iter(task.get_batch_iterator(task.dataset("valid"), max_tokens=200).next_epoch_itr(shuffle=False)))
    net_input = sample["net_input"]
    encoder_out = model.encoder(net_input["src_tokens"], src_lengths=net_input["src_lengths"])
    states, pads = contract.encoder_states(encoder_out)
    bsz, src_len = net_input["src_tokens"].shape
    assert states.shape == (src_len, bsz, 16) and (pads is None or pads.shape == (bsz, src_len))
    net_output = model(**net_input)
    assert contract.decoder_states(net_output).shape == (sample["target"].size(1), bsz, 16)


def test_the_transformers_log_probabilities_are_its_logits_log_softmax_unless_adaptive(tiny_data_bin):
    _, task, model, _ = _setup(tiny_data_bin)
    assert contract.logits_are_log_softmax_input(model)
    task.load_dataset("valid")
    sample = next(iter(task.get_batch_iterator(task.dataset("valid"), max_tokens=200).next_epoch_itr(shuffle=False)))
    net_output = model(**sample["net_input"])
    torch.testing.assert_close(model.get_normalized_probs(net_output, log_probs=True),
                               torch.log_softmax(net_output[0].float(), -1), rtol=0, atol=0)
    _, _, adaptive, _ = _setup(tiny_data_bin, ["--adaptive-softmax-cutoff", "5"])
    assert adaptive.decoder.adaptive_softmax is not None and not contract.logits_are_log_softmax_input(adaptive)


def test_batch_rows_split_a_collated_batch_into_parts_whose_losses_add_up(tiny_data_bin):
    _, task, model, criterion = _setup(tiny_data_bin)
    task.load_dataset("valid")
    sample = next(iter(task.get_batch_iterator(task.dataset("valid"), max_tokens=400).next_epoch_itr(shuffle=False)))
    model.eval()
    pad = task.target_dictionary.pad()
    with torch.no_grad():
        whole = criterion(model, sample)[0]
        parts = [contract.batch_rows(sample, torch.arange(r, sample["target"].size(0), 2), pad) for r in (0, 1)]
        losses = [criterion(model, part)[0] for part in parts]
    assert sum(p["nsentences"] for p in parts) == sample["nsentences"]
    assert sum(p["ntokens"] for p in parts) == sample["ntokens"]
    assert parts[1]["id"].tolist() == sample["id"][1::2].tolist()
    torch.testing.assert_close(sum(losses), whole, rtol=1e-5, atol=1e-5)


def test_encoder_states_refuse_another_layout():
    import pytest

    with pytest.raises(TypeError, match="TransformerEncoder output"):
        contract.encoder_states(torch.zeros(3))

