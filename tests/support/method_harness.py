"""Shared machinery of the method tests: a pass counter, a lockstep driver, a short real run."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch.utils._pytree import tree_leaves

import advfunc
from tests.support.parity import assert_grads_match
from tests.support.tiny_models import padded_batch, tiny_model

LR = 0.5  # SGD steps large enough that lockstep visits clearly different parameters
SHARP_LR = 0.005  # the same for a sharpened head; larger steps flatten its KL into round-off


class PassCounter:
    """Counts the model's forwards and the backwards that reach any tensor one of them computed.

    A forward hook on the model counts calls (``functional_call`` runs module hooks);
    hooks on its submodules collect every output that requires grad, and on each
    forward a multi-grad hook over those counts each backward that reaches any of them,
    once per backward: a loss read from the logits or from a hidden state (rerouting)
    alike. A forward-only pass (no_grad) or a forward whose graph is never
    differentiated adds a forward and no backward.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.forwards = 0
        self.backwards = 0
        self._seen: list[torch.Tensor] = []

    def __enter__(self) -> PassCounter:
        self.handles = [module.register_forward_hook(self._collect) for module in self.model.modules()]
        self.handles.append(self.model.register_forward_pre_hook(lambda module, args: self._seen.clear()))
        self.handles.append(self.model.register_forward_hook(self._forward))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()

    def _collect(self, module, args, output) -> None:
        self._seen.extend(t for t in tree_leaves(output) if isinstance(t, torch.Tensor) and t.requires_grad)

    def _forward(self, module, args, output) -> None:
        self.forwards += 1
        if self._seen:
            torch.autograd.graph.register_multi_grad_hook(list(self._seen), self._backward, mode="any")
        self._seen.clear()

    def _backward(self, grad: torch.Tensor) -> None:
        self.backwards += 1


SHARPEN = {"bert": 10.0, "gpt2": 3.0}


def sharpened(model: torch.nn.Module, factor: float = 10.0) -> torch.nn.Module:
    """``model`` with its classification head ``factor`` times its initial scale.

    A tiny random BERT's logits barely depend on its input (small head after a tanh
    pooler), so a KL between two of its forwards is a difference of nearly equal
    float32 numbers and its gradient is round-off. A sharper head makes the divergence
    methods' comparisons well conditioned; the equations are unchanged.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in ("classifier.weight", "score.weight"):
                p.mul_(factor)
    return model


def lockstep(
    family: str,
    reference: Callable[[torch.nn.Module, dict], dict],
    functional: Callable[[torch.nn.Module, dict], tuple[dict, object]],
    steps: int = 3,
    sharpen: bool = False,
) -> list:
    """Two copies of one model take ``steps`` SGD steps, one on each implementation's grads.

    ``reference(model, batch)`` returns the ``.grad`` dict it leaves; ``functional(model,
    batch)`` returns advfunc's ``(grads, out)``. Grads must agree at every step (tests/support/parity.py
    tolerances: whole-vector relative error <= 1e-4). ``sharpen`` uses :func:`sharpened`
    models (for the KL-based methods). Returns the ``out`` of each step.
    """
    ref_model = sharpened(tiny_model(family), SHARPEN[family]) if sharpen else tiny_model(family)
    func_model = copy.deepcopy(ref_model)
    lr = SHARP_LR if sharpen else LR
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=lr)
    func_opt = torch.optim.SGD(func_model.parameters(), lr=lr)
    outs = []
    for t in range(steps):
        batch = padded_batch(family, seed=t)
        expected = reference(ref_model, batch)
        grads, out = functional(func_model, batch)
        assert_grads_match(grads, expected, where=f"{family} step {t}")
        outs.append(out)
        for name, p in ref_model.named_parameters():
            if p.requires_grad:
                p.grad = expected[name]
        ref_opt.step()
        advfunc.set_grads(func_model, grads)
        func_opt.step()
    return outs


def short_run(
    make_step: Callable[[torch.nn.Module], Callable], steps: int = 12, lr: float = 3e-3
) -> tuple[float, float]:
    """Fine-tune a tiny random BERT with ``make_step(model)``'s grads and Adam on a fixed batch.

    ``make_step(model)`` returns ``train(params, batch) -> grads``. Returns the clean loss
    before and after, measured by the model itself.
    """
    model = tiny_model("bert", seed=3)
    batch = padded_batch("bert", batch=8, length=10, seed=11)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    train = make_step(model)
    with torch.no_grad():
        before = model(**batch).loss.item()
    for _ in range(steps):
        grads = train(advfunc.params_of(model), batch)
        advfunc.set_grads(model, grads)
        optimizer.step()
    with torch.no_grad():
        after = model(**batch).loss.item()
    return before, after
