"""Image path: CIFAR archives, label noise, students, the reweighted training command.

Archives are generated in the official python-pickle layout; models are tiny (depth 8, width 4);
gradient checks run in float64 against a plain unrolled autograd of the student's steps.
"""
import io
import logging
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from fairseq_reweight.core.errors import ReweightConfigError
from fairseq_reweight.core import RecordingSGD
from fairseq_reweight.vision.cifar import (
    corrupt_labels,
    load_cifar,
    noise_transition_matrix,
    random_crop_flip,
)
from fairseq_reweight.vision.digits import load_digits_splits
from fairseq_reweight.vision.resnet import CifarResNet, WideResNet, build_student
from fairseq_reweight.vision.reweight import (
    ExampleWeigher,
    StepData,
    student_loss,
    teacher_hypergradient,
)
from fairseq_reweight.vision.train import main

logging.getLogger("fairseq_reweight").setLevel(logging.WARNING)

LAYOUT = {  # folder, training members, test member, label key, meta member, meta key
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch",
                b"labels", "batches.meta", b"label_names"),
    "cifar100": ("cifar-100-python", ["train"], "test", b"fine_labels", "meta",
                 b"fine_label_names"),
}


def write_archive(directory, dataset, num_train, num_test, num_classes, seed=0):
    """An archive like the official one; images are a class-dependent colour plus noise."""
    folder, train_names, test_name, label_key, meta_name, meta_key = LAYOUT[dataset]
    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, size=(num_classes, 3))

    def images(labels):
        base = np.repeat(palette[labels], 1024, axis=1)  # N x 3072, channel-major like CIFAR
        return np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)

    train_labels = rng.integers(0, num_classes, num_train)
    test_labels = rng.integers(0, num_classes, num_test)
    members = {test_name: {b"data": images(test_labels), label_key: test_labels.tolist()}}
    train_images = images(train_labels)
    for name, idx in zip(train_names, np.array_split(np.arange(num_train), len(train_names))):
        members[name] = {b"data": train_images[idx], label_key: train_labels[idx].tolist(),
                         b"filenames": [f"{i}.png".encode() for i in idx]}
    members[meta_name] = {meta_key: [f"c{i}".encode() for i in range(num_classes)]}
    path = os.path.join(directory, f"{folder.split('-batches')[0].replace('-python', '')}"
                        "-python.tar.gz")
    with tarfile.open(path, "w:gz") as tar:
        for name, content in members.items():
            blob = pickle.dumps(content, protocol=2)
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path, train_images, train_labels


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on shared, busy cores more threads make these tiny models far slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cifar10_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cifar10")
    write_archive(str(directory), "cifar10", num_train=260, num_test=60, num_classes=10)
    return str(directory)


# --- data --------------------------------------------------------------------------------------


def test_archive_names_and_layout(tmp_path):
    path10, _, _ = write_archive(str(tmp_path), "cifar10", 50, 10, 10)
    path100, _, _ = write_archive(str(tmp_path), "cifar100", 50, 10, 100)
    assert os.path.basename(path10) == "cifar-10-python.tar.gz"
    assert os.path.basename(path100) == "cifar-100-python.tar.gz"


@pytest.mark.parametrize("dataset,classes", [("cifar10", 10), ("cifar100", 100)])
def test_load_split_and_noise_only_in_train(tmp_path, dataset, classes):
    _, images, labels = write_archive(str(tmp_path), dataset, 400, 30, classes)
    splits = load_cifar(str(tmp_path), dataset, "uniform", 0.8, valid_size=100, seed=3)
    assert splits.num_classes == classes
    assert splits.train_images.shape == (300, 3, 32, 32)
    assert splits.train_images.dtype == torch.uint8
    assert splits.valid_images.shape == (100, 3, 32, 32)
    assert splits.test_images.shape == (30, 3, 32, 32)
    # every image is in exactly one split, and valid labels are the archive's (clean) labels
    flat = images.reshape(400, 3, 32, 32)
    lookup = {flat[i].tobytes(): labels[i] for i in range(400)}
    valid = [lookup[x.numpy().tobytes()] for x in splits.valid_images]
    assert valid == splits.valid_labels.tolist()
    clean = [lookup[x.numpy().tobytes()] for x in splits.train_images]
    assert clean == splits.train_clean_labels.tolist()
    changed, p = (splits.train_labels != splits.train_clean_labels).double().mean(), 0.8 * (classes - 1) / classes
    assert abs(float(changed) - p) < 4 * np.sqrt(p * (1 - p) / 300)  # a uniform label (maybe the same) w.p. 0.8: 4 sd
    # the unpacked folder gives the same data
    with tarfile.open(os.path.join(str(tmp_path), os.listdir(str(tmp_path))[0])) as tar:
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.8.17
        tar.extractall(str(tmp_path / "unpacked"), **safe)
    again = load_cifar(str(tmp_path / "unpacked"), dataset, "uniform", 0.8, valid_size=100, seed=3)
    assert torch.equal(again.train_images, splits.train_images)
    assert torch.equal(again.train_labels, splits.train_labels)


