"""Float32 drift of the reverse-mode hypergradient, and the memory of one reverse step.

mode="reverse" recovers theta_t, v_t by undoing the student's steps (dividing by the momentum);
mode="checkpoint" reads stored copies. This script trains a small MLP student (the paper's linear
teacher weighting each example) with momentum SGD in float32, then, for B = 1..max-steps, compares
the teacher gradient of both modes with each other and with float64 (checkpoint mode on the same
trajectory replayed in float64), and the reconstructed theta_{K-B} with the stored one. It then
measures one plain training step against one reverse step (B = 1): on CUDA the peak allocated
memory, on CPU the peak bytes of tensors saved for backward (parameters excluded), counted with
``torch.autograd.graph.saved_tensors_hooks``.

    python -m benchmarks.hypergrad_drift              # CPU
    python -m benchmarks.hypergrad_drift --device cuda
"""
import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from benchmarks.common import synchronize
from fairseq_reweight.core import HypergradOptions, RecordingSGD, StepRecord, reverse_hypergradient
from fairseq_reweight.core.teacher import Teacher, normalize_weights


class MLP(nn.Module):
    def __init__(self, in_dim, hidden_dim, num_classes):
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, hidden_dim), nn.ReLU()
        )
        self.head = nn.Linear(hidden_dim, num_classes)

    def forward(self, x):
        hidden = self.body(x)  # N x H
        return hidden, self.head(hidden)  # N x C


class Setup:
    """Student, teacher and data in one dtype; ``loss_fn``/``val_loss`` for the hypergradient."""

    def __init__(self, student, teacher, batches, val_batch, dtype, device):
        self.student = copy.deepcopy(student).to(device=device, dtype=dtype)
        self.teacher = copy.deepcopy(teacher).to(device=device, dtype=dtype)
        self.names = [name for name, _ in self.student.named_parameters()]
        cast = lambda b: (b[0].to(device=device, dtype=dtype), b[1].to(device))  # noqa: E731
        self.batches = [cast(b) for b in batches]
        self.val_batch = cast(val_batch)

    def forward(self, params, x):
        return functional_call(self.student, dict(zip(self.names, params)), (x,))

    def loss_fn(self, step, params):
        x, y = self.batches[step.data]
        hidden, logits = self.forward(params, x)
        weights = normalize_weights(self.teacher(hidden.detach(), y))
        return (weights * F.cross_entropy(logits, y, reduction="none")).mean()

    def val_grad(self, params):
        params = [p.detach().clone().requires_grad_(True) for p in params]
        x, y = self.val_batch
        return list(torch.autograd.grad(F.cross_entropy(self.forward(params, x)[1], y), params))


def make_optimizer(setup, lr, momentum, weight_decay, history_size, momentum_buffers=None):
    """RecordingSGD over the setup's student, optionally starting from given momentum buffers."""
    params = list(setup.student.parameters())
    optimizer = RecordingSGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                             history_size=history_size, store_states=True)
    for param, buffer in zip(params, momentum_buffers or ()):
        optimizer.state[param]["momentum_buffer"] = buffer.detach().to(param).clone()
    return optimizer


def train(setup, optimizer, first_step, num_steps):
    """Steps first_step .. first_step + num_steps - 1, each recording its batch index as data."""
    params = optimizer.student_params()
    for t in range(first_step, first_step + num_steps):
        optimizer.zero_grad()
        setup.loss_fn(StepRecord(lr=0.0, momentum=0.0, data=t), params).backward()

        def attach(record, t=t):
            record.data = t

        optimizer.step_callback = attach
        optimizer.step()
    setup.teacher.zero_grad(set_to_none=True)


def relative_error(actual, expected):
    actual = torch.cat([a.detach().double().reshape(-1) for a in actual])
    expected = torch.cat([e.detach().double().reshape(-1) for e in expected])
    return float((actual - expected).norm() / expected.norm())


class SavedTensorMeter:
    """Peak bytes of the storages saved for backward while active (parameters excluded)."""

    def __init__(self, exclude):
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.counts, self.current, self.peak = {}, 0, 0

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self.exclude or key == 0:
            return tensor
        return _Saved(self, key, storage.nbytes(), tensor)

    @staticmethod
    def unpack(packed):
        return packed.tensor if isinstance(packed, _Saved) else packed

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


class _Saved:
    def __init__(self, meter, key, nbytes, tensor):
        self.meter, self.key, self.nbytes, self.tensor = meter, key, nbytes, tensor
        if meter.counts.get(key, 0) == 0:
            meter.current += nbytes
            meter.peak = max(meter.peak, meter.current)
        meter.counts[key] = meter.counts.get(key, 0) + 1

    def __del__(self):
        self.meter.counts[self.key] -= 1
        if self.meter.counts[self.key] == 0:
            self.meter.current -= self.nbytes


