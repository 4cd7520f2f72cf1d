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
import re

import pytest
import torch

import advfunc
from advfunc.hf.trainer import refuse_unsupported_sharding
from advfunc.methods.registry import build_step, parse_method
from tests.hf import accelerate_fsdp_worker as accelerate_worker
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


def one_process(case: str, device: str = "cpu") -> tuple[dict, dict, dict | None]:
    """(grads, parameters after one SGD step, the method's teacher after it) on the large batch, on the CPU."""
    model, prefix = model_for(case)
    model.to(device)
    target = model.get_base_model() if prefix else model
    step = advfunc.stateful(build_step(parse_method(worker.CASES[case]), target, compile=False))
    params = advfunc.params_of(target)
    state = step.init(params)
    batch = {k: v.to(device) for k, v in _collate(_examples()).items()}
    grads, _, state = step.update(params, batch, state)
    with torch.no_grad():
        updated = {n: p - worker.LR * grads[n] if n in grads else p for n, p in params.items()}
    state = step.after_update(state, copy.copy(updated))
    teacher = state.get("teacher")
    on_cpu = lambda d: None if d is None else {n: t.cpu() for n, t in d.items()}  # noqa: E731
    return on_cpu(grads), on_cpu(updated), on_cpu(teacher)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(worker.CASES))
def test_trainer_step_on_a_sharded_model_equals_one_process_on_the_large_batch(ranks, case):
    grads, updated, teacher = one_process(case)
    for rank, result in enumerate(ranks):
        record = result[case]
        assert record["world"] == WORLD
        assert record["sharded_grads"] and record["sharded_after"], "grads and parameters stay sharded"
        assert record["checkpointed"] == case.startswith("sft")
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


@pytest.fixture(scope="module")
def accelerate_ranks(tmp_path_factory):
    found = torch.cuda.device_count()
    if found < WORLD:
        pytest.skip(
            f"accelerate applies FSDP2 only on GPU backends (NCCL, one process per GPU): needs {WORLD} CUDA "
            f"devices, found {found}"
        )
    out = tmp_path_factory.mktemp("accelerate_fsdp_ranks")
    script = ROOT / "tests" / "hf" / "accelerate_fsdp_worker.py"
    run_torchrun(script, str(out), processes=WORLD, timeout_s=600)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.slow
@pytest.mark.parametrize("case", list(accelerate_worker.CASES))
def test_trainer_under_accelerate_fsdp2_trains_like_one_process(accelerate_ranks, case):
    """``trainer.train()`` with ``fsdp=True, fsdp_config={"version": 2}``: the optimizer step of the large batch.

    The oracle runs eager on the first GPU; the ranks' reductions run in another order, so
    the absolute tolerance is float32's on a GPU, the relative one the CPU test's.
    """
    grads, updated, _ = one_process(case, "cuda")
    for rank, result in enumerate(accelerate_ranks):
        record = result[case]
        assert record["fsdp2"] and record["sharded"] and record["world"] == WORLD
        assert sorted(record["grads"]) == sorted(grads)
        for name, value in grads.items():
            torch.testing.assert_close(record["grads"][name], value, rtol=1e-5, atol=1e-6, msg=f"rank {rank} {name}")
        for name, value in updated.items():
            torch.testing.assert_close(record["params"][name], value, rtol=1e-5, atol=1e-6, msg=f"rank {rank} {name}")


REFUSED = {
    "FSDP (v1)": ({"fsdp_version": 1}, {}, "fsdp_config={'version': 2}"),
    "FSDP's activation checkpointing": (
        {"fsdp_version": 2, "activation_checkpointing": True},
        {},
        "gradient_checkpointing=True",
    ),
    "CPU offload": ({"fsdp_version": 2, "cpu_offload": True}, {}, "leave cpu_offload off"),
    "fp16 under FSDP2": ({"fsdp_version": 2}, {"fp16": True}, "bf16=True"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_fsdp2_cannot_train_is_refused_naming_the_alternative(case):
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin_options, flags, alternative = REFUSED[case]
    plugin = FullyShardedDataParallelPlugin(**plugin_options)
    with pytest.raises(ValueError, match=re.escape(alternative)):
        refuse_unsupported_sharding(plugin, deepspeed=False, fp16=flags.get("fp16", False), sharded_model=False)


def test_fsdp2_and_a_sharded_model_in_bf16_or_fp32_are_not_refused():
    from accelerate.utils import FullyShardedDataParallelPlugin

    refuse_unsupported_sharding(
        FullyShardedDataParallelPlugin(fsdp_version=2), deepspeed=False, fp16=False, sharded_model=False
    )
    refuse_unsupported_sharding(None, deepspeed=False, fp16=False, sharded_model=True)
    with pytest.raises(ValueError, match="bf16=True"):
        refuse_unsupported_sharding(None, deepspeed=False, fp16=True, sharded_model=True)
    with pytest.raises(ValueError, match="FSDP2"):
        refuse_unsupported_sharding(None, deepspeed=True, fp16=False, sharded_model=False)