def test_download_fetches_and_checks_the_archive(tmp_path, monkeypatch):
    import shutil
    import urllib.request

    from fairseq_reweight.vision import cifar

    source, _, _ = write_archive(str(tmp_path), "cifar10", 60, 10, 10)
    fetched = []

    def fake_urlretrieve(url, path):
        fetched.append(url)
        shutil.copy(source, path)

    monkeypatch.setattr(urllib.request, "urlretrieve", fake_urlretrieve)
    entry = list(cifar.ARCHIVES["cifar10"])
    entry[-1] = cifar._md5(source)
    monkeypatch.setitem(cifar.ARCHIVES, "cifar10", tuple(entry))
    splits = load_cifar(str(tmp_path / "new"), "cifar10", valid_size=10, download=True)
    assert fetched == ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"]
    assert len(splits.train_labels) == 50
    entry[-1] = "0" * 32
    monkeypatch.setitem(cifar.ARCHIVES, "cifar10", tuple(entry))
    with pytest.raises(ValueError, match="wrong md5"):
        load_cifar(str(tmp_path / "other"), "cifar10", valid_size=10, download=True)


def test_missing_archive_names_expected_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz.*data_batch_1.*--download"):
        load_cifar(str(tmp_path), "cifar10")


@pytest.mark.parametrize("kind,expected",
                         [("uniform", 0.4 * 9 / 10), ("flip", 0.4), ("flip2", 0.4)])
def test_noise_rates_and_structure(kind, expected):
    true = np.arange(50000) % 10
    noisy = corrupt_labels(true, kind, 0.4, 10, seed=7)
    changed = noisy != true
    # 4 binomial standard deviations
    assert abs(changed.mean() - expected) < 4 * np.sqrt(expected * (1 - expected) / len(true))
    targets_per_class = [len(np.unique(noisy[changed & (true == c)])) for c in range(10)]
    assert targets_per_class == [{"uniform": 9, "flip": 1, "flip2": 2}[kind]] * 10
    matrix = noise_transition_matrix(kind, 0.4, 10, seed=7)
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0)
    assert np.array_equal(noisy, corrupt_labels(true, kind, 0.4, 10, seed=7))
    assert not np.array_equal(noisy, corrupt_labels(true, kind, 0.4, 10, seed=8))


def test_noise_rejects_bad_options():
    with pytest.raises(ValueError, match="noise rate must be in"):
        noise_transition_matrix("flip", 1.5, 10, 0)
    with pytest.raises(ValueError, match="unknown noise"):
        noise_transition_matrix("pairflip", 0.4, 10, 0)


def test_digits_splits_share_the_test_set():
    a = load_digits_splits("flip", 0.4, valid_size=100, seed=1)
    b = load_digits_splits("flip", 0.4, valid_size=100, seed=2)
    assert a.train_images.shape == (1197, 1, 8, 8) and len(a.test_labels) == 500
    assert torch.equal(a.test_images, b.test_images)
    assert not torch.equal(a.train_labels, b.train_labels)
    assert abs(float((a.train_labels != a.train_clean_labels).double().mean()) - 0.4) < 4 * np.sqrt(0.24 / 1197)


def test_random_crop_flip_is_a_seeded_shift_or_mirror():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5)
    same = [random_crop_flip(x, 0, torch.Generator().manual_seed(s)) for s in range(8)]
    for out in same:
        for i in range(2):
            assert torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(-1))
    assert any(torch.equal(o[0], x[0]) for o in same)
    assert any(not torch.equal(o[0], x[0]) for o in same)
    a = random_crop_flip(x, 2, torch.Generator().manual_seed(1))
    assert torch.equal(a, random_crop_flip(x, 2, torch.Generator().manual_seed(1)))


# --- hypergradient plumbing ---------------------------------------------------------------------


