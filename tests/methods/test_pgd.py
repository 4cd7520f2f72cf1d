"""PGD's cost; its parity with the classic PGD class is in test_parity_classic.py."""

from __future__ import annotations

import pytest

import advfunc
from tests.support.method_harness import PassCounter
from tests.support.tiny_models import padded_batch, tiny_model


@pytest.mark.parametrize("target", ["weight", "embeds"])
@pytest.mark.parametrize("steps", [1, 3])
def test_pgd_cost_is_the_documented_passes(steps, target):
    """Forwards and backwards counted with hooks equal ``Step.passes`` (a δ-only pass counts as one)."""
    model = tiny_model("bert")
    step = advfunc.pgd(model, 0.5, 0.2, steps, target=target)
    assert step.passes == steps + 1 and step.config["forward_only_passes"] == 0
    with PassCounter(model) as count:
        step(advfunc.params_of(model), padded_batch("bert"))
    assert count.forwards == step.passes
    assert count.backwards == step.passes
