"""core.losses: the label-smoothed loss from the logits is fairseq's, and every derivative the
reverse loop takes of it (first, second, forward mode, forward-over-reverse) is autograd's of
fairseq's formulation; the criterion takes it from the logits only where that is the same loss."""
import pytest
import torch
from fairseq import options, tasks
from fairseq import utils as fairseq_utils
from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

from fairseq_helpers import REWEIGHT, TINY_TRANSFORMER
from fairseq_reweight.core import math_attention
from fairseq_reweight.core.losses import _SmoothedNLL, _SmoothedNLLGrad, smoothed_nll_from_logits
from fairseq_reweight.nmt import fairseq_contract as contract

PAD = 1


def _problem(dtype=torch.float64, n=9, vocab=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(n, vocab, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    target = torch.randint(0, vocab, (n,), generator=g)
    target[[2, 5]] = PAD
    return logits, target


def _fairseq(logits, target, epsilon):
    lprobs = torch.log_softmax(logits, -1)
    loss, nll = label_smoothed_nll_loss(lprobs, target.unsqueeze(-1), epsilon, ignore_index=PAD, reduce=False)
    return loss.view(-1), nll.view(-1)


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
def test_values_are_fairseqs_zero_on_padding(epsilon):
    logits, target = _problem()
    loss, nll = smoothed_nll_from_logits(logits, target, epsilon, PAD)
    ref_loss, ref_nll = _fairseq(logits, target, epsilon)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(nll, ref_nll, rtol=1e-14, atol=1e-14)
    assert loss[2] == 0 and loss[5] == 0 and not nll.requires_grad


def test_first_second_forward_and_forward_over_reverse_derivatives_are_exact():
    torch.manual_seed(0)  # the weights and grad_loss below
    logits, target = _problem()
    keep = target.ne(PAD).double()
    safe = target.masked_fill(target.eq(PAD), 0)
    weights = torch.rand(len(target), dtype=torch.float64)

    def weighted(z):
        return (_SmoothedNLL.apply(z, safe, keep, 0.1)[0] * weights).sum()

    assert torch.autograd.gradcheck(weighted, (logits,), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(weighted, (logits,), check_fwd_over_rev=True)
    grad_loss = torch.rand(len(target), dtype=torch.float64, requires_grad=True)

    def gradient(z, g):
        return _SmoothedNLLGrad.apply(z, safe, keep, 0.1, g)

    assert torch.autograd.gradcheck(gradient, (logits, grad_loss), check_forward_ad=True)
    # its backward under create_graph takes the out-of-place path: a third derivative
    assert torch.autograd.gradgradcheck(gradient, (logits, grad_loss))


def test_hessian_vector_product_matches_fairseqs_formulation():
    torch.manual_seed(0)  # the weights and the vector below
    logits, target = _problem()
    weights = torch.rand(len(target), dtype=torch.float64)
    vector = torch.randn_like(logits)
    results = []
    for loss_fn in (lambda z: smoothed_nll_from_logits(z, target, 0.1, PAD)[0], lambda z: _fairseq(z, target, 0.1)[0]):
        grad, = torch.autograd.grad((loss_fn(logits) * weights).sum(), logits, create_graph=True)
        hvp, = torch.autograd.grad((grad * vector).sum(), logits)
        results.append((grad.detach(), hvp))
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_half_and_float_logits_give_a_float32_loss_and_a_gradient_in_their_dtype(dtype):
    logits, target = _problem(dtype)
    loss = smoothed_nll_from_logits(logits, target, 0.1, PAD)[0]
    assert loss.dtype == torch.float32
    grad, = torch.autograd.grad(loss.sum(), logits)
    ref, = torch.autograd.grad(_fairseq(logits.float(), target, 0.1)[0].sum(), logits)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad, ref, rtol=1e-3, atol=1e-3)


def _setup(data, extra=()):
    args = options.parse_args_and_arch(options.get_training_parser(), [data] + TINY_TRANSFORMER + REWEIGHT
                                       + ["--lr", "0.01", "--momentum", "0.9", "--label-smoothing", "0.1"]
                                       + list(extra))
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    return task, task.build_model(cfg.model).double(), task.build_criterion(cfg.criterion).double()


@pytest.mark.parametrize("extra", [[], ["--ignore-prefix-size", "1", "--report-accuracy"]], ids=["plain", "prefix"])
def test_the_criterion_takes_the_same_loss_and_hessian_products_from_the_logits(tiny_data_bin, monkeypatch, extra):
    torch.manual_seed(0)  # the model's and the teacher's initialisation, and the vector below
    task, model, criterion = _setup(tiny_data_bin, ["--dropout", "0"] + extra)
    assert contract.logits_are_log_softmax_input(model)
    task.load_dataset("train")
    sample = next(iter(task.get_batch_iterator(task.dataset("train"), max_tokens=300).next_epoch_itr(shuffle=False)))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    vector = [torch.randn_like(p) for p in params]
    # fairseq's log-softmax in float64 too (it casts to float32), so that both agree to round-off
    monkeypatch.setattr(fairseq_utils, "log_softmax", lambda x, dim, onnx_trace=False: torch.log_softmax(x, dim))
    assert criterion.weight_fn is not None and criterion.loss_from_logits  # the deep teacher's criterion
    calls = []

    def counted(*args):
        calls.append(args)
        return smoothed_nll_from_logits(*args)

    monkeypatch.setattr("fairseq_reweight.nmt.criterion.smoothed_nll_from_logits", counted)
    results, correct = [], []
    for from_logits in (True, False):
        monkeypatch.setattr("fairseq_reweight.nmt.criterion.logits_are_log_softmax_input", lambda m: from_logits)
        with math_attention():  # the fused CPU kernel has no double backward
            loss, _, logging_output = criterion(model, sample)
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        dot = sum((g * v).sum() for g, v in zip(grads, vector) if g is not None)
        hvp = torch.autograd.grad(dot, params, allow_unused=True)
        results.append((loss.detach(), logging_output["nll_loss"], [g.detach() for g in grads if g is not None],
                        [h for h in hvp if h is not None]))
        correct.append(logging_output.get("n_correct"))
    assert len(calls) == 1  # the first pass took the loss from the logits, the second fairseq's way
    (loss, nll, grads, hvp), (ref_loss, ref_nll, ref_grads, ref_hvp) = results
    assert len(grads) == len(ref_grads) and len(hvp) == len(ref_hvp) > 0
    assert correct[0] == correct[1] and (correct[0] is not None) == ("--report-accuracy" in extra)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(nll, ref_nll, rtol=1e-12, atol=1e-12)
    for ours, ref in zip(grads + hvp, ref_grads + ref_hvp):
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)

