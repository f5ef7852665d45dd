"""The NMT glue's parts built directly, without fairseq-train: the token weigher, the step
recorder and the driver's schedule and state."""
from types import SimpleNamespace

import pytest
import torch

from fairseq_reweight.core.features import TrainingState
from fairseq_reweight.nmt.driver import ReweightDriver
from fairseq_reweight.nmt.optimizer import ReweightSGD, ReweightSGDConfig
from fairseq_reweight.nmt.recorder import ReplayData, StepRecorder
from fairseq_reweight.nmt.weigher import TokenWeigher

PAD = 1


def _batch(bsz=3, src_len=5, tgt_len=4, dim=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(4, 20, (bsz, tgt_len), generator=g)
    target[0, -2:] = PAD
    pads = torch.zeros(bsz, src_len, dtype=torch.bool)
    pads[1, :2] = True
    encoder_out = {"encoder_out": [torch.randn(src_len, bsz, dim, generator=g)], "encoder_padding_mask": [pads]}
    lprobs = torch.randn(bsz, tgt_len, 20, generator=g).log_softmax(-1)
    return {"target": target}, encoder_out, lprobs


def _weigher(**kwargs):
    return TokenWeigher(kwargs.pop("features", ["encoder", "label"]), PAD, 20, 6, 6, **kwargs)


def test_zero_initialised_teacher_gives_uniform_weights_zero_on_padding():
    sample, encoder_out, lprobs = _batch()
    w, raw = _weigher()(sample, encoder_out, None, lprobs, TrainingState())
    mask = sample["target"].ne(PAD)
    assert torch.equal(w, mask.float()) and torch.equal(raw, 0.5 * mask.float())


def test_explicit_teacher_parameters_are_used_and_differentiable():
    torch.manual_seed(0)  # the initialisation of the teacher's hidden layer and label embedding
    sample, encoder_out, lprobs = _batch()
    weigher = _weigher(hidden_layers=1, hidden_dim=8)
    params = {name: (p + 0.3).requires_grad_() for name, p in weigher.teacher.named_parameters()}
    own, _ = weigher(sample, encoder_out, None, lprobs, TrainingState())
    w, _ = weigher(sample, encoder_out, None, lprobs, TrainingState(), params)
    assert not torch.allclose(w, own)
    mask = sample["target"].ne(PAD)
    assert w[mask].mean().item() == pytest.approx(1.0) and (w[~mask] == 0).all()
    (w * torch.arange(w.numel()).view_as(w)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
    assert all(p.grad is None for p in weigher.teacher.parameters())  # the teacher's own are untouched


def test_sentence_granularity_gives_every_token_its_sentence_mean():
    torch.manual_seed(0)  # the label embedding drawn below
    sample, encoder_out, lprobs = _batch()
    weigher = _weigher(granularity="sentence")
    with torch.no_grad():
        weigher.teacher.label_embed.weight.normal_()
    _, raw = weigher(sample, encoder_out, None, lprobs, TrainingState())
    mask = sample["target"].ne(PAD)
    for row in range(raw.size(0)):
        values = raw[row][mask[row]]
        assert torch.allclose(values, values[0].expand_as(values))


def test_eos_as_sentence_gives_eos_the_mean_of_its_sentence_words_and_leaves_them_alone():
    EOS = 2
    sample, encoder_out, lprobs = _batch()
    target = sample["target"]
    target[0, 1], target[1, -1], target[2, -1] = EOS, EOS, EOS  # </s> before the padding, or last
    target[2, :-1] = EOS  # a sentence of </s> only keeps the teacher's own weight
    torch.manual_seed(0)
    plain, weigher = _weigher(), _weigher(eos=EOS)
    with torch.no_grad():
        plain.teacher.label_embed.weight.normal_()
    weigher.load_state_dict(plain.state_dict())
    _, raw_plain = plain(sample, encoder_out, None, lprobs, TrainingState())
    w, raw = weigher(sample, encoder_out, None, lprobs, TrainingState())
    words = target.ne(PAD) & target.ne(EOS)
    assert torch.equal(raw[words], raw_plain[words])
    for row in (0, 1):
        assert raw[row][target[row].eq(EOS)].item() == pytest.approx(raw_plain[row][words[row]].mean().item())
    assert torch.equal(raw[2], raw_plain[2])
    assert w[target.ne(PAD)].mean().item() == pytest.approx(1.0)


def test_surface_loss_feature_is_the_token_nll_and_the_running_loss():
    sample, encoder_out, lprobs = _batch()
    weigher = _weigher(features=["loss", "progress"])
    dense = weigher.dense_features(encoder_out, None, lprobs, sample["target"], TrainingState(0.25, 3.0, 0.0))
    nll = -lprobs.gather(-1, sample["target"].unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(dense[..., 0], nll) and (dense[..., 1] == 3.0).all() and (dense[..., 2] == 0.25).all()


def test_the_teacher_stays_float32_when_the_criterion_is_cast_to_half():
    weigher = _weigher().half()
    assert all(p.dtype == torch.float32 for p in weigher.teacher.parameters())
    assert all(not p.requires_grad for p in weigher.teacher.parameters())


def _sgd(params, momentum=0.9):
    return ReweightSGD(ReweightSGDConfig(momentum=momentum, lr=[0.1]), params)


def test_recorder_attaches_micro_batches_to_each_recorded_step_and_round_trips():
    model = torch.nn.Linear(2, 1)
    optimizer = _sgd(model.parameters())
    recorder = StepRecorder(history_size=2, store_states=False, clip_norm=0.5)
    recorder.attach(optimizer, "--reweight-teacher deep")
    for update in range(3):
        model.zero_grad(set_to_none=True)
        for micro in range(2):
            first = recorder.starts_update(model)
            assert first == (micro == 0)
            recorder.on_micro_batch(update, {"id": torch.tensor([update, micro])}, False, first)
            model(torch.ones(1, 2)).sum().backward()
        optimizer.step()
        assert recorder.window() is None if update == 0 else len(recorder.window()) == 2
    window = recorder.window()
    assert [r.data.update_num for r in window] == [1, 2] and all(r.clip_norm == 0.5 for r in window)
    assert [s["id"].tolist() for s, _ in window[1].data.micro_batches] == [[2, 0], [2, 1]]
    restored = StepRecorder(2, False, 0.5)
    restored.load_state_dict(recorder.state_dict())
    restored.attach(_sgd(torch.nn.Linear(2, 1).parameters()), "--reweight-teacher deep")
    again = restored.window()
    assert [r.data.update_num for r in again] == [1, 2] and isinstance(again[0].data, ReplayData)
    assert torch.equal(again[1].data.micro_batches[1][0]["id"], torch.tensor([2, 1]))


def test_recorder_refuses_what_cannot_be_replayed():
    from fairseq_reweight.core.errors import ReweightConfigError

    with pytest.raises(ReweightConfigError, match="cannot undo steps in reverse"):
        StepRecorder(2, False, 0.0).attach(_sgd(torch.nn.Linear(2, 1).parameters(), momentum=0.0), "x")
    with pytest.raises(ReweightConfigError, match="needs --optimizer reweight_sgd"):
        StepRecorder(2, False, 0.0).attach(torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1), "x")
    StepRecorder(2, True, 0.0).attach(_sgd(torch.nn.Linear(2, 1).parameters(), momentum=0.0), "x")  # checkpoint: fine


def _driver(interval=3):
    cfg = SimpleNamespace(teacher_lr=0.01, reweight_backprop_steps=2, reweight_history="reverse", clip_norm=0.0,
                          reweight_interval=interval, reweight_teacher="deep", max_update=10, seed=1,
                          meta_valid_loss="criterion", teacher_clip_norm=0.0)
    return ReweightDriver(cfg, _weigher(), meta_valid_batches=lambda skip=0: iter(()))


def test_driver_meta_updates_before_updates_k_2k_once_each(monkeypatch):
    driver, model = _driver(), torch.nn.Linear(2, 1)
    optimizer = _sgd(model.parameters())
    calls = []
    monkeypatch.setattr(driver, "meta_update", lambda model, criterion, update_num: calls.append(update_num))
    for update in range(7):
        model.zero_grad(set_to_none=True)
        for _ in range(2):  # --update-freq 2
            driver.on_micro_batch(model, None, optimizer, update, {"id": torch.tensor([0])}, False)
            model(torch.ones(1, 2)).sum().backward()
        if update == 3:  # an fp16 overflow: the trainer zeroes the gradients and retries update 3
            model.zero_grad(set_to_none=True)
            driver.on_micro_batch(model, None, optimizer, update, {"id": torch.tensor([0])}, False)
        optimizer.step()
    assert calls == [3, 6]
    assert driver.training_state().progress == pytest.approx(0.6)
    assert len(driver.recorder.window()[-1].data.micro_batches) == 2


def test_driver_state_round_trips():
    driver = _driver()
    driver.num_meta_updates, driver.best_meta_valid_loss, driver.last_meta_update = 4, 1.5, 12
    driver.running_loss, driver.last_meta_stats = torch.tensor(2.0), {"meta_val_loss": 3.0}
    other = _driver()
    other.set_extra_state(driver.get_extra_state())
    assert (other.num_meta_updates, other.best_meta_valid_loss, other.last_meta_update) == (4, 1.5, 12)
    assert float(other.running_loss) == 2.0 and other.last_meta_stats == {"meta_val_loss": 3.0}
    assert other.training_state().best_valid == 1.5


def test_coalesced_all_reduce_flattens_per_dtype_and_bucket_and_copies_back():
    """One collective per dtype and per bucket of at most bucket_numel elements (a larger tensor
    alone), every tensor, also a non-contiguous one, reduced in place."""
    from fairseq_reweight.nmt.data_parallel import coalesced

    torch.manual_seed(0)
    tensors = [torch.randn(3, 4), torch.randn(5, dtype=torch.float64), torch.randn(4, 3).t(), torch.randn(30),
               torch.randn(2, dtype=torch.float64), torch.randn(6)]
    before = [t.clone() for t in tensors]
    calls = []
    coalesced(tensors, lambda flat: calls.append((flat.dtype, flat.numel())) or flat.mul_(2), bucket_numel=24)
    assert calls == [(torch.float32, 24), (torch.float64, 7), (torch.float32, 30), (torch.float32, 6)]
    for tensor, old in zip(tensors, before):
        torch.testing.assert_close(tensor, 2 * old, rtol=0, atol=0)


@pytest.mark.parametrize("change, kept", [
    ({}, True),
    ({"update_num": 3}, False),  # not the update before a meta-update (K = 3: updates 2, 5, ...)
    ({"one_micro_batch": False}, False),  # --update-freq > 1: the graph would be part of the update
    ({"ignore_grad": True}, False),
    ({"reweight_chunks": 2}, False),
    ({"reweight_backprop_steps": 1}, False),  # the newest step is the forward-mode oldest one
    ({"reweight_newest_step": "replay"}, False),
    ({"fp16": True}, False),  # FP16Optimizer steps fp32 masters, not the model's parameters
    ({"wrapped": True}, False),  # a data-parallel wrapper around the model
])
def test_the_update_before_a_meta_update_keeps_its_graph_only_where_it_is_the_whole_update(change, kept):
    driver, model = _driver(), torch.nn.Linear(2, 1)
    driver.cfg.reweight_newest_step = change.get("reweight_newest_step", "kept")
    driver.cfg.reweight_chunks = change.get("reweight_chunks", 1)
    driver.cfg.reweight_backprop_steps = change.get("reweight_backprop_steps", 2)
    optimizer = _sgd(model.parameters())
    if change.get("fp16"):
        optimizer = SimpleNamespace(fp32_optimizer=optimizer)
    wrapped = SimpleNamespace(module=model) if change.get("wrapped") else model
    assert driver.keeps_step(wrapped, optimizer, change.get("update_num", 5), change.get("ignore_grad", False),
                             change.get("one_micro_batch", True)) is kept
