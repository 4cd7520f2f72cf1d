"""The method registry: spec parsing, and every registered method driven through the training loop."""

from __future__ import annotations

import copy

import pytest
import torch

from advfunc.app.train import Loop, TrainConfig
from advfunc.methods import registry
from tests.tiny_models import padded_batch, tiny_model


def test_spec_parsing_and_labels():
    spec = registry.parse_method(" pgd : epsilon=0.5, steps=2 ")
    assert spec.name == "pgd" and spec.options == {"epsilon": 0.5, "steps": 2}
    assert isinstance(spec.options["steps"], int) and spec.label == "pgd(epsilon=0.5,steps=2)"
    assert registry.parse_method("fgm:target=embeds").options == {"target": "embeds"}
    assert registry.parse_method("none").label == "none"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nope", "unknown method 'nope'"),
        ("pgd:radius=1", "has no hyper-parameter 'radius'"),
        ("pgd:steps=two", "steps must be an integer"),
        ("pgd:epsilon", "is not key=value"),
        ("freelb:lr=fast", "lr must be a number"),
    ],
)
def test_bad_specs_name_the_problem(text, message):
    with pytest.raises(registry.MethodError, match=message):
        registry.parse_method(text)


def test_every_method_the_loop_offers_is_registered_with_its_driver():
    names = registry.available()
    assert {"none", "fgm", "pgd", "freelb"} <= set(names)
    for name in names:
        assert registry.METHODS[name].driver in registry.DRIVER_OPTIONS
        for hyper in registry.hyperparameters(name).values():
            assert hyper.kind in (bool, int, float, str)


# Small perturbations: the point is that each driver runs and trains, not robustness.
SPECS = {
    "none": "none",
    "fgm": "fgm:epsilon=0.1",
    "pgd": "pgd:epsilon=0.1,alpha=0.05,steps=2",
    "freelb": "freelb:steps=2,lr=0.01",
    "neftune": "neftune:alpha=5",
    "vat": "vat:epsilon=0.1",
    "r3f": "r3f",
    "awp": "awp",
    "smart": "smart:beta=0.9",
    "free_at": "free_at:replays=2",
}


# CAT and LAT train a causal LM on an adversary's completion (tests/test_cat.py, tests/test_lat.py).
@pytest.mark.parametrize("name", [n for n, m in registry.METHODS.items() if not m.batch_keys])
def test_each_method_trains_through_the_loop(name):
    model = tiny_model("bert", num_labels=2)
    start = copy.deepcopy(model)
    loop = Loop(model, TrainConfig(method=SPECS[name], lr=1e-2, warmup_ratio=0.0), total_units=3)
    losses = []
    for t in range(3):
        losses += loop.run([padded_batch("bert", batch=4, seed=t, num_labels=2)])
    expected_steps = 3 * (2 if name == "free_at" else 1)
    assert len(losses) == expected_steps and all(torch.isfinite(torch.tensor(losses)))
    assert loop.scheduler.last_epoch == expected_steps
    with torch.no_grad():
        moved = sum(float((p - q).abs().sum()) for p, q in zip(model.parameters(), start.parameters(), strict=True))
    assert moved > 0
