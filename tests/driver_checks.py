"""Checks shared by the driver tests: a run's checkpointed student and teacher, the teacher's Adam
steps seen through ``ReweightDriver.meta_update_hook``, logs compared to their printed precision, and
a stopped-and-resumed run against an uninterrupted one."""
import contextlib
import copy
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from fairseq_helpers import run_train


def run_fairseq_train(args, cwd):
    """``python -m fairseq_cli.train ARGS`` in a subprocess (the repository on its path)."""
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "fairseq_cli.train"] + args, cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def load_state(path):
    state = torch.load(path)
    return state["model"], {k: v for k, v in state["criterion"].items() if k.startswith("reweight.weigher.teacher.")}


ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults: the teacher's optimizer


def record_teacher_steps(monkeypatch):
    """Every meta-update, seen through the driver's ``meta_update_hook``: (the update it comes before,
    the teacher's parameters and Adam state before it, and after it)."""
    from fairseq_reweight.nmt.driver import ReweightDriver

    steps = []

    def snapshot(driver):
        return {name: p.detach().clone() for name, p in driver.teacher.named_parameters()}, copy.deepcopy(
            driver.teacher_optimizer.state_dict()["state"])

    @contextlib.contextmanager
    def hook(driver):
        before = snapshot(driver)
        yield
        steps.append((driver.update_num, before, snapshot(driver)))

    monkeypatch.setattr(ReweightDriver, "meta_update_hook", staticmethod(hook))
    return steps


def check_teacher_steps(stats, steps, updates, lr):
    """The recorded meta-updates came before ``updates`` (0-based) and each stepped the teacher by
    Adam (``lr``, default betas) on a gradient, recovered from Adam's first moment
    (``m <- b1 m + (1 - b1) g``), whose norm is the ``teacher_gnorm`` logged from that update on.

    Tolerances: the recovery undoes two float32 roundings (relative ~1e-6 of the moments); a parameter
    change is a float32 difference of values up to ~``len(updates) * lr`` (an ulp ~2e-9); the logged
    norm is rounded to 4 decimals (half a unit, 5e-5)."""
    b1, b2 = ADAM_BETAS
    assert [update for update, _, _ in steps] == updates
    expected = [None] * len(stats)
    for k, (update, (before, state_before), (after, state)) in enumerate(steps, 1):
        before, after, grads = list(before.values()), list(after.values()), []  # Adam's order: parameters()
        for i, (p0, p1) in enumerate(zip(before, after)):
            m0, v0 = (state_before[i]["exp_avg"], state_before[i]["exp_avg_sq"]) if i in state_before else (0.0, 0.0)
            m, v = state[i]["exp_avg"], state[i]["exp_avg_sq"]
            assert float(state[i]["step"]) == k
            g = (m - b1 * m0) / (1 - b1)
            torch.testing.assert_close(v, b2 * v0 + (1 - b2) * g * g, rtol=1e-4, atol=1e-30)
            adam = lr / (1 - b1**k) * m / ((v / (1 - b2**k)).sqrt() + ADAM_EPS)
            torch.testing.assert_close(p1 - p0, -adam, rtol=1e-4, atol=1e-8)
            grads.append(g)
        if k == 1:  # from zero moments Adam moves each parameter by lr * g / (|g| + eps): lr where |g| >> eps
            # (rel 1e-4: eps / |g| of the largest |g|, which is far above 1e-4 in these runs)
            assert max(float((p1 - p0).abs().max()) for p0, p1 in zip(before, after)) == pytest.approx(lr, rel=1e-4)
        norm = float(torch.cat([g.flatten() for g in grads]).double().norm())
        expected[update:] = [norm] * (len(stats) - update)
    logged = [float(s["teacher_gnorm"]) if "teacher_gnorm" in s else None for s in stats]
    assert [x is None for x in logged] == [x is None for x in expected]
    assert [x for x in logged if x is not None] == pytest.approx([x for x in expected if x is not None],
                                                                 rel=0, abs=5e-5 + 1e-6)


def assert_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# a unit of the last logged decimal: fairseq rounds the loss to 3 decimals, the driver its statistics
# to 4 (metrics.log_scalar's round)
LOGGED_UNITS = {"loss": 1e-3, "teacher_gnorm": 1e-4, "meta_val_loss": 1e-4}


def assert_logged_close(a, b):
    """Per-update (loss, teacher_gnorm, meta_val_loss) logs of two runs whose arithmetic differs (float32
    round-off, not bit for bit): a round-off difference can move a value across a rounding boundary, by
    one unit of its last logged decimal (1.5 units: parsing the decimal strings adds binary noise)."""
    assert len(a) == len(b)
    for update, (x, y) in enumerate(zip(a, b)):
        for name, u, v in zip(("loss", "teacher_gnorm", "meta_val_loss"), x, y):
            assert (u is None) == (v is None), (update, name, u, v)
            if u is not None:
                assert float(u) == pytest.approx(float(v), rel=0, abs=1.5 * LOGGED_UNITS[name]), (update, name)


def check_resume_is_bit_identical(data, tmp_path, flags, stop=4, end=10):
    """``end`` updates in one run against ``stop``, stopped (by default after the meta-update at 3,
    with updates 3 and 4 still to be replayed at 6) and resumed to ``end``: the same student and
    teacher, bit for bit. Returns the uninterrupted run's log."""
    full = run_train(data, str(tmp_path / "full"), flags + ["--max-update", str(end)])
    run_train(data, str(tmp_path / "cut"), flags + ["--max-update", str(stop)])
    run_train(data, str(tmp_path / "cut"), flags + ["--max-update", str(end)])
    full_model, full_teacher = load_state(tmp_path / "full" / "checkpoint_last.pt")
    cut_model, cut_teacher = load_state(tmp_path / "cut" / "checkpoint_last.pt")
    # a meta-update before every K-th update (K = 3), each one Adam step of every teacher parameter
    extra = torch.load(tmp_path / "full" / "checkpoint_last.pt")["criterion"]["reweight._extra_state"]
    meta_updates = len(range(3, end, 3))
    assert extra["num_meta_updates"] == meta_updates
    assert [float(s["step"]) for s in extra["teacher_optimizer"]["state"].values()] == [meta_updates] * len(full_teacher)
    assert_equal(full_teacher, cut_teacher)
    assert_equal(full_model, cut_model)
    return full
