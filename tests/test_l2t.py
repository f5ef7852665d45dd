"""--reweight-teacher l2t: L2T-data (a keep/drop policy trained by REINFORCE), the paper's Table 7 baseline."""
import copy
import csv
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from conftest import REPO
from fairseq_helpers import REWEIGHT, TINY_TRANSFORMER, inner_stats, run_train
from fairseq_reweight.core.errors import ReweightConfigError
from fairseq_reweight.core.teacher import Teacher
from fairseq_reweight.nmt import l2t, noise_monitor
from fairseq_reweight.nmt.task import ReweightTranslationConfig, check_options

COMMON = TINY_TRANSFORMER + REWEIGHT + ["--lr", "0.05", "--momentum", "0.9", "--label-smoothing", "0.1",
                                        "--update-freq", "2", "--no-epoch-checkpoints"]
L2T = ["--reweight-teacher", "l2t", "--reweight-interval", "2", "--teacher-lr", "0.05",
       "--meta-valid-max-tokens", "300"]
FEATURES = ["progress", "loss", "best-valid", "prediction", "margin"]  # 6 columns
PAD = 1


def _cfg(**overrides):
    return ReweightTranslationConfig(**{"reweight_teacher": "l2t", "max_update": 10, "seed": 1, **overrides})


def _driver(**overrides):
    return l2t.L2TDriver(_cfg(**overrides), FEATURES, PAD, meta_valid_batches=None)


def _log_likelihood_directly(policy, features, actions):
    """sum_i log pi(a_i | s_i) from the probabilities, as a function of fresh parameter leaves."""
    leaves = {name: p.detach().clone().requires_grad_() for name, p in policy.named_parameters()}
    p = torch.func.functional_call(policy, leaves, (features, None))
    return (actions * p.log() + (1 - actions) * (1 - p).log()).sum(), list(leaves.values())


def test_reinforce_gradient_is_the_advantage_times_the_score_function():
    torch.manual_seed(0)
    policy = Teacher(6, 0, hidden_layers=1, hidden_dim=8).double()
    with torch.no_grad():
        for p in policy.parameters():
            p.normal_(0.0, 0.5)
    policy.requires_grad_(False)
    features, actions = torch.randn(10, 6, dtype=torch.float64), (torch.rand(10) < 0.7).double()
    reward, baseline = 0.3, 0.1
    grads = l2t.reinforce_gradient(policy, features, actions, reward - baseline)
    log_pi, leaves = _log_likelihood_directly(policy, features, actions)
    expected = torch.autograd.grad((reward - baseline) * log_pi, leaves)
    assert all(torch.allclose(g, e, rtol=1e-10, atol=1e-14) for g, e in zip(grads, expected))
    assert any(g.abs().sum() > 0 for g in grads)
    assert not any(p.requires_grad for p in policy.parameters())  # never the student optimizer's


def test_episode_step_is_adam_on_the_policy_gradient_with_a_moving_baseline():
    torch.manual_seed(1)
    driver = _driver(teacher_lr=0.01)
    features, actions = torch.randn(12, 6), (torch.rand(12) < 0.9).float()
    start = copy.deepcopy(driver.policy)
    assert driver.learn(features, actions, 0.5) and driver.baseline == 0.5  # the first episode sets b
    assert all(torch.equal(a, b) for a, b in zip(start.parameters(), driver.policy.parameters()))
    assert driver.learn(features, actions, 0.8)  # R - b = 0.3, then b = 0.9 * 0.5 + 0.1 * 0.8
    assert driver.baseline == pytest.approx(0.53)
    log_pi, leaves = _log_likelihood_directly(start, features, actions)
    grads = torch.autograd.grad(0.3 * log_pi, leaves)
    reference = torch.optim.Adam(start.parameters(), lr=0.01)
    for p, g in zip(start.parameters(), grads):
        p.grad = -g  # ascent on the expected reward
    reference.step()
    for a, b in zip(start.parameters(), driver.policy.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-7)
    assert not torch.equal(start.bias, torch.tensor(l2t.INITIAL_LOGIT))


def _batch(rows=200, length=6, vocab=20):
    torch.manual_seed(2)
    target = torch.randint(4, vocab, (rows, length))
    lengths = torch.randint(1, length + 1, (rows,))
    target[torch.arange(length).unsqueeze(0) >= lengths.unsqueeze(1)] = PAD
    return {"target": target}, torch.log_softmax(torch.randn(rows, length, vocab), -1)


