"""RecordingSGD takes torch.optim.SGD's steps bit for bit and records them (float64, seeded)."""
import copy

import pytest
import torch
from torch import nn

from fairseq_reweight.core import RecordingSGD, StepRecord

LRS = [0.1, 0.05, 0.2, 0.07, 0.12, 0.03]


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()


def backward(model, step):
    torch.manual_seed(100 + step)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    ((model(x) - y) ** 2).mean().backward()


@pytest.mark.parametrize("foreach", [False, True])
def test_trajectory_is_bit_identical_to_torch_sgd_and_records_the_steps(foreach):
    reference = make_model()
    recorded = copy.deepcopy(reference)
    kwargs = dict(lr=LRS[0], momentum=0.9, weight_decay=0.01, foreach=foreach)
    sgd = torch.optim.SGD(reference.parameters(), **kwargs)
    recording = RecordingSGD(recorded.parameters(), history_size=len(LRS), store_states=True, **kwargs)
    assert all(float(v.abs().max()) == 0.0 for v in recording.momentum_buffers())
    for step, lr in enumerate(LRS):
        sgd.param_groups[0]["lr"] = lr
        recording.group["lr"] = lr
        before = [p.detach().clone() for p in reference.parameters()]
        buffers_before = [
            sgd.state[p]["momentum_buffer"].clone() if p in sgd.state else torch.zeros_like(p)
            for p in reference.parameters()
        ]
        for model, optimizer in ((reference, sgd), (recorded, recording)):
            optimizer.zero_grad()
            backward(model, step)
            optimizer.step()
        for p_ref, p_rec in zip(reference.parameters(), recorded.parameters()):
            assert torch.equal(p_ref, p_rec)
            assert torch.equal(sgd.state[p_ref]["momentum_buffer"], recording.state[p_rec]["momentum_buffer"])
        record = recording.history[-1]
        assert (record.lr, record.momentum, record.weight_decay) == (lr, 0.9, 0.01)
        assert all(torch.equal(a, b) for a, b in zip(record.params, before))
        assert all(torch.equal(a, b) for a, b in zip(record.momentum_buffers, buffers_before))
    assert [r.lr for r in recording.history] == LRS
    for buffer, p in zip(recording.momentum_buffers(), recorded.parameters()):
        assert buffer is recording.state[p]["momentum_buffer"]


def test_history_size_callback_and_closure():
    model = make_model()
    seen = []
    optimizer = RecordingSGD(model.parameters(), lr=0.1, momentum=0.5, history_size=2)
    optimizer.step_callback = seen.append

    for step in range(3):
        def closure(step=step):
            optimizer.zero_grad()
            backward(model, step)
            return step

        assert optimizer.step(closure) == step
    assert len(optimizer.history) == 2 and optimizer.history_size == 2
    assert list(optimizer.history) == seen[1:]
    assert all(isinstance(r, StepRecord) and r.params is None for r in seen)
    optimizer.set_history_size(1)
    assert list(optimizer.history) == seen[2:]
    optimizer.set_history_size(4)
    assert list(optimizer.history) == seen[2:] and optimizer.history_size == 4
    with pytest.raises(ValueError, match="history_size must be an integer >= 1, got 0"):
        optimizer.set_history_size(0)


def test_parameters_without_gradient_keep_their_momentum():
    model = make_model()
    optimizer = RecordingSGD(model.parameters(), lr=0.1, momentum=0.9)
    backward(model, 0)
    optimizer.step()
    last = list(model.parameters())[-1]
    velocity = optimizer.momentum_buffers()[-1].clone()
    before = last.detach().clone()
    optimizer.zero_grad(set_to_none=True)  # no backward: every grad is None
    optimizer.step()
    # torch.optim.SGD's add_(buf, alpha=-lr) may fuse the multiply-add (ATen's vectorised fmadd: one
    # rounding) where this expression rounds twice: apart by at most an ulp of each side's terms
    eps = torch.finfo(torch.float64).eps
    torch.testing.assert_close(last, before - 0.1 * (0.9 * velocity), rtol=eps,
                               atol=eps * float((0.1 * (0.9 * velocity)).abs().max()))


def test_refused_options():
    params = list(make_model().parameters())
    with pytest.raises(ValueError, match="nesterov"):
        RecordingSGD(params, lr=0.1, momentum=0.9, nesterov=True)
    with pytest.raises(ValueError, match="dampening=0, got 0.1"):
        RecordingSGD(params, lr=0.1, momentum=0.9, dampening=0.1)
    with pytest.raises(ValueError, match="maximize"):
        RecordingSGD(params, lr=0.1, momentum=0.9, maximize=True)
    with pytest.raises(ValueError, match="one parameter group"):
        RecordingSGD([{"params": params[:2]}, {"params": params[2:]}], lr=0.1)
    with pytest.raises(ValueError, match="history_size"):
        RecordingSGD(params, lr=0.1, history_size=0)
    optimizer = RecordingSGD(params, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="one parameter group"):
        optimizer.add_param_group({"params": [torch.zeros(2, requires_grad=True)]})
    optimizer.group["dampening"] = 0.5
    with pytest.raises(ValueError, match="dampening"):
        optimizer.step()
