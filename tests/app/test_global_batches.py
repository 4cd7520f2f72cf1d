"""Two processes of batch 8 train on the batches one process of batch 16 trains on: the same weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.distributed as dist
from safetensors.torch import load_file as load_safetensors

from tests.support.tiny_task import save_tiny_model, sentences, write_csv
from tests.support.torchrun import ROOT, run_torchrun

TIMEOUT_S = 240


def train_args(task: Path, out: Path, batch_size: int) -> list[str]:
    """``advfunc train`` on the task: 48 rows, two epochs of three global batches of 16."""
    args = [
        "--threads",
        "1",
        "--no-progress",
        "train",
        "--model",
        str(task / "model"),
        "--data",
        str(task / "train.csv"),
    ]
    args += ["--epochs", "2", "--batch-size", str(batch_size), "--lr", "3e-3", "--method", "none"]
    return [*args, "--output", str(out)]


@pytest.mark.slow
def test_two_processes_of_batch_8_match_one_process_of_batch_16(tmp_path):
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    from advfunc.app.cli import main

    task = tmp_path / "task"
    save_tiny_model(task / "model")
    # Lengths from 4 to 11 words, so that the length grouping decides which rows share a batch.
    write_csv(task / "train.csv", sentences(48, seed=0))
    run_torchrun(ROOT / "tests" / "app" / "global_batch_worker.py", str(task), str(tmp_path / "two"), processes=2,
                 timeout_s=TIMEOUT_S)  # fmt: skip
    assert main(train_args(task, tmp_path / "one", batch_size=16)) == 0

    start = load_safetensors(str(task / "model" / "model.safetensors"))
    one = load_safetensors(str(tmp_path / "one" / "model.safetensors"))
    two = load_safetensors(str(tmp_path / "two" / "model.safetensors"))
    assert one.keys() == two.keys()
    update = max(float((one[n] - start[n]).abs().max()) for n in start if n in one)
    assert update > 1e-3, "the run did not train"
    # The softmax over keys is invariant to the key bias: its true gradient is zero and AdamW
    # scales the rounding noise that stands for it up to steps of about lr, in either run.
    compared = [n for n in one if not n.endswith("attention.self.key.bias")]
    gap = max(float((one[n] - two[n]).abs().max()) for n in compared)
    assert gap < 1e-5, f"weights {gap:.2e} apart after an update of {update:.2e}"
    losses = [json.loads((tmp_path / run / "advfunc_state.json").read_text())["losses"] for run in ("one", "two")]
    assert len(losses[0]) == len(losses[1]) == 6
    assert all(abs(a - b) < 1e-5 for a, b in zip(*losses, strict=True)), losses
