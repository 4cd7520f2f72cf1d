"""FreeLB's cost; its parity with the official FreeLB loop is in test_parity_classic.py."""

from __future__ import annotations

import pytest

import advfunc
from tests.support.method_harness import PassCounter
from tests.support.tiny_models import padded_batch, tiny_model


@pytest.mark.parametrize("target", ["embeds"])
@pytest.mark.parametrize("steps", [1, 3])
def test_freelb_cost_is_the_documented_passes(steps, target):
    """Forwards and backwards counted with hooks equal ``Step.passes``."""
    model = tiny_model("bert")
    step = advfunc.freelb(model, steps=steps)
    assert step.passes == steps and step.config["forward_only_passes"] == 0
    with PassCounter(model) as count:
        step(advfunc.params_of(model), padded_batch("bert"))
    assert count.forwards == step.passes
    assert count.backwards == step.passes
