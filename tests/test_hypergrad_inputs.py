"""The reverse loop's inputs and interfaces: one-line errors for what it cannot use, its options, the
optimizer protocol, and the attention backends it selects.
"""
import dataclasses

import pytest
import torch

from fairseq_reweight.core import (
    ADAM_REVERSE,
    SGD_REVERSE,
    HypergradOptions,
    ReversibleOptimizer,
    StepRecord,
    math_attention,
    reverse_hypergradient,
    select_window,
)
from hypergrad_problems import NUM_STEPS, MLPProblem


def test_window_selection_and_validation_errors():
    problem = MLPProblem(seed=7)
    optimizer = problem.train()
    with pytest.raises(ValueError, match="last 6 steps: only 5 were recorded"):
        optimizer.window(NUM_STEPS + 1)
    with pytest.raises(ValueError, match="at least 1 step"):
        select_window(optimizer.history, 0)
    theta_k = optimizer.student_params()
    v_k = optimizer.momentum_buffers()
    teacher_params = list(problem.teacher.parameters())
    window = optimizer.window(2)
    val_grad = problem.val_grad(theta_k)

    def call(mode="reverse", hvp="double-backward", **overrides):
        kwargs = dict(params=theta_k, momentum_buffers=v_k, teacher_params=teacher_params,
                      steps=window, loss_fn=problem.loss_fn, val_grad=val_grad)
        kwargs.update(overrides)
        return reverse_hypergradient(**kwargs, options=HypergradOptions(mode=mode, hvp=hvp))

    with pytest.raises(ValueError, match="steps is empty"):
        call(steps=[])
    with pytest.raises(ValueError, match="val_grad has 3 tensors but params has 4"):
        call(val_grad=val_grad[:3])
    with pytest.raises(ValueError, match="non-finite"):
        call(val_grad=[g * float("nan") for g in val_grad])
    with pytest.raises(ValueError, match=r"momentum_buffers\[0\] has shape \(6,\)"):
        call(momentum_buffers=[v_k[1]] + v_k[1:])
    with pytest.raises(ValueError, match="mode='reverse' needs momentum_buffers"):
        call(momentum_buffers=None)
    with pytest.raises(ValueError, match="mode must be"):
        call(mode="forward")
    with pytest.raises(ValueError, match="hvp must be one of 'double-backward', 'forward-over-reverse'"):
        call(hvp="forward")
    with pytest.raises(ValueError, match="does not require grad"):
        call(teacher_params=[w.detach() for w in teacher_params])
    with pytest.raises(ValueError, match="not a StepRecord"):
        call(steps=[{"lr": 0.1}])
    with pytest.raises(ValueError, match="has no stored params.*store_states=True"):
        call(steps=[StepRecord(lr=0.1, momentum=0.9, data=0)], mode="checkpoint")
    with pytest.raises(ValueError, match="scalar tensor.*gave \\(8,\\)"):
        call(loss_fn=lambda step, params: torch.zeros(8, dtype=torch.float64, requires_grad=True))


def test_math_attention_restores_the_callers_backends():
    before = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
              torch.backends.cuda.math_sdp_enabled())
    try:
        torch.backends.cuda.enable_flash_sdp(False)  # the caller's own choice
        torch.backends.cuda.enable_mem_efficient_sdp(True)
        with math_attention():
            assert torch.backends.cuda.math_sdp_enabled()
            assert not torch.backends.cuda.flash_sdp_enabled()
            assert not torch.backends.cuda.mem_efficient_sdp_enabled()
        assert not torch.backends.cuda.flash_sdp_enabled()
        assert torch.backends.cuda.mem_efficient_sdp_enabled()
        with pytest.raises(RuntimeError, match="inside"):
            with math_attention():
                raise RuntimeError("inside")
        assert not torch.backends.cuda.flash_sdp_enabled()
        assert torch.backends.cuda.mem_efficient_sdp_enabled()
    finally:
        torch.backends.cuda.enable_flash_sdp(before[0])
        torch.backends.cuda.enable_mem_efficient_sdp(before[1])
        torch.backends.cuda.enable_math_sdp(before[2])


def test_options_are_checked_when_made_and_cannot_change():
    with pytest.raises(ValueError, match="mode must be one of 'checkpoint', got 'reverse'"):
        HypergradOptions(optimizer=ADAM_REVERSE)
    with pytest.raises(ValueError, match="hvp must be one of"):
        HypergradOptions(hvp="forward")
    options = HypergradOptions(mode="checkpoint", optimizer=ADAM_REVERSE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.mode = "reverse"
    assert HypergradOptions() == HypergradOptions(mode="reverse", optimizer=SGD_REVERSE, hvp="double-backward")


def test_both_optimizers_implement_the_reversible_optimizer_protocol():
    members = [name for name in vars(ReversibleOptimizer) if not name.startswith("_")] + ["modes"]
    assert {"check_step", "gradient_adjoint", "propagate", "rewind_state", "apply"} <= set(members)
    for optimizer in (SGD_REVERSE, ADAM_REVERSE):
        assert isinstance(optimizer, ReversibleOptimizer)
        for name in members:
            assert callable(getattr(optimizer, name)) or name == "modes", (type(optimizer).__name__, name)
    assert not isinstance(object(), ReversibleOptimizer)
