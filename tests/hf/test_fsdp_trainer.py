"""``AdversarialTrainer`` on an FSDP2 (``fully_shard``) model: its step equals one process's on the large batch.

On CPU (2 gloo processes, tests/hf/fsdp_trainer_worker.py) the Trainer holds a model
sharded with ``fully_shard`` and its own ``training_step`` runs two accumulated
micro-batches per rank; accelerate turns FSDP on only for GPU backends, so the whole
``trainer.train()`` under accelerate's FSDP2 runs on two or more GPUs
(``test_trainer_under_accelerate_fsdp2_trains_like_one_process``). The oracle is the same
method's step on one unsharded model and one batch holding all four examples (uneven
completions, so the gradient is weighted per token), then one SGD step.
"""

from __future__ import annotations

import copy

import pytest
import torch

import advfunc
from advfunc.methods.registry import build_step, parse_method
from tests.hf import fsdp_trainer_worker as worker
from tests.hf.test_token_weighting import _collate, _examples
from tests.scale.fsdp_worker import model_for
from tests.support.torchrun import ROOT, run_torchrun

WORLD = 2


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_trainer_ranks")
    run_torchrun(ROOT / "tests" / "hf" / "fsdp_trainer_worker.py", str(out), processes=WORLD, timeout_s=300)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def one_process(case: str) -> tuple[dict, dict, dict | None]:
    """(grads, parameters after one SGD step, the method's teacher after it) on the large batch."""
    model, prefix = model_for(case)
    target = model.get_base_model() if prefix else model
    step = advfunc.stateful(build_step(parse_method(worker.CASES[case]), target))
    params = advfunc.params_of(target)
    state = step.init(params)
    grads, _, state = step.update(params, _collate(_examples()), state)
    with torch.no_grad():
        updated = {n: p - worker.LR * grads[n] if n in grads else p for n, p in params.items()}
    state = step.after_update(state, copy.copy(updated))
    return grads, updated, state.get("teacher")


@pytest.mark.slow
@pytest.mark.parametrize("case", list(worker.CASES))
def test_trainer_step_on_a_sharded_model_equals_one_process_on_the_large_batch(ranks, case):
    grads, updated, teacher = one_process(case)
    for rank, result in enumerate(ranks):
        record = result[case]
        assert record["world"] == WORLD
        assert record["sharded_grads"] and record["sharded_after"], "grads and parameters stay sharded"
        assert sorted(record["grads"]) == sorted(grads)
        for name, value in grads.items():
            torch.testing.assert_close(record["grads"][name], value, rtol=1e-5, atol=1e-7, msg=f"rank {rank} {name}")
        for name, value in updated.items():
            torch.testing.assert_close(record["params"][name], value, rtol=1e-5, atol=1e-7, msg=f"rank {rank} {name}")
        if teacher is None:
            assert record["teacher"] is None
        else:
            assert sorted(record["teacher"]) == sorted(teacher)
            for name, value in teacher.items():
                torch.testing.assert_close(record["teacher"][name], value, rtol=1e-5, atol=1e-7, msg=name)