def _unrolled_teacher_grad(model, weigher, records, val_x, val_y):
    """Plain autograd through the recorded steps from the oldest record's (theta, v)."""
    names = [n for n, _ in model.named_parameters()]
    theta = [p.clone().requires_grad_(True) for p in records[0].params]
    velocity = [v.clone() for v in records[0].momentum_buffers]
    for record in records:
        loss = student_loss(model, weigher, record.data, dict(zip(names, theta)), True)[0]
        grads = torch.autograd.grad(loss, theta, create_graph=True)
        velocity = [record.momentum * v + g + record.weight_decay * t
                    for v, g, t in zip(velocity, grads, theta)]
        theta = [t - record.lr * v for t, v in zip(theta, velocity)]
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    logits, _ = torch.func.functional_call(model, (dict(zip(names, theta)), buffers), (val_x,))
    val_loss = torch.nn.functional.cross_entropy(logits, val_y)
    return theta, torch.autograd.grad(val_loss, list(weigher.parameters()))


@pytest.mark.parametrize("arch", ["resnet", "wrn-dropout"])
def test_teacher_hypergradient_matches_unrolled_autograd(arch):
    torch.manual_seed(0)
    if arch == "resnet":
        model = CifarResNet(5, depth=8, width=4)
    else:
        model = WideResNet(5, depth=10, widen=1, dropout=0.3, width=4)
    model = model.double().train()
    weigher = ExampleWeigher("deep+surface", model.feature_dim, 5).double()
    for w in weigher.parameters():
        torch.nn.init.normal_(w, std=0.5)  # non-uniform weights
    optimizer = RecordingSGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3,
                             history_size=3, store_states=True)
    for step in range(4):
        data = StepData(torch.randn(6, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (6,)),
                        progress=step / 4, mean_train_loss=1.5, best_valid_acc=0.3)
        data.rng_state = torch.get_rng_state()
        loss, _, raw = student_loss(model, weigher, data)
        # a step draws fresh dropout masks (only replays restore the RNG)
        assert torch.equal(torch.get_rng_state(), data.rng_state) == (arch == "resnet")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        optimizer.history[-1].data = data
    assert raw.std() > 0.05
    running_mean = [b.clone() for b in model.buffers()]
    val_x, val_y = torch.randn(7, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (7,))
    torch.manual_seed(1)  # the validation forward pass draws dropout masks from the global RNG
    records = list(optimizer.history)[-3:]
    theta, expected = _unrolled_teacher_grad(model, weigher, records, val_x, val_y)
    for t, p in zip(theta, model.parameters()):  # the replay repeats the steps as taken
        torch.testing.assert_close(t, p, rtol=0, atol=1e-12)
    for mode in ("reverse", "checkpoint"):
        torch.manual_seed(1)
        _, grads = teacher_hypergradient(model, optimizer, weigher, val_x, val_y, 3, mode)
        for g, e in zip(grads, expected):
            torch.testing.assert_close(g, e, rtol=1e-7, atol=1e-12)
    assert any(float(e.abs().max()) > 1e-4 for e in expected)
    for before, after in zip(running_mean, model.buffers()):  # replays leave BN statistics alone
        assert torch.equal(before, after)


# --- the command --------------------------------------------------------------------------------

TINY = ["--depth", "8", "--width", "4", "--batch-size", "32", "--valid-size", "40",
        "--reweight-interval", "3", "--reweight-backprop-steps", "2", "--teacher-lr", "0.05",
        "--log-interval", "4", "--threads", "1", "--device", "cpu"]


def recomputed(data, save_dir, dataset, classes, noise, rate, teacher="deep"):
    """From the last checkpoint of a TINY run: the test error (%) and the ROC AUCs of "low weight => noisy" and
    "high loss => noisy" over the training split (all of it: up to 5000 scored), None without noisy labels."""
    state = torch.load(os.path.join(str(save_dir), "checkpoint_last.pt"))
    splits = load_cifar(str(data), dataset, noise, rate, valid_size=40, seed=1)
    model = build_student("resnet", classes, 3, depth=8, width=4)
    model.load_state_dict(state["model"])
    weigher = ExampleWeigher(teacher, model.feature_dim, classes)
    weigher.load_state_dict(state["teacher"])
    progress = state["progress"]  # the training state of the surface features, at the end of the run
    context = StepData(None, None, 1.0, progress["loss_sum"] / progress["loss_count"], progress["best_valid_acc"] / 100)
    with torch.no_grad():
        test_logits, _ = model.eval()(splits.normalize(splits.test_images))
        logits, features = model(splits.normalize(splits.train_images))
        losses = F.cross_entropy(logits, splits.train_labels, reduction="none")
        weights = weigher(features, logits, splits.train_labels, losses, context)
    error = 100.0 * float((test_logits.argmax(1) != splits.test_labels).double().mean())
    noisy = (splits.train_labels != splits.train_clean_labels).numpy()
    if not noisy.any():
        return error, None, None
    return error, roc_auc_score(noisy, -weights.numpy()), roc_auc_score(noisy, losses.numpy())