def test_actions_are_0_1_per_sentence_and_the_weights_normalised():
    driver = _driver()
    sample, lprobs = _batch()
    mask = sample["target"].ne(PAD)
    assert torch.allclose(driver.keep_probabilities(lprobs, sample["target"])[1], torch.tensor(0.9))  # the start
    driver.generator.manual_seed(0)
    w, raw = driver.act(sample, None, None, lprobs)
    actions = raw[:, 0]
    assert set(actions.tolist()) == {0.0, 1.0} and 0.8 < actions.mean().item() < 0.97
    assert torch.equal(raw, actions.unsqueeze(1) * mask)  # every token of a sentence: its action; 0 on padding
    assert torch.allclose(w, raw * mask.sum() / raw.sum()) and w.sum().item() == pytest.approx(mask.sum().item())
    (update, features, recorded), = driver.records
    assert torch.equal(recorded, actions) and features.shape == (200, 6)
    driver.generator.manual_seed(0)
    assert torch.equal(driver.act(sample, None, None, lprobs)[1], raw)  # its own generator, seeded
    with torch.no_grad():
        driver.policy.bias.fill_(-50.0)  # drops everything: the micro-batch contributes nothing, no NaN
    w, raw = driver.act(sample, None, None, lprobs)
    assert raw.sum() == 0 and torch.equal(w, torch.zeros_like(w))


def _model(directory):
    return torch.load(directory / "checkpoint_last.pt")["model"]


def test_a_policy_that_keeps_everything_is_the_baseline_bit_for_bit(tiny_data_bin, tmp_path, monkeypatch):
    monkeypatch.setattr(l2t, "INITIAL_LOGIT", 50.0)  # p = 1 in float32, and its gradient 0: it stays there
    flags = COMMON + ["--max-update", "6"]
    base = inner_stats(run_train(tiny_data_bin, str(tmp_path / "base"), flags + ["--reweight-teacher", "none"]))
    keep = inner_stats(run_train(tiny_data_bin, str(tmp_path / "keep"), flags + L2T))
    assert len(base) == len(keep) == 6 and float(keep[-1]["l2t_keep_rate"]) == 1.0
    a, b = _model(tmp_path / "base"), _model(tmp_path / "keep")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the validation forwards disturb no dropout draw


def _policy_state(directory):
    state = torch.load(directory / "checkpoint_last.pt", weights_only=False)
    params = {k: v for k, v in state["criterion"].items() if k.startswith("reweight.policy.")}
    return state["model"], params, state["criterion"]["reweight._extra_state"]