def measure(fn, params, device, repeats=5):
    """(peak bytes, best seconds of ``repeats`` runs) of ``fn()``.

    Bytes: CUDA allocator peak above the start, or on CPU the peak of saved-for-backward tensors.
    """
    cuda, seconds = device.type == "cuda", []
    for _ in range(repeats):
        synchronize(cuda)
        start = time.perf_counter()
        fn()
        synchronize(cuda)
        seconds.append(time.perf_counter() - start)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start_bytes = torch.cuda.memory_allocated()
        fn()
        return torch.cuda.max_memory_allocated() - start_bytes, min(seconds)
    meter = SavedTensorMeter(params)
    with meter.hooks():
        fn()
    return meter.peak, min(seconds)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--max-steps", type=int, default=20, help="largest B (= K)")
    parser.add_argument("--warmup-steps", type=int, default=100, help="steps before the window")
    parser.add_argument("--in-dim", type=int, default=64, help="input features of the MLP student")
    parser.add_argument("--hidden-dim", type=int, default=128, help="its hidden width")
    parser.add_argument("--num-classes", type=int, default=10, help="its classes")
    parser.add_argument("--batch-size", type=int, default=128, help="examples per step")
    parser.add_argument("--lr", type=float, default=0.05, help="momentum SGD's learning rate")
    parser.add_argument("--momentum", type=float, default=0.9, help="its momentum (> 0: the steps are undone)")
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="its weight decay")
    parser.add_argument("--seed", type=int, default=0, help="the problem's and the data's seed")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(args.seed)

    centers = torch.randn(args.num_classes, args.in_dim)

    def batch(size):
        y = torch.randint(0, args.num_classes, (size,))
        return centers[y] + 2.0 * torch.randn(size, args.in_dim), y

    total = args.warmup_steps + args.max_steps
    batches = [batch(args.batch_size) for _ in range(total)]
    student = MLP(args.in_dim, args.hidden_dim, args.num_classes)
    teacher = Teacher(args.hidden_dim, args.num_classes)  # zero-initialised, as in the paper
    f32 = Setup(student, teacher, batches, batch(512), torch.float32, device)
    hyper = dict(lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    opt32 = make_optimizer(f32, history_size=args.max_steps, **hyper)
    train(f32, opt32, 0, args.warmup_steps)
    # float64 starts from the float32 state at the window's start and replays the same steps
    f64 = Setup(f32.student, f32.teacher, batches, f32.val_batch, torch.float64, device)
    opt64 = make_optimizer(f64, history_size=args.max_steps, momentum_buffers=opt32.momentum_buffers(), **hyper)
    train(f32, opt32, args.warmup_steps, args.max_steps)
    train(f64, opt64, args.warmup_steps, args.max_steps)
    theta32, theta64 = opt32.student_params(), opt64.student_params()
    val32, val64 = f32.val_grad(theta32), f64.val_grad(theta64)
    omega32, omega64 = list(f32.teacher.parameters()), list(f64.teacher.parameters())
    num_params = sum(p.numel() for p in theta32)
    print(f"MLP {args.in_dim}-{args.hidden_dim}-{args.hidden_dim}-{args.num_classes} ({num_params} params), "
          f"batch {args.batch_size}, lr {args.lr}, momentum {args.momentum}, weight decay "
          f"{args.weight_decay}, {args.warmup_steps} warm-up steps, device {device}")
    print("relative errors of the teacher gradient (float32 unless named) and of the reconstructed theta_{K-B}")
    print(f"{'B':>3} {'rev vs ckpt':>12} {'rev vs f64':>12} {'ckpt vs f64':>12} {'theta rev':>12} {'v rev':>12}")
    start = time.perf_counter()
    checkpoint = HypergradOptions(mode="checkpoint")
    for num_steps in range(1, args.max_steps + 1):
        window32, window64 = opt32.window(num_steps), opt64.window(num_steps)
        rev = reverse_hypergradient(theta32, opt32.momentum_buffers(), omega32, window32, f32.loss_fn, val32)
        ckpt = reverse_hypergradient(theta32, None, omega32, window32, f32.loss_fn, val32, checkpoint)
        exact = reverse_hypergradient(theta64, None, omega64, window64, f64.loss_fn, val64, checkpoint)
        theta_error = max(relative_error([a], [b]) for a, b in zip(rev.start_params, window32[0].params))
        v_error = relative_error(rev.start_momentum_buffers, window32[0].momentum_buffers)
        print(f"{num_steps:>3} {relative_error(rev.teacher_grad, ckpt.teacher_grad):12.2e} "
              f"{relative_error(rev.teacher_grad, exact.teacher_grad):12.2e} "
              f"{relative_error(ckpt.teacher_grad, exact.teacher_grad):12.2e} {theta_error:12.2e} {v_error:12.2e}")
    print(f"(sweep took {time.perf_counter() - start:.1f} s; theta: max over tensors of ||error|| / ||theta||)")

    window = opt32.window(1)
    leaves = [p.detach().clone().requires_grad_(True) for p in theta32]
    plain = lambda: torch.autograd.grad(f32.loss_fn(window[0], leaves), leaves)  # noqa: E731
    reverse = lambda: reverse_hypergradient(  # noqa: E731
        theta32, opt32.momentum_buffers(), omega32, window, f32.loss_fn, val32)
    for fn in (plain, reverse):  # warm up kernels and allocator
        fn()
    plain_bytes, plain_s = measure(plain, leaves + omega32, device)
    reverse_bytes, reverse_s = measure(reverse, theta32 + omega32, device)
    what = "peak allocated above start" if device.type == "cuda" else "peak saved-for-backward"
    print(f"one plain step  : {plain_bytes / 2**20:8.2f} MiB {what}, {plain_s * 1e3:7.1f} ms (best of 5)")
    print(f"one reverse step: {reverse_bytes / 2**20:8.2f} MiB {what}, {reverse_s * 1e3:7.1f} ms "
          f"(x{reverse_bytes / max(plain_bytes, 1):.2f} memory, x{reverse_s / plain_s:.2f} time)")
    print(f"parameters: {num_params * 4 / 2**20:.2f} MiB in float32")


if __name__ == "__main__":
    main()