@pytest.mark.parametrize("noise", ["none", "uniform", "flip"])
def test_command_trains_with_each_noise_and_moves_the_teacher(cifar10_dir, tmp_path, noise):
    rate = ["--noise-rate", "0.4"] if noise != "none" else []
    results = main(["--data", cifar10_dir, "--noise", noise, *rate, "--epochs", "1",
                    "--save-dir", str(tmp_path), *TINY])
    assert results["steps"] == (260 - 40) // 32
    error, teacher_auc, loss_auc = recomputed(cifar10_dir, tmp_path, "cifar10", 10, noise, 0.4 * bool(rate))
    # the command's float32 logits and weights, from batches of the same shape: the same predictions and ranks
    assert results["test_error"] == pytest.approx(error, abs=1e-9)  # 100 - 100 * right / n vs 100 * wrong / n
    if noise == "none":
        assert results["teacher_auc"] is None and results["loss_auc"] is None and teacher_auc is None
    else:
        assert (results["teacher_auc"], results["loss_auc"]) == pytest.approx((teacher_auc, loss_auc), abs=1e-12)
    state = torch.load(os.path.join(str(tmp_path), "checkpoint_last.pt"))  # K = 3: 2 teacher steps in 6, from zero
    assert {int(s["step"]) for s in state["teacher_optimizer"]["state"].values()} == {2}
    assert all(state["teacher"][f"teacher.{name}.weight"].abs().max() > 0 for name in ("feature_proj", "label_embed"))


def test_command_cifar100_surface_teacher_checkpoint_mode(tmp_path):
    write_archive(str(tmp_path), "cifar100", 200, 40, 100)
    results = main(["--data", str(tmp_path), "--dataset", "cifar100", "--noise", "flip",
                    "--noise-rate", "0.4", "--teacher", "surface", "--history-mode",
                    "checkpoint", "--epochs", "1", "--save-dir", str(tmp_path / "run"), *TINY])
    error, teacher_auc, loss_auc = recomputed(tmp_path, tmp_path / "run", "cifar100", 100, "flip", 0.4, "surface")
    assert results["steps"] == (200 - 40) // 32 and results["test_error"] == pytest.approx(error, abs=1e-9)
    assert (results["teacher_auc"], results["loss_auc"]) == pytest.approx((teacher_auc, loss_auc), abs=1e-12)


def test_command_is_deterministic_and_resumes_exactly(cifar10_dir, tmp_path):
    args = ["--data", cifar10_dir, "--noise", "uniform", "--noise-rate", "0.4", *TINY,
            "--lr-steps", "1"]
    full = main([*args, "--epochs", "2", "--save-dir", str(tmp_path / "full")])
    again = main([*args, "--epochs", "2", "--save-dir", str(tmp_path / "again")])
    main([*args, "--epochs", "1", "--save-dir", str(tmp_path / "split")])
    resumed = main([*args, "--epochs", "2", "--save-dir", str(tmp_path / "split"), "--resume"])
    states = [torch.load(str(tmp_path / d / "checkpoint_last.pt"))
              for d in ("full", "again", "split")]
    for other in states[1:]:
        for key in ("model", "teacher"):
            for name, value in states[0][key].items():
                assert torch.equal(value, other[key][name]), (key, name)
    assert full == {**again, "seconds": full["seconds"]}
    assert {**resumed, "seconds": 0} == {**full, "seconds": 0}


def test_command_rejects_bad_options(cifar10_dir, tmp_path):
    with pytest.raises(ReweightConfigError, match="reweight-backprop-steps"):
        main(["--data", cifar10_dir, "--reweight-interval", "2", "--reweight-backprop-steps", "3"])
    with pytest.raises(ReweightConfigError, match="needs --noise-rate"):
        main(["--data", cifar10_dir, "--noise", "flip"])
    with pytest.raises(ReweightConfigError, match="--data DIR is required"):
        main(["--dataset", "cifar10"])
    main(["--data", cifar10_dir, "--epochs", "1", "--save-dir", str(tmp_path), *TINY])
    with pytest.raises(ReweightConfigError, match="other settings"):
        main(["--data", cifar10_dir, "--epochs", "2", "--save-dir", str(tmp_path), "--resume",
              "--seed", "2", *TINY])
