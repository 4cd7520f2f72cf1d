"""A model saved in half precision trains in float32: AdamW steps below bf16's resolution are not lost."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from advfunc.app.cli import main
from tests.support.tiny_task import save_tiny_model, sentences, write_csv


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_checkpoint_trains_every_weight(tmp_path, dtype):
    folder = save_tiny_model(tmp_path / "model")
    AutoModelForSequenceClassification.from_pretrained(folder).to(dtype).save_pretrained(folder)
    data = write_csv(tmp_path / "train.csv", sentences(32, seed=0))
    args = ["--threads", "1", "--no-progress", "train", "--model", str(folder), "--data", str(data)]
    assert main([*args, "--batch-size", "8", "--output", str(tmp_path / "out")]) == 0  # default lr 5e-5
    start = load_file(str(folder / "model.safetensors"))
    end = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert {value.dtype for value in end.values()} == {torch.float32}
    moved = sum(int((end[name] != start[name].float()).sum()) for name in start)
    total = sum(value.numel() for value in start.values())
    # In half precision only the weights whose update exceeds half a unit in the last place moved (12% in bf16).
    assert moved > 0.95 * total, f"{moved} of {total} weights moved"
