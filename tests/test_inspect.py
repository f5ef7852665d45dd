"""Teacher inspection: the inspect command, the in-training noise_auc metric and the influence command
(the scores themselves, core.metrics: test_noise_metrics.py)."""
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

import fairseq_reweight  # noqa: F401  (registers the components)
from conftest import REPO, binarize, write_parallel_corpus
from fairseq_helpers import REWEIGHT, TINY_TRANSFORMER, inner_stats, run_train
from fairseq_reweight.cli import influence as influence_cmd
from fairseq_reweight.cli import inspect_teacher as inspect_cmd
from fairseq_reweight.core.errors import ReweightConfigError
from fairseq_reweight.core.metrics import read_noise_sidecar, roc_auc_low_weight_noisy
from fairseq_reweight.nmt import noise_monitor
from fairseq_reweight.nmt.noise_monitor import NoiseAucMonitor

TRAIN = TINY_TRANSFORMER + REWEIGHT + [
    "--lr", "0.05", "--momentum", "0.9", "--label-smoothing", "0.1", "--clip-norm", "1.0",
    "--reweight-interval", "3", "--reweight-backprop-steps", "2", "--teacher-lr", "0.05",
    "--no-epoch-checkpoints", "--meta-valid-max-tokens", "300", "--max-update", "7",
]
N_TRAIN = 300


# -- a tiny noisy corpus and checkpoints --------------------------------------------------------------
@pytest.fixture(scope="module")
def noisy_bin(tmp_path_factory):
    """The conftest corpus with the targets of a quarter of the training pairs replaced by random
    words of the target vocabulary (noisy = 1 in train.noise)."""
    root = tmp_path_factory.mktemp("noisy")
    text = write_parallel_corpus(str(root / "text"), n_train=N_TRAIN)
    rng = random.Random(7)
    with open(os.path.join(text, "train.en")) as f:
        targets = f.read().splitlines()
    vocabulary = sorted({word for line in targets for word in line.split()})
    noisy = [int(rng.random() < 0.25) for _ in targets]
    targets = [" ".join(rng.choice(vocabulary) for _ in line.split()) if bad else line for line, bad in zip(targets, noisy)]
    with open(os.path.join(text, "train.en"), "w") as f:
        f.write("\n".join(targets) + "\n")
    data_bin = binarize(text, str(root / "bin"))
    with open(os.path.join(data_bin, "train.noise"), "w") as f:
        f.write("".join(f"{bad}\n" for bad in noisy))
    return data_bin


