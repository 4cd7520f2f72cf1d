"""``advfunc`` on two gloo processes under torchrun: one checkpoint folder, written once, resumed exactly; compare.

The ranks run tests/cli_distributed_worker.py under ``torch.distributed.run`` (tests/support/torchrun.py).
"""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file as load_safetensors

from advfunc.app.common import checkpoint
from tests.support.tiny_task import save_tiny_model, sentences, write_csv
from tests.support.torchrun import ROOT, run_torchrun

TIMEOUT_S = 240


@pytest.mark.slow
def test_two_processes_write_one_checkpoint_resume_it_exactly_and_compare(tmp_path):
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    task, out = tmp_path / "task", tmp_path / "out"
    save_tiny_model(task / "model")
    write_csv(task / "train.csv", sentences(48, seed=0))  # 6 batches of 8: 3 optimizer steps per epoch on 2 processes
    write_csv(task / "test.csv", sentences(16, seed=1))
    log = run_torchrun(
        ROOT / "tests" / "cli_distributed_worker.py", str(task), str(out), processes=2, timeout_s=TIMEOUT_S
    )

    # Process 0 writes each checkpoint and reports it; the other adds only its own random and method state.
    saves = re.findall(r"checkpoint at step (\d+) of 6 written to \S+/(\w+)", log)
    assert saves == [("3", "whole"), ("6", "whole"), ("3", "part"), ("4", "part"), ("6", "part")], log[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["part", "report", "swept", "whole"], "a temporary folder was left"
    files = sorted(p.name for p in (out / "whole").iterdir())
    assert [name for name in files if name.endswith(".safetensors")] == ["model.safetensors"]
    assert {"rng_state_0.pth", "rng_state_1.pth", "advfunc_method_0.pt", "advfunc_method_1.pt"} <= set(files)
    state = json.loads((out / "whole" / checkpoint.STATE_FILE).read_text())
    assert state["processes"] == 2 and state["finished"] and state["step"] == 6 and state["files"] == files

    start = load_safetensors(str(task / "model" / "model.safetensors"))
    whole = load_safetensors(str(out / "whole" / "model.safetensors"))
    resumed = load_safetensors(str(out / "part" / "model.safetensors"))
    assert max(float((whole[n] - start[n]).abs().max()) for n in start) > 1e-3, "the run did not train"
    for name, value in whole.items():
        assert torch.equal(resumed[name], value), f"{name} differs after resuming in the second epoch"

    # compare: every run trained on both processes (3 steps of 2 × 8, not 6 of 8), attacked and reported once
    # (each report once: this comparison's, then the sweep's and the comparison after it below)
    assert log.count("=== none, seed 0") == 2 and log.count("report: ") == 3, log[-3000:]
    document = json.loads((out / "report" / "results.json").read_text())
    assert [run["method"] for run in document["runs"]] == ["none", "fgm(epsilon=0.05)"]
    assert [run["train"]["total_steps"] for run in document["runs"]] == [3, 3]
    assert len(list((out / "report" / "runs").iterdir())) == 2  # one file per run, no temporary left

    # compare --sweep: both processes go on to the comparison with the winner the reporting one picked
    swept = json.loads((out / "swept" / "sweep" / "results.json").read_text())
    scores = {run["method"]: (run["eval"]["robust"]["0.1"], run["eval"]["clean_accuracy"]) for run in swept["runs"]}
    winner = max(scores, key=scores.__getitem__)
    document = json.loads((out / "swept" / "results.json").read_text())
    assert [run["method"] for run in document["runs"]] == ["none", winner], log[-3000:]
    assert log.count(f"sweep: {winner} is the most robust") == 1


def test_the_command_ends_the_process_group_a_launcher_made(tmp_path, capsys):
    """Left open to interpreter shutdown, gloo can abort the process after its work is saved."""
    import torch.distributed as dist

    from advfunc.app.cli import entry_point

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert entry_point(["methods"]) == 0
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
