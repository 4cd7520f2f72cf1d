"""The bridge between an ``nn.Module`` and advfunc's pure world of parameter dicts."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

Params = dict[str, torch.Tensor]


def params_of(model: nn.Module) -> Params:
    """``{name: tensor}`` of every parameter of ``model``, detached, sharing storage (no copy).

    The tensors have ``requires_grad=False``; advfunc differentiates with respect to
    fresh leaves of its own, so nothing here ever receives a ``.grad``. Tied
    parameters appear once, under their first name, as ``named_parameters`` gives them.
    """
    return {name: p.detach() for name, p in model.named_parameters()}


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the parameters with ``requires_grad=True``, in ``named_parameters`` order."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def set_grads(model: nn.Module, grads: Mapping[str, torch.Tensor], *, accumulate: bool = False) -> None:
    """Write ``grads`` into ``p.grad`` of the model's parameters, for ``torch.optim`` users.

    ``accumulate=False`` replaces each ``p.grad``; ``accumulate=True`` adds to it (gradient
    accumulation over micro-batches). Every name must be a parameter of ``model`` with the
    same shape; nothing is written unless all of them are.
    """
    parameters = dict(model.named_parameters())
    unknown = sorted(set(grads) - set(parameters))
    if unknown:
        raise ValueError(
            f"set_grads got names that are not parameters of the model: {unknown[:5]}"
            f"{' ...' if len(unknown) > 5 else ''}; pass the grads a step returned for this model"
        )
    for name, grad in grads.items():
        if grad.shape != parameters[name].shape:
            raise ValueError(
                f"grad for {name!r} has shape {tuple(grad.shape)}, the parameter has {tuple(parameters[name].shape)}"
            )
    for name, grad in grads.items():
        param = parameters[name]
        grad = grad.detach().to(dtype=param.dtype, device=param.device)
        if accumulate and param.grad is not None:
            param.grad = param.grad + grad
        else:
            param.grad = grad
