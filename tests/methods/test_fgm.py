"""FGM's cost; its parity with the classic FGM class is in test_parity_classic.py."""

from __future__ import annotations

import pytest

import advfunc
from tests.support.method_harness import PassCounter
from tests.support.tiny_models import padded_batch, tiny_model


@pytest.mark.parametrize("target", ["weight", "embeds"])
@pytest.mark.parametrize("steps", [1])
def test_fgm_cost_is_the_documented_passes(steps, target):
    """Forwards and backwards counted with hooks equal ``Step.passes``."""
    model = tiny_model("bert")
    step = advfunc.fgm(model, 0.5, target=target)
    assert step.passes == 2 and step.config["forward_only_passes"] == 0
    with PassCounter(model) as count:
        step(advfunc.params_of(model), padded_batch("bert"))
    assert count.forwards == step.passes
    assert count.backwards == step.passes
