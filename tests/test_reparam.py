"""substitute_parameters: evaluating a module at other parameters without breaking weight tying."""
import pytest
import torch
from torch import nn

from fairseq_reweight.core import substitute_parameters


class Tied(nn.Module):
    """fairseq's --share-all-embeddings shape: one embedding module under two names, and an output
    projection whose weight is the embedding's weight."""

    def __init__(self):
        super().__init__()
        self.encoder_embed = nn.Embedding(5, 3)
        self.decoder_embed = self.encoder_embed
        self.hidden = nn.Linear(3, 3)
        self.output = nn.Linear(3, 5, bias=False)
        self.output.weight = self.encoder_embed.weight

    def forward(self, tokens):
        return self.output(torch.tanh(self.hidden(self.decoder_embed(tokens)))).logsumexp(-1).sum()


def test_substitution_uses_the_values_everywhere_and_restores_the_tying():
    torch.manual_seed(0)
    model = Tied()
    before = list(model.named_parameters())
    values = {name: torch.randn_like(p, requires_grad=True) for name, p in before}
    tokens = torch.tensor([0, 3, 4])
    with substitute_parameters(model, values):
        loss = model(tokens)
    # the same function as a copy of the model holding those values
    reference = Tied()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            p.copy_(values[name])
    torch.testing.assert_close(loss, reference(tokens), rtol=0, atol=0)
    grads = torch.autograd.grad(loss, list(values.values()))
    ref_grads = torch.autograd.grad(reference(tokens), list(reference.parameters()))
    for g, r in zip(grads, ref_grads):  # the shared weight gets the sum over its uses
        torch.testing.assert_close(g, r)
    after = list(model.named_parameters())
    assert [n for n, _ in after] == [n for n, _ in before]
    assert all(a is b for (_, a), (_, b) in zip(after, before))
    assert model.output.weight is model.encoder_embed.weight and model.decoder_embed is model.encoder_embed


def test_restored_after_an_exception_and_bad_names_refused():
    model = Tied()
    before = list(model.parameters())
    with pytest.raises(RuntimeError):
        with substitute_parameters(model, {"hidden.bias": torch.zeros(3)}):
            raise RuntimeError("boom")
    assert list(model.parameters()) == before and all(a is b for a, b in zip(model.parameters(), before))
    with pytest.raises(ValueError, match="not parameters of the module: nope"):
        with substitute_parameters(model, {"nope": torch.zeros(1)}):
            pass
    with pytest.raises(ValueError, match="hidden.bias: shape"):
        with substitute_parameters(model, {"hidden.bias": torch.zeros(4)}):
            pass