def _assert_same(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    elif torch.is_tensor(a):
        assert torch.equal(a, b)
    else:
        assert a == b or (a != a and b != b)


def test_episodes_learn_log_and_resume_bit_for_bit(tiny_data_bin, tmp_path):
    noisy = set(range(0, 300, 4))
    sidecar = tmp_path / "train.noise"
    sidecar.write_text("".join(f"{int(i in noisy)}\n" for i in range(300)))
    # no progress feature here: it is update / --max-update, which the stopped run's smaller --max-update changes
    flags = COMMON + L2T + ["--reweight-noise-sidecar", str(sidecar), "--reweight-noise-auc-interval", "1",
                            "--teacher-features", "loss,best-valid,prediction,margin"]
    episodes, scored = [], []  # what each episode's end learned from; the noise monitor's sentence scores
    learn, score_sentences = l2t.L2TDriver.learn, noise_monitor.score_sentences

    def learning(self, features, actions, reward, stats=None):
        episodes.append((features.clone(), actions.clone(), reward))
        return learn(self, features, actions, reward, stats)

    def scoring(*args, **kwargs):
        scored.append(score_sentences(*args, **kwargs))
        return scored[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(l2t.L2TDriver, "learn", learning)
        patch.setattr(noise_monitor, "score_sentences", scoring)
        full = inner_stats(run_train(tiny_data_bin, str(tmp_path / "full"), flags + ["--max-update", "9"]))
    # episodes end before updates 2, 4, 6 and 8 (0-based): logged from the third update on, each line
    # showing the latest episode's figures (to 4 decimals: half a unit, 5e-5)
    assert len(full) == 9 and "l2t_reward" not in full[1] and all("l2t_reward" in s for s in full[2:])
    shown = [(line - 2) // 2 for line in range(2, 9)]  # the episode (0-based) each line from the third shows
    assert len(episodes) == 4
    # an episode: the sentences of its 2 updates, one 0/1 action each; its keep rate their mean
    for k, (_, actions, _) in enumerate(episodes):
        assert len(actions) == sum(int(float(full[u]["bsz"])) for u in (2 * k, 2 * k + 1))
        assert set(actions.tolist()) <= {0.0, 1.0}
    assert [float(s["l2t_keep_rate"]) for s in full[2:]] == pytest.approx(
        [episodes[k][1].mean().item() for k in shown], rel=0, abs=5e-5 + 1e-12)
    assert [float(s["l2t_reward"]) for s in full[2:]] == pytest.approx(
        [episodes[k][2] for k in shown], rel=0, abs=5e-5 + 1e-12)
    # the policy is REINFORCE on those episodes: the first sets the baseline b, each later one an Adam step
    # (--teacher-lr 0.05) along (R - b) grad log pi (reinforce_gradient, checked above against autograd of
    # log pi), then b <- 0.9 b + 0.1 R; the same float32 kernels on the same tensors: bit for bit
    reference = Teacher(episodes[0][0].shape[1], 0)
    torch.nn.init.constant_(reference.bias, l2t.INITIAL_LOGIT)
    reference.requires_grad_(False)
    adam, baseline, baselines, gnorms = torch.optim.Adam(reference.parameters(), lr=0.05), None, [], {}
    for k, (features, actions, reward) in enumerate(episodes):
        if baseline is None:
            baseline = reward
        else:
            grads = l2t.reinforce_gradient(reference, features, actions, reward - baseline)
            for p, g in zip(reference.parameters(), grads):
                p.grad = -g  # ascent on the expected reward
            adam.step()
            gnorms[k] = torch.cat([g.flatten() for g in grads]).double().norm().item()
            baseline = 0.9 * baseline + 0.1 * reward
        baselines.append(baseline)
    assert [float(s["l2t_baseline"]) for s in full[2:]] == pytest.approx([baselines[k] for k in shown],
                                                                        rel=0, abs=5e-5 + 1e-12)
    # the gradient's norm from the first step on (the norm of float32 tensors: 1e-6 for its own round-off)
    assert [k for s, k in zip(full[2:], shown) if "teacher_gnorm" in s] == [k for k in shown if k in gnorms]
    assert [float(s["teacher_gnorm"]) for s in full[2:] if "teacher_gnorm" in s] == pytest.approx(
        [gnorms[k] for k in shown if k in gnorms], rel=0, abs=5e-5 + 1e-6)
    model, policy, extra = _policy_state(tmp_path / "full")
    assert extra["num_episodes"] == 4 and extra["baseline"] == pytest.approx(baselines[-1], rel=1e-12, abs=0)
    assert [u for u, _, _ in extra["records"]] == [8, 8]  # the running episode: update 8's two micro-batches
    for name, value in reference.named_parameters():
        assert torch.equal(policy[f"reweight.policy.{name}"], value), name
    assert policy["reweight.policy.bias"].item() != pytest.approx(l2t.INITIAL_LOGIT, abs=1e-6)
    assert extra["optimizer"]["state"][0]["step"] == 3  # the first episode only sets the baseline
    # the noise AUC logged at each episode's end is sklearn's on the keep probabilities the monitor scored
    # (all 300 sentences); the first, before any policy step, gives every token one probability, 0.9
    noise = np.array([int(i in noisy) for i in range(300)]) == 1
    figures = [[roc_auc_score(noise[s.ids], -s.mean_weight), s.mean_weight[noise[s.ids]].mean(),
                s.mean_weight[~noise[s.ids]].mean()] for s in scored]
    assert len(figures) == 4 and all(len(s.ids) == 300 for s in scored)
    first = {float(p) for w in scored[0].weights for p in w}
    assert len(first) == 1 and first.pop() == pytest.approx(0.9, rel=1e-7)
    assert figures[0][0] == 0.5  # equal weights, averaged in float64: no tie broken by round-off
    logged = [[float(s[key]) for key in ("noise_auc", "noise_w_noisy", "noise_w_clean")] for s in full[2:]]
    assert logged == [pytest.approx(figures[k], rel=0, abs=5e-5 + 1e-12) for k in shown]
    # stopped mid-episode (after update 4 of the episode 4-5) and resumed: the same run
    run_train(tiny_data_bin, str(tmp_path / "cut"), flags + ["--max-update", "5"])
    assert [u for u, _, _ in _policy_state(tmp_path / "cut")[2]["records"]] == [4, 4]
    run_train(tiny_data_bin, str(tmp_path / "cut"), flags + ["--max-update", "9"])
    cut_model, cut_policy, cut_extra = _policy_state(tmp_path / "cut")
    _assert_same(policy, cut_policy)
    _assert_same({k: v for k, v in extra.items() if k != "last_stats"},
                 {k: v for k, v in cut_extra.items() if k != "last_stats"})
    _assert_same(model, cut_model)


@pytest.mark.parametrize("overrides, message", [
    (dict(teacher_features="encoder,loss"), "takes surface features only"),
    (dict(reweight_features_grad=True), "--reweight-features-grad has no effect"),
    (dict(meta_valid_params="embed"), "--meta-valid-params restricts"),
    (dict(reweight_interval=0), "--reweight-interval must be >= 1"),
    (dict(teacher_lr=0.0), "--teacher-lr must be > 0"),
    (dict(max_update=0), "progress needs --max-update > 0"),
])
def test_what_makes_no_sense_is_refused(overrides, message):
    with pytest.raises(ReweightConfigError, match=message):
        check_options(_cfg(**overrides))
    check_options(_cfg(reweight_backprop_steps=5, reweight_interval=2))  # B has no role here: not refused


def test_one_line_error_and_gradcheck_refuses_l2t(tiny_data_bin, tmp_path):
    from fairseq_reweight.cli.gradcheck import cli_main

    with pytest.raises(ReweightConfigError, match="not l2t, which learns by REINFORCE"):
        cli_main([tiny_data_bin] + COMMON + ["--reweight-teacher", "l2t"])
    args = [tiny_data_bin] + COMMON + L2T + ["--teacher-features", "label", "--no-save"]
    result = subprocess.run([sys.executable, "-m", "fairseq_cli.train"] + args, cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, env=dict(os.environ, PYTHONPATH=REPO))
    assert result.returncode != 0 and "--reweight-teacher l2t takes surface features only" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_experiment_micro_l2t(tmp_path):
    """examples/run_experiment.py's l2t method end to end, on noisy data with its sidecar (as test_filters')."""
    from conftest import binarize, write_parallel_corpus

    text = write_parallel_corpus(str(tmp_path / "text"))
    targets = (tmp_path / "text" / "train.en").read_text().splitlines()
    rng = np.random.RandomState(1)
    noisy, shuffled = rng.rand(len(targets)) < 0.3, rng.permutation(len(targets))
    (tmp_path / "text" / "train.en").write_text("".join(
        (targets[shuffled[i]] if noisy[i] else line) + "\n" for i, line in enumerate(targets)))
    data = binarize(text, str(tmp_path / "bin"))
    (tmp_path / "bin" / "train.noise").write_text("".join(f"{int(v)}\n" for v in noisy))
    out = tmp_path / "experiment"
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=REPO,
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    result = subprocess.run([sys.executable, f"{REPO}/examples/run_experiment.py", "--preset", "micro", "--out",
                             str(out), "--data", f"noisy={data}", "--methods", "l2t"],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["method"] for r in rows] == ["l2t"] and "--reweight-teacher l2t" in rows[0]["command"]
    log = (out / "logs" / "noisy-l2t-seed1.log").read_text()
    assert "l2t_reward" in log
    # the fine-tune's training time per update, from its log: each epoch summary's new updates over its ups
    seconds = updates = 0
    for line in log.splitlines():
        if "| train | epoch" in line:
            total = int(re.search(r"\| num_updates (\d+)", line).group(1))
            seconds += (total - updates) / float(re.search(r"\| ups ([0-9.]+)", line).group(1))
            updates = total
    assert updates == 6 and "--max-update 6" in rows[0]["command"]  # the micro preset
    assert float(rows[0]["sec_per_update"]) == pytest.approx(seconds / updates, rel=0, abs=5e-5)
    # the sidecar is passed, but the AUC is due every 10th episode (the default interval) and this run ends
    # fewer: none logged, none made up
    assert "--reweight-noise-sidecar" in rows[0]["command"] and rows[0]["noise_auc"] == ""
    assert not re.search(r"\| noise_auc ", log)
