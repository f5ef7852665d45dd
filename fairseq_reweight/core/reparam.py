"""Evaluate a module at other parameter values, for ``loss_fn(step, params)``.

``torch.func.functional_call`` does this too, but (torch 2.13) it leaves a parameter that is shared
between modules under different attribute names untied after the call, e.g. fairseq's
``--share-all-embeddings`` output projection: the student would silently stop sharing its
embeddings. :func:`substitute_parameters` swaps every alias of each parameter and restores each
module's parameter dict exactly (same objects, same order).
"""
import contextlib
from typing import Dict, Iterator

from torch import Tensor, nn


@contextlib.contextmanager
def substitute_parameters(module: nn.Module, values: Dict[str, Tensor]) -> Iterator[None]:
    """Within the context, ``module`` computes with ``values[name]`` in place of each parameter.

    Args:
        module: the module (its submodules may share parameters and submodules).
        values: tensors keyed by the names of ``module.named_parameters()`` (one name per shared
            parameter, as that method gives); every alias of that parameter uses the tensor.
            Parameters not named keep their value.

    Raises:
        ValueError: a name that is not a parameter of ``module``, or a tensor of another shape.
    """
    params = dict(module.named_parameters())
    unknown = sorted(set(values) - set(params))
    if unknown:
        raise ValueError(f"not parameters of the module: {', '.join(unknown[:5])}")
    replacement = {}
    for name, value in values.items():
        if value.shape != params[name].shape:
            raise ValueError(f"{name}: shape {tuple(value.shape)} given for {tuple(params[name].shape)}")
        replacement[id(params[name])] = value
    saved = []  # (module, its original _parameters dict, the names made plain attributes)
    seen = set()
    try:
        for sub in module.modules():  # each module object once, shared ones included
            if id(sub) in seen:
                continue
            seen.add(id(sub))
            names = [n for n, p in sub._parameters.items() if p is not None and id(p) in replacement]
            if not names:
                continue
            saved.append((sub, dict(sub._parameters), names))
            for name in names:
                value = replacement[id(sub._parameters.pop(name))]
                object.__setattr__(sub, name, value)
        yield
    finally:
        for sub, original, names in reversed(saved):
            for name in names:
                sub.__dict__.pop(name, None)
            sub._parameters.clear()
            sub._parameters.update(original)
