"""Token ids of a dtype an embedding cannot look up are refused by the batch check, naming the fix."""

from __future__ import annotations

import pytest
import torch

import advfunc
from tests.support.tiny_models import padded_batch, tiny_model


@pytest.mark.parametrize("dtype", [torch.int16, torch.int8, torch.uint8])
def test_narrow_integer_ids_are_refused_before_the_step(dtype):
    model = tiny_model("bert", num_labels=2)
    batch = padded_batch("bert", batch=2, length=6, num_labels=2)
    step = advfunc.fgm(model, epsilon=0.1, target="embeds", compile=False)
    with pytest.raises(ValueError, match=rf"input_ids.*torch.long or torch.int32, got {dtype}.*input_ids.long\(\)"):
        step(advfunc.params_of(model), dict(batch, input_ids=batch["input_ids"].to(dtype)))


def test_int32_ids_are_read_as_long_ones():
    model = tiny_model("bert", num_labels=2)
    batch = padded_batch("bert", batch=2, length=6, num_labels=2)
    step = advfunc.fgm(model, epsilon=0.1, target="embeds", compile=False)
    params = advfunc.params_of(model)
    wide, _ = step(params, batch)
    narrow, _ = step(params, dict(batch, input_ids=batch["input_ids"].int()))
    torch.testing.assert_close(narrow, wide, rtol=0, atol=0)
