"""Every method's state through the stateful protocol survives a checkpoint: the loaded state resumes the same step."""

from __future__ import annotations

import pytest
import torch

import advfunc
from tests.support.catalogue import CATALOGUE, seeded


@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_a_state_saved_and_loaded_with_weights_only_resumes_the_same_step(name, tmp_path):
    entry = CATALOGUE[name]
    model = entry.make_model()
    step = advfunc.stateful(entry.build(model))
    params, batch = advfunc.params_of(model), entry.make_batch()
    draws = {"generator": seeded(3)} if entry.seeded else {}
    grads, _, state = step.update(params, batch, step.init(params))
    moved = {n: p - 0.1 * grads[n] if n in grads else p for n, p in params.items()}  # an SGD step
    state = step.after_update(state, moved)
    torch.save(state, tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)
    expected, expected_out = entry.call(step, moved, batch, state, **draws)
    resumed, resumed_out = entry.call(step, moved, batch, loaded, **{k: seeded(3) for k in draws})
    assert list(resumed) == list(expected)
    for key, value in expected.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=0, msg=key)
    torch.testing.assert_close(resumed_out.loss, expected_out.loss, rtol=0, atol=0)