@pytest.fixture(scope="module")
def trained(noisy_bin, tmp_path_factory):
    """The same run twice: with --reweight-noise-sidecar (AUC at every meta-update; "scored": the sentence
    scores the monitor computed, in order) and without."""
    root = tmp_path_factory.mktemp("runs")
    sidecar = os.path.join(noisy_bin, "train.noise")
    scored, score_sentences = [], noise_monitor.score_sentences

    def recording(*args, **kwargs):
        scored.append(score_sentences(*args, **kwargs))
        return scored[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(noise_monitor, "score_sentences", recording)
        logs = {"with": run_train(noisy_bin, str(root / "with"), TRAIN + [
            "--reweight-noise-sidecar", sidecar, "--reweight-noise-auc-interval", "1"])}
    logs["without"] = run_train(noisy_bin, str(root / "without"), TRAIN)
    return {"logs": logs, "scored": scored, "with": str(root / "with" / "checkpoint_last.pt"),
            "without": str(root / "without" / "checkpoint_last.pt")}


def _read_tsv(path):
    with open(path, encoding="utf-8") as f:
        header, *rows = [line.rstrip("\n").split("\t") for line in f]
    return header, rows


def test_training_logs_noise_auc_and_is_unchanged_by_it(trained, noisy_bin):
    stats = inner_stats(trained["logs"]["with"])
    assert len(stats) == 7
    assert all("noise_auc" not in s for s in stats[:3])  # before the first meta-update (at update 3)
    with_auc = [s for s in stats if "noise_auc" in s]
    assert len(with_auc) == 4  # updates 4..7, shown in every line after the meta-update
    assert float(with_auc[0]["noise_auc"]) != float(with_auc[-1]["noise_auc"])  # re-evaluated at update 6
    # the figures of the two evaluations (updates 4-6 show the first), by sklearn from the scored sentences'
    # weights and the sidecar, are those logged (to 4 decimals)
    noisy = np.loadtxt(os.path.join(noisy_bin, "train.noise"), dtype=int) == 1
    figures = [[roc_auc_score(noisy[s.ids], -s.mean_weight), s.mean_weight[noisy[s.ids]].mean(),
                s.mean_weight[~noisy[s.ids]].mean()] for s in trained["scored"]]
    assert len(figures) == 2 and len(trained["scored"][0].ids) == N_TRAIN
    logged = [float(s[key]) for s in with_auc for key in ("noise_auc", "noise_w_noisy", "noise_w_clean")]
    assert logged == pytest.approx(figures[0] * 3 + figures[1], rel=0, abs=5e-5 + 1e-12)
    plain = inner_stats(trained["logs"]["without"])
    assert [s["loss"] for s in stats] == [s["loss"] for s in plain]
    a, b = torch.load(trained["with"]), torch.load(trained["without"])
    for part in ("model", "criterion"):
        tensors = {k: v for k, v in a[part].items() if torch.is_tensor(v)}
        assert tensors.keys() == {k for k, v in b[part].items() if torch.is_tensor(v)}
        for key, value in tensors.items():
            assert torch.equal(value, b[part][key]), key


def test_inspect_writes_tables_plots_and_the_auc(trained, noisy_bin, tmp_path, capsys):
    out = tmp_path / "out"
    result = inspect_cmd.main([noisy_bin, "--path", trained["with"], "--out", str(out), "--cpu"])
    printed = capsys.readouterr().out
    assert "ROC AUC of 'low weight => noisy'" in printed and str(out / "weights.tsv") in printed
    noisy = read_noise_sidecar(os.path.join(noisy_bin, "train.noise"))

    header, rows = _read_tsv(out / "weights.tsv")
    assert header == ["id", "noisy", "n_tokens", "mean_weight", "mean_loss", "mean_nll", "src", "tgt"]
    assert [int(r[0]) for r in rows] == list(range(N_TRAIN))
    assert [int(r[1]) for r in rows] == noisy.tolist()
    token_header, token_rows = _read_tsv(out / "tokens.tsv")
    assert token_header == ["id", "position", "token", "weight", "loss", "nll"]
    assert len(token_rows) == sum(int(r[2]) for r in rows) == result["num_tokens"]
    first = rows[0]
    assert len(first[7].split()) + 1 == int(first[2])  # target words + eos
    tokens0 = [r for r in token_rows if r[0] == "0"]
    assert [r[2] for r in tokens0] == first[7].split() + ["</s>"]
    assert float(first[3]) == pytest.approx(np.mean([float(r[3]) for r in tokens0]), abs=2e-6)
    tokens = {}  # every sentence's weight, loss and NLL are the means of its tokens' (6 printed decimals each)
    for r in token_rows:
        tokens.setdefault(r[0], []).append([float(x) for x in r[3:6]])
    np.testing.assert_allclose([[float(x) for x in r[3:6]] for r in rows], [np.mean(tokens[r[0]], 0) for r in rows],
                               rtol=0, atol=2e-6)

    weights = np.array([float(r[3]) for r in rows])
    summary = result["summary"]
    assert summary.auc == pytest.approx(roc_auc_score(noisy, -weights), abs=1e-4)  # from weights rounded to 6 decimals
    assert (summary.num_noisy, summary.num_clean) == (int(noisy.sum()), N_TRAIN - int(noisy.sum()))
    assert (out / "summary.txt").read_text().count("ROC AUC") == 1

    from matplotlib.image import imread
    for name in inspect_cmd.PLOT_NAMES:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", name
        image = imread(str(out / name))
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert image[..., :3].std() > 0.01  # something was drawn


def test_weights_match_a_hand_computed_teacher_and_do_not_depend_on_batching(trained, noisy_bin, tmp_path):
    loaded = inspect_cmd.load_teacher_checkpoint(trained["with"], noisy_bin, use_cuda=False)
    teacher = loaded.driver.teacher
    assert loaded.driver.weigher.features == ["encoder", "label"] and teacher.mlp is None
    loaded.task.load_dataset("train")
    dataset = loaded.task.dataset("train")
    sample = dataset.collater([dataset[5]])
    model = loaded.model
    with torch.no_grad():
        encoder_out = model.encoder(sample["net_input"]["src_tokens"], src_lengths=sample["net_input"]["src_lengths"])
        pooled = encoder_out["encoder_out"][0][:, 0].mean(0)  # S x B x C, one sentence: no padding
        features = F.layer_norm(pooled, pooled.shape)
        target = sample["target"][0]
        expected = torch.sigmoid(teacher.feature_proj(features) + teacher.label_embed(target).squeeze(-1) + teacher.bias)
        net_output = model(**sample["net_input"])
        nll = -model.get_normalized_probs(net_output, log_probs=True)[0].gather(-1, target[:, None]).squeeze(-1)

    runs = {}
    for max_tokens in ("4096", "40"):  # one batch with much padding / many small batches
        out = tmp_path / max_tokens
        inspect_cmd.main([noisy_bin, "--path", trained["with"], "--out", str(out), "--cpu",
                              "--max-tokens", max_tokens, "--max-sentences", "60", "--seed", "3"])
        runs[max_tokens] = _read_tsv(out / "tokens.tsv")[1]
    assert [r[:3] for r in runs["4096"]] == [r[:3] for r in runs["40"]]
    # 6 printed decimals (2 x 5e-7, in atol) of float32 values from products of other shapes, which
    # differ by a few ulps (3 seen on losses in [4, 8), whose ulp is 4.8e-7): up to 8 ulps allowed
    for column in (3, 4):
        np.testing.assert_allclose([float(r[column]) for r in runs["4096"]], [float(r[column]) for r in runs["40"]],
                                   rtol=8 * np.finfo(np.float32).eps, atol=2e-6)
    assert len({r[0] for r in runs["4096"]}) == 60

    inspect_cmd.main([noisy_bin, "--path", trained["with"], "--out", str(tmp_path / "all"), "--cpu",
                          "--max-tokens", "4096"])
    rows5 = [r for r in _read_tsv(tmp_path / "all" / "tokens.tsv")[1] if r[0] == "5"]
    np.testing.assert_allclose([float(r[3]) for r in rows5], expected.numpy(), atol=1e-6)
    np.testing.assert_allclose([float(r[5]) for r in rows5], nll.numpy(), atol=1e-5)


def test_in_training_monitor_agrees_with_inspect(trained, noisy_bin, tmp_path):
    loaded = inspect_cmd.load_teacher_checkpoint(trained["with"], noisy_bin, use_cuda=False)
    loaded.task.load_dataset("train")
    cfg = loaded.task.cfg
    assert cfg.reweight_noise_sidecar.endswith("train.noise") and cfg.reweight_noise_auc_interval == 1
    monitor = NoiseAucMonitor(cfg, loaded.task)
    assert len(monitor.indices) == N_TRAIN  # fewer than MONITOR_MAX_SENTENCES: all of them
    loaded.model.train()
    rng = torch.get_rng_state()
    stats, new = monitor.update(loaded.driver, loaded.model, loaded.criterion, num_meta_updates=2)
    assert new and loaded.model.training and torch.equal(torch.get_rng_state(), rng)
    result = inspect_cmd.main([noisy_bin, "--path", trained["with"], "--out", str(tmp_path), "--cpu"])
    # the AUC ranks float32 sentence weights computed in batches of other shapes (round-off < 1e-6 each):
    # only a (noisy, clean) pair within 2e-6 can swap (3e-6 in weights.tsv, rounded to 6 decimals), each
    # moving the AUC by 1 / (noisy x clean)
    _, rows = _read_tsv(tmp_path / "weights.tsv")
    weight, is_noisy = np.array([float(r[3]) for r in rows]), np.array([r[1] == "1" for r in rows])
    near = int((np.abs(weight[is_noisy][:, None] - weight[~is_noisy][None, :]) <= 3e-6).sum())
    pairs = result["summary"].num_noisy * result["summary"].num_clean
    assert stats["noise_auc"] == pytest.approx(result["summary"].auc, abs=1e-12 + near / pairs)
    # float32 weights computed in batches of other shapes (300 vs 4096 tokens): round-off only
    assert stats["noise_w_noisy"] == pytest.approx(result["summary"].mean_weight_noisy, abs=1e-6)


def test_command_line_error_is_one_line(noisy_bin, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fairseq_reweight.cli.inspect_teacher", noisy_bin, "--path", str(tmp_path / "missing.pt")],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        f"fairseq-reweight: error: checkpoint '{tmp_path / 'missing.pt'}' not found: give --path a checkpoint_*.pt "
        "written by fairseq-train"
    )
    assert "Traceback" not in proc.stderr


def test_clear_errors(trained, noisy_bin, tmp_path):
    with pytest.raises(ReweightConfigError, match="checkpoint .*missing.pt' not found"):
        inspect_cmd.main([noisy_bin, "--path", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o")])
    short = tmp_path / "short.noise"
    short.write_text("0\n1\n")
    with pytest.raises(ReweightConfigError, match=f"has 2 lines but the split has {N_TRAIN} sentences"):
        inspect_cmd.main([noisy_bin, "--path", trained["with"], "--noise-sidecar", str(short), "--cpu",
                              "--out", str(tmp_path / "o")])
    run_train(noisy_bin, str(tmp_path / "none"), TRAIN[:-2] + ["--max-update", "1", "--reweight-teacher", "none"])
    with pytest.raises(ReweightConfigError, match="has no teacher .*--reweight-teacher none"):
        inspect_cmd.main([noisy_bin, "--path", str(tmp_path / "none" / "checkpoint_last.pt"), "--cpu",
                              "--out", str(tmp_path / "o")])
    with pytest.raises(ReweightConfigError, match=f"has 2 lines but the split has {N_TRAIN}"):  # at meta-update 1
        run_train(noisy_bin, str(tmp_path / "bad"), TRAIN[:-2] + ["--max-update", "4", "--reweight-noise-sidecar", str(short)])


# -- influence: which tokens the meta-objective asks to up-weight -------------------------------------
def test_influence_is_the_dot_product_of_the_two_gradients(trained, noisy_bin):
    from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss

    task, model, eps = influence_cmd.load_checkpoint(trained["without"], noisy_bin, use_cuda=False)
    assert eps == 0.1  # the checkpoint's --label-smoothing
    task.load_dataset("train")
    task.load_dataset("valid")
    pad = task.target_dictionary.pad()
    for valid_loss in ("criterion", "nll"):
        value, direction, tokens = influence_cmd.validation_gradient(
            task, model, "valid", eps, valid_loss, max_tokens=150, device=torch.device("cpu"))
        # by hand: the whole valid split in one batch, plain autograd
        valid = task.dataset("valid")
        sample = valid.collater([valid[i] for i in range(len(valid))])
        model.eval()
        lprobs = model.get_normalized_probs(model(**sample["net_input"]), log_probs=True)
        loss, nll = label_smoothed_nll_loss(lprobs.view(-1, lprobs.size(-1)), sample["target"].view(-1), eps,
                                            ignore_index=pad)
        objective = (loss if valid_loss == "criterion" else nll) / tokens
        assert tokens == int(sample["target"].ne(pad).sum())
        assert value == pytest.approx(objective.item(), rel=1e-5)
        params = dict(model.named_parameters())
        expected = torch.autograd.grad(objective, list(params.values()))
        for name, grad in zip(params, expected):
            torch.testing.assert_close(direction[name], grad, rtol=1e-4, atol=1e-7)

        dataset = task.dataset("train")
        result = influence_cmd.token_influence(model, dataset, [3, 17, 40], direction, eps, pad, max_tokens=4096,
                                               seed=0, num_special=task.target_dictionary.nspecial)
        assert sorted(set(result.ids.tolist())) == [3, 17, 40]
        for sentence_id in (3, 17):
            sample = dataset.collater([dataset[sentence_id]])
            lprobs = model.get_normalized_probs(model(**sample["net_input"]), log_probs=True)[0]
            token_loss, _ = label_smoothed_nll_loss(lprobs, sample["target"][0], eps, ignore_index=pad, reduce=False)
            token_loss = token_loss.squeeze(-1)
            rows = np.flatnonzero(result.ids == sentence_id)
            assert result.tokens[rows].tolist() == sample["target"][0].tolist()
            np.testing.assert_allclose(result.loss[rows], token_loss.detach().numpy(), rtol=1e-5)
            for position in (0, len(rows) - 1):
                grads = torch.autograd.grad(token_loss[position], list(params.values()), retain_graph=True)
                by_hand = sum(float((g * direction[n]).sum()) for n, g in zip(params, grads))
                assert result.influence[rows[position]] == pytest.approx(by_hand, rel=1e-4, abs=1e-9)


def test_influence_command_writes_tables_and_the_auc(noisy_bin, tmp_path, capsys):
    # a student without a teacher (the pretrained model of an experiment): the command needs no teacher
    run_train(noisy_bin, str(tmp_path / "student"), TRAIN[:-2] + ["--max-update", "40", "--reweight-teacher", "none"])
    out = tmp_path / "out"
    result = influence_cmd.main([noisy_bin, "--path", str(tmp_path / "student" / "checkpoint_last.pt"), "--cpu",
                                 "--out", str(out), "--max-sentences", "150", "--meta-valid-loss", "nll", "--by-layer"])
    printed = capsys.readouterr().out
    # --by-layer: the influence is linear in the direction, so the groups' shares add up to it
    by_layer = result["by_layer"]
    assert {"embeddings (shared)", "encoder layers", "decoder cross-attention", "decoder self-attention"} <= set(by_layer)
    np.testing.assert_allclose(sum(r.influence for r in by_layer.values()), result["result"].influence,
                               rtol=1e-4, atol=1e-7)
    assert "mean influence by parameter group" in printed
    total_row = next(line for line in printed.splitlines() if line.startswith("total "))
    assert float(total_row.split()[-1]) == pytest.approx(result["sentence_auc"], abs=1e-4)  # the groups' AUCs
    assert "validation objective: plain NLL on valid" in printed
    assert "ROC AUC of 'low influence => noisy pair'" in printed and "tokens of noisy pairs" in printed
    noisy = read_noise_sidecar(os.path.join(noisy_bin, "train.noise"))
    header, rows = _read_tsv(out / "sentences.tsv")
    assert header == ["id", "noisy", "n_tokens", "mean_loss", "mean_influence"]
    assert len(rows) == 150 and sum(int(r[1]) for r in rows) == 75  # balanced draw
    assert all(int(r[1]) == noisy[int(r[0])] for r in rows)
    token_header, token_rows = _read_tsv(out / "tokens.tsv")
    assert token_header == ["id", "position", "token", "noisy", "loss", "influence", "influence_random_label"]
    assert len(token_rows) == sum(int(r[2]) for r in rows) == result["num_tokens"]
    first = [r for r in token_rows if r[0] == rows[0][0]]
    assert float(rows[0][4]) == pytest.approx(np.mean([float(r[5]) for r in first]), rel=1e-4, abs=1e-9)
    sentence_influence = np.array([float(r[4]) for r in rows])
    assert result["sentence_auc"] == pytest.approx(
        roc_auc_low_weight_noisy(sentence_influence, np.array([int(r[1]) for r in rows])), abs=1e-4)
    # a student that has learned something: on the clean pairs its training labels lower the
    # validation NLL (the objective wants them), random words at the same positions raise it
    clean = [r for r in token_rows if r[3] == "0"]
    assert np.mean([float(r[5]) for r in clean]) > 0 > np.mean([float(r[6]) for r in clean])
    assert (out / "summary.txt").read_text().count("ROC AUC") == 1
    with pytest.raises(ReweightConfigError, match="checkpoint .*missing.pt' not found"):
        influence_cmd.main([noisy_bin, "--path", str(tmp_path / "missing.pt"), "--out", str(out)])
