"""The command-line training loop's optimizer."""

from __future__ import annotations

from advfunc.app.classify.train import make_optimizer
from tests.support.tiny_models import tiny_model


def test_the_task_head_learns_at_its_own_rate_and_everything_else_at_lr():
    model = tiny_model("bert", num_labels=2)
    optimizer = make_optimizer(model, lr=2e-4, weight_decay=0.01, head_lr=1e-2)
    rate = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    decay = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    head = {id(p) for p in model.classifier.parameters()}
    assert {rate[i] for i in head} == {1e-2}
    assert {r for i, r in rate.items() if i not in head} == {2e-4}
    assert len(rate) == sum(1 for p in model.parameters() if p.requires_grad)
    assert decay[id(model.classifier.weight)] == 0.01 and decay[id(model.classifier.bias)] == 0.0
    same = make_optimizer(model, lr=2e-4, weight_decay=0.01)
    assert {group["lr"] for group in same.param_groups} == {2e-4}
